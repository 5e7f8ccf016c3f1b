// LayerNorm and fused residual-add + LayerNorm on the CPU: the same contract as the CUDA launcher
// (layer_norm.h), so every vitfast op works without a GPU.
//
// Dtypes: x / residual / y / s in float32, float64, float16, bfloat16; weight and bias in float32 or
// x's dtype. Statistics in float (double for float64), corrected two-pass over a per-thread row
// buffer: with m the pass-1 mean and shift = Σ(x - m) / n, var = Σ(x - m)² / n - shift² and
// y = ((x - m) - shift) * rstd * w + b (accurate for rows far from zero; see layer_norm_kernel.cu).
// Rows are split across threads with at::parallel_for. The forward can store each row's mean and
// rstd; the backward splits the rows into chunks, each writing its own column sums (dweight, dbias).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common_cpu.h"
#include "layer_norm.h"

namespace vitfast {
namespace {

// Rows [begin, end). buf: cols Acc of scratch for the row when it is not already in Acc.
template <typename T, typename W, typename Acc>
VITFAST_CPU_CLONES void normalize_rows(const T* x,         // [rows, cols]
                                       const T* residual,  // [rows, cols] or null
                                       const W* weight,    // [cols]
                                       const W* bias,      // [cols]
                                       T* y,               // [rows, cols]
                                       T* sum_out,         // [rows, cols] or null
                                       Acc* mean_out,      // [rows] or null
                                       Acc* rstd_out,      // [rows] or null
                                       int64_t begin, int64_t end, int64_t cols, Acc eps, Acc* buf) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * cols;
    const Acc* v = buf;  // the row in Acc, read by both statistics passes and the output pass
    if (residual != nullptr) {
      for (int64_t c = 0; c < cols; ++c) {
        // s is rounded to T before it is normalized, as the reference (and the CUDA kernel) do.
        const T s = static_cast<T>(static_cast<Acc>(x[base + c]) + static_cast<Acc>(residual[base + c]));
        sum_out[base + c] = s;
        buf[c] = static_cast<Acc>(s);
      }
    } else if constexpr (std::is_same_v<T, Acc>) {
      v = x + base;
    } else {
      for (int64_t c = 0; c < cols; ++c) buf[c] = static_cast<Acc>(x[base + c]);
    }
    const Acc n = static_cast<Acc>(cols);
    // The simd reductions sum in vector-width partial sums (built with -fopenmp-simd; a plain
    // sequential sum elsewhere): vectorized, and shorter rounding chains than one accumulator.
    Acc sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) sum += v[c];
    const Acc m = sum / n;
    Acc dev = 0, dev2 = 0;
#pragma omp simd reduction(+ : dev, dev2)
    for (int64_t c = 0; c < cols; ++c) {
      const Acc d = v[c] - m;
      dev += d;
      dev2 += d * d;
    }
    const Acc shift = dev / n;
    const Acc var = std::max(dev2 / n - shift * shift, Acc(0));
    const Acc rstd = Acc(1) / std::sqrt(var + eps);
    if (mean_out != nullptr) {
      mean_out[row] = m + shift;
      rstd_out[row] = rstd;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const Acc out = ((v[c] - m) - shift) * rstd * static_cast<Acc>(weight[c]) + static_cast<Acc>(bias[c]);
      y[base + c] = static_cast<T>(out);
    }
  }
}

template <typename T, typename W, typename Acc>
void layer_norm_rows(const T* x, const T* residual, const W* weight, const W* bias, T* y, T* sum_out,
                     Acc* mean_out, Acc* rstd_out, int64_t rows, int64_t cols, Acc eps) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> buf(cols);
    normalize_rows(x, residual, weight, bias, y, sum_out, mean_out, rstd_out, begin, end, cols, eps, buf.data());
  });
}

