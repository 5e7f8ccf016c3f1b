// RMSNorm for CUDA. Pure CUDA (no torch headers): it compiles with bare nvcc, and ops.cpp calls the
// C-ABI launchers at the bottom with raw pointers.
//
// Dtypes: x / y in float32, float16, bfloat16; weight in float32 or x's dtype. y = x · rstd · w with
// rstd = rsqrt(Σx² / n + eps), all in fp32, rounded to y's dtype once. One reduction per row (Σx²): a
// sum of squares has no cancellation, so unlike LayerNorm's statistics it needs no correction pass.
//
// The paths of LayerNorm's forward, chosen from the row length `cols` (launch_rows, common.cuh): one
// warp per row (cols <= 1024) or one block per row (cols <= 16384) with the row cached in registers,
// else one block per row re-reading the row; 16-byte vectors when every pointer is 16-byte aligned and
// cols is a multiple of the vector width, else single elements. Rows are independent: no atomics, no
// host sync. With rstd_out the first thread of each row also stores its rstd.
//
// Backward (rms_norm.h): LayerNorm's, without the mean and the bias: dx with one warp per row, two passes
// over the row (any length); dweight as column sums, 32 columns x 8 row lanes per block and one block row
// per chunk of rows, written per chunk and added up by the caller (deterministic, no atomics).

#include "common.cuh"
#include "rms_norm.h"

namespace {

using namespace vitfast_cuda;

// Register-cached RMSNorm. A row is handled by blockDim.x threads: one warp (BLOCK false,
// blockDim = (32, kRowsPerWarpBlock), row = warp) or the whole block (BLOCK true, blockDim.x a
// multiple of 32, <= kMaxBlockThreads). Thread t owns the V-element vectors t, t + blockDim.x, ...
// (ITERS of them, masked past cols), so ITERS * V >= cols / blockDim.x.
template <typename T, typename W, int V, int ITERS, bool BLOCK>
__global__ void __launch_bounds__(BLOCK ? kMaxBlockThreads : kWarpSize * kRowsPerWarpBlock)
rms_norm_kernel(const T* __restrict__ x,         // [rows, cols]
                const W* __restrict__ weight,    // [cols]
                T* __restrict__ y,               // [rows, cols]
                float* __restrict__ rstd_out,    // [rows] or null
                int64_t rows, int cols, float eps) {
  // One reduction per row, so consecutive rows of a block alternate between two arrays: a thread writes
  // red[p] again (two rows on) only after every thread passed the barrier of the row between, which
  // each reaches after reading red[p].
  __shared__ float red[2][BLOCK ? kMaxWarps : 1][1];
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t first = BLOCK ? int64_t(blockIdx.x) : int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t step = BLOCK ? int64_t(gridDim.x) : int64_t(gridDim.x) * blockDim.y;

  int parity = 0;
  for (int64_t row = first; row < rows; row += step, parity ^= 1) {
    const int64_t base = row * cols;
    float v[ITERS][V];
    float ss[1] = {0.f};  // Σ x²
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int col = (tid + i * nthreads) * V;
      if (col < cols) {
        load<V>(x + base + col, v[i]);
#pragma unroll
        for (int j = 0; j < V; ++j) ss[0] += v[i][j] * v[i][j];
      }
    }
    row_sum<BLOCK>(ss, red[parity]);
    const float rstd = rsqrtf(ss[0] / cols + eps);
    if (rstd_out != nullptr && tid == 0) rstd_out[row] = rstd;

#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int col = (tid + i * nthreads) * V;
      if (col < cols) {
        float w[V];
        load<V>(weight + col, w);
#pragma unroll
        for (int j = 0; j < V; ++j) v[i][j] = v[i][j] * rstd * w[j];
        store<V>(y + base + col, v[i]);
      }
    }
  }
}

// Rows too long to cache in registers: two passes over global memory (the row is L2-resident after the
// first).
template <typename T, typename W>
__global__ void __launch_bounds__(kMaxBlockThreads)
rms_norm_wide_kernel(const T* __restrict__ x,         // [rows, cols]
                     const W* __restrict__ weight,    // [cols]
                     T* __restrict__ y,               // [rows, cols]
                     float* __restrict__ rstd_out,    // [rows] or null
                     int64_t rows, int64_t cols, float eps) {
  __shared__ float red[2][kMaxWarps][1];  // alternating between rows, as in rms_norm_kernel
  int parity = 0;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x, parity ^= 1) {
    const int64_t base = row * cols;
    float ss[1] = {0.f};
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float v = to_float(x[base + c]);
      ss[0] += v * v;
    }
    row_sum<true>(ss, red[parity]);
    const float rstd = rsqrtf(ss[0] / cols + eps);
    if (rstd_out != nullptr && threadIdx.x == 0) rstd_out[row] = rstd;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      y[base + c] = from_float<T>(to_float(x[base + c]) * rstd * to_float(weight[c]));
    }
  }
}

