// LayerNorm and fused residual-add + LayerNorm for CUDA. Pure CUDA (no torch headers): it compiles
// with bare nvcc, and ops.cpp calls the C-ABI launcher at the bottom with raw pointers.
//
// Dtypes: x / residual / y / s in float32, float16, bfloat16; weight and bias in float32 or x's
// dtype. Statistics in fp32, corrected two-pass over the row held in registers (never E[x²] - E[x]²):
// pass 1 gives an approximate mean m; pass 2 sums d = x - m and d², then shift = Σd / n (mean =
// m + shift) and var = Σd² / n - shift², and y = ((x - m) - shift) * rstd * w + b. This stays
// accurate for rows far from zero (mean 1e3, std 1), where even rounding the mean to fp32 would not.
//
// Three paths, chosen from the row length `cols` (launch_rows, common.cuh):
//   cols <= 1024    one warp per row, 4 rows per block, the row cached in registers;
//   cols <= 16384   one block (<= 512 threads) per row, the row cached in registers;
//   larger          one block per row, re-reading the row from global memory (L2-resident).
// Each thread moves 16-byte vectors when every pointer is 16-byte aligned and cols is a multiple
// of the vector width, else single elements. Rows are independent: no atomics, no host sync.
// With mean_out / rstd_out the first thread of each row also stores its mean and rstd.
//
// Backward (layer_norm.h): dx with one warp per row, two passes over the row (any length); dweight and
// dbias as column sums, 32 columns x 8 row lanes per block and one block row per chunk of rows,
// written per chunk and added up by the caller (deterministic, no atomics).

#include "common.cuh"
#include "layer_norm.h"

namespace {

using namespace vitfast_cuda;

// (shift, rstd) from the pass-2 sums {Σ(x - m), Σ(x - m)²} over n elements; the mean is m + shift.
__device__ __forceinline__ void finish_stats(const float (&dev)[2], int64_t n, float eps, float& shift, float& rstd) {
  shift = dev[0] / n;
  rstd = rsqrtf(fmaxf(dev[1] / n - shift * shift, 0.f) + eps);
}

// Register-cached LayerNorm. A row is handled by blockDim.x threads: one warp (BLOCK false,
// blockDim = (32, kRowsPerWarpBlock), row = warp) or the whole block (BLOCK true, blockDim.x a
// multiple of 32, <= kMaxBlockThreads). Thread t owns the V-element vectors t, t + blockDim.x, ...
// (ITERS of them, masked past cols), so ITERS * V >= cols / blockDim.x.
template <typename T, typename W, bool ADD, int V, int ITERS, bool BLOCK>
__global__ void __launch_bounds__(BLOCK ? kMaxBlockThreads : kWarpSize * kRowsPerWarpBlock)
layer_norm_kernel(const T* __restrict__ x,         // [rows, cols]
                  const T* __restrict__ residual,  // [rows, cols] (ADD) or null
                  const W* __restrict__ weight,    // [cols]
                  const W* __restrict__ bias,      // [cols]
                  T* __restrict__ y,               // [rows, cols]
                  T* __restrict__ sum_out,         // [rows, cols] (ADD) or null
                  float* __restrict__ mean_out,    // [rows] or null
                  float* __restrict__ rstd_out,    // [rows] or null
                  int64_t rows, int cols, float eps) {
  __shared__ float red_sum[BLOCK ? kMaxWarps : 1][1];
  __shared__ float red_dev[BLOCK ? kMaxWarps : 1][2];
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t first = BLOCK ? int64_t(blockIdx.x) : int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t step = BLOCK ? int64_t(gridDim.x) : int64_t(gridDim.x) * blockDim.y;

  for (int64_t row = first; row < rows; row += step) {
    const int64_t base = row * cols;
    float v[ITERS][V];
    float sum[1] = {0.f};
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int col = (tid + i * nthreads) * V;
      if (col < cols) {
        load<V>(x + base + col, v[i]);
        if constexpr (ADD) {
          float r[V];
          load<V>(residual + base + col, r);
          // Normalize s as stored in T, so y == LN(returned s) exactly as the reference computes it.
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = to_float(from_float<T>(v[i][j] + r[j]));
          store<V>(sum_out + base + col, v[i]);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) sum[0] += v[i][j];
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[i][j] = 0.f;
      }
    }
    row_sum<BLOCK>(sum, red_sum);
    const float m = sum[0] / cols;

    float dev[2] = {0.f, 0.f};  // Σ(x - m), Σ(x - m)²
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int col = (tid + i * nthreads) * V;
      if (col < cols) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = v[i][j] - m;
          dev[0] += d;
          dev[1] += d * d;
        }
      }
    }
    row_sum<BLOCK>(dev, red_dev);
    float shift, rstd;
    finish_stats(dev, cols, eps, shift, rstd);
    if (mean_out != nullptr && tid == 0) {
      mean_out[row] = m + shift;
      rstd_out[row] = rstd;
    }

