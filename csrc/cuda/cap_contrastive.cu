// capsparse: CAP's contrastive step, fused around an in-kernel memory-bank gather.
//
// Contract: docs/design.md, "CAP contrastive loss, exactly".  Keys are
//   key_k = bank[key_index[k]]          for 0 <= k < K   (gathered inside the kernels)
//   key_k = extra[k - K]                for K <= k < K+E (optional in-batch keys)
// and are never copied into a (K+E) x D buffer.  With s_ik = q_i . key_k / tau, the excluded key
// e_i (exclude_index[i] >= 0) is dropped from the softmax and from the positives,
//   lse_i = logsumexp_{k != e_i} s_ik,  l_ik = s_ik - lse_i,
//   P^u_i = {k != e_i : key_ids[k] == query_ids[i]},  P^s_i = same with labels,
//   loss = - sum_i (1 / (|P_i| den)) sum_{k in P_i} l_ik,
//   den  = sum_i |P_i|        ("official", normalization = 0)
//        = #{i : |P_i| > 0}   ("supcon",   normalization = 1),   loss = 0 if den == 0,
//   d loss / d q_i = -(1 / (|P_i| den tau)) sum_k G_ik key_k,  G_ik = [k in P_i] - |P_i| p_ik.
// Both losses share the logits, the lse and the softmax; only the positive sets differ.
//
// Kernels (all deterministic, no atomics):
//   1. logits:  S[B, K+E] = q key^T / tau            (fp32, SIMT tiles, gathered keys)
//   2. rows:    one CTA per query: online log-sum-exp over k != e_i, positive counts and
//               positive-logit sums, then S is overwritten by G^u (G^s goes to a second buffer)
//   3. grad:    split-K over keys: partial[split] = G key   (fp32, gathered keys again)
//   4. scalars: one CTA: both losses and the per-row gradient coefficients
//   5. output:  grad_q = coef_i * sum_split partial (fixed order), cast to q's dtype
// Memory: O(B (K+E)) fp32 for the logits/G plus O(nsplit B D); never O((K+E) D).
#include "common.cuh"
#include <math.h>

