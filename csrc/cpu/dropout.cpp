// Dropout with a counter-based RNG: element i is kept when the (i % 4)-th word of Philox4x32-10 at counter
// (i / 4) under the 64-bit key `seed` is below (1 - p) * 2^32. The mask is a pure function of (seed, i), so
// the backward regenerates it instead of saving one, and the result does not depend on the thread count.
// capsparse/backends/reference.py (philox_words) computes the same words with PyTorch integer ops.
#include "common.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace capsparse {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // Philox4x32 multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule
constexpr int64_t kGrain = 1 << 14;                             // elements per parallel chunk (a multiple of 64)

inline void philox_scalar(uint64_t ctr, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = (uint64_t)kMul0 * c0, p1 = (uint64_t)kMul1 * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = n0;
    c2 = n2;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

// y[i] = keep(i) ? x[i] * scale : 0 for i in [begin, end); keep(i) <=> word(i) < thr (thr <= 2^32)
// (half types are scaled in fp32: one rounding, as torch's own mul)
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void dropout_scalar(const scalar_t* x, scalar_t* y, int64_t begin, int64_t end, uint64_t seed, uint64_t thr,
                    acc_t scale) {
  uint32_t w[4];
  for (int64_t i = begin; i < end; ++i) {
    if (i == begin || (i & 3) == 0) philox_scalar((uint64_t)i >> 2, seed, w);
    y[i] = (uint64_t)w[i & 3] < thr ? scalar_t(acc_t(x[i]) * scale) : scalar_t(0);
  }
}

#if defined(__AVX2__)
// 32-bit high and low halves of a * b for the 8 lanes
inline void mulhilo(__m256i a, __m256i b, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Round keys of Philox4x32-10, broadcast once per call
struct Keys8 {
  __m256i k0[10], k1[10];
  explicit Keys8(uint64_t seed) {
    uint32_t a = (uint32_t)seed, b = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r, a += kWeyl0, b += kWeyl1) {
      k0[r] = _mm256_set1_epi32((int)a);
      k1[r] = _mm256_set1_epi32((int)b);
    }
  }
};

// Philox at counters ctr + 8 * g + l for G groups of 8 lanes; word j of counter ctr + 8g + l lands in c[g][j] lane l.
// The groups are independent chains: interleaving them hides the multiplies' latency.
template <int G>
inline void philox8(uint64_t ctr, const Keys8& key, __m256i c[G][4]) {
  const __m256i m0 = _mm256_set1_epi32((int)kMul0), m1 = _mm256_set1_epi32((int)kMul1);
  // ctr is a multiple of 8 * G (callers start at multiples of 32 * G elements): ctr + 8g + l never carries
  for (int g = 0; g < G; ++g) {
    c[g][0] = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)(ctr + 8 * g)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    c[g][1] = _mm256_set1_epi32((int)(uint32_t)(ctr >> 32));
    c[g][2] = c[g][3] = _mm256_setzero_si256();
  }
  for (int r = 0; r < 10; ++r) {
    for (int g = 0; g < G; ++g) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(c[g][0], m0, hi0, lo0);
      mulhilo(c[g][2], m1, hi1, lo1);
      c[g][0] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[g][1]), key.k0[r]);
      c[g][2] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[g][3]), key.k1[r]);
      c[g][1] = lo1;
      c[g][3] = lo0;
    }
  }
}

// y = keep ? x * scale : 0 for 32 elements whose words are the 8 counters' 4 words in c
inline void apply32(const float* x, float* y, const __m256i c[4], __m256i vthr, __m256 vscale) {
  const __m256i flip = _mm256_set1_epi32((int)0x80000000u);
  // element 4l + j takes word j of lane l: interleave the four word vectors into element order
  const __m256i a01 = _mm256_unpacklo_epi32(c[0], c[1]), b01 = _mm256_unpackhi_epi32(c[0], c[1]);
  const __m256i a23 = _mm256_unpacklo_epi32(c[2], c[3]), b23 = _mm256_unpackhi_epi32(c[2], c[3]);
  // e0 = counters 0 | 4 (128-bit halves), e1 = 1 | 5, e2 = 2 | 6, e3 = 3 | 7
  const __m256i e0 = _mm256_unpacklo_epi64(a01, a23), e1 = _mm256_unpackhi_epi64(a01, a23);
  const __m256i e2 = _mm256_unpacklo_epi64(b01, b23), e3 = _mm256_unpackhi_epi64(b01, b23);
  const __m256i w[4] = {_mm256_permute2x128_si256(e0, e1, 0x20), _mm256_permute2x128_si256(e2, e3, 0x20),
                        _mm256_permute2x128_si256(e0, e1, 0x31), _mm256_permute2x128_si256(e2, e3, 0x31)};
  for (int q = 0; q < 4; ++q) {
    const __m256i keep = _mm256_cmpgt_epi32(vthr, _mm256_xor_si256(w[q], flip));  // unsigned word < thr
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * q), vscale);
    _mm256_storeu_ps(y + 8 * q, _mm256_and_ps(v, _mm256_castsi256_ps(keep)));
  }
}

// fp32, 64 elements per step (two Philox groups); begin is a multiple of 64
void dropout_avx2(const float* x, float* y, int64_t begin, int64_t end, uint64_t seed, uint64_t thr, float scale) {
  const int64_t vend = begin + ((end - begin) / 64) * 64;
  const Keys8 key(seed);
  const __m256 vscale = _mm256_set1_ps(scale);
  // thr < 2^32 here (p > 0): compare in signed form after flipping the sign bits
  const __m256i vthr = _mm256_set1_epi32((int)((uint32_t)thr ^ 0x80000000u));
  for (int64_t i = begin; i < vend; i += 64) {
    __m256i c[2][4];
    philox8<2>((uint64_t)i >> 2, key, c);
    apply32(x + i, y + i, c[0], vthr, vscale);
    apply32(x + i + 32, y + i + 32, c[1], vthr, vscale);
  }
  dropout_scalar<float>(x, y, vend, end, seed, thr, scale);
}
#endif

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void dropout_chunk(const scalar_t* x, scalar_t* y, int64_t begin, int64_t end, uint64_t seed, uint64_t thr,
                   acc_t scale) {
  dropout_scalar<scalar_t>(x, y, begin, end, seed, thr, scale);
}

#if defined(__AVX2__)
template <>
void dropout_chunk<float>(const float* x, float* y, int64_t begin, int64_t end, uint64_t seed, uint64_t thr,
                          float scale) {
  dropout_avx2(x, y, begin, end, seed, thr, scale);
}
#endif

}  // namespace

at::Tensor dropout_apply(const at::Tensor& x_in, double p, const at::Tensor& seed) {
  TORCH_CHECK(x_in.device().is_cpu(), "dropout: CPU tensor expected");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "dropout: floating point input expected");
  TORCH_CHECK(p > 0.0 && p < 1.0, "dropout: p must be in (0, 1) here (0 and 1 are handled by the caller), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "dropout: seed must be one int64");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  const uint64_t thr = (uint64_t)std::floor((1.0 - p) * 4294967296.0);
  const uint64_t s = (uint64_t)seed.item<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const auto scale = at::opmath_type<scalar_t>(1.0 / (1.0 - p));
    at::parallel_for(0, (n + kGrain - 1) / kGrain, 1, [&](int64_t c0, int64_t c1) {
      const int64_t begin = c0 * kGrain, end = std::min(n, c1 * kGrain);
      dropout_chunk<scalar_t>(xp, yp, begin, end, s, thr, scale);
    });
  });
  return y;
}

}  // namespace capsparse
