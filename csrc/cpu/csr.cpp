// Element-sparse (CSR) linear for inference: y[T, N] = x[T, K] @ W^T (+ bias), W in CSR with fp32 values.
//
// Work items are (token tile of TT tokens) x (group of output rows). For a tile, x is transposed once
// into xt[K][TT] (fp32, zero-padded; in column chunks of kXtBytes, so that a chunk stays in L1), so each kept
// weight w[n, k] costs TT/VW fused multiply-adds on a contiguous row of xt:
// acc[0:TT] += w[n, k] * xt[k, 0:TT], for RR rows at a time. Where each row's kept weights cross into the
// next chunk is found once per call. The rows' sums are written back transposed, 16 rows at a time
// (8 x 8 register transposes on AVX2/AVX-512). Each output element is summed by one thread in CSR order,
// so results depend neither on the number of threads nor on the tile, chunk or RR.
// bf16 / fp16 inputs are converted to fp32 in the transpose and the output is rounded back.
#include "common.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

namespace capsparse {
namespace {

constexpr int RG = 16;          // output rows per group (the unit of the transposed write-back)
// Tuning (set_csr_tile; 0 = automatic): tokens per tile TT (TT / VW accumulators per output row), rows
// advanced together, and bytes of transposed tile per column chunk.
// AVX2 builds keep what was measured on the AMD machine (one thread, 10% density, the default model's shapes
// 384 -> 1536, 1536 -> 384, 384 -> 384, T = 128 / 1024 / 4096): TT 64 and 48 KB chunks (5-20% faster than
// 160 KB). AVX-512 builds on an Intel Xeon (2 threads, same shapes and density): every kept weight loads
// TT * 4 bytes of the chunk for TT / 16 multiply-adds, so the chunk has to stay in L1: TT 32, 24 KB chunks
// and two rows at a time were 1.1-1.35x faster than TT 64 / 48 KB / one row (2.1-2.4x dense instead of 1.7-2.0x).
static int64_t g_csr_tile = 0;
static int64_t g_csr_rows = 0;
static int64_t g_csr_chunk = 0;
#if defined(__AVX512F__)
constexpr int64_t kTile = 32, kRows = 2, kXtBytes = 24 << 10;
#else
constexpr int64_t kTile = 64, kRows = 1, kXtBytes = 48 << 10;
#endif

int csr_threads() { return std::max(1, at::get_num_threads()); }

template <typename in_t>
inline float to_f32(in_t v) { return static_cast<float>(v); }

// xt[(k - k0) * TT + i] = x[(t0 + i) * K + k] for k in [k0, k1), i < mt; 0 for mt <= i < TT
template <int TT, typename in_t>
void transpose_tile(const in_t* x, int64_t K, int64_t t0, int64_t mt, int64_t k0, int64_t k1, float* xt) {
  if (mt < TT) std::memset(xt, 0, sizeof(float) * (k1 - k0) * TT);
  constexpr int64_t KB = 64;  // k-chunk: keeps the TT source rows' chunks in L1
  for (int64_t kb = k0; kb < k1; kb += KB) {
    const int64_t ke = std::min(k1, kb + KB);
    for (int64_t i = 0; i < mt; ++i) {
      const in_t* src = x + (t0 + i) * K;
      for (int64_t k = kb; k < ke; ++k) xt[(k - k0) * TT + i] = to_f32(src[k]);
    }
  }
}

// rows [n0, n0 + nr) of the tile, the kept weights with columns in chunk c = [k0, k1): positions
// bounds[n * nb1 + c] to bounds[n * nb1 + c + 1] of row n:
// buf[r * TT + i] (+)= sum_p val[p] * xt[(col[p] - k0) * TT + i], starting from the bias on the first chunk.
// RR rows advance together, one kept weight of each per step: RR * TT / VW independent accumulator chains
// hide the fused multiply-add latency (one row's TT / VW chains alone wait on it). Each output element still
// sums its row's kept weights in CSR order.
template <int TT, int RR>
inline void rows_tile(const float* xt, const int32_t* ci, const float* val, const float* bias,
                      int64_t n0, int64_t nr, int64_t k0, const int32_t* bounds, int64_t nb1, int64_t c,
                      float* buf) {
  const bool first = c == 0;
  constexpr int NA = TT / VW;
  int64_t r = 0;
  auto run = [&](auto rows_c) {
    constexpr int R = decltype(rows_c)::value;
    vf acc[R][NA];
    int32_t p[R], e[R];
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      const int64_t n = n0 + r + j;
      if (first) {
        const vf b = bias ? vbcast(bias + n) : vzero();
#pragma GCC unroll 16
        for (int a = 0; a < NA; ++a) acc[j][a] = b;
      } else {
#pragma GCC unroll 16
        for (int a = 0; a < NA; ++a) acc[j][a] = vload(buf + (r + j) * TT + a * VW);
      }
      p[j] = bounds[n * nb1 + c];
      e[j] = bounds[n * nb1 + c + 1];
    }
    auto add = [&](vf* row_acc, int32_t q) {  // row_acc[0:TT] += val[q] * xt[col[q] - k0, 0:TT]
      const vf w = vbcast(val + q);
      const float* xr = xt + ((int64_t)ci[q] - k0) * TT;
#pragma GCC unroll 16
      for (int a = 0; a < NA; ++a) row_acc[a] = vfma(w, vload(xr + a * VW), row_acc[a]);
    };
    int32_t common = e[0] - p[0];
#pragma GCC unroll 4
    for (int j = 1; j < R; ++j) common = std::min(common, e[j] - p[j]);
    for (int32_t s = 0; s < common; ++s) {
#pragma GCC unroll 4
      for (int j = 0; j < R; ++j) add(acc[j], p[j] + s);
    }
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      for (int32_t q = p[j] + common; q < e[j]; ++q) add(acc[j], q);
#pragma GCC unroll 16
      for (int a = 0; a < NA; ++a) vstore(buf + (r + j) * TT + a * VW, acc[j][a]);
    }
  };
  for (; r + RR <= nr; r += RR) run(std::integral_constant<int, RR>());
  for (; r < nr; ++r) run(std::integral_constant<int, 1>());
}