#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int col = (tid + i * nthreads) * V;
      if (col < cols) {
        float w[V], b[V];
        load<V>(weight + col, w);
        load<V>(bias + col, b);
#pragma unroll
        for (int j = 0; j < V; ++j) v[i][j] = ((v[i][j] - m) - shift) * rstd * w[j] + b[j];
        store<V>(y + base + col, v[i]);
      }
    }
    // No barrier needed before the next row: a thread writes red_sum again only after every
    // thread passed the barrier in the red_dev reduction, i.e. finished reading red_sum (and
    // likewise for red_dev with the next row's red_sum barrier).
  }
}

// Rows too long to cache in registers: three passes over global memory (the row is L2-resident
// after the first). Thread t owns elements t, t + blockDim.x, ... in every pass, so with ADD it
// re-reads the s it wrote itself.
template <typename T, typename W, bool ADD>
__global__ void __launch_bounds__(kMaxBlockThreads)
layer_norm_wide_kernel(const T* __restrict__ x,         // [rows, cols]
                       const T* __restrict__ residual,  // [rows, cols] (ADD) or null
                       const W* __restrict__ weight,    // [cols]
                       const W* __restrict__ bias,      // [cols]
                       T* __restrict__ y,               // [rows, cols]
                       T* sum_out,                      // [rows, cols] (ADD) or null; re-read
                       float* __restrict__ mean_out,    // [rows] or null
                       float* __restrict__ rstd_out,    // [rows] or null
                       int64_t rows, int64_t cols, float eps) {
  __shared__ float red_sum[kMaxWarps][1];
  __shared__ float red_dev[kMaxWarps][2];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * cols;
    float sum[1] = {0.f};
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float v = to_float(x[base + c]);
      if constexpr (ADD) {
        const T s = from_float<T>(v + to_float(residual[base + c]));
        sum_out[base + c] = s;
        v = to_float(s);
      }
      sum[0] += v;
    }
    row_sum<true>(sum, red_sum);
    const float m = sum[0] / cols;
    const T* src = ADD ? sum_out : x;

    float dev[2] = {0.f, 0.f};
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float d = to_float(src[base + c]) - m;
      dev[0] += d;
      dev[1] += d * d;
    }
    row_sum<true>(dev, red_dev);
    float shift, rstd;
    finish_stats(dev, cols, eps, shift, rstd);
    if (mean_out != nullptr && threadIdx.x == 0) {
      mean_out[row] = m + shift;
      rstd_out[row] = rstd;
    }

    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float v = ((to_float(src[base + c]) - m) - shift) * rstd;
      y[base + c] = from_float<T>(v * to_float(weight[c]) + to_float(bias[c]));
    }
  }
}

