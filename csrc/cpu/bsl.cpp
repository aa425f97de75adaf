// Block-sparse linear on the CPU: forward over block-rows, dX over block-columns, dW on kept blocks.
//
// fp32 with bm, bk multiples of 16 takes the packed, register-blocked path (simd.h; on AVX-512 builds
// with 32-column weight strips where 32 divides the block, which halves the loads per multiply-add); every other
// case (fp64, odd block sizes) takes a plain templated path. fp16/bf16 are computed in fp32.
// Each output element is produced by exactly one thread with a fixed summation order, so results
// are bitwise independent of the number of threads.
#include "common.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

namespace capsparse {

static int64_t g_token_tile = 0;  // 0 = automatic
static int64_t g_dw_chunk = 0;
static int64_t g_order = 0;  // 0 automatic, 1 weight-strip outer, 2 token-micro-row outer
static int64_t g_strip = 0;  // 0 automatic (NRW where it divides the block), NR: always the narrow strip

void set_tuning(int64_t token_tile, int64_t dw_chunk, int64_t order, int64_t strip) {
  TORCH_CHECK(strip == 0 || strip == NR || strip == NRW, "set_tuning: strip must be 0 (automatic), ", NR, " or ",
              NRW, ", got ", strip);
  g_token_tile = token_tile;
  g_dw_chunk = dw_chunk;
  g_order = order;
  g_strip = strip;
}

std::string simd_info() {
  return std::string(kSimd) + " mr=" + std::to_string(MRMAX) + " nr=" + std::to_string(NR) +
         (NRW != NR ? "/" + std::to_string(NRW) : std::string());
}

namespace {

// columns per packed weight strip for output blocks `wd` wide: the wide strip where it divides them
int64_t strip_width(int64_t wd) { return g_strip != NR && wd % NRW == 0 ? NRW : NR; }

struct AlignedBuf {
  float* p = nullptr;
  explicit AlignedBuf(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64));
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

int num_threads() { return std::max(1, at::get_num_threads()); }

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be 1-D and contiguous");
}

bool low_precision(at::ScalarType s) { return s == at::kBFloat16 || s == at::kHalf; }

// Rows [0, rows) of X (row stride ld), columns [0, K), interleaved for the micro-kernel: Ap[kk * MRMAX + i];
// rows >= `rows` are zero. Ap needs 2 floats of slack past K * MRMAX: the AVX2 path transposes 6 x 8
// floats as 8 x 8 and stores each 8-float column 6 floats after the previous one (its last 2 are
// overwritten by the next store, or land in the slack).
void pack_rows(const float* X, int64_t ld, int64_t rows, int64_t K, float* Ap) {
  constexpr int MR = MRMAX;
  int64_t kk = 0;
#if !defined(__AVX512F__) && defined(__AVX2__)
  if (rows == MR) {
    for (; kk + 8 <= K; kk += 8) {
      const float* x = X + kk;
      const __m256 z = _mm256_setzero_ps();  // rows 6 and 7: their columns land in the next store's head or the slack
      transpose8x8_store(_mm256_loadu_ps(x), _mm256_loadu_ps(x + ld), _mm256_loadu_ps(x + 2 * ld),
                         _mm256_loadu_ps(x + 3 * ld), _mm256_loadu_ps(x + 4 * ld), _mm256_loadu_ps(x + 5 * ld), z, z,
                         Ap + kk * MR, MR);
    }
  }
#endif
  for (; kk < K; ++kk)
    for (int i = 0; i < MR; ++i) Ap[kk * MR + i] = i < rows ? X[i * ld + kk] : 0.f;
}

// ---------------------------------------------------------------------------------------------
// fp32 fast path: Y[T, nOut*Wd] = for each output block o: sum_{q in ptr[o]..} A[:, idx[q] block] @ Bp
// Used for the forward (o = block-row, inner block L = bk, width Wd = bm) and for dX
// (o = block-column, L = bm, Wd = bk). Bp holds, for output block o, strips of SW columns (the caller's
// strip_width(Wd), with which it packed Bp): Bp[ptr[o]*L*Wd + s*nb*L*SW + q*L*SW + p*SW + v]. AVX2 builds
// copy each micro-row of MR tokens, restricted to the input blocks some kept block reads, into an interleaved
// panel (pack_rows): the
// micro-kernel's MR broadcasts then read one contiguous run instead of MR rows a Kin stride apart
// (rows 3072 floats apart share one L1 set). AVX-512 builds read X in place, as they were tuned.
// Work items are (token tile, group of output blocks), scheduled dynamically; groups are only
// split when there are too few token tiles, balanced by kept-block counts.
// ---------------------------------------------------------------------------------------------
void spmm_f32(const float* X, int64_t T, int64_t Kin, const float* Bp, const int32_t* ptr, const int32_t* idx,
              int64_t nOut, int64_t L, int64_t Wd, int64_t SW, const float* bias, float* Y) {
  const int64_t Nout = nOut * Wd;
  const int MR = MRMAX;
  // tiny problems run on one thread (same result: the split never changes the summation order)
  const double work = 2.0 * (double)T * (double)ptr[nOut] * (double)L * (double)Wd;
  const int nthreads = work < 4e6 ? 1 : num_threads();
  int64_t MT = g_token_tile;
  if (MT <= 0) {
    MT = 2 * MR;  // measured best on the dev machine (few concurrent output write streams)
  }
  MT = std::max<int64_t>(MR, (MT / MR) * MR);
  // make sure every thread gets work on small T
  int64_t per = (T + 2 * nthreads - 1) / (2 * nthreads);
  per = std::max<int64_t>(MR, ((per + MR - 1) / MR) * MR);
  MT = std::min(MT, per);
  const int64_t ntiles = (T + MT - 1) / MT;
  // split output blocks into groups when there are too few token tiles
  int64_t ngroups = 1;
  if (ntiles < 2 * nthreads) ngroups = std::min<int64_t>(std::max<int64_t>(nOut, 1), 4 * nthreads);
  std::vector<int64_t> gstart(ngroups + 1, 0);
  {
    int64_t total = 0;
    for (int64_t o = 0; o < nOut; ++o) total += (ptr[o + 1] - ptr[o]) + 1;
    int64_t o = 0, acc = 0;
    for (int64_t g = 1; g < ngroups; ++g) {
      int64_t target = total * g / ngroups;
      while (o < nOut && acc + (ptr[o + 1] - ptr[o]) + 1 <= target) {
        acc += (ptr[o + 1] - ptr[o]) + 1;
        ++o;
      }
      gstart[g] = o;
    }
    gstart[ngroups] = nOut;
  }
  const int64_t nitems = ntiles * ngroups;
  const int64_t packed_bytes = (int64_t)ptr[nOut] * L * Wd * (int64_t)sizeof(float);
  // token-row outer while the packed weight is small enough: AVX-512 builds were tuned to 512 KB; on AVX2 builds
  // row-outer was as fast or faster up to 4.5 MB packed (BERT-base shapes, densities 0.1-0.5, 1 and 2 threads)
  const int64_t row_outer_max = MRMAX <= 6 ? (int64_t)8 << 20 : (int64_t)512 << 10;
  const bool row_outer = g_order == 2 || (g_order == 0 && packed_bytes <= row_outer_max);
  const ukr_fn kern = ukr_for(MR, (int)SW);
  const int64_t nstrips = Wd / SW;
  // packed panels: the input blocks read (`used`, ascending) and idx remapped to their panel positions
  const bool pack = MRMAX <= 6;
  std::vector<int32_t> used, pidx;
  if (pack) {
    std::vector<int32_t> pos(Kin / L, -1);
    for (int64_t q = 0; q < ptr[nOut]; ++q) pos[idx[q]] = 0;
    for (int64_t c = 0; c < Kin / L; ++c)
      if (pos[c] == 0) {
        pos[c] = (int32_t)used.size();
        used.push_back((int32_t)c);
      }
    pidx.resize(ptr[nOut]);
    for (int64_t q = 0; q < ptr[nOut]; ++q) pidx[q] = pos[idx[q]];
  }
  const int64_t pstride = (int64_t)used.size() * L * MR;  // floats per packed micro-row

#pragma omp parallel num_threads(nthreads)
  {
    AlignedBuf edge(pack ? 1 : MR * Kin);  // zero-padded copy of a partial last micro-row (in-place path)
    AlignedBuf ap(pack ? ((MT + MR - 1) / MR) * pstride + 8 : 1);  // + pack_rows' slack
    alignas(64) float tmp[MRMAX * NRW];
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < nitems; ++w) {
      const int64_t tile = w / ngroups, g = w % ngroups;
      const int64_t t0 = tile * MT, mt = std::min(MT, T - t0);
      const int64_t nmi = (mt + MR - 1) / MR;
      const int64_t last_rows = mt - (nmi - 1) * MR;
      if (pack) {
        for (int64_t mi = 0; mi < nmi; ++mi)
          for (size_t u = 0; u < used.size(); ++u)
            pack_rows(X + (t0 + mi * MR) * Kin + (int64_t)used[u] * L, Kin, std::min<int64_t>(MR, mt - mi * MR), L,
                      ap.p + mi * pstride + (int64_t)u * L * MR);
      } else if (last_rows < MR) {
        const int64_t tl = t0 + (nmi - 1) * MR;
        std::memcpy(edge.p, X + tl * Kin, last_rows * Kin * sizeof(float));
        std::memset(edge.p + last_rows * Kin, 0, (MR - last_rows) * Kin * sizeof(float));
      }
      auto tile_op = [&](int64_t o, int64_t s, int64_t mi) {
        const int64_t nb = ptr[o + 1] - ptr[o];
        const int32_t* ix = (pack ? pidx.data() : idx) + ptr[o];
        const float* strip = Bp + (int64_t)ptr[o] * L * Wd + s * nb * L * SW;
        const float* init = bias ? bias + o * Wd + s * SW : nullptr;
        const int mode = bias ? 2 : 0;
        const int64_t rows = std::min<int64_t>(MR, mt - mi * MR);
        float* c = Y + (t0 + mi * MR) * Nout + o * Wd + s * SW;
        // A[idx*a_blk + p*lda + i*a_row]: packed panel, or X in place (edge copy for a partial micro-row)
        const float* a = pack ? ap.p + mi * pstride : rows == MR ? X + (t0 + mi * MR) * Kin : edge.p;
        const int64_t a_blk = pack ? L * MR : L, lda = pack ? MR : 1, a_row = pack ? 1 : Kin;
        if (rows == MR && pack && SW == NR) {
          // inlined with the packed strides known: at 97% most tiles reduce over 0-2 blocks, call overhead counts
          ukr<MRMAX>(nb, ix, L, a, L * MRMAX, MRMAX, 1, strip, L * NR, NR, c, Nout, mode, init);
        } else if (rows == MR) {
          kern(nb, ix, L, a, a_blk, lda, a_row, strip, L * SW, SW, c, Nout, mode, init);
        } else {
          kern(nb, ix, L, a, a_blk, lda, a_row, strip, L * SW, SW, tmp, SW, mode, init);
          for (int64_t i = 0; i < rows; ++i) std::memcpy(c + i * Nout, tmp + i * SW, SW * sizeof(float));
        }
      };
      if (row_outer) {
        // one micro-row of tokens at a time across all output blocks: the output is written
        // row-block by row-block; the packed weight must stay in L2 for this to pay
        for (int64_t mi = 0; mi < nmi; ++mi)
          for (int64_t o = gstart[g]; o < gstart[g + 1]; ++o)
            for (int64_t s = 0; s < nstrips; ++s) tile_op(o, s, mi);
      } else {
        // one 16-column weight strip at a time, reused by every micro-row of the token tile
        for (int64_t o = gstart[g]; o < gstart[g + 1]; ++o)
          for (int64_t s = 0; s < nstrips; ++s)
            for (int64_t mi = 0; mi < nmi; ++mi) tile_op(o, s, mi);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// generic path (any dtype, any block size)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void fwd_generic(const scalar_t* x, const scalar_t* w, const scalar_t* bias, const int32_t* row_ptr,
                 const int32_t* row_cols, int64_t T, int64_t N, int64_t K, int64_t bm, int64_t bk, scalar_t* y) {
  const int64_t R = N / bm;
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* xr = x + t * K;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = r * bm; n < (r + 1) * bm; ++n) {
        scalar_t acc = bias ? bias[n] : scalar_t(0);
        for (int32_t q = row_ptr[r]; q < row_ptr[r + 1]; ++q) {
          const int64_t c0 = (int64_t)row_cols[q] * bk;
          const scalar_t* wr = w + n * K + c0;
          for (int64_t kk = 0; kk < bk; ++kk) acc += xr[c0 + kk] * wr[kk];
        }
        y[t * N + n] = acc;
      }
  }
}

template <typename scalar_t>
void dx_generic(const scalar_t* gy, const scalar_t* w, const int32_t* col_ptr, const int32_t* col_rows, int64_t T,
                int64_t N, int64_t K, int64_t bm, int64_t bk, scalar_t* gx) {
  const int64_t C = K / bk;
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* gr = gy + t * N;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = c * bk; j < (c + 1) * bk; ++j) {
        scalar_t acc = 0;
        for (int32_t q = col_ptr[c]; q < col_ptr[c + 1]; ++q) {
          const int64_t r0 = (int64_t)col_rows[q] * bm;
          for (int64_t n = r0; n < r0 + bm; ++n) acc += gr[n] * w[n * K + j];
        }
        gx[t * K + j] = acc;
      }
  }
}

