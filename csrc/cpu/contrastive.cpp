// CAP contrastive loss (see docs/design.md), forward and gradient wrt q in one pass over the keys.
//
// Each block of QB query rows streams over the keys in tiles: it computes the tile's scores,
// updates an online log-sum-exp (max m, sum l) and the rescaled softmax numerator sum_k e^{s-m} k,
// and accumulates the positive statistics (count, sum of scores, sum of keys) for the instance
// (ids) and the supervised (labels) positives on the fly. No B x K tensor is ever built.
// Rows are owned by one thread and the final reduction over rows is sequential, so results do not
// depend on the number of threads.
#include "common.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

namespace capsparse {
namespace {

constexpr int QB = 4;    // query rows per work item
constexpr int KT = 128;  // keys per tile

// s[i] = dot(q_i, kr) for up to QB query rows, fixed summation order
template <typename scalar_t>
inline void dots(const scalar_t* const* qr, int nq, const scalar_t* kr, int64_t D, scalar_t* s) {
  for (int i = 0; i < nq; ++i) {
    scalar_t acc = 0;
    for (int64_t d = 0; d < D; ++d) acc += qr[i][d] * kr[d];
    s[i] = acc;
  }
}

template <>
inline void dots<float>(const float* const* qr, int nq, const float* kr, int64_t D, float* s) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  const int64_t Dv = (D / VW) * VW;
  vf acc[QB];
  for (int i = 0; i < QB; ++i) acc[i] = vzero();
  for (int64_t d = 0; d < Dv; d += VW) {
    vf kv = vload(kr + d);
    for (int i = 0; i < nq; ++i) acc[i] = vfma(vload(qr[i] + d), kv, acc[i]);
  }
  for (int i = 0; i < nq; ++i) {
    alignas(64) float lanes[VW];
    vstore(lanes, acc[i]);
    float t = 0.f;
    for (int l = 0; l < VW; ++l) t += lanes[l];
    for (int64_t d = Dv; d < D; ++d) t += qr[i][d] * kr[d];
    s[i] = t;
  }
#else
  for (int i = 0; i < nq; ++i) {
    float acc = 0;
    for (int64_t d = 0; d < D; ++d) acc += qr[i][d] * kr[d];
    s[i] = acc;
  }
#endif
}

template <typename scalar_t>
inline void axpy(scalar_t a, const scalar_t* __restrict x, scalar_t* __restrict y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

template <typename scalar_t>
void contrastive_impl(const scalar_t* Q, const scalar_t* Kmat, int64_t B, int64_t NK, int64_t D, const int64_t* qid,
                      const int64_t* kid, const int64_t* qlab, const int64_t* klab, const int64_t* excl,
                      scalar_t inv_tau, bool has_s, scalar_t* gu, scalar_t* gs, double* row_u, int64_t* cnt_u,
                      double* row_s, int64_t* cnt_s) {
  const int64_t nblocks = (B + QB - 1) / QB;
  const int nthreads = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<scalar_t> g(QB * D), pku(QB * D), pks(has_s ? QB * D : 0);
    std::vector<scalar_t> st(QB * KT);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t i0 = blk * QB;
      const int nq = (int)std::min<int64_t>(QB, B - i0);
      const scalar_t* qr[QB];
      scalar_t m[QB];
      double l[QB], su[QB], ss[QB];
      int64_t cu[QB], cs[QB];
      for (int i = 0; i < QB; ++i) {
        qr[i] = Q + (i0 + std::min(i, nq - 1)) * D;
        m[i] = -std::numeric_limits<scalar_t>::infinity();
        l[i] = su[i] = ss[i] = 0.0;
        cu[i] = cs[i] = 0;
      }
      std::fill(g.begin(), g.end(), scalar_t(0));
      std::fill(pku.begin(), pku.end(), scalar_t(0));
      std::fill(pks.begin(), pks.end(), scalar_t(0));
      for (int64_t j0 = 0; j0 < NK; j0 += KT) {
        const int64_t nk = std::min<int64_t>(KT, NK - j0);
        scalar_t tmax[QB];
        for (int i = 0; i < QB; ++i) tmax[i] = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < nk; ++j) {
          scalar_t sv[QB];
          dots<scalar_t>(qr, nq, Kmat + (j0 + j) * D, D, sv);
          for (int i = 0; i < nq; ++i) {
            const scalar_t s = sv[i] * inv_tau;
            st[i * KT + j] = s;
            if (excl[i0 + i] != j0 + j && s > tmax[i]) tmax[i] = s;
          }
        }
        for (int i = 0; i < nq; ++i) {
          if (tmax[i] > m[i]) {
            const scalar_t scale = std::exp(m[i] - tmax[i]);  // 0 on the first tile
            l[i] *= (double)scale;
            scalar_t* gi = g.data() + i * D;
            for (int64_t d = 0; d < D; ++d) gi[d] *= scale;
            m[i] = tmax[i];
          }
        }
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t kj = j0 + j;
          const scalar_t* kr = Kmat + kj * D;
          for (int i = 0; i < nq; ++i) {
            const int64_t qi = i0 + i;
            if (excl[qi] == kj) continue;
            const scalar_t s = st[i * KT + j];
            const scalar_t e = std::exp(s - m[i]);
            l[i] += (double)e;
            axpy<scalar_t>(e, kr, g.data() + i * D, D);
            if (kid[kj] == qid[qi]) {
              ++cu[i];
              su[i] += (double)s;
              axpy<scalar_t>(scalar_t(1), kr, pku.data() + i * D, D);
            }
            if (has_s && klab[kj] == qlab[qi]) {
              ++cs[i];
              ss[i] += (double)s;
              axpy<scalar_t>(scalar_t(1), kr, pks.data() + i * D, D);
            }
          }
        }
      }
      for (int i = 0; i < nq; ++i) {
        const int64_t qi = i0 + i;
        const double lse = (double)m[i] + std::log(l[i]);
        const scalar_t inv_l = l[i] > 0 ? scalar_t(1.0 / l[i]) : scalar_t(0);
        cnt_u[qi] = cu[i];
        scalar_t* gr = gu + qi * D;
        if (cu[i] > 0) {
          row_u[qi] = su[i] / (double)cu[i] - lse;
          const scalar_t ic = scalar_t(1.0 / (double)cu[i]);
          for (int64_t d = 0; d < D; ++d) gr[d] = (pku[i * D + d] * ic - g[i * D + d] * inv_l) * inv_tau;
        } else {
          row_u[qi] = 0.0;
          for (int64_t d = 0; d < D; ++d) gr[d] = 0;
        }
        if (has_s) {
          cnt_s[qi] = cs[i];
          scalar_t* gr2 = gs + qi * D;
          if (cs[i] > 0) {
            row_s[qi] = ss[i] / (double)cs[i] - lse;
            const scalar_t ic = scalar_t(1.0 / (double)cs[i]);
            for (int64_t d = 0; d < D; ++d) gr2[d] = (pks[i * D + d] * ic - g[i * D + d] * inv_l) * inv_tau;
          } else {
            row_s[qi] = 0.0;
            for (int64_t d = 0; d < D; ++d) gr2[d] = 0;
          }
        }
      }
    }
  }
}