// Backward, dx: one warp per row (4 rows per block), any cols, two passes over the row (L1/L2-resident
// after the first): the sums Σ g and Σ g·xhat, then dx = rstd · (g - Σg/n - xhat · Σg·xhat/n).
template <typename T, typename W>
__global__ void __launch_bounds__(kWarpSize * kRowsPerWarpBlock)
layer_norm_bwd_dx_kernel(const T* __restrict__ dy,         // [rows, cols]
                         const T* __restrict__ x,          // [rows, cols]
                         const float* __restrict__ mean,   // [rows]
                         const float* __restrict__ rstd,   // [rows]
                         const W* __restrict__ weight,     // [cols]
                         T* __restrict__ dx,               // [rows, cols]
                         int64_t rows, int64_t cols) {
  const int lane = threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += step) {
    const int64_t base = row * cols;
    const float mu = mean[row], rs = rstd[row];
    float sums[2] = {0.f, 0.f};  // Σ g, Σ g·xhat
    for (int64_t c = lane; c < cols; c += kWarpSize) {
      const float g = to_float(dy[base + c]) * to_float(weight[c]);
      sums[0] += g;
      sums[1] += g * (to_float(x[base + c]) - mu) * rs;
    }
    row_sum<false, 2>(sums, nullptr);
    const float a = sums[0] / cols, b = sums[1] / cols;
    for (int64_t c = lane; c < cols; c += kWarpSize) {
      const float g = to_float(dy[base + c]) * to_float(weight[c]);
      const float xh = (to_float(x[base + c]) - mu) * rs;
      dx[base + c] = from_float<T>(rs * (g - a - xh * b));
    }
  }
}

// Backward, column sums: block (32, 8) = 32 columns x 8 row lanes (coalesced along the row), blockIdx.y
// one chunk of rows; writes the chunk's Σ dy·xhat and Σ dy of its 32 columns to part_w / part_b.

template <typename T>
__global__ void __launch_bounds__(kColTile * kRowLanes)
layer_norm_bwd_dwdb_kernel(const T* __restrict__ dy,         // [rows, cols]
                           const T* __restrict__ x,          // [rows, cols]
                           const float* __restrict__ mean,   // [rows]
                           const float* __restrict__ rstd,   // [rows]
                           float* __restrict__ part_w,       // [chunks, cols]
                           float* __restrict__ part_b,       // [chunks, cols]
                           int64_t rows, int64_t cols, int64_t per_chunk) {
  __shared__ float red_w[kRowLanes][kColTile + 1];
  __shared__ float red_b[kRowLanes][kColTile + 1];
  const int64_t col = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t first = int64_t(blockIdx.y) * per_chunk;
  const int64_t last = first + per_chunk < rows ? first + per_chunk : rows;
  float acc_w = 0.f, acc_b = 0.f;
  if (col < cols) {
    for (int64_t r = first + threadIdx.y; r < last; r += kRowLanes) {
      const float d = to_float(dy[r * cols + col]);
      acc_w += d * (to_float(x[r * cols + col]) - mean[r]) * rstd[r];
      acc_b += d;
    }
  }
  red_w[threadIdx.y][threadIdx.x] = acc_w;
  red_b[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float w = 0.f, b = 0.f;
#pragma unroll
    for (int k = 0; k < kRowLanes; ++k) {
      w += red_w[k][threadIdx.x];
      b += red_b[k][threadIdx.x];
    }
    part_w[int64_t(blockIdx.y) * cols + col] = w;
    part_b[int64_t(blockIdx.y) * cols + col] = b;
  }
}

