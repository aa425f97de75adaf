// capsparse: device-side block-layout metadata (docs/design.md, "Block layout metadata").
//
// bitmap (uint8/bool, R x C, row stride ld) -> row_ptr[R+1], row_cols[R*C], col_ptr[C+1],
// col_rows[R*C], block_rows[R*C], nnz (int64).  Fixed capacity R*C; entries >= nnz are 0.
// One kernel, two CTAs: CTA 0 builds the row-major (forward / dW) lists, CTA 1 the column-major
// (dX) lists.  Each walks its order in tiles of blockDim.x flags with a block-wide exclusive scan
// built from warp shuffles, carrying a running offset.  No host synchronisation anywhere, so the
// launch is CUDA-graph safe.
#include "common.cuh"

namespace capsparse_cuda {
namespace meta {

constexpr int NT = 1024;
constexpr int NWARPS = NT / 32;

// Block-wide exclusive scan of v; returns the exclusive prefix and sets total.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int& total) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  int inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int s = lane < NWARPS ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += n;
    }
    if (lane < NWARPS) warp_sums[lane] = s;  // inclusive prefix over warps
  }
  __syncthreads();
  const int excl = inc - v + (warp > 0 ? warp_sums[warp - 1] : 0);
  total = warp_sums[NWARPS - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return excl;
}

__global__ void __launch_bounds__(NT)
build_block_metadata_kernel(const unsigned char* __restrict__ bitmap, long long ld, int R, int C,
                            int* __restrict__ row_ptr, int* __restrict__ row_cols, int* __restrict__ col_ptr,
                            int* __restrict__ col_rows, int* __restrict__ block_rows, long long* __restrict__ nnz) {
  __shared__ int warp_sums[NWARPS];
  const int cap = R * C;
  const bool by_rows = blockIdx.x == 0;
  const int outer = by_rows ? R : C, inner = by_rows ? C : R;
  int* ptr = by_rows ? row_ptr : col_ptr;
  int base = 0;
  for (int t0 = 0; t0 < cap; t0 += NT) {
    const int f = t0 + int(threadIdx.x);  // flat index in this CTA's order
    int o = 0, i = 0, keep = 0;
    if (f < cap) {
      o = f / inner;
      i = f - o * inner;
      const int r = by_rows ? o : i, c = by_rows ? i : o;
      keep = bitmap[(long long)r * ld + c] != 0;
    }
    int tile_total;
    const int pos = base + block_exclusive_scan(keep, warp_sums, tile_total);
    if (f < cap) {
      if (i == 0) ptr[o] = pos;  // kept blocks before this row (column)
      if (keep) {
        if (by_rows) {
          row_cols[pos] = i;
          block_rows[pos] = o;
        } else {
          col_rows[pos] = i;
        }
      }
    }
    base += tile_total;
  }
  if (threadIdx.x == 0) {
    ptr[outer] = base;
    if (by_rows) *nnz = (long long)base;
  }
  for (int p = base + int(threadIdx.x); p < cap; p += NT) {  // padding
    if (by_rows) {
      row_cols[p] = 0;
      block_rows[p] = 0;
    } else {
      col_rows[p] = 0;
    }
  }
  if (cap == 0) {  // R == 0 or C == 0: every pointer entry is 0
    for (int p = int(threadIdx.x); p <= outer; p += NT) ptr[p] = 0;
  }
}

}  // namespace meta
}  // namespace capsparse_cuda

// bitmap: R x C bytes (nonzero = kept) with row stride ld (elements).  Outputs are device buffers
// of the sizes in docs/design.md; nnz is one int64.  block_cols is row_cols (same tensor).
extern "C" cudaError_t capsparse_build_block_metadata(const unsigned char* bitmap, long long ld, int R, int C,
                                                      int* row_ptr, int* row_cols, int* col_ptr, int* col_rows,
                                                      int* block_rows, long long* nnz, cudaStream_t stream) {
  if (R < 0 || C < 0 || ld < C) return cudaErrorInvalidValue;
  if ((long long)R * (long long)C > 0x7fffffffll) return cudaErrorInvalidValue;
  capsparse_cuda::meta::build_block_metadata_kernel<<<2, capsparse_cuda::meta::NT, 0, stream>>>(
      bitmap, ld, R, C, row_ptr, row_cols, col_ptr, col_rows, block_rows, nnz);
  return cudaGetLastError();
}