#if defined(__AVX2__)
// dst[i * ld + r] = src[r * TT + i] for an 8 x 8 block
template <int TT>
inline void transpose8(const float* src, float* dst, int64_t ld) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * TT), r1 = _mm256_loadu_ps(src + 1 * TT);
  __m256 r2 = _mm256_loadu_ps(src + 2 * TT), r3 = _mm256_loadu_ps(src + 3 * TT);
  __m256 r4 = _mm256_loadu_ps(src + 4 * TT), r5 = _mm256_loadu_ps(src + 5 * TT);
  __m256 r6 = _mm256_loadu_ps(src + 6 * TT), r7 = _mm256_loadu_ps(src + 7 * TT);
  transpose8x8_store(r0, r1, r2, r3, r4, r5, r6, r7, dst, ld);
}
#endif

// y[(t0 + i) * N + n0 + r] = buf[r * TT + i] for i < mt, r < nr
template <int TT>
void write_back(const float* buf, int64_t mt, int64_t nr, float* y, int64_t N, int64_t t0, int64_t n0) {
  float* base = y + t0 * N + n0;
  int64_t i0 = 0;
#if defined(__AVX2__)
  if (nr == RG) {
    for (; i0 + 8 <= mt; i0 += 8)
      for (int64_t r0 = 0; r0 < RG; r0 += 8) transpose8<TT>(buf + r0 * TT + i0, base + i0 * N + r0, N);
  }
#endif
  for (int64_t i = i0; i < mt; ++i)
    for (int64_t r = 0; r < nr; ++r) base[i * N + r] = buf[r * TT + i];
}