template <typename T, typename W>
cudaError_t launch_backward(const void* dy, const void* x, const float* mean, const float* rstd, const void* weight,
                            void* dx, float* part_w, float* part_b, int64_t chunks, int64_t rows, int64_t cols,
                            cudaStream_t stream) {
  const int64_t blocks = (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock;
  layer_norm_bwd_dx_kernel<T, W><<<dim3(static_cast<unsigned>(std::min(blocks, kMaxGrid))),
                                   dim3(kWarpSize, kRowsPerWarpBlock), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, static_cast<const W*>(weight),
      static_cast<T*>(dx), rows, cols);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>((cols + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  layer_norm_bwd_dwdb_kernel<T><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, part_w, part_b, rows, cols, per_chunk);
  return cudaGetLastError();
}

struct Problem {
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* y;
  void* sum_out;
  float* mean_out;
  float* rstd_out;
  int64_t rows;
  int64_t cols;
  float eps;
  cudaStream_t stream;
};

// The forward's kernels for launch_rows (common.cuh).
template <typename T, typename W, bool ADD, int V>
struct Launcher {
  const Problem& p;

  template <bool BLOCK, int ITERS>
  cudaError_t cached(dim3 grid, dim3 block) const {
    layer_norm_kernel<T, W, ADD, V, ITERS, BLOCK><<<grid, block, 0, p.stream>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.residual), static_cast<const W*>(p.weight),
        static_cast<const W*>(p.bias), static_cast<T*>(p.y), static_cast<T*>(p.sum_out), p.mean_out, p.rstd_out,
        p.rows, static_cast<int>(p.cols), p.eps);
    return cudaGetLastError();
  }

  cudaError_t wide(dim3 grid) const {
    layer_norm_wide_kernel<T, W, ADD><<<grid, kMaxBlockThreads, 0, p.stream>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.residual), static_cast<const W*>(p.weight),
        static_cast<const W*>(p.bias), static_cast<T*>(p.y), static_cast<T*>(p.sum_out), p.mean_out, p.rstd_out,
        p.rows, p.cols, p.eps);
    return cudaGetLastError();
  }
};

template <typename T, typename W, bool ADD>
cudaError_t launch_typed(const Problem& p) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = p.cols % kVec == 0 && aligned16(p.x) && aligned16(p.weight) && aligned16(p.bias) &&
                          aligned16(p.y) && (!ADD || (aligned16(p.residual) && aligned16(p.sum_out)));
  if (vectorized) {
    return launch_rows<kVec>(Launcher<T, W, ADD, kVec>{p}, p.rows, p.cols, typename Iters<kVec>::type{});
  }
  return launch_rows<1>(Launcher<T, W, ADD, 1>{p}, p.rows, p.cols, typename Iters<1>::type{});
}

template <typename T, typename W>
cudaError_t launch(const Problem& p) {
  return p.residual != nullptr ? launch_typed<T, W, true>(p) : launch_typed<T, W, false>(p);
}

}  // namespace

extern "C" cudaError_t vitfast_layer_norm_backward_cuda(int x_dtype, int w_dtype, const void* dy, const void* x,
                                                        const float* mean, const float* rstd, const void* weight,
                                                        void* dx, float* part_w, float* part_b, int64_t chunks,
                                                        int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || chunks < 1 || chunks > 65535) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  return with_cuda_dtypes(x_dtype, w_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    return launch_backward<T, W>(dy, x, mean, rstd, weight, dx, part_w, part_b, chunks, rows, cols, stream);
  });
}

extern "C" cudaError_t vitfast_layer_norm_cuda(int x_dtype, int w_dtype, const void* x, const void* residual,
                                               const void* weight, const void* bias, void* y, void* sum_out,
                                               float* mean_out, float* rstd_out, int64_t rows, int64_t cols,
                                               double eps, cudaStream_t stream) {
  if ((residual == nullptr) != (sum_out == nullptr) || (mean_out == nullptr) != (rstd_out == nullptr) || rows < 0 ||
      cols < 0)
    return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const Problem p{x, residual, weight, bias, y, sum_out, mean_out, rstd_out, rows, cols, static_cast<float>(eps),
                  stream};
  return with_cuda_dtypes(x_dtype, w_dtype, [&](auto t, auto w) { return launch<decltype(t), decltype(w)>(p); });
}