template <typename scalar_t>
void dw_generic(const scalar_t* gy, const scalar_t* x, const int32_t* brow, const int32_t* bcol, int64_t nnz,
                int64_t T, int64_t N, int64_t K, int64_t bm, int64_t bk, scalar_t* gw) {
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t q = 0; q < nnz; ++q) {
    const int64_t r0 = (int64_t)brow[q] * bm, c0 = (int64_t)bcol[q] * bk;
    for (int64_t i = r0; i < r0 + bm; ++i)
      for (int64_t j = c0; j < c0 + bk; ++j) {
        scalar_t acc = 0;
        for (int64_t t = 0; t < T; ++t) acc += gy[t * N + i] * x[t * K + j];
        gw[i * K + j] = acc;
      }
  }
}

at::Tensor prepare_out(const std::optional<at::Tensor>& out, int64_t T, int64_t N, const at::Tensor& like) {
  if (out.has_value() && out->defined()) {
    const at::Tensor& o = *out;
    TORCH_CHECK(o.device().is_cpu() && o.scalar_type() == like.scalar_type(), "out must be a CPU tensor of dtype ",
                like.scalar_type());
    TORCH_CHECK(o.dim() == 2 && o.size(0) == T && o.size(1) == N && o.is_contiguous(), "out must be contiguous [",
                T, ", ", N, "]");
    return o;
  }
  return at::empty({T, N}, like.options());
}

}  // namespace

