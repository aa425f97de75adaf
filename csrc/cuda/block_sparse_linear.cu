// capsparse: block-sparse linear kernels (forward, grad_input, grad_weight).
//
// Contract (docs/design.md): W is N x K (out x in), blocks bm x bk, R = N/bm, C = K/bk.
//   forward:     y[:, rows(r)]  = sum_{c kept in r} x[:, cols(c)] @ W[rows(r), cols(c)]^T (+ bias)
//   grad_input:  gx[:, cols(c)] = sum_{r kept in c} gy[:, rows(r)] @ W[rows(r), cols(c)]
//   grad_weight: gW[r, c]       = gy[:, rows(r)]^T @ x[:, cols(c)] for kept blocks, 0 elsewhere
// Kept blocks are read straight from the dense W at block coordinates (no packed copy).
//
// Tiling: every kernel is "load an A tile and a B tile into shared memory, multiply, repeat",
// with a register-staged double buffer (the next chunk is fetched from global memory while the
// current one is multiplied).  fp16/bf16 use tensor cores through WMMA (16x16x16, fp32
// accumulate); fp32 uses a SIMT FMA path (exact fp32, for parity).  Token counts that are not a
// multiple of the token tile are handled by zero-filling the missing rows and masking the stores.
//
// Only CUDA headers are used; the torch binding lives in binding_cuda.cpp.
#include "common.cuh"
#include <mma.h>

namespace capsparse_cuda {
namespace bsl {

template <typename T> struct KC { static constexpr int value = sizeof(T) == 2 ? 32 : 16; };
template <typename T> struct Pad { static constexpr int value = int(16 / sizeof(T)); };

// ---------------------------------------------------------------------------------------------
// Global -> register -> shared copies of a ROWS x COLS tile that is contiguous along COLS both in
// global and in shared memory.  Rows >= valid_rows are zero-filled (ragged token tiles).
template <typename T, int ROWS, int COLS, int NT, bool VEC>
struct TileLoader {
  static constexpr int V = VEC ? int(16 / sizeof(T)) : 1;
  typedef typename RawVec<V * int(sizeof(T))>::type Raw;
  static constexpr int VPR = COLS / V;
  static constexpr int NV = ROWS * VPR;
  static constexpr int PER = (NV + NT - 1) / NT;
  static_assert(COLS % V == 0, "tile width must be a multiple of the vector width");
  Raw r[PER];