template <typename T, typename W>
void run(const void* x, const void* residual, const void* weight, const void* bias, void* y, void* sum_out,
         void* mean_out, void* rstd_out, int64_t rows, int64_t cols, double eps) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  layer_norm_rows<T, W, Acc>(static_cast<const T*>(x), static_cast<const T*>(residual),
                             static_cast<const W*>(weight), static_cast<const W*>(bias), static_cast<T*>(y),
                             static_cast<T*>(sum_out), static_cast<Acc*>(mean_out), static_cast<Acc*>(rstd_out),
                             rows, cols, static_cast<Acc>(eps));
}

// Backward of rows [begin, end): with xhat = (x - mean) · rstd and g = dy · w,
//     dx = rstd · (g - mean(g) - xhat · mean(g · xhat)),
// and this chunk's column sums of dy · xhat (dweight) and dy (dbias) added to part_w, part_b.
template <typename T, typename W, typename Acc>
VITFAST_CPU_CLONES void backward_rows(const T* dy, const T* x, const Acc* mean, const Acc* rstd, const W* weight,
                                      T* dx, Acc* part_w, Acc* part_b, int64_t begin, int64_t end, int64_t cols) {
  const Acc n = static_cast<Acc>(cols);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * cols;
    const Acc mu = mean[row], rs = rstd[row];
    Acc sum_g = 0, sum_gx = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const Acc d = static_cast<Acc>(dy[base + c]);
      const Acc xh = (static_cast<Acc>(x[base + c]) - mu) * rs;
      const Acc g = d * static_cast<Acc>(weight[c]);
      sum_g += g;
      sum_gx += g * xh;
      part_w[c] += d * xh;
      part_b[c] += d;
    }
    const Acc a = sum_g / n, b = sum_gx / n;
    for (int64_t c = 0; c < cols; ++c) {
      const Acc xh = (static_cast<Acc>(x[base + c]) - mu) * rs;
      const Acc g = static_cast<Acc>(dy[base + c]) * static_cast<Acc>(weight[c]);
      dx[base + c] = static_cast<T>(rs * (g - a - xh * b));
    }
  }
}

template <typename T, typename W>
void run_backward(const void* dy, const void* x, const void* mean, const void* rstd, const void* weight, void* dx,
                  void* part_w, void* part_b, int64_t chunks, int64_t rows, int64_t cols) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const int64_t begin = k * per_chunk, end = std::min(rows, begin + per_chunk);
      Acc* pw = static_cast<Acc*>(part_w) + k * cols;
      Acc* pb = static_cast<Acc*>(part_b) + k * cols;
      std::fill(pw, pw + cols, Acc(0));
      std::fill(pb, pb + cols, Acc(0));
      if (begin < end) {
        backward_rows<T, W, Acc>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const Acc*>(mean),
                                 static_cast<const Acc*>(rstd), static_cast<const W*>(weight), static_cast<T*>(dx),
                                 pw, pb, begin, end, cols);
      }
    }
  });
}

}  // namespace

bool layer_norm_backward_cpu(int x_dtype, int w_dtype, const void* dy, const void* x, const void* mean,
                             const void* rstd, const void* weight, void* dx, void* part_w, void* part_b,
                             int64_t chunks, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0 || chunks < 1) return false;
  if (rows == 0 || cols == 0) return true;
  return with_cpu_dtypes(x_dtype, w_dtype, [&](auto t, auto w) {
    run_backward<decltype(t), decltype(w)>(dy, x, mean, rstd, weight, dx, part_w, part_b, chunks, rows, cols);
  });
}

bool layer_norm_cpu(int x_dtype, int w_dtype, const void* x, const void* residual, const void* weight,
                    const void* bias, void* y, void* sum_out, void* mean_out, void* rstd_out, int64_t rows,
                    int64_t cols, double eps) {
  if ((residual == nullptr) != (sum_out == nullptr) || (mean_out == nullptr) != (rstd_out == nullptr) || rows < 0 ||
      cols < 0)
    return false;
  if (rows == 0 || cols == 0) return true;
  return with_cpu_dtypes(x_dtype, w_dtype, [&](auto t, auto w) {
    run<decltype(t), decltype(w)>(x, residual, weight, bias, y, sum_out, mean_out, rstd_out, rows, cols, eps);
  });
}

}  // namespace vitfast