at::Tensor bsl_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                       const at::Tensor& row_ptr, const at::Tensor& row_cols, int64_t bm, int64_t bk,
                       const std::optional<at::Tensor>& out) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "bsl_forward: x and weight must be 2-D");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "bsl_forward: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "bsl_forward: x and weight dtypes differ");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "bsl_forward: x and weight must be contiguous");
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "bsl_forward: x has ", K, " features, weight expects ", weight.size(1));
  TORCH_CHECK(bm > 0 && bk > 0 && N % bm == 0 && K % bk == 0, "bsl_forward: block (", bm, ", ", bk,
              ") must divide the weight ", N, "x", K);
  check_index(row_ptr, "row_ptr");
  check_index(row_cols, "row_cols");
  const int64_t R = N / bm;
  TORCH_CHECK(row_ptr.numel() == R + 1, "row_ptr must have R+1 = ", R + 1, " entries");
  const at::Tensor* bias = nullptr;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias = &*bias_opt;
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == N && bias->scalar_type() == x.scalar_type() &&
                    bias->is_contiguous(),
                "bsl_forward: bias must be a contiguous [", N, "] tensor of the input dtype");
  }
  if (low_precision(x.scalar_type())) {
    auto y = bsl_forward(x.to(at::kFloat), weight.to(at::kFloat),
                         bias ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt, row_ptr, row_cols,
                         bm, bk, std::nullopt);
    if (out.has_value() && out->defined()) return prepare_out(out, T, N, x).copy_(y);
    return y.to(x.scalar_type());
  }
  at::Tensor y = prepare_out(out, T, N, x);
  if (T == 0 || N == 0) return y;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* rc = row_cols.data_ptr<int32_t>();
  if (x.scalar_type() == at::kFloat && bm % NR == 0 && K > 0) {
    const float* W = weight.data_ptr<float>();
    const int64_t nnz = rp[R];
    AlignedBuf bp(std::max<int64_t>(nnz, 1) * bm * bk);
    // pack the kept blocks of each block-row into strips of SW columns, k-major
    const int64_t SW = strip_width(bm);
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads())
    for (int64_t r = 0; r < R; ++r) {
      const int64_t nb = rp[r + 1] - rp[r];
      for (int64_t s = 0; s < bm / SW; ++s) {
        float* strip = bp.p + (int64_t)rp[r] * bm * bk + s * nb * bk * SW;
        for (int64_t q = 0; q < nb; ++q) {
          const int64_t c0 = (int64_t)rc[rp[r] + q] * bk;
          for (int64_t v = 0; v < SW; ++v) {
            const float* src = W + (r * bm + s * SW + v) * K + c0;
            float* dst = strip + q * bk * SW + v;
            for (int64_t kk = 0; kk < bk; ++kk) dst[kk * SW] = src[kk];
          }
        }
      }
    }
    spmm_f32(x.data_ptr<float>(), T, K, bp.p, rp, rc, R, bk, bm, SW, bias ? bias->data_ptr<float>() : nullptr,
             y.data_ptr<float>());
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsl_forward", [&] {
    fwd_generic<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                          bias ? bias->data_ptr<scalar_t>() : nullptr, rp, rc, T, N, K, bm, bk, y.data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor bsl_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& col_ptr,
                          const at::Tensor& col_rows, int64_t bm, int64_t bk, const std::optional<at::Tensor>& out) {
  TORCH_CHECK(grad_y.dim() == 2 && weight.dim() == 2, "bsl_grad_input: grad_y and weight must be 2-D");
  TORCH_CHECK(grad_y.device().is_cpu() && weight.device().is_cpu(), "bsl_grad_input: CPU tensors expected");
  TORCH_CHECK(grad_y.scalar_type() == weight.scalar_type(), "bsl_grad_input: dtypes differ");
  TORCH_CHECK(grad_y.is_contiguous() && weight.is_contiguous(), "bsl_grad_input: inputs must be contiguous");
  const int64_t T = grad_y.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad_y.size(1) == N, "bsl_grad_input: grad_y has ", grad_y.size(1), " columns, weight has ", N, " rows");
  TORCH_CHECK(bm > 0 && bk > 0 && N % bm == 0 && K % bk == 0, "bsl_grad_input: block must divide the weight");
  check_index(col_ptr, "col_ptr");
  check_index(col_rows, "col_rows");
  const int64_t C = K / bk;
  TORCH_CHECK(col_ptr.numel() == C + 1, "col_ptr must have C+1 = ", C + 1, " entries");
  if (low_precision(grad_y.scalar_type())) {
    auto g = bsl_grad_input(grad_y.to(at::kFloat), weight.to(at::kFloat), col_ptr, col_rows, bm, bk, std::nullopt);
    if (out.has_value() && out->defined()) return prepare_out(out, T, K, grad_y).copy_(g);
    return g.to(grad_y.scalar_type());
  }
  at::Tensor gx = prepare_out(out, T, K, grad_y);
  if (T == 0 || K == 0) return gx;
  const int32_t* cp = col_ptr.data_ptr<int32_t>();
  const int32_t* cr = col_rows.data_ptr<int32_t>();
  if (grad_y.scalar_type() == at::kFloat && bk % NR == 0 && N > 0) {
    const float* W = weight.data_ptr<float>();
    const int64_t nnz = cp[C];
    AlignedBuf bp(std::max<int64_t>(nnz, 1) * bm * bk);
    const int64_t SW = strip_width(bk);
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads())
    for (int64_t c = 0; c < C; ++c) {
      const int64_t nb = cp[c + 1] - cp[c];
      for (int64_t s = 0; s < bk / SW; ++s) {
        float* strip = bp.p + (int64_t)cp[c] * bm * bk + s * nb * bm * SW;
        for (int64_t q = 0; q < nb; ++q) {
          const int64_t r0 = (int64_t)cr[cp[c] + q] * bm;
          for (int64_t n = 0; n < bm; ++n)
            std::memcpy(strip + (q * bm + n) * SW, W + (r0 + n) * K + c * bk + s * SW, SW * sizeof(float));
        }
      }
    }
    spmm_f32(grad_y.data_ptr<float>(), T, N, bp.p, cp, cr, C, bm, bk, SW, nullptr, gx.data_ptr<float>());
    return gx;
  }
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "bsl_grad_input", [&] {
    dx_generic<scalar_t>(grad_y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), cp, cr, T, N, K, bm, bk,
                         gx.data_ptr<scalar_t>());
  });
  return gx;
}

