// What the CUDA row-norm kernels (layer_norm_kernel.cu, rms_norm_kernel.cu) share: element conversions, 16-byte
// vector loads and stores, the row reduction, the launch shapes and the choice among them by row length, and the
// dtype dispatch of the C-ABI launchers. Pure CUDA, no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace vitfast_cuda {

constexpr int kWarpSize = 32;
constexpr int kRowsPerWarpBlock = 4;                      // warp-per-row kernels: 4 warps = 4 rows per block
constexpr int kWarpRowMaxCols = 1024;                     // longest row a single warp caches
constexpr int kMaxBlockThreads = 512;                     // block-per-row kernels: at most 16 warps
constexpr int kMaxWarps = kMaxBlockThreads / kWarpSize;
constexpr int64_t kMaxGrid = int64_t(1) << 30;            // larger problems loop over rows (grid-stride)
// Backward column sums (dweight, dbias): blocks of 32 columns x 8 row lanes.
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N consecutive elements at p, as floats. N > 1: p is 16-byte aligned and N elements are a whole
// number of 16-byte vectors.
template <int N, typename U>
__device__ __forceinline__ void load(const U* __restrict__ p, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = to_float(p[0]);
  } else {
    constexpr int kPer = 16 / sizeof(U);
    static_assert(N % kPer == 0, "vector loads move whole 16-byte vectors");
#pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[k];
      U e[kPer];
      memcpy(e, &raw, sizeof(raw));
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[k * kPer + j] = to_float(e[j]);
    }
  }
}

template <int N, typename U>
__device__ __forceinline__ void store(U* __restrict__ p, const float (&in)[N]) {
  if constexpr (N == 1) {
    p[0] = from_float<U>(in[0]);
  } else {
    constexpr int kPer = 16 / sizeof(U);
    static_assert(N % kPer == 0, "vector stores move whole 16-byte vectors");
#pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
      U e[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) e[j] = from_float<U>(in[k * kPer + j]);
      uint4 raw;
      memcpy(&raw, e, sizeof(raw));
      reinterpret_cast<uint4*>(p)[k] = raw;
    }
  }
}

// Sums each of the N values v over the threads of a row: the warp (BLOCK false) or the block
// (BLOCK true). Every thread gets the same sums. red: [kMaxWarps][N] floats of shared memory, which a
// thread may write again only once every thread of the block has read it: a kernel with several
// reductions per row gives each its own array, so the barrier of the next one orders the reads
// before the writes (see layer_norm_kernel and rms_norm_kernel).
template <bool BLOCK, int N>
__device__ __forceinline__ void row_sum(float (&v)[N], float (*red)[N]) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  if constexpr (BLOCK) {
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) red[warp][k] = v[k];
    }
    __syncthreads();
    const int nwarps = blockDim.x / kWarpSize;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = 0.f;
      for (int w = 0; w < nwarps; ++w) v[k] += red[w][k];
    }
  }
}

template <int... Is>
struct IterList {};

// Vectors cached per thread, by vector width. ITERS * V <= 32 floats of row data per thread keeps
// every instantiation spill-free on sm_90 (checked by tests/test_csrc_compile.py).
template <int V>
struct Iters;
template <>
struct Iters<8> { using type = IterList<1, 2, 3, 4>; };        // 16-bit dtypes, 16-byte vectors
template <>
struct Iters<4> { using type = IterList<1, 2, 3, 4, 6, 8>; };  // float32, 16-byte vectors
template <>
struct Iters<1> { using type = IterList<2, 8, 32>; };          // scalar fallback

// Launches k.cached<BLOCK, I>(grid, block) with the smallest I in (I, Rest...) that is >= iters (the
// caller ensures one is).
template <bool BLOCK, int I, int... Rest, typename K>
cudaError_t launch_iters(const K& k, int iters, dim3 grid, dim3 block) {
  if constexpr (sizeof...(Rest) > 0) {
    if (iters > I) return launch_iters<BLOCK, Rest...>(k, iters, grid, block);
  }
  return k.template cached<BLOCK, I>(grid, block);
}

// The path of a row-norm forward, by row length, for rows of `cols` elements moved as V-element vectors:
//   cols <= 1024    one warp per row, kRowsPerWarpBlock rows per block, the row cached in registers;
//   cols <= 16384   one block (<= 512 threads) per row, the row cached in registers;
//   larger          one block per row, re-reading the row from global memory (L2-resident).
// K launches the op's kernels on its stream and returns cudaGetLastError():
//   template <bool BLOCK, int ITERS> cudaError_t cached(dim3 grid, dim3 block) const;  // register-cached
//   cudaError_t wide(dim3 grid) const;                                                // kMaxBlockThreads threads
// where BLOCK false is a (32, kRowsPerWarpBlock) block with one row per warp, and thread t of a row owns its
// vectors t, t + blockDim.x, ... (ITERS of them, masked past cols).
template <int V, typename K, int... Is>
cudaError_t launch_rows(const K& k, int64_t rows, int64_t cols, IterList<Is...>) {
  const int64_t vectors = (cols + V - 1) / V;  // V-element vectors per row
  if (cols <= kWarpRowMaxCols) {
    const int iters = static_cast<int>((vectors + kWarpSize - 1) / kWarpSize);
    const int64_t blocks = (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock;
    const dim3 grid(static_cast<unsigned>(std::min(blocks, kMaxGrid)));
    return launch_iters<false, Is...>(k, iters, grid, dim3(kWarpSize, kRowsPerWarpBlock));
  }
  // Block per row: the fewest vectors per thread that fit in kMaxBlockThreads threads.
  const dim3 grid(static_cast<unsigned>(std::min(rows, kMaxGrid)));
  for (int iters : {Is...}) {
    const int64_t threads = ((vectors + iters - 1) / iters + kWarpSize - 1) / kWarpSize * kWarpSize;
    if (threads <= kMaxBlockThreads) {
      return launch_iters<true, Is...>(k, iters, grid, dim3(static_cast<unsigned>(threads)));
    }
  }
  return k.wide(grid);
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Calls f(T{}, W{}) with the element types of x and weight for a supported pair: x float32, float16 or bfloat16;
// weight float32 or x's dtype. cudaErrorInvalidValue for any other pair.
template <typename F>
cudaError_t with_cuda_dtypes(int x_dtype, int w_dtype, F&& f) {
  switch (x_dtype) {
    case VITFAST_FLOAT32:
      if (w_dtype == VITFAST_FLOAT32) return f(float{}, float{});
      break;
    case VITFAST_FLOAT16:
      if (w_dtype == VITFAST_FLOAT16) return f(__half{}, __half{});
      if (w_dtype == VITFAST_FLOAT32) return f(__half{}, float{});
      break;
    case VITFAST_BFLOAT16:
      if (w_dtype == VITFAST_BFLOAT16) return f(__nv_bfloat16{}, __nv_bfloat16{});
      if (w_dtype == VITFAST_FLOAT32) return f(__nv_bfloat16{}, float{});
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace vitfast_cuda