// Backward, dx: one warp per row (4 rows per block), any cols, two passes over the row (L1/L2-resident
// after the first): the sum Σ g·xhat, then dx = rstd · (g - xhat · Σg·xhat / n).
template <typename T, typename W>
__global__ void __launch_bounds__(kWarpSize * kRowsPerWarpBlock)
rms_norm_bwd_dx_kernel(const T* __restrict__ dy,         // [rows, cols]
                       const T* __restrict__ x,          // [rows, cols]
                       const float* __restrict__ rstd,   // [rows]
                       const W* __restrict__ weight,     // [cols]
                       T* __restrict__ dx,               // [rows, cols]
                       int64_t rows, int64_t cols) {
  const int lane = threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += step) {
    const int64_t base = row * cols;
    const float rs = rstd[row];
    float sum[1] = {0.f};  // Σ g·xhat
    for (int64_t c = lane; c < cols; c += kWarpSize) {
      sum[0] += to_float(dy[base + c]) * to_float(weight[c]) * to_float(x[base + c]) * rs;
    }
    row_sum<false, 1>(sum, nullptr);
    const float b = sum[0] / cols;
    for (int64_t c = lane; c < cols; c += kWarpSize) {
      const float g = to_float(dy[base + c]) * to_float(weight[c]);
      const float xh = to_float(x[base + c]) * rs;
      dx[base + c] = from_float<T>(rs * (g - xh * b));
    }
  }
}

// Backward, column sums: block (32, 8) = 32 columns x 8 row lanes (coalesced along the row), blockIdx.y
// one chunk of rows; writes the chunk's Σ dy·xhat of its 32 columns to part_w.
template <typename T>
__global__ void __launch_bounds__(kColTile * kRowLanes)
rms_norm_bwd_dw_kernel(const T* __restrict__ dy,         // [rows, cols]
                       const T* __restrict__ x,          // [rows, cols]
                       const float* __restrict__ rstd,   // [rows]
                       float* __restrict__ part_w,       // [chunks, cols]
                       int64_t rows, int64_t cols, int64_t per_chunk) {
  __shared__ float red_w[kRowLanes][kColTile + 1];
  const int64_t col = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t first = int64_t(blockIdx.y) * per_chunk;
  const int64_t last = first + per_chunk < rows ? first + per_chunk : rows;
  float acc = 0.f;
  if (col < cols) {
    for (int64_t r = first + threadIdx.y; r < last; r += kRowLanes) {
      acc += to_float(dy[r * cols + col]) * to_float(x[r * cols + col]) * rstd[r];
    }
  }
  red_w[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float w = 0.f;
#pragma unroll
    for (int k = 0; k < kRowLanes; ++k) w += red_w[k][threadIdx.x];
    part_w[int64_t(blockIdx.y) * cols + col] = w;
  }
}

template <typename T, typename W>
cudaError_t launch_backward(const void* dy, const void* x, const float* rstd, const void* weight, void* dx,
                            float* part_w, int64_t chunks, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t blocks = (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock;
  rms_norm_bwd_dx_kernel<T, W><<<dim3(static_cast<unsigned>(std::min(blocks, kMaxGrid))),
                                 dim3(kWarpSize, kRowsPerWarpBlock), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), rstd, static_cast<const W*>(weight), static_cast<T*>(dx),
      rows, cols);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>((cols + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  rms_norm_bwd_dw_kernel<T><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), rstd, part_w, rows, cols, per_chunk);
  return cudaGetLastError();
}

struct Problem {
  const void* x;
  const void* weight;
  void* y;
  float* rstd_out;
  int64_t rows;
  int64_t cols;
  float eps;
  cudaStream_t stream;
};

// The forward's kernels for launch_rows (common.cuh).
template <typename T, typename W, int V>
struct Launcher {
  const Problem& p;

  template <bool BLOCK, int ITERS>
  cudaError_t cached(dim3 grid, dim3 block) const {
    rms_norm_kernel<T, W, V, ITERS, BLOCK><<<grid, block, 0, p.stream>>>(
        static_cast<const T*>(p.x), static_cast<const W*>(p.weight), static_cast<T*>(p.y), p.rstd_out, p.rows,
        static_cast<int>(p.cols), p.eps);
    return cudaGetLastError();
  }

  cudaError_t wide(dim3 grid) const {
    rms_norm_wide_kernel<T, W><<<grid, kMaxBlockThreads, 0, p.stream>>>(
        static_cast<const T*>(p.x), static_cast<const W*>(p.weight), static_cast<T*>(p.y), p.rstd_out, p.rows,
        p.cols, p.eps);
    return cudaGetLastError();
  }
};

template <typename T, typename W>
cudaError_t launch(const Problem& p) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = p.cols % kVec == 0 && aligned16(p.x) && aligned16(p.weight) && aligned16(p.y);
  if (vectorized) return launch_rows<kVec>(Launcher<T, W, kVec>{p}, p.rows, p.cols, typename Iters<kVec>::type{});
  return launch_rows<1>(Launcher<T, W, 1>{p}, p.rows, p.cols, typename Iters<1>::type{});
}

}  // namespace

extern "C" cudaError_t vitfast_rms_norm_backward_cuda(int x_dtype, int w_dtype, const void* dy, const void* x,
                                                      const float* rstd, const void* weight, void* dx, float* part_w,
                                                      int64_t chunks, int64_t rows, int64_t cols,
                                                      cudaStream_t stream) {
  if (rows < 0 || cols < 0 || chunks < 1 || chunks > 65535) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  return with_cuda_dtypes(x_dtype, w_dtype, [&](auto t, auto w) {
    return launch_backward<decltype(t), decltype(w)>(dy, x, rstd, weight, dx, part_w, chunks, rows, cols, stream);
  });
}

extern "C" cudaError_t vitfast_rms_norm_cuda(int x_dtype, int w_dtype, const void* x, const void* weight, void* y,
                                             float* rstd_out, int64_t rows, int64_t cols, double eps,
                                             cudaStream_t stream) {
  if (rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const Problem p{x, weight, y, rstd_out, rows, cols, static_cast<float>(eps), stream};
  return with_cuda_dtypes(x_dtype, w_dtype, [&](auto t, auto w) { return launch<decltype(t), decltype(w)>(p); });
}
