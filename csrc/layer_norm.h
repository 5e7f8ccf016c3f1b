// LayerNorm kernels of vitfast._C: the raw-pointer interface between the torch binding
// (ops.cpp) and the kernels (layer_norm_kernel.cu, layer_norm_cpu.cpp). No torch types here, so
// the CUDA file compiles with bare nvcc.
//
// Both kernels compute, per row of `cols` contiguous elements,
//     s = x + residual                  (add_layer_norm only; rounded to x's dtype and written out)
//     y = (s - mean) / sqrt(var + eps) * weight + bias      (biased variance, like torch)
// with statistics in fp32 (fp64 for float64 on the CPU): a corrected two-pass over the row.
//
// Supported dtypes: x / residual / y / s in {float32, float16, bfloat16} (CUDA; float64 too on the
// CPU); weight and bias both float32 or both x's dtype. All tensors contiguous, rows * cols elements.
#pragma once

#include "common.h"

// Statistics: mean_out / rstd_out, when not null, receive each row's mean and 1 / sqrt(var + eps), in
// the accumulation type (float; double for float64 on the CPU), for the backward.
//
// Backward, per row, with xhat = (s - mean) · rstd and g = dy · weight:
//     dx = rstd · (g - mean(g) - xhat · mean(g · xhat)),
// and per column dweight = Σ dy · xhat, dbias = Σ dy over the rows: each of `chunks` contiguous row
// ranges writes its column sums to row k of part_w / part_b ([chunks, cols], accumulation type); the
// caller adds the chunks up (deterministic, no atomics).
#if defined(__CUDACC__) || defined(VITFAST_WITH_CUDA)
// Launches on `stream`; never synchronizes (CUDA-graph safe). residual and sum_out are null for
// plain layer_norm. Returns cudaSuccess, cudaErrorInvalidValue for an unsupported dtype pair, or the
// launch error.
extern "C" cudaError_t vitfast_layer_norm_cuda(int x_dtype, int w_dtype,
                                               const void* x,         // [rows, cols]
                                               const void* residual,  // [rows, cols] or null
                                               const void* weight,    // [cols]
                                               const void* bias,      // [cols]
                                               void* y,               // [rows, cols]
                                               void* sum_out,         // [rows, cols] or null
                                               float* mean_out,       // [rows] or null
                                               float* rstd_out,       // [rows] or null
                                               int64_t rows, int64_t cols, double eps,
                                               cudaStream_t stream);

extern "C" cudaError_t vitfast_layer_norm_backward_cuda(int x_dtype, int w_dtype,
                                                        const void* dy,      // [rows, cols]
                                                        const void* x,       // [rows, cols]: x, or s
                                                        const float* mean,   // [rows]
                                                        const float* rstd,   // [rows]
                                                        const void* weight,  // [cols]
                                                        void* dx,            // [rows, cols]
                                                        float* part_w,       // [chunks, cols]
                                                        float* part_b,       // [chunks, cols]
                                                        int64_t chunks, int64_t rows, int64_t cols,
                                                        cudaStream_t stream);
#endif

namespace vitfast {
// CPU kernels (at::parallel_for over rows / chunks). Same contracts as the CUDA launchers; return
// false for an unsupported dtype pair.
bool layer_norm_cpu(int x_dtype, int w_dtype,
                    const void* x,         // [rows, cols]
                    const void* residual,  // [rows, cols] or null
                    const void* weight,    // [cols]
                    const void* bias,      // [cols]
                    void* y,               // [rows, cols]
                    void* sum_out,         // [rows, cols] or null
                    void* mean_out,        // [rows] or null
                    void* rstd_out,        // [rows] or null
                    int64_t rows, int64_t cols, double eps);

bool layer_norm_backward_cpu(int x_dtype, int w_dtype,
                             const void* dy,      // [rows, cols]
                             const void* x,       // [rows, cols]: x, or s
                             const void* mean,    // [rows]
                             const void* rstd,    // [rows]
                             const void* weight,  // [cols]
                             void* dx,            // [rows, cols]
                             void* part_w,        // [chunks, cols]
                             void* part_b,        // [chunks, cols]
                             int64_t chunks, int64_t rows, int64_t cols);
}  // namespace vitfast