// compact: the kept blocks only, [nnz, bm, bk] in block order (no zero-filled [N, K] matrix)
at::Tensor bsl_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& block_rows,
                           const at::Tensor& block_cols, int64_t nnz, int64_t bm, int64_t bk, bool compact) {
  TORCH_CHECK(grad_y.dim() == 2 && x.dim() == 2, "bsl_grad_weight: grad_y and x must be 2-D");
  TORCH_CHECK(grad_y.device().is_cpu() && x.device().is_cpu(), "bsl_grad_weight: CPU tensors expected");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "bsl_grad_weight: dtypes differ");
  TORCH_CHECK(grad_y.is_contiguous() && x.is_contiguous(), "bsl_grad_weight: inputs must be contiguous");
  const int64_t T = grad_y.size(0), N = grad_y.size(1), K = x.size(1);
  TORCH_CHECK(x.size(0) == T, "bsl_grad_weight: grad_y and x have different token counts");
  TORCH_CHECK(bm > 0 && bk > 0 && N % bm == 0 && K % bk == 0, "bsl_grad_weight: block must divide the weight");
  check_index(block_rows, "block_rows");
  check_index(block_cols, "block_cols");
  TORCH_CHECK(nnz >= 0 && nnz <= block_rows.numel() && nnz <= block_cols.numel(), "bsl_grad_weight: bad nnz ", nnz);
  if (low_precision(x.scalar_type())) {
    return bsl_grad_weight(grad_y.to(at::kFloat), x.to(at::kFloat), block_rows, block_cols, nnz, bm, bk, compact)
        .to(x.scalar_type());
  }
  const bool fast = x.scalar_type() == at::kFloat && bk % NR == 0;
  if (compact && !fast) {  // generic path: dense, then gather the kept blocks
    const int64_t C = K / bk;
    at::Tensor dense = bsl_grad_weight(grad_y, x, block_rows, block_cols, nnz, bm, bk, false);
    at::Tensor flat = block_rows.slice(0, 0, nnz).to(at::kLong) * C + block_cols.slice(0, 0, nnz).to(at::kLong);
    return dense.view({N / bm, bm, C, bk}).permute({0, 2, 1, 3}).reshape({-1, bm, bk}).index_select(0, flat);
  }
  at::Tensor gw = compact ? (T == 0 ? at::zeros({nnz, bm, bk}, x.options()) : at::empty({nnz, bm, bk}, x.options()))
                          : at::zeros({N, K}, x.options());
  if (nnz == 0 || N == 0 || K == 0) return gw;
  const int32_t* br = block_rows.data_ptr<int32_t>();
  const int32_t* bc = block_cols.data_ptr<int32_t>();
  if (fast) {
    const float* GY = grad_y.data_ptr<float>();
    const float* X = x.data_ptr<float>();
    float* GW = gw.data_ptr<float>();
    if (T == 0) return gw;
    const int64_t ldw = compact ? bk : K;
    // token chunk: on AVX2 builds (6 x 16 tiles) 64 was 0-26% faster than 256 on the MiniLM and BERT-base
    // shapes at 90% block sparsity (1 and 2 threads, T = 4096). AVX-512 builds: 128; with the 12 x 32 tiles, a
    // block's two panels of 256 tokens (2 x 32 KB) overflow a 48 KB L1, and 128 was 7-13% faster than 256 on
    // the BERT-base shapes at 90% and 97% (Intel Xeon, 2 threads, T = 4096, interleaved)
    int64_t Tc = g_dw_chunk > 0 ? g_dw_chunk : (MRMAX <= 6 ? 64 : 128);
    const int32_t zero = 0;
    const int nthreads = 2.0 * (double)T * (double)nnz * (double)(bm * bk) < 4e6 ? 1 : num_threads();
    const int64_t SW = strip_width(bk);
    const int64_t nstrips = bk / SW;
    // Each thread owns a fixed contiguous range of kept blocks (split by count, row-major order), so every block
    // accumulates its token chunks in order on one thread, with no barrier per chunk. Per chunk the operands are
    // copied into contiguous panels: X[chunk, block column] for the block columns the thread's blocks read
    // ([slot][tc][bk], at the chunk start) and grad_y[chunk, block row] ([tc][bm], when the row changes). Read in
    // place, a 16-float strip of 64 token rows 3072 floats apart sits in one L1 set and is evicted between the
    // micro-kernel calls that reuse it (1.3x on the BERT-base shapes at 90-97%, AVX2, one thread).
#pragma omp parallel num_threads(nthreads)
    {
      const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t q0 = nnz * tid / nt, q1 = nnz * (tid + 1) / nt;
      std::vector<int32_t> slot(K / bk, -1), cols;
      for (int64_t q = q0; q < q1; ++q)
        if (slot[bc[q]] < 0) {
          slot[bc[q]] = (int32_t)cols.size();
          cols.push_back(bc[q]);
        }
      AlignedBuf pg(Tc * bm), px(std::max<size_t>(cols.size(), 1) * Tc * bk);
      for (int64_t t0 = 0; t0 < T; t0 += Tc) {
        const int64_t tc = std::min(Tc, T - t0);
        const int mode = t0 == 0 ? 0 : 1;
        for (size_t u = 0; u < cols.size(); ++u)
          for (int64_t t = 0; t < tc; ++t)
            std::memcpy(px.p + ((int64_t)u * Tc + t) * bk, X + (t0 + t) * K + (int64_t)cols[u] * bk, bk * sizeof(float));
        int64_t row = -1;
        for (int64_t q = q0; q < q1; ++q) {
          if (br[q] != row) {
            row = br[q];
            for (int64_t t = 0; t < tc; ++t)
              std::memcpy(pg.p + t * bm, GY + (t0 + t) * N + row * bm, bm * sizeof(float));
          }
          const float* xq = px.p + (int64_t)slot[bc[q]] * Tc * bk;
          float* gq = compact ? GW + q * bm * bk : GW + (int64_t)br[q] * bm * K + (int64_t)bc[q] * bk;
          for (int64_t s = 0; s < nstrips; ++s)
            for (int64_t i0 = 0; i0 < bm; i0 += MRMAX) {
              const int mr = (int)std::min<int64_t>(MRMAX, bm - i0);
              ukr_for(mr, (int)SW)(1, &zero, tc, pg.p + i0, 0, bm, 1, xq + s * SW, 0, bk, gq + i0 * ldw + s * SW, ldw,
                                   mode, nullptr);
            }
        }
      }
    }
    return gw;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsl_grad_weight", [&] {
    dw_generic<scalar_t>(grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), br, bc, nnz, T, N, K, bm, bk,
                         gw.data_ptr<scalar_t>());
  });
  return gw;
}