// loss = -sum(row) / Z, grad *= -1/Z; Z per normalization; sequential, deterministic reduction
double finish(const std::vector<double>& row, const std::vector<int64_t>& cnt, bool supcon, at::Tensor& grad) {
  double total = 0.0;
  int64_t z = 0;
  for (size_t i = 0; i < row.size(); ++i) {
    total += row[i];
    z += supcon ? (cnt[i] > 0 ? 1 : 0) : cnt[i];
  }
  if (z == 0) {
    grad.zero_();
    return 0.0;
  }
  grad.mul_(-1.0 / (double)z);
  return -total / (double)z;
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, std::optional<at::Tensor>> cap_contrastive(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& query_ids, const at::Tensor& key_ids,
    const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& key_labels,
    const at::Tensor& exclude_index, double temperature, const std::string& normalization) {
  TORCH_CHECK(normalization == "official" || normalization == "supcon",
              "cap_contrastive: normalization must be 'official' or 'supcon', got '", normalization, "'");
  TORCH_CHECK(temperature > 0, "cap_contrastive: temperature must be positive");
  TORCH_CHECK(q_in.dim() == 2 && k_in.dim() == 2 && q_in.size(1) == k_in.size(1),
              "cap_contrastive: q [B, D] and k [K, D] expected");
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu(), "cap_contrastive: CPU tensors expected");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type(), "cap_contrastive: q and k dtypes differ");
  const at::ScalarType out_dtype = q_in.scalar_type();
  TORCH_CHECK(at::isFloatingType(out_dtype), "cap_contrastive: floating point q expected");
  const bool low = out_dtype == at::kBFloat16 || out_dtype == at::kHalf;
  at::Tensor q = (low ? q_in.to(at::kFloat) : q_in).contiguous();
  at::Tensor k = (low ? k_in.to(at::kFloat) : k_in).contiguous();
  const int64_t B = q.size(0), NK = k.size(0), D = q.size(1);
  auto ids = [](const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() == n, name,
                " must be an int64 CPU tensor of ", n, " entries");
    return t.contiguous();
  };
  at::Tensor qid = ids(query_ids, B, "query_ids"), kid = ids(key_ids, NK, "key_ids");
  at::Tensor ex = ids(exclude_index, B, "exclude_index");
  const bool has_s = query_labels.has_value() && query_labels->defined() && key_labels.has_value() &&
                     key_labels->defined();
  at::Tensor qlab, klab;
  if (has_s) {
    qlab = ids(*query_labels, B, "query_labels");
    klab = ids(*key_labels, NK, "key_labels");
  }
  at::Tensor gu = at::empty({B, D}, q.options());
  at::Tensor gs = has_s ? at::empty({B, D}, q.options()) : at::Tensor();
  std::vector<double> row_u(B), row_s(has_s ? B : 0);
  std::vector<int64_t> cnt_u(B), cnt_s(has_s ? B : 0);
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cap_contrastive", [&] {
      contrastive_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), B, NK, D, qid.data_ptr<int64_t>(),
                                 kid.data_ptr<int64_t>(), has_s ? qlab.data_ptr<int64_t>() : nullptr,
                                 has_s ? klab.data_ptr<int64_t>() : nullptr, ex.data_ptr<int64_t>(),
                                 scalar_t(1.0 / temperature), has_s, gu.data_ptr<scalar_t>(),
                                 has_s ? gs.data_ptr<scalar_t>() : nullptr, row_u.data(), cnt_u.data(),
                                 row_s.data(), cnt_s.data());
    });
  }
  const bool supcon = normalization == "supcon";
  const double lu = finish(row_u, cnt_u, supcon, gu);
  at::Tensor loss_u = at::scalar_tensor(lu, at::TensorOptions().dtype(at::kFloat));
  std::optional<at::Tensor> loss_s, grad_s;
  if (has_s) {
    const double ls = finish(row_s, cnt_s, supcon, gs);
    loss_s = at::scalar_tensor(ls, at::TensorOptions().dtype(at::kFloat));
    grad_s = low ? gs.to(out_dtype) : gs;
  }
  return {loss_u, loss_s, low ? gu.to(out_dtype) : gu, grad_s};
}

}  // namespace capsparse