  __device__ __forceinline__ void load(const T* __restrict__ src, long long ld, int valid_rows) {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int idx = int(threadIdx.x) + p * NT;
      if (NV % NT == 0 || idx < NV) {
        const int row = idx / VPR, col = (idx % VPR) * V;
        r[p] = row < valid_rows ? *reinterpret_cast<const Raw*>(src + row * ld + col) : raw_zero<Raw>();
      }
    }
  }
  __device__ __forceinline__ void store(T* dst, int lds) const {
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int idx = int(threadIdx.x) + p * NT;
      if (NV % NT == 0 || idx < NV) {
        const int row = idx / VPR, col = (idx % VPR) * V;
        *reinterpret_cast<Raw*>(dst + row * lds + col) = r[p];
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// MMA engines: C[TM x TN] += A[TM x KC] * B[KC x TN] from shared memory.
//   A_ROW: A stored as As[m * lda + k] (else As[k * lda + m]).
//   B_COL: B stored as Bs[n * ldb + k] (else Bs[k * ldb + n]).

// SIMT fp32 FMA engine (any storage type, converted to fp32 on read).
template <typename T, int TM, int TN, int KCH, int NT, int WM, int WN, bool A_ROW, bool B_COL>
struct SimtEngine {
  static constexpr int NTN = 16, NTM = NT / NTN;
  static constexpr int RM = TM / NTM, RN = TN / NTN;
  static_assert(TM % NTM == 0 && TN % NTN == 0, "bad SIMT tiling");
  float acc[RM][RN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = 0.f;
  }
  __device__ __forceinline__ void mma(const T* As, int lda, const T* Bs, int ldb) {
    const int tn = int(threadIdx.x) % NTN, tm = int(threadIdx.x) / NTN;
#pragma unroll 4
    for (int k = 0; k < KCH; ++k) {
      float a[RM], b[RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int m = tm + i * NTM;
        a[i] = Cvt<T>::to(A_ROW ? As[m * lda + k] : As[k * lda + m]);
      }
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int n = tn + j * NTN;
        b[j] = Cvt<T>::to(B_COL ? Bs[n * ldb + k] : Bs[k * ldb + n]);
      }
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs, int ldc) const {
    const int tn = int(threadIdx.x) % NTN, tm = int(threadIdx.x) / NTN;
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) Cs[(tm + i * NTM) * ldc + tn + j * NTN] = acc[i][j];
  }
};

template <bool ROW> struct WLayout { typedef nvcuda::wmma::row_major type; };
template <> struct WLayout<false> { typedef nvcuda::wmma::col_major type; };

// Tensor-core engine (WMMA 16x16x16, fp16/bf16 in, fp32 accumulate); WM x WN warps.
template <typename T, int TM, int TN, int KCH, int NT, int WM, int WN, bool A_ROW, bool B_COL>
struct WmmaEngine {
  static_assert(WM * WN * 32 == NT, "warp grid must cover the CTA");
  static constexpr int WTM = TM / WM, WTN = TN / WN;
  static constexpr int FM = WTM / 16, FN = WTN / 16;
  static_assert(FM >= 1 && FN >= 1 && WTM % 16 == 0 && WTN % 16 == 0 && KCH % 16 == 0, "bad WMMA tiling");
  typedef typename WLayout<A_ROW>::type ALay;
  typedef typename WLayout<!B_COL>::type BLay;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FM][FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ __forceinline__ void mma(const T* As, int lda, const T* Bs, int ldb) {
    using namespace nvcuda;
    const int warp = int(threadIdx.x) / 32;
    const int wm = warp / WN, wn = warp % WN;
#pragma unroll
    for (int kk = 0; kk < KCH; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALay> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLay> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = wm * WTM + i * 16;
        wmma::load_matrix_sync(a[i], A_ROW ? As + m * lda + kk : As + kk * lda + m, unsigned(lda));
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = wn * WTN + j * 16;
        wmma::load_matrix_sync(b[j], B_COL ? Bs + n * ldb + kk : Bs + kk * ldb + n, unsigned(ldb));
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs, int ldc) const {
    const int warp = int(threadIdx.x) / 32;
    const int wm = warp / WN, wn = warp % WN;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (wm * WTM + i * 16) * ldc + wn * WTN + j * 16, acc[i][j],
                                        unsigned(ldc), nvcuda::wmma::mem_row_major);
  }
};

// Tensor cores for fp16 (sm_70+) and bf16 (sm_80+); SIMT otherwise.
template <typename T> struct UseTC { static constexpr bool value = false; };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
template <> struct UseTC<__half> { static constexpr bool value = true; };
#endif
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <> struct UseTC<__nv_bfloat16> { static constexpr bool value = true; };
#endif

template <bool TC, typename T, int TM, int TN, int KCH, int NT, int WM, int WN, bool A_ROW, bool B_COL>
struct EngineSel { typedef SimtEngine<T, TM, TN, KCH, NT, WM, WN, A_ROW, B_COL> type; };
template <typename T, int TM, int TN, int KCH, int NT, int WM, int WN, bool A_ROW, bool B_COL>
struct EngineSel<true, T, TM, TN, KCH, NT, WM, WN, A_ROW, B_COL> {
  typedef WmmaEngine<T, TM, TN, KCH, NT, WM, WN, A_ROW, B_COL> type;
};

// ---------------------------------------------------------------------------------------------
// Epilogue: fp32 tile in shared memory -> dst (storage type), optional bias, masked rows.
template <typename T> struct Bits;
template <> struct Bits<float> { static __device__ __forceinline__ unsigned int get(float v) { return __float_as_uint(v); } };
template <> struct Bits<__half> { static __device__ __forceinline__ unsigned int get(__half v) { return __half_as_ushort(v); } };
template <> struct Bits<__nv_bfloat16> {
  static __device__ __forceinline__ unsigned int get(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
};

template <typename T, int TM, int TN, int NT, bool VEC>
__device__ __forceinline__ void write_tile(const float* Cs, int ldc, T* __restrict__ dst, long long ldd,
                                           int valid_rows, const T* __restrict__ bias) {
  constexpr int V = VEC ? int(16 / sizeof(T)) : 1;
  constexpr int VPR = TN / V;
  for (int idx = int(threadIdx.x); idx < TM * VPR; idx += NT) {
    const int row = idx / VPR, col = (idx % VPR) * V;
    if (row >= valid_rows) continue;
    if (V == 1) {
      float c = Cs[row * ldc + col];
      if (bias != nullptr) c += Cvt<T>::to(bias[col]);
      dst[row * ldd + col] = Cvt<T>::from(c);
    } else {
      unsigned int w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float c = Cs[row * ldc + col + e];
        if (bias != nullptr) c += Cvt<T>::to(bias[col + e]);
        const unsigned int b = Bits<T>::get(Cvt<T>::from(c));
        if (sizeof(T) == 4) w[e] = b;
        else w[e / 2] |= b << (16 * (e & 1));
      }
      *reinterpret_cast<uint4*>(dst + row * ldd + col) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Generic double-buffered main loop.  fetch(i) loads chunk i into the loaders' registers.
template <typename Eng, typename LA, typename LB, typename Fetch>
__device__ __forceinline__ void main_loop(Eng& eng, LA& la, LB& lb, Fetch fetch, int nchunks, unsigned char* smem,
                                          int a_elems, int stage_elems, int lda, int ldb) {
  typedef typename Eng::Elem T;
  T* sbuf = reinterpret_cast<T*>(smem);
  if (nchunks > 0) {
    fetch(0);
    la.store(sbuf, lda);
    lb.store(sbuf + a_elems, ldb);
  }
  __syncthreads();
  for (int i = 0; i < nchunks; ++i) {
    const T* cur = sbuf + (i & 1) * stage_elems;
    const bool more = i + 1 < nchunks;
    if (more) fetch(i + 1);
    eng.mma(cur, lda, cur + a_elems, ldb);
    if (more) {
      T* nxt = sbuf + ((i + 1) & 1) * stage_elems;
      la.store(nxt, lda);
      lb.store(nxt + a_elems, ldb);
    }
    __syncthreads();
  }
}

template <typename T, int TM, int TN, int NT, int WM, int WN, bool A_ROW, bool B_COL>
struct Engine : EngineSel<UseTC<T>::value, T, TM, TN, KC<T>::value, NT, WM, WN, A_ROW, B_COL>::type {
  typedef T Elem;
};

__host__ __device__ constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Forward over block-rows: CTA = (128-token tile, block-row r), output tile 128 x BM.
constexpr int FWD_TM = 128, FWD_NT = 256;

template <typename T, int BM, int BK, bool VEC>
__global__ void __launch_bounds__(FWD_NT)
bsl_forward_kernel(const T* __restrict__ x, long long ldx, const T* __restrict__ w, long long ldw,
                   const T* __restrict__ bias, T* __restrict__ y, long long ldy, const int* __restrict__ row_ptr,
                   const int* __restrict__ row_cols, int ntok) {
  constexpr int TM = FWD_TM, TN = BM, NT = FWD_NT, KCH = KC<T>::value, PAD = Pad<T>::value;
  constexpr int WN = TN / 32, WM = (NT / 32) / WN;
  constexpr int LDA = KCH + PAD, LDB = KCH + PAD, LDC = TN + 4;
  constexpr int A_EL = TM * LDA, B_EL = TN * LDB, STAGE = A_EL + B_EL;
  constexpr size_t BYTES = cmax(2 * size_t(STAGE) * sizeof(T), size_t(TM) * LDC * sizeof(float));
  __shared__ __align__(128) unsigned char smem[BYTES];

  const int r = int(blockIdx.y), t0 = int(blockIdx.x) * TM;
  const int valid = min(TM, ntok - t0);
  const int start = row_ptr[r];
  constexpr int CPB = BK / KCH;
  const int nchunks = (row_ptr[r + 1] - start) * CPB;
  const T* xt = x + (long long)t0 * ldx;
  const T* wr = w + (long long)r * BM * ldw;

  Engine<T, TM, TN, NT, WM, WN, true, true> eng;
  eng.zero();
  TileLoader<T, TM, KCH, NT, VEC> la;
  TileLoader<T, TN, KCH, NT, VEC> lb;
  auto fetch = [&](int i) {
    const int k = row_cols[start + i / CPB] * BK + (i % CPB) * KCH;
    la.load(xt + k, ldx, valid);
    lb.load(wr + k, ldw, TN);
  };
  main_loop(eng, la, lb, fetch, nchunks, smem, A_EL, STAGE, LDA, LDB);

  float* Cs = reinterpret_cast<float*>(smem);
  eng.store(Cs, LDC);
  __syncthreads();
  write_tile<T, TM, TN, NT, VEC>(Cs, LDC, y + (long long)t0 * ldy + (long long)r * BM, ldy, valid,
                                 bias != nullptr ? bias + (long long)r * BM : nullptr);
}

// grad_input over block-columns via col_ptr/col_rows: CTA = (128-token tile, block-column c).
template <typename T, int BM, int BK, bool VEC>
__global__ void __launch_bounds__(FWD_NT)
bsl_grad_input_kernel(const T* __restrict__ gy, long long ldgy, const T* __restrict__ w, long long ldw,
                      T* __restrict__ gx, long long ldgx, const int* __restrict__ col_ptr,
                      const int* __restrict__ col_rows, int ntok) {
  constexpr int TM = FWD_TM, TN = BK, NT = FWD_NT, KCH = KC<T>::value, PAD = Pad<T>::value;
  constexpr int WN = TN / 32, WM = (NT / 32) / WN;
  constexpr int LDA = KCH + PAD, LDB = TN + PAD, LDC = TN + 4;
  constexpr int A_EL = TM * LDA, B_EL = KCH * LDB, STAGE = A_EL + B_EL;
  constexpr size_t BYTES = cmax(2 * size_t(STAGE) * sizeof(T), size_t(TM) * LDC * sizeof(float));
  __shared__ __align__(128) unsigned char smem[BYTES];

  const int c = int(blockIdx.y), t0 = int(blockIdx.x) * TM;
  const int valid = min(TM, ntok - t0);
  const int start = col_ptr[c];
  constexpr int CPB = BM / KCH;
  const int nchunks = (col_ptr[c + 1] - start) * CPB;
  const T* gyt = gy + (long long)t0 * ldgy;
  const T* wc = w + (long long)c * BK;

  Engine<T, TM, TN, NT, WM, WN, true, false> eng;
  eng.zero();
  TileLoader<T, TM, KCH, NT, VEC> la;
  TileLoader<T, KCH, TN, NT, VEC> lb;
  auto fetch = [&](int i) {
    const int k = col_rows[start + i / CPB] * BM + (i % CPB) * KCH;  // row of W / column of gy
    la.load(gyt + k, ldgy, valid);
    lb.load(wc + (long long)k * ldw, ldw, KCH);
  };
  main_loop(eng, la, lb, fetch, nchunks, smem, A_EL, STAGE, LDA, LDB);

  float* Cs = reinterpret_cast<float*>(smem);
  eng.store(Cs, LDC);
  __syncthreads();
  write_tile<T, TM, TN, NT, VEC>(Cs, LDC, gx + (long long)t0 * ldgx + (long long)c * BK, ldgx, valid, nullptr);
}

// grad_weight on kept blocks only, split-K over tokens.  grid = (capacity R*C, nsplit); CTAs with
// blockIdx.x >= nnz exit at once (nnz stays on the device).  nsplit == 1: the block is written
// straight into grad_w; otherwise an fp32 partial goes to ws[split][j][BM*BK] and
// bsl_grad_weight_reduce sums the splits in a fixed order (deterministic).
constexpr int DW_NT = 128;

template <typename T, int BM, int BK, bool VEC>
__global__ void __launch_bounds__(DW_NT)
bsl_grad_weight_kernel(const T* __restrict__ gy, long long ldgy, const T* __restrict__ x, long long ldx,
                       T* __restrict__ gw, long long ldgw, float* __restrict__ ws, const int* __restrict__ block_rows,
                       const int* __restrict__ block_cols, const long long* __restrict__ nnz_ptr, int ntok,
                       int tokens_per_split, int capacity) {
  constexpr int TM = BM, TN = BK, NT = DW_NT, KCH = KC<T>::value, PAD = Pad<T>::value;
  constexpr int WM = 2, WN = 2;
  constexpr int LDA = TM + PAD, LDB = TN + PAD, LDC = TN + 4;
  constexpr int A_EL = KCH * LDA, B_EL = KCH * LDB, STAGE = A_EL + B_EL;
  constexpr size_t BYTES = cmax(2 * size_t(STAGE) * sizeof(T), size_t(TM) * LDC * sizeof(float));
  __shared__ __align__(128) unsigned char smem[BYTES];

  const int j = int(blockIdx.x);
  if ((long long)j >= *nnz_ptr) return;  // uniform across the CTA
  const int r = block_rows[j], c = block_cols[j];
  const int ts = int(blockIdx.y) * tokens_per_split;
  const int te = min(ntok, ts + tokens_per_split);
  const int nchunks = te > ts ? ceil_div(te - ts, KCH) : 0;
  const T* gyr = gy + (long long)r * BM;
  const T* xc = x + (long long)c * BK;

  Engine<T, TM, TN, NT, WM, WN, false, false> eng;
  eng.zero();
  TileLoader<T, KCH, TM, NT, VEC> la;
  TileLoader<T, KCH, TN, NT, VEC> lb;
  auto fetch = [&](int i) {
    const int t = ts + i * KCH;
    const int v = min(KCH, te - t);
    la.load(gyr + (long long)t * ldgy, ldgy, v);
    lb.load(xc + (long long)t * ldx, ldx, v);
  };
  main_loop(eng, la, lb, fetch, nchunks, smem, A_EL, STAGE, LDA, LDB);

  float* Cs = reinterpret_cast<float*>(smem);
  eng.store(Cs, LDC);
  __syncthreads();
  if (gridDim.y == 1) {
    write_tile<T, TM, TN, NT, VEC>(Cs, LDC, gw + (long long)r * BM * ldgw + (long long)c * BK, ldgw, TM, nullptr);
  } else {
    float* dst = ws + ((size_t)blockIdx.y * (size_t)capacity + (size_t)j) * (size_t)(BM * BK);
    for (int idx = int(threadIdx.x); idx < BM * BK / 4; idx += NT) {
      const int row = (idx * 4) / BK, col = (idx * 4) % BK;
      *reinterpret_cast<float4*>(dst + row * BK + col) = *reinterpret_cast<const float4*>(Cs + row * LDC + col);
    }
  }
}

template <typename T, int BM, int BK>
__global__ void __launch_bounds__(256)
bsl_grad_weight_reduce(const float* __restrict__ ws, T* __restrict__ gw, long long ldgw,
                       const int* __restrict__ block_rows, const int* __restrict__ block_cols,
                       const long long* __restrict__ nnz_ptr, int nsplit, int capacity) {
  const int j = int(blockIdx.x);
  if ((long long)j >= *nnz_ptr) return;
  const int r = block_rows[j], c = block_cols[j];
  const size_t split_stride = (size_t)capacity * (size_t)(BM * BK);
  const float* src = ws + (size_t)j * (size_t)(BM * BK);
  T* dst = gw + (long long)r * BM * ldgw + (long long)c * BK;
  for (int e = int(threadIdx.x); e < BM * BK; e += int(blockDim.x)) {
    float s = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) s += src[(size_t)sp * split_stride + (size_t)e];  // fixed order
    dst[(long long)(e / BK) * ldgw + (e % BK)] = Cvt<T>::from(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side dispatch helpers.
template <typename T>
inline bool vec_ok(const void* a, long long lda, const void* b, long long ldb, const void* c, long long ldc) {
  const long long V = 16 / (long long)sizeof(T);
  return aligned16(a) && aligned16(b) && aligned16(c) && lda % V == 0 && ldb % V == 0 && ldc % V == 0;
}

template <typename T, int B>
cudaError_t forward_t(const void* x, long long ldx, const void* w, long long ldw, const void* bias, void* y,
                      long long ldy, const int* row_ptr, const int* row_cols, int T_, int R, cudaStream_t s) {
  dim3 grid(ceil_div(T_, FWD_TM), R);
  const T* xp = static_cast<const T*>(x);
  const T* wp = static_cast<const T*>(w);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  if (vec_ok<T>(x, ldx, w, ldw, y, ldy))
    bsl_forward_kernel<T, B, B, true><<<grid, FWD_NT, 0, s>>>(xp, ldx, wp, ldw, bp, yp, ldy, row_ptr, row_cols, T_);
  else
    bsl_forward_kernel<T, B, B, false><<<grid, FWD_NT, 0, s>>>(xp, ldx, wp, ldw, bp, yp, ldy, row_ptr, row_cols, T_);
  return cudaGetLastError();
}

template <typename T, int B>
cudaError_t grad_input_t(const void* gy, long long ldgy, const void* w, long long ldw, void* gx, long long ldgx,
                         const int* col_ptr, const int* col_rows, int T_, int C, cudaStream_t s) {
  dim3 grid(ceil_div(T_, FWD_TM), C);
  const T* gyp = static_cast<const T*>(gy);
  const T* wp = static_cast<const T*>(w);
  T* gxp = static_cast<T*>(gx);
  if (vec_ok<T>(gy, ldgy, w, ldw, gx, ldgx))
    bsl_grad_input_kernel<T, B, B, true><<<grid, FWD_NT, 0, s>>>(gyp, ldgy, wp, ldw, gxp, ldgx, col_ptr, col_rows, T_);
  else
    bsl_grad_input_kernel<T, B, B, false><<<grid, FWD_NT, 0, s>>>(gyp, ldgy, wp, ldw, gxp, ldgx, col_ptr, col_rows, T_);
  return cudaGetLastError();
}

// Split-K policy for grad_weight: about one split per 512 tokens, at most 16, and the fp32
// workspace (nsplit * capacity * bm * bk * 4 bytes) kept under 96 MiB.
inline int dw_num_splits(int T_, int capacity, int bm, int bk) {
  long long n = (T_ + 511) / 512;
  if (n > 16) n = 16;
  const long long per_split = (long long)capacity * bm * bk * 4;
  const long long budget = 96ll << 20;
  if (per_split > 0 && n * per_split > budget) n = budget / per_split;
  return n < 1 ? 1 : int(n);
}

template <typename T, int B>
cudaError_t grad_weight_t(const void* gy, long long ldgy, const void* x, long long ldx, void* gw, long long ldgw,
                          const int* block_rows, const int* block_cols, const long long* nnz, int T_, int N, int K,
                          void* ws, size_t ws_bytes, cudaStream_t s) {
  const int capacity = (N / B) * (K / B);
  // Every entry outside the kept blocks must be exactly zero.
  cudaError_t err = cudaMemset2DAsync(gw, (size_t)ldgw * sizeof(T), 0, (size_t)K * sizeof(T), (size_t)N, s);
  if (err != cudaSuccess) return err;
  if (T_ == 0 || capacity == 0) return cudaSuccess;
  int nsplit = dw_num_splits(T_, capacity, B, B);
  const size_t need = (size_t)nsplit * (size_t)capacity * B * B * sizeof(float);
  if (nsplit > 1 && (ws == nullptr || ws_bytes < need || !aligned16(ws))) nsplit = 1;
  const int kch = KC<T>::value;
  const int tps = ceil_div(ceil_div(T_, nsplit), kch) * kch;
  dim3 grid(capacity, nsplit);
  const T* gyp = static_cast<const T*>(gy);
  const T* xp = static_cast<const T*>(x);
  T* gwp = static_cast<T*>(gw);
  float* wsp = static_cast<float*>(ws);
  if (vec_ok<T>(gy, ldgy, x, ldx, gw, ldgw))
    bsl_grad_weight_kernel<T, B, B, true><<<grid, DW_NT, 0, s>>>(gyp, ldgy, xp, ldx, gwp, ldgw, wsp, block_rows,
                                                                 block_cols, nnz, T_, tps, capacity);
  else
    bsl_grad_weight_kernel<T, B, B, false><<<grid, DW_NT, 0, s>>>(gyp, ldgy, xp, ldx, gwp, ldgw, wsp, block_rows,
                                                                  block_cols, nnz, T_, tps, capacity);
  err = cudaGetLastError();
  if (err != cudaSuccess || nsplit == 1) return err;
  bsl_grad_weight_reduce<T, B, B><<<capacity, 256, 0, s>>>(wsp, gwp, ldgw, block_rows, block_cols, nnz, nsplit, capacity);
  return cudaGetLastError();
}

inline bool shape_ok(int T_, int N, int K, int bm, int bk) {
  return T_ >= 0 && N >= 0 && K >= 0 && bm == bk && (bm == 32 || bm == 64) && N % bm == 0 && K % bk == 0;
}

}  // namespace bsl
}  // namespace capsparse_cuda

using namespace capsparse_cuda;

#define CAPSPARSE_DISPATCH(DTYPE, B, FN, ...)                                              \
  do {                                                                                     \
    if ((B) == 32) {                                                                       \
      if ((DTYPE) == kF32) return FN<float, 32>(__VA_ARGS__);                              \
      if ((DTYPE) == kF16) return FN<__half, 32>(__VA_ARGS__);                             \
      if ((DTYPE) == kBF16) return FN<__nv_bfloat16, 32>(__VA_ARGS__);                     \
    } else if ((B) == 64) {                                                                \
      if ((DTYPE) == kF32) return FN<float, 64>(__VA_ARGS__);                              \
      if ((DTYPE) == kF16) return FN<__half, 64>(__VA_ARGS__);                             \
      if ((DTYPE) == kBF16) return FN<__nv_bfloat16, 64>(__VA_ARGS__);                     \
    }                                                                                      \
    return cudaErrorInvalidValue;                                                          \
  } while (0)

// All launchers: dtype 0/1/2 = fp32/fp16/bf16; 2-D row-major operands with the given leading
// dimensions (unit column stride); only bm == bk in {32, 64}.  Asynchronous on `stream`.

// y[T,N] = blocksparse(x[T,K] @ W[N,K]^T) (+ bias[N], may be NULL).
extern "C" cudaError_t capsparse_bsl_forward(int dtype, const void* x, long long ldx, const void* w, long long ldw,
                                             const void* bias, void* y, long long ldy, const int* row_ptr,
                                             const int* row_cols, int T, int N, int K, int bm, int bk,
                                             cudaStream_t stream) {
  if (!bsl::shape_ok(T, N, K, bm, bk)) return cudaErrorInvalidValue;
  if (T == 0 || N == 0) return cudaSuccess;
  if (K == 0) {  // no blocks at all: y = bias or 0
    if (bias != nullptr) return cudaErrorInvalidValue;  // callers add the bias themselves in this degenerate case
    const size_t es = dtype == kF32 ? 4 : 2;
    return cudaMemset2DAsync(y, (size_t)ldy * es, 0, (size_t)N * es, (size_t)T, stream);
  }
  CAPSPARSE_DISPATCH(dtype, bm, bsl::forward_t, x, ldx, w, ldw, bias, y, ldy, row_ptr, row_cols, T, N / bm, stream);
}

// grad_x[T,K] = blocksparse(grad_y[T,N] @ W[N,K]) over block-columns (col_ptr / col_rows).
extern "C" cudaError_t capsparse_bsl_grad_input(int dtype, const void* grad_y, long long ldgy, const void* w,
                                                long long ldw, void* grad_x, long long ldgx, const int* col_ptr,
                                                const int* col_rows, int T, int N, int K, int bm, int bk,
                                                cudaStream_t stream) {
  if (!bsl::shape_ok(T, N, K, bm, bk)) return cudaErrorInvalidValue;
  if (T == 0 || K == 0) return cudaSuccess;
  if (N == 0) {
    const size_t es = dtype == kF32 ? 4 : 2;
    return cudaMemset2DAsync(grad_x, (size_t)ldgx * es, 0, (size_t)K * es, (size_t)T, stream);
  }
  CAPSPARSE_DISPATCH(dtype, bm, bsl::grad_input_t, grad_y, ldgy, w, ldw, grad_x, ldgx, col_ptr, col_rows, T, K / bk,
                     stream);
}

// Workspace (bytes) that capsparse_bsl_grad_weight wants for split-K (0: no split).
extern "C" size_t capsparse_bsl_grad_weight_workspace_bytes(int T, int N, int K, int bm, int bk) {
  if (!bsl::shape_ok(T, N, K, bm, bk) || T == 0 || N == 0 || K == 0) return 0;
  const int capacity = (N / bm) * (K / bk);
  const int nsplit = bsl::dw_num_splits(T, capacity, bm, bk);
  return nsplit > 1 ? (size_t)nsplit * (size_t)capacity * (size_t)bm * (size_t)bk * sizeof(float) : 0;
}

// grad_w[N,K]: kept blocks = grad_y[:, rows]^T @ x[:, cols]; every other entry set to 0.
// nnz is a device pointer (int64); the grid is sized to the capacity R*C.
// workspace: fp32 scratch of capsparse_bsl_grad_weight_workspace_bytes() bytes (16-byte aligned),
// or NULL / too small to run without split-K.
extern "C" cudaError_t capsparse_bsl_grad_weight(int dtype, const void* grad_y, long long ldgy, const void* x,
                                                 long long ldx, void* grad_w, long long ldgw, const int* block_rows,
                                                 const int* block_cols, const long long* nnz, int T, int N, int K,
                                                 int bm, int bk, void* workspace, size_t workspace_bytes,
                                                 cudaStream_t stream) {
  if (!bsl::shape_ok(T, N, K, bm, bk)) return cudaErrorInvalidValue;
  if (N == 0 || K == 0) return cudaSuccess;
  CAPSPARSE_DISPATCH(dtype, bm, bsl::grad_weight_t, grad_y, ldgy, x, ldx, grad_w, ldgw, block_rows, block_cols, nnz,
                     T, N, K, workspace, workspace_bytes, stream);
}