template <int TT, int RR, typename in_t>
void csr_run(const in_t* x, int64_t T, int64_t K, const int32_t* rp, const int32_t* ci, const float* val,
             const float* bias, int64_t N, float* y) {
  const int64_t ntiles = (T + TT - 1) / TT;
  const int64_t nnz = rp[N];
  const double work = 2.0 * (double)std::max<int64_t>(T, 1) * (double)nnz + (double)T * (double)(K + N);
  const int nthreads = work < 2e6 ? 1 : csr_threads();
  // split the rows into groups only when there are too few token tiles for the threads; a group
  // re-transposes its tile, so groups stay large
  int64_t ngroups = 1;
  const int64_t nrg = (N + RG - 1) / RG;
  if (ntiles < 2 * nthreads) ngroups = std::min<int64_t>(nrg, (2 * nthreads + ntiles - 1) / ntiles);
  std::vector<int64_t> gstart(ngroups + 1);
  {
    // balance the groups by kept weights (plus one per row group for the write-back)
    const int64_t total = nnz + nrg * RG;
    int64_t g = 1, acc = 0;
    gstart[0] = 0;
    for (int64_t q = 0; q < nrg && g < ngroups; ++q) {
      const int64_t n1 = std::min(N, (q + 1) * RG);
      acc += rp[n1] - rp[q * RG] + RG;
      if (acc >= total * g / ngroups) gstart[g++] = q + 1;
    }
    for (; g <= ngroups; ++g) gstart[g] = nrg;
  }
  const int64_t nitems = ntiles * ngroups;
  // columns are processed in chunks of (by default) kXtBytes of transposed tile;
  // the partial sums of the item's rows wait in acc between chunks (same summation order as one pass)
  const int64_t chunk_bytes = g_csr_chunk > 0 ? g_csr_chunk : kXtBytes;
  const int64_t KC = std::max<int64_t>(1, std::min<int64_t>(K, chunk_bytes / (TT * (int64_t)sizeof(float))));
  // where each row's kept weights cross into the next column chunk (once per call, not per tile)
  const int64_t nchunks = (std::max<int64_t>(K, 1) + KC - 1) / KC, nb1 = nchunks + 1;
  std::vector<int32_t> bounds(N * nb1);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t n = 0; n < N; ++n) {
    int32_t p = rp[n];
    const int32_t e = rp[n + 1];
    for (int64_t c = 0; c < nchunks; ++c) {
      bounds[n * nb1 + c] = p;
      const int64_t k1 = (c + 1) * KC;
      while (p < e && ci[p] < k1) ++p;
    }
    bounds[n * nb1 + nchunks] = e;
  }
  int64_t max_rows = 0;
  for (int64_t g = 0; g < ngroups; ++g) max_rows = std::max(max_rows, std::min(N, gstart[g + 1] * RG) - gstart[g] * RG);
#pragma omp parallel num_threads(nthreads)
  {
    // scratch left uninitialised (value-initialising it cost a memset of ~0.5 MB per call on FFN shapes):
    // transpose_tile zero-pads xt, and the first chunk writes acc before any read
    std::unique_ptr<float[]> xt_store(new float[KC * TT + 16]);
    std::unique_ptr<float[]> acc_store(new float[std::max<int64_t>(max_rows, 1) * TT + 16]);
    float* xt = xt_store.get();
    float* acc = acc_store.get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < nitems; ++w) {
      const int64_t tile = w / ngroups, g = w % ngroups;
      const int64_t t0 = tile * TT, mt = std::min<int64_t>(TT, T - t0);
      const int64_t nb = gstart[g] * RG, ne = std::min(N, gstart[g + 1] * RG);
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t k0 = c * KC, k1 = std::min(K, k0 + KC);
        transpose_tile<TT>(x, K, t0, mt, k0, k1, xt);
        rows_tile<TT, RR>(xt, ci, val, bias, nb, ne - nb, k0, bounds.data(), nb1, c, acc);
      }
      for (int64_t n0 = nb; n0 < ne; n0 += RG)
        write_back<TT>(acc + (n0 - nb) * TT, mt, std::min<int64_t>(RG, ne - n0), y, N, t0, n0);
    }
  }
}