// db[N] = sum over tokens of grad_y[T, N]. Each thread streams whole rows of its own contiguous column range
// (sequential reads; torch's sum(0) took 2.3x as long as this on 4096 x 3072 fp32, one thread). Every column is
// summed in token order, in chunks of 64 tokens added to a running total, whatever the thread count or column
// split: results are bitwise independent of the number of threads.
template <typename scalar_t>
void db_columns(const scalar_t* gy, int64_t T, int64_t N, scalar_t* out) {
  constexpr int64_t TC = 64;
  const int nthreads = (double)T * (double)N < 1e6 ? 1 : num_threads();
#pragma omp parallel num_threads(nthreads)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t j0 = (N * tid / nt) / 16 * 16, j1 = tid + 1 == nt ? N : (N * (tid + 1) / nt) / 16 * 16;
    const int64_t w = j1 - j0;
    if (w > 0) {
      std::vector<scalar_t> part(w);
      scalar_t* __restrict p = part.data();
      scalar_t* __restrict total = out + j0;
      for (int64_t t0 = 0; t0 < T; t0 += TC) {
        std::fill(p, p + w, scalar_t(0));
        const int64_t t1 = std::min(T, t0 + TC);
        for (int64_t t = t0; t < t1; ++t) {
          const scalar_t* __restrict row = gy + t * N + j0;
          for (int64_t j = 0; j < w; ++j) p[j] += row[j];
        }
        for (int64_t j = 0; j < w; ++j) total[j] += p[j];
      }
    }
  }
}

at::Tensor bsl_grad_bias(const at::Tensor& grad_y) {
  TORCH_CHECK(grad_y.dim() == 2, "bsl_grad_bias: grad_y must be 2-D, got ", grad_y.dim(), "-D");
  TORCH_CHECK(grad_y.device().is_cpu(), "bsl_grad_bias: grad_y must be a CPU tensor");
  TORCH_CHECK(grad_y.is_contiguous(), "bsl_grad_bias: grad_y must be contiguous");
  if (low_precision(grad_y.scalar_type())) return bsl_grad_bias(grad_y.to(at::kFloat)).to(grad_y.scalar_type());
  const int64_t T = grad_y.size(0), N = grad_y.size(1);
  at::Tensor db = at::zeros({N}, grad_y.options());
  if (T == 0 || N == 0) return db;
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "bsl_grad_bias", [&] {
    db_columns<scalar_t>(grad_y.data_ptr<scalar_t>(), T, N, db.data_ptr<scalar_t>());
  });
  return db;
}

}  // namespace capsparse
