// RMSNorm kernels of vitfast._C: the raw-pointer interface between the torch binding (ops.cpp) and the
// kernels (rms_norm_kernel.cu, rms_norm_cpu.cpp). No torch types here, so the CUDA file compiles with
// bare nvcc.
//
// Both kernels compute, per row of `cols` contiguous elements (the RMSNorm of Qwen2.5-VL's vision tower,
// AIMv2 and InternViT),
//     y = x · rstd · weight,   rstd = 1 / sqrt(mean(x²) + eps)      (no mean subtracted, no bias)
// in fp32 (fp64 for float64 on the CPU), rounded to y's dtype once.
//
// Supported dtypes: x / y in {float32, float16, bfloat16} (CUDA; float64 too on the CPU); weight float32
// or x's dtype. All tensors contiguous, rows * cols elements.
#pragma once

#include "common.h"

// rstd_out, when not null, receives each row's rstd in the accumulation type (float; double for float64
// on the CPU), for the backward.
//
// Backward, per row, with xhat = x · rstd and g = dy · weight:
//     dx = rstd · (g - xhat · mean(g · xhat)),
// and per column dweight = Σ dy · xhat over the rows: each of `chunks` contiguous row ranges writes its
// column sums to row k of part_w ([chunks, cols], accumulation type); the caller adds the chunks up
// (deterministic, no atomics).
#if defined(__CUDACC__) || defined(VITFAST_WITH_CUDA)
// Launches on `stream`; never synchronizes (CUDA-graph safe). Returns cudaSuccess,
// cudaErrorInvalidValue for an unsupported dtype pair, or the launch error.
extern "C" cudaError_t vitfast_rms_norm_cuda(int x_dtype, int w_dtype,
                                             const void* x,       // [rows, cols]
                                             const void* weight,  // [cols]
                                             void* y,             // [rows, cols]
                                             float* rstd_out,     // [rows] or null
                                             int64_t rows, int64_t cols, double eps, cudaStream_t stream);

extern "C" cudaError_t vitfast_rms_norm_backward_cuda(int x_dtype, int w_dtype,
                                                      const void* dy,      // [rows, cols]
                                                      const void* x,       // [rows, cols]
                                                      const float* rstd,   // [rows]
                                                      const void* weight,  // [cols]
                                                      void* dx,            // [rows, cols]
                                                      float* part_w,       // [chunks, cols]
                                                      int64_t chunks, int64_t rows, int64_t cols,
                                                      cudaStream_t stream);
#endif

namespace vitfast {
// CPU kernels (at::parallel_for over rows / chunks). Same contracts as the CUDA launchers; return
// false for an unsupported dtype pair.
bool rms_norm_cpu(int x_dtype, int w_dtype,
                  const void* x,       // [rows, cols]
                  const void* weight,  // [cols]
                  void* y,             // [rows, cols]
                  void* rstd_out,      // [rows] or null
                  int64_t rows, int64_t cols, double eps);

bool rms_norm_backward_cpu(int x_dtype, int w_dtype,
                           const void* dy,      // [rows, cols]
                           const void* x,       // [rows, cols]
                           const void* rstd,    // [rows]
                           const void* weight,  // [cols]
                           void* dx,            // [rows, cols]
                           void* part_w,        // [chunks, cols]
                           int64_t chunks, int64_t rows, int64_t cols);
}  // namespace vitfast