template <int TT, typename in_t>
void csr_rows(int64_t rr, const in_t* x, int64_t T, int64_t K, const int32_t* rp, const int32_t* ci,
              const float* val, const float* bias, int64_t N, float* y) {
  if (rr == 1) return csr_run<TT, 1>(x, T, K, rp, ci, val, bias, N, y);
  if (rr == 2) return csr_run<TT, 2>(x, T, K, rp, ci, val, bias, N, y);
  return csr_run<TT, 4>(x, T, K, rp, ci, val, bias, N, y);
}

template <typename in_t>
void csr_dispatch(const in_t* x, int64_t T, int64_t K, const int32_t* rp, const int32_t* ci, const float* val,
                  const float* bias, int64_t N, float* y) {
  const int64_t tile = g_csr_tile > 0 ? g_csr_tile : kTile;
  const int64_t rr = g_csr_rows > 0 ? g_csr_rows : kRows;
  if (tile == 32) return csr_rows<32>(rr, x, T, K, rp, ci, val, bias, N, y);
  if (tile == 128) return csr_rows<128>(rr, x, T, K, rp, ci, val, bias, N, y);
  return csr_rows<64>(rr, x, T, K, rp, ci, val, bias, N, y);
}

}  // namespace

void set_csr_tile(int64_t tile, int64_t chunk_bytes, int64_t rows) {
  // every value checked before any is set: a refused call leaves the tuning as it was
  TORCH_CHECK(tile == 0 || tile == 32 || tile == 64 || tile == 128, "set_csr_tile: tile must be 0 (automatic), 32, 64 "
              "or 128, got ", tile);
  TORCH_CHECK(chunk_bytes >= 0, "set_csr_tile: chunk_bytes must be >= 0 (0 = automatic), got ", chunk_bytes);
  TORCH_CHECK(rows == 0 || rows == 1 || rows == 2 || rows == 4, "set_csr_tile: rows must be 0, 1, 2 or 4, got ", rows);
  g_csr_tile = tile;
  g_csr_chunk = chunk_bytes;
  g_csr_rows = rows;
}

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const std::optional<at::Tensor>& bias_opt, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.is_contiguous(), "csr_linear: x must be a contiguous 2-D CPU tensor");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "csr_linear: x must be float32, bfloat16 or float16, got ", st);
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(K == in_features, "csr_linear: x has ", K, " features, the weight expects ", in_features);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.is_contiguous() && row_ptr.numel() >= 1,
              "csr_linear: row_ptr must be a contiguous 1-D int32 tensor of N + 1 entries");
  TORCH_CHECK(col_idx.scalar_type() == at::kInt && col_idx.dim() == 1 && col_idx.is_contiguous(),
              "csr_linear: col_idx must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 1 && values.is_contiguous(),
              "csr_linear: values must be a contiguous 1-D float32 tensor");
  const int64_t N = row_ptr.numel() - 1;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[N] <= col_idx.numel() && rp[N] <= values.numel(),
              "csr_linear: row_ptr must start at 0 and end at most at len(col_idx) = len(values)");
  const float* bias = nullptr;
  at::Tensor bias_f;
  if (bias_opt.has_value() && bias_opt->defined()) {
    TORCH_CHECK(bias_opt->dim() == 1 && bias_opt->numel() == N, "csr_linear: bias must have N = ", N, " entries");
    bias_f = bias_opt->to(at::kFloat).contiguous();
    bias = bias_f.data_ptr<float>();
  }
  at::Tensor y = at::empty({T, N}, x.options().dtype(at::kFloat));
  if (T > 0 && N > 0) {
    const int32_t* ci = col_idx.data_ptr<int32_t>();
    const float* val = values.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    if (st == at::kFloat) {
      csr_dispatch(x.data_ptr<float>(), T, K, rp, ci, val, bias, N, yp);
    } else if (st == at::kBFloat16) {
      csr_dispatch(x.data_ptr<at::BFloat16>(), T, K, rp, ci, val, bias, N, yp);
    } else {
      csr_dispatch(x.data_ptr<at::Half>(), T, K, rp, ci, val, bias, N, yp);
    }
  }
  return st == at::kFloat ? y : y.to(st);
}

}  // namespace capsparse