namespace capsparse_cuda {
namespace cap {

template <typename TK>
__device__ __forceinline__ const TK* key_row(int k, const TK* __restrict__ bank, long long ldb,
                                             const long long* __restrict__ key_index, int K,
                                             const TK* __restrict__ extra, long long lde) {
  return k < K ? bank + key_index[k] * ldb : extra + (long long)(k - K) * lde;
}

// ---- 1. logits -------------------------------------------------------------------------------
constexpr int L_BQ = 32, L_KT = 32, L_DC = 32, L_NT = 128;

template <typename TQ, typename TK>
__global__ void __launch_bounds__(L_NT)
logits_kernel(const TQ* __restrict__ q, long long ldq, const TK* __restrict__ bank, long long ldb,
              const long long* __restrict__ key_index, int K, const TK* __restrict__ extra, long long lde, int B,
              int KE, int D, float inv_tau, float* __restrict__ S) {
  __shared__ float Qs[L_BQ][L_DC + 1];
  __shared__ float Ks[L_KT][L_DC + 1];
  __shared__ const TK* krow[L_KT];
  const int k0 = int(blockIdx.x) * L_KT, i0 = int(blockIdx.y) * L_BQ;
  if (threadIdx.x < L_KT) {
    const int k = k0 + int(threadIdx.x);
    krow[threadIdx.x] = k < KE ? key_row(k, bank, ldb, key_index, K, extra, lde) : nullptr;
  }
  constexpr int NTN = 16, NTM = L_NT / NTN, RM = L_BQ / NTM, RN = L_KT / NTN;
  const int tn = int(threadIdx.x) % NTN, tm = int(threadIdx.x) / NTN;
  float acc[RM][RN];
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int b = 0; b < RN; ++b) acc[a][b] = 0.f;
  __syncthreads();
  for (int d0 = 0; d0 < D; d0 += L_DC) {
    for (int idx = int(threadIdx.x); idx < L_BQ * L_DC; idx += L_NT) {
      const int row = idx / L_DC, col = idx % L_DC;
      const int i = i0 + row, d = d0 + col;
      Qs[row][col] = (i < B && d < D) ? Cvt<TQ>::to(q[(long long)i * ldq + d]) : 0.f;
    }
    for (int idx = int(threadIdx.x); idx < L_KT * L_DC; idx += L_NT) {
      const int row = idx / L_DC, col = idx % L_DC;
      const int d = d0 + col;
      const TK* kr = krow[row];
      Ks[row][col] = (kr != nullptr && d < D) ? Cvt<TK>::to(kr[d]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int d = 0; d < L_DC; ++d) {
      float av[RM], bv[RN];
#pragma unroll
      for (int a = 0; a < RM; ++a) av[a] = Qs[tm + a * NTM][d];
#pragma unroll
      for (int b = 0; b < RN; ++b) bv[b] = Ks[tn + b * NTN][d];
#pragma unroll
      for (int a = 0; a < RM; ++a)
#pragma unroll
        for (int b = 0; b < RN; ++b) acc[a][b] = fmaf(av[a], bv[b], acc[a][b]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < RM; ++a) {
    const int i = i0 + tm + a * NTM;
#pragma unroll
    for (int b = 0; b < RN; ++b) {
      const int k = k0 + tn + b * NTN;
      if (i < B && k < KE) S[(long long)i * KE + k] = acc[a][b] * inv_tau;
    }
  }
}

// ---- 2. per-row statistics and G -------------------------------------------------------------
constexpr int R_NT = 256;

struct MaxSum { float m, l; };
__device__ __forceinline__ MaxSum ms_combine(MaxSum a, MaxSum b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return MaxSum{m, a.l * expf(a.m - m) + b.l * expf(b.m - m)};
}

template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, V* sh, Op op) {  // fixed tree order: deterministic
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  constexpr int NW = R_NT / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    V other;
    other = v;
    other.m = __shfl_xor_sync(0xffffffffu, v.m, o);
    other.l = __shfl_xor_sync(0xffffffffu, v.l, o);
    v = op(v, other);
  }
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  V r = sh[0];
#pragma unroll
  for (int w = 1; w < NW; ++w) r = op(r, sh[w]);
  __syncthreads();
  return r;
}

struct Pair { float m, l; };  // generic (a, b) float pair for sums; m/l naming reuses block_reduce
__device__ __forceinline__ Pair pair_add(Pair a, Pair b) { return Pair{a.m + b.m, a.l + b.l}; }

__global__ void __launch_bounds__(R_NT)
row_kernel(float* __restrict__ S_G, float* __restrict__ Gs, const long long* __restrict__ query_ids,
           const long long* __restrict__ key_ids, const long long* __restrict__ query_labels,
           const long long* __restrict__ key_labels, const long long* __restrict__ exclude_index, int KE,
           float* __restrict__ rowstat) {
  __shared__ MaxSum sh_ms[R_NT / 32];
  __shared__ Pair sh_p[R_NT / 32];
  const int i = int(blockIdx.x);
  float* row = S_G + (long long)i * KE;
  const long long e = exclude_index[i];
  const long long qid = query_ids[i];
  const bool has_lab = query_labels != nullptr && key_labels != nullptr;
  const long long qlab = has_lab ? query_labels[i] : 0;

  MaxSum ms{-INFINITY, 0.f};
  float cu = 0.f, su = 0.f, cs = 0.f, ss = 0.f;  // counts are exact in fp32 up to 2^24 keys
  for (int k = int(threadIdx.x); k < KE; k += R_NT) {
    if ((long long)k == e) continue;
    const float s = row[k];
    ms = ms_combine(ms, MaxSum{s, 1.f});
    if (key_ids[k] == qid) { cu += 1.f; su += s; }
    if (has_lab && key_labels[k] == qlab) { cs += 1.f; ss += s; }
  }
  ms = block_reduce(ms, sh_ms, ms_combine);
  const Pair pu = block_reduce(Pair{cu, su}, sh_p, pair_add);
  const Pair ps = block_reduce(Pair{cs, ss}, sh_p, pair_add);
  const bool any = ms.m != -INFINITY && ms.l > 0.f;
  const float lse = any ? ms.m + logf(ms.l) : 0.f;
  const float nu = pu.m, ns = ps.m;
  for (int k = int(threadIdx.x); k < KE; k += R_NT) {
    const bool ex = (long long)k == e;
    const float p = (ex || !any) ? 0.f : expf(row[k] - lse);
    float gu = 0.f, gs = 0.f;
    if (nu > 0.f) gu = ((!ex && key_ids[k] == qid) ? 1.f : 0.f) - nu * p;
    if (has_lab && ns > 0.f) gs = ((!ex && key_labels[k] == qlab) ? 1.f : 0.f) - ns * p;
    row[k] = gu;
    if (has_lab) Gs[(long long)i * KE + k] = gs;
  }
  if (threadIdx.x == 0) {
    rowstat[i * 4 + 0] = nu;
    rowstat[i * 4 + 1] = nu > 0.f ? pu.l - nu * lse : 0.f;  // sum_{k in P^u} l_ik
    rowstat[i * 4 + 2] = ns;
    rowstat[i * 4 + 3] = ns > 0.f ? ps.l - ns * lse : 0.f;
  }
}

// ---- 3. split-K G @ keys ---------------------------------------------------------------------
constexpr int G_BQ = 32, G_DT = 64, G_KC = 32, G_NT = 256;

template <typename TK>
__global__ void __launch_bounds__(G_NT)
grad_kernel(const float* __restrict__ Gu, const float* __restrict__ Gs, const TK* __restrict__ bank, long long ldb,
            const long long* __restrict__ key_index, int K, const TK* __restrict__ extra, long long lde, int B,
            int KE, int D, int keys_per_split, float* __restrict__ Pu, float* __restrict__ Ps) {
  __shared__ float Gus[G_BQ][G_KC + 1];
  __shared__ float Gss[G_BQ][G_KC + 1];
  __shared__ float Ks[G_KC][G_DT];
  const bool two = Gs != nullptr;
  const int d0 = int(blockIdx.x) * G_DT, i0 = int(blockIdx.y) * G_BQ, split = int(blockIdx.z);
  const int ks = split * keys_per_split;
  const int ke = min(KE, ks + keys_per_split);
  constexpr int NTN = 16, NTM = G_NT / NTN, RM = G_BQ / NTM, RN = G_DT / NTN;
  const int tn = int(threadIdx.x) % NTN, tm = int(threadIdx.x) / NTN;
  float au[RM][RN], as[RM][RN];
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int b = 0; b < RN; ++b) au[a][b] = as[a][b] = 0.f;
  for (int k0 = ks; k0 < ke; k0 += G_KC) {
    for (int idx = int(threadIdx.x); idx < G_BQ * G_KC; idx += G_NT) {
      const int row = idx / G_KC, col = idx % G_KC;
      const int i = i0 + row, k = k0 + col;
      const bool ok = i < B && k < ke;
      Gus[row][col] = ok ? Gu[(long long)i * KE + k] : 0.f;
      if (two) Gss[row][col] = ok ? Gs[(long long)i * KE + k] : 0.f;
    }
    for (int idx = int(threadIdx.x); idx < G_KC * G_DT; idx += G_NT) {
      const int row = idx / G_DT, col = idx % G_DT;
      const int k = k0 + row, d = d0 + col;
      Ks[row][col] = (k < ke && d < D) ? Cvt<TK>::to(key_row(k, bank, ldb, key_index, K, extra, lde)[d]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < G_KC; ++kk) {
      float bv[RN];
#pragma unroll
      for (int b = 0; b < RN; ++b) bv[b] = Ks[kk][tn + b * NTN];
#pragma unroll
      for (int a = 0; a < RM; ++a) {
        const float gu = Gus[tm + a * NTM][kk];
#pragma unroll
        for (int b = 0; b < RN; ++b) au[a][b] = fmaf(gu, bv[b], au[a][b]);
      }
      if (two) {
#pragma unroll
        for (int a = 0; a < RM; ++a) {
          const float gs = Gss[tm + a * NTM][kk];
#pragma unroll
          for (int b = 0; b < RN; ++b) as[a][b] = fmaf(gs, bv[b], as[a][b]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < RM; ++a) {
    const int i = i0 + tm + a * NTM;
#pragma unroll
    for (int b = 0; b < RN; ++b) {
      const int d = d0 + tn + b * NTN;
      if (i < B && d < D) {
        const long long o = ((long long)split * B + i) * D + d;
        Pu[o] = au[a][b];
        if (two) Ps[o] = as[a][b];
      }
    }
  }
}

// ---- 4. losses and per-row coefficients (one CTA) --------------------------------------------
constexpr int F_NT = 256;

__device__ __forceinline__ double block_sum_d(double v, double* sh) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double r = 0.0;
#pragma unroll
  for (int w = 0; w < F_NT / 32; ++w) r += sh[w];
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(F_NT)
finalize_kernel(const float* __restrict__ rowstat, int B, int has_labels, int normalization, float temperature,
                float* __restrict__ coef, float* __restrict__ loss_u, float* __restrict__ loss_s) {
  __shared__ double sh[F_NT / 32];
  for (int which = 0; which < (has_labels ? 2 : 1); ++which) {
    double npos = 0.0, nrows = 0.0, term = 0.0;
    for (int i = int(threadIdx.x); i < B; i += F_NT) {
      const double n = rowstat[i * 4 + 2 * which];
      if (n > 0.0) {
        npos += n;
        nrows += 1.0;
        term += (double)rowstat[i * 4 + 2 * which + 1] / n;
      }
    }
    npos = block_sum_d(npos, sh);
    nrows = block_sum_d(nrows, sh);
    term = block_sum_d(term, sh);
    const double den = normalization == 0 ? npos : nrows;
    if (threadIdx.x == 0) {
      const float L = den > 0.0 ? (float)(-term / den) : 0.f;
      if (which == 0) *loss_u = L; else *loss_s = L;
    }
    for (int i = int(threadIdx.x); i < B; i += F_NT) {
      const double n = rowstat[i * 4 + 2 * which];
      coef[which * B + i] = (n > 0.0 && den > 0.0) ? (float)(-1.0 / (n * den * (double)temperature)) : 0.f;
    }
  }
}

// ---- 5. gradient output ----------------------------------------------------------------------
template <typename TQ>
__global__ void __launch_bounds__(256)
output_kernel(const float* __restrict__ P, const float* __restrict__ coef, int nsplit, int B, int D,
              TQ* __restrict__ g, long long ldg) {
  const long long n = (long long)B * D;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (long long)gridDim.x * blockDim.x) {
    const int i = int(idx / D), d = int(idx % D);
    float s = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) s += P[(long long)sp * n + idx];  // fixed order
    g[(long long)i * ldg + d] = Cvt<TQ>::from(coef[i] * s);
  }
}

// ---- host side -------------------------------------------------------------------------------
inline int num_splits(int B, int KE, int D) {
  const int tiles = ceil_div(D, G_DT) * ceil_div(B, G_BQ);
  int n = ceil_div(264, tiles > 0 ? tiles : 1);  // ~2 CTAs per SM on a 132-SM H100
  const int max_by_keys = KE / 256 > 1 ? KE / 256 : 1;
  if (n > max_by_keys) n = max_by_keys;
  if (n > 64) n = 64;
  return n < 1 ? 1 : n;
}

inline size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

struct Workspace {
  size_t s, gs, rowstat, coef, pu, ps, total;
};
inline Workspace plan(int B, int KE, int D, bool has_labels) {
  Workspace w;
  const int ns = num_splits(B, KE, D);
  size_t off = 0;
  w.s = off; off += align_up(sizeof(float) * (size_t)B * KE);
  w.gs = off; off += has_labels ? align_up(sizeof(float) * (size_t)B * KE) : 0;
  w.rowstat = off; off += align_up(sizeof(float) * (size_t)B * 4);
  w.coef = off; off += align_up(sizeof(float) * (size_t)B * 2);
  w.pu = off; off += align_up(sizeof(float) * (size_t)ns * B * D);
  w.ps = off; off += has_labels ? align_up(sizeof(float) * (size_t)ns * B * D) : 0;
  w.total = off;
  return w;
}

template <typename TQ, typename TK>
cudaError_t run_gemms(const void* q, long long ldq, const void* bank, long long ldb, const long long* key_index, int K,
                      const void* extra, long long lde, int B, int KE, int D, float inv_tau, float* S, float* Gs,
                      float* Pu, float* Ps, int nsplit, int kps, int phase, cudaStream_t st) {
  if (phase == 0) {
    dim3 grid(ceil_div(KE, L_KT), ceil_div(B, L_BQ));
    logits_kernel<TQ, TK><<<grid, L_NT, 0, st>>>(static_cast<const TQ*>(q), ldq, static_cast<const TK*>(bank), ldb,
                                                 key_index, K, static_cast<const TK*>(extra), lde, B, KE, D, inv_tau, S);
  } else {
    dim3 grid(ceil_div(D, G_DT), ceil_div(B, G_BQ), nsplit);
    grad_kernel<TK><<<grid, G_NT, 0, st>>>(S, Gs, static_cast<const TK*>(bank), ldb, key_index, K,
                                           static_cast<const TK*>(extra), lde, B, KE, D, kps, Pu, Ps);
  }
  return cudaGetLastError();
}

template <typename TQ>
cudaError_t dispatch_k(int k_dtype, const void* q, long long ldq, const void* bank, long long ldb,
                       const long long* key_index, int K, const void* extra, long long lde, int B, int KE, int D,
                       float inv_tau, float* S, float* Gs, float* Pu, float* Ps, int nsplit, int kps, int phase,
                       cudaStream_t st) {
  switch (k_dtype) {
    case kF32: return run_gemms<TQ, float>(q, ldq, bank, ldb, key_index, K, extra, lde, B, KE, D, inv_tau, S, Gs, Pu, Ps, nsplit, kps, phase, st);
    case kF16: return run_gemms<TQ, __half>(q, ldq, bank, ldb, key_index, K, extra, lde, B, KE, D, inv_tau, S, Gs, Pu, Ps, nsplit, kps, phase, st);
    case kBF16: return run_gemms<TQ, __nv_bfloat16>(q, ldq, bank, ldb, key_index, K, extra, lde, B, KE, D, inv_tau, S, Gs, Pu, Ps, nsplit, kps, phase, st);
    default: return cudaErrorInvalidValue;
  }
}

template <typename TQ>
cudaError_t write_grad(const float* P, const float* coef, int nsplit, int B, int D, void* g, long long ldg, cudaStream_t st) {
  const long long n = (long long)B * D;
  long long blocks = (n + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  output_kernel<TQ><<<(unsigned)blocks, 256, 0, st>>>(P, coef, nsplit, B, D, static_cast<TQ*>(g), ldg);
  return cudaGetLastError();
}

inline cudaError_t write_grad_any(int dt, const float* P, const float* coef, int nsplit, int B, int D, void* g,
                                  long long ldg, cudaStream_t st) {
  switch (dt) {
    case kF32: return write_grad<float>(P, coef, nsplit, B, D, g, ldg, st);
    case kF16: return write_grad<__half>(P, coef, nsplit, B, D, g, ldg, st);
    case kBF16: return write_grad<__nv_bfloat16>(P, coef, nsplit, B, D, g, ldg, st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cap
}  // namespace capsparse_cuda

using namespace capsparse_cuda;

// Scratch bytes needed by capsparse_cap_contrastive (K_total = K + E keys).
extern "C" size_t capsparse_cap_contrastive_workspace_bytes(int B, int K_total, int D, int has_labels) {
  if (B <= 0 || K_total <= 0 || D <= 0) return 0;
  return cap::plan(B, K_total, D, has_labels != 0).total;
}

// q [B, D] (dtype q_dtype, row stride ldq), bank [*, D] (k_dtype, row stride ldb), key_index [K]
// int64 rows of the bank, extra [E, D] (k_dtype, row stride lde; may be NULL when E == 0).
// key_ids / key_labels cover all K + E keys; query_labels / key_labels may both be NULL (then
// loss_s / grad_s are not written).  exclude_index [B] int64 indexes the K + E keys (-1 = none).
// normalization: 0 = "official", 1 = "supcon".  loss_u / loss_s: one fp32 each on the device;
// grad_u / grad_s: [B, D] in q_dtype with row stride ldg.  workspace: at least
// capsparse_cap_contrastive_workspace_bytes(B, K + E, D, labels != NULL) bytes, 256-byte aligned.
extern "C" cudaError_t capsparse_cap_contrastive(
    int q_dtype, const void* q, long long ldq, int B, int D, int k_dtype, const void* bank, long long ldb,
    const long long* key_index, int K, const void* extra, long long lde, int E, const long long* query_ids,
    const long long* key_ids, const long long* query_labels, const long long* key_labels,
    const long long* exclude_index, float temperature, int normalization, float* loss_u, float* loss_s, void* grad_u,
    void* grad_s, long long ldg, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (B < 0 || D < 0 || K < 0 || E < 0 || !(temperature > 0.f) || (normalization != 0 && normalization != 1))
    return cudaErrorInvalidValue;
  if (q_dtype < 0 || q_dtype > 2 || k_dtype < 0 || k_dtype > 2) return cudaErrorInvalidValue;
  const bool has_labels = query_labels != nullptr && key_labels != nullptr;
  if (has_labels && (loss_s == nullptr || grad_s == nullptr)) return cudaErrorInvalidValue;
  if (E > 0 && extra == nullptr) return cudaErrorInvalidValue;
  const int KE = K + E;
  const size_t es = q_dtype == kF32 ? 4 : 2;
  cudaError_t err;
  if (B == 0 || KE == 0 || D == 0) {  // nothing to contrast: zero losses and gradients
    if ((err = cudaMemsetAsync(loss_u, 0, sizeof(float), stream)) != cudaSuccess) return err;
    if (has_labels && (err = cudaMemsetAsync(loss_s, 0, sizeof(float), stream)) != cudaSuccess) return err;
    if (B > 0 && D > 0) {
      if ((err = cudaMemset2DAsync(grad_u, (size_t)ldg * es, 0, (size_t)D * es, (size_t)B, stream)) != cudaSuccess) return err;
      if (has_labels && (err = cudaMemset2DAsync(grad_s, (size_t)ldg * es, 0, (size_t)D * es, (size_t)B, stream)) != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const cap::Workspace w = cap::plan(B, KE, D, has_labels);
  if (workspace == nullptr || workspace_bytes < w.total || (reinterpret_cast<uintptr_t>(workspace) & 255u) != 0)
    return cudaErrorInvalidValue;
  unsigned char* base = static_cast<unsigned char*>(workspace);
  float* S = reinterpret_cast<float*>(base + w.s);
  float* Gs = has_labels ? reinterpret_cast<float*>(base + w.gs) : nullptr;
  float* rowstat = reinterpret_cast<float*>(base + w.rowstat);
  float* coef = reinterpret_cast<float*>(base + w.coef);
  float* Pu = reinterpret_cast<float*>(base + w.pu);
  float* Ps = has_labels ? reinterpret_cast<float*>(base + w.ps) : nullptr;
  const int nsplit = cap::num_splits(B, KE, D);
  const int kps = ceil_div(ceil_div(KE, nsplit), cap::G_KC) * cap::G_KC;
  const float inv_tau = 1.f / temperature;

#define CAPSPARSE_GEMMS(PHASE)                                                                                   \
  (q_dtype == kF32 ? cap::dispatch_k<float>(k_dtype, q, ldq, bank, ldb, key_index, K, extra, lde, B, KE, D, inv_tau, S, \
                                            Gs, Pu, Ps, nsplit, kps, PHASE, stream)                              \
   : q_dtype == kF16 ? cap::dispatch_k<__half>(k_dtype, q, ldq, bank, ldb, key_index, K, extra, lde, B, KE, D,    \
                                               inv_tau, S, Gs, Pu, Ps, nsplit, kps, PHASE, stream)               \
                     : cap::dispatch_k<__nv_bfloat16>(k_dtype, q, ldq, bank, ldb, key_index, K, extra, lde, B, KE, \
                                                      D, inv_tau, S, Gs, Pu, Ps, nsplit, kps, PHASE, stream))

  if ((err = CAPSPARSE_GEMMS(0)) != cudaSuccess) return err;
  cap::row_kernel<<<B, cap::R_NT, 0, stream>>>(S, Gs, query_ids, key_ids, has_labels ? query_labels : nullptr,
                                               has_labels ? key_labels : nullptr, exclude_index, KE, rowstat);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = CAPSPARSE_GEMMS(1)) != cudaSuccess) return err;
#undef CAPSPARSE_GEMMS
  cap::finalize_kernel<<<1, cap::F_NT, 0, stream>>>(rowstat, B, has_labels ? 1 : 0, normalization, temperature, coef,
                                                    loss_u, has_labels ? loss_s : nullptr);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = cap::write_grad_any(q_dtype, Pu, coef, nsplit, B, D, grad_u, ldg, stream)) != cudaSuccess) return err;
  if (has_labels) return cap::write_grad_any(q_dtype, Ps, coef + B, nsplit, B, D, grad_s, ldg, stream);
  return cudaSuccess;
}
