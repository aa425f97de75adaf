// capsparse CPU kernels: a tiny SIMD layer and the register-blocked micro-kernel.
//
// The micro-kernel computes an MR x (SV * VW) tile of C (16 columns, or 32 on AVX-512 with SV = 2):
//   C[i, 0:W] (+)= sum_{q < nb} sum_{p < L} A[idx[q]*a_blk + p*lda + i*a_row] * B[q*b_blk + p*ldb + 0:W]
// A is read in place (no packing): a_row is the stride between its MR rows.
// with every output element accumulated by one fused multiply-add chain in ascending (q, p)
// order, so the result never depends on how the work is split among threads.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace capsparse {

constexpr int NR = 16;  // width of a micro-tile (one output strip); bm / bk must be multiples of it

#if defined(__AVX512F__)
constexpr int VW = 16;
constexpr int MRMAX = 12;
typedef __m512 vf;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vbcast(const float* p) { return _mm512_set1_ps(*p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static constexpr const char* kSimd = "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VW = 8;
constexpr int MRMAX = 6;
typedef __m256 vf;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vbcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static constexpr const char* kSimd = "avx2+fma";
#else
constexpr int VW = 1;
constexpr int MRMAX = 4;
typedef float vf;
static inline vf vzero() { return 0.f; }
static inline vf vload(const float* p) { return *p; }
static inline void vstore(float* p, vf v) { *p = v; }
static inline vf vbcast(const float* p) { return *p; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static constexpr const char* kSimd = "scalar";
#endif
constexpr int NV = NR / VW;
// The wide strip: 32 columns on AVX-512 (two vectors per broadcast: 2 + MR loads per 2 * MR fused multiply-adds
// instead of 1 + MR per MR, which leaves the load ports idle on cores with two 512-bit FMA units), else NR.
#if defined(__AVX512F__)
constexpr int NRW = 32;
#else
constexpr int NRW = NR;
#endif
constexpr int NVW = NRW / VW;

#if defined(__AVX2__)
// An 8 x 8 transpose through registers: dst[c * ld + r] = element c of row r. The 8 stores go in ascending c,
// so with ld < 8 each store overwrites the previous one's tail (pack_rows relies on that).
static inline void transpose8x8_store(__m256 r0, __m256 r1, __m256 r2, __m256 r3, __m256 r4, __m256 r5, __m256 r6,
                                      __m256 r7, float* dst, int64_t ld) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ld, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// mode 0: start from zero; 1: accumulate into C; 2: start from the strip-wide vector `init` (bias).
template <int MR, int SV = NV>
static inline __attribute__((always_inline)) void ukr(int64_t nb, const int32_t* __restrict idx, int64_t L, const float* __restrict A, int64_t a_blk,
                int64_t lda, int64_t a_row, const float* __restrict B, int64_t b_blk, int64_t ldb, float* __restrict C,
                int64_t ldc, int mode, const float* __restrict init) {
  vf acc[MR][SV];
  if (mode == 1) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
      for (int v = 0; v < SV; ++v) acc[i][v] = vload(C + i * ldc + v * VW);
  } else if (mode == 2) {
#pragma GCC unroll 16
    for (int v = 0; v < SV; ++v) {
      vf b = vload(init + v * VW);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i][v] = b;
    }
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
      for (int v = 0; v < SV; ++v) acc[i][v] = vzero();
  }
  for (int64_t q = 0; q < nb; ++q) {
    const float* a = A + (int64_t)idx[q] * a_blk;
    const float* b = B + q * b_blk;
    for (int64_t p = 0; p < L; ++p) {
      vf bv[SV];
#pragma GCC unroll 16
      for (int v = 0; v < SV; ++v) bv[v] = vload(b + v * VW);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        vf av = vbcast(a + i * a_row);
#pragma GCC unroll 16
        for (int v = 0; v < SV; ++v) acc[i][v] = vfma(av, bv[v], acc[i][v]);
      }
      a += lda;
      b += ldb;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < SV; ++v) vstore(C + i * ldc + v * VW, acc[i][v]);
}

typedef void (*ukr_fn)(int64_t, const int32_t*, int64_t, const float*, int64_t, int64_t, int64_t, const float*, int64_t,
                       int64_t, float*, int64_t, int, const float*);

// the micro-kernel for mr rows and a strip of `width` columns (NR, or NRW where that is wider)
template <int SV>
static inline ukr_fn ukr_for_sv(int mr) {
  switch (mr) {
    case 1: return ukr<1, SV>;
    case 2: return ukr<2, SV>;
    case 3: return ukr<3, SV>;
    case 4: return ukr<4, SV>;
    default: break;
  }
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  switch (mr) {
    case 5: return ukr<5, SV>;
    case 6: return ukr<6, SV>;
#if defined(__AVX512F__)
    case 7: return ukr<7, SV>;
    case 8: return ukr<8, SV>;
    case 9: return ukr<9, SV>;
    case 10: return ukr<10, SV>;
    case 11: return ukr<11, SV>;
    case 12: return ukr<12, SV>;
#endif
    default: break;
  }
#endif
  return nullptr;
}

static inline ukr_fn ukr_for(int mr, int width = NR) {
  if (NVW != NV && width == NRW) return ukr_for_sv<NVW>(mr);
  return ukr_for_sv<NV>(mr);
}

}  // namespace capsparse
