// capsparse CUDA kernels: shared helpers (CUDA headers only, no torch).
//
// Dtype codes used by every extern "C" launcher in csrc/cuda/*.cu:
//   0 = float32, 1 = float16, 2 = bfloat16.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace capsparse_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// float <-> storage type conversions.
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Raw bit containers used for vectorised global <-> shared copies.
template <int BYTES> struct RawVec;
template <> struct RawVec<16> { typedef uint4 type; };
template <> struct RawVec<8> { typedef uint2 type; };
template <> struct RawVec<4> { typedef unsigned int type; };
template <> struct RawVec<2> { typedef unsigned short type; };

template <typename V> __device__ __forceinline__ V raw_zero();
template <> __device__ __forceinline__ uint4 raw_zero<uint4>() { return make_uint4(0u, 0u, 0u, 0u); }
template <> __device__ __forceinline__ uint2 raw_zero<uint2>() { return make_uint2(0u, 0u); }
template <> __device__ __forceinline__ unsigned int raw_zero<unsigned int>() { return 0u; }
template <> __device__ __forceinline__ unsigned short raw_zero<unsigned short>() { return (unsigned short)0; }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace capsparse_cuda
