// RMSNorm on the CPU: the same contract as the CUDA launcher (rms_norm.h), so the op works without a GPU.
//
// Dtypes: x / y in float32, float64, float16, bfloat16; weight in float32 or x's dtype. Σx² in float
// (double for float64) over a per-thread row buffer, y = x · rstd · w rounded once. Rows are split across
// threads with at::parallel_for. The forward can store each row's rstd; the backward splits the rows into
// chunks, each writing its own column sums (dweight), as LayerNorm's does (layer_norm_cpu.cpp).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common_cpu.h"
#include "rms_norm.h"

namespace vitfast {
namespace {

// Rows [begin, end). buf: cols Acc of scratch for the row when it is not already in Acc.
template <typename T, typename W, typename Acc>
VITFAST_CPU_CLONES void normalize_rows(const T* x,       // [rows, cols]
                                       const W* weight,  // [cols]
                                       T* y,             // [rows, cols]
                                       Acc* rstd_out,    // [rows] or null
                                       int64_t begin, int64_t end, int64_t cols, Acc eps, Acc* buf) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * cols;
    const Acc* v = buf;  // the row in Acc, read by the sum and the output pass
    if constexpr (std::is_same_v<T, Acc>) {
      v = x + base;
    } else {
      for (int64_t c = 0; c < cols; ++c) buf[c] = static_cast<Acc>(x[base + c]);
    }
    // A simd reduction: vector-width partial sums (see layer_norm_cpu.cpp).
    Acc ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < cols; ++c) ss += v[c] * v[c];
    const Acc rstd = Acc(1) / std::sqrt(ss / static_cast<Acc>(cols) + eps);
    if (rstd_out != nullptr) rstd_out[row] = rstd;
    for (int64_t c = 0; c < cols; ++c) y[base + c] = static_cast<T>(v[c] * rstd * static_cast<Acc>(weight[c]));
  }
}

template <typename T, typename W>
void run(const void* x, const void* weight, void* y, void* rstd_out, int64_t rows, int64_t cols, double eps) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> buf(std::is_same_v<T, Acc> ? 0 : cols);
    normalize_rows<T, W, Acc>(static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<T*>(y),
                              static_cast<Acc*>(rstd_out), begin, end, cols, static_cast<Acc>(eps), buf.data());
  });
}

// Backward of rows [begin, end): with xhat = x · rstd and g = dy · w,
//     dx = rstd · (g - xhat · mean(g · xhat)),
// and this chunk's column sums of dy · xhat (dweight) added to part_w.
template <typename T, typename W, typename Acc>
VITFAST_CPU_CLONES void backward_rows(const T* dy, const T* x, const Acc* rstd, const W* weight, T* dx, Acc* part_w,
                                      int64_t begin, int64_t end, int64_t cols) {
  const Acc n = static_cast<Acc>(cols);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * cols;
    const Acc rs = rstd[row];
    Acc sum_gx = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const Acc d = static_cast<Acc>(dy[base + c]);
      const Acc xh = static_cast<Acc>(x[base + c]) * rs;
      sum_gx += d * static_cast<Acc>(weight[c]) * xh;
      part_w[c] += d * xh;
    }
    const Acc b = sum_gx / n;
    for (int64_t c = 0; c < cols; ++c) {
      const Acc xh = static_cast<Acc>(x[base + c]) * rs;
      const Acc g = static_cast<Acc>(dy[base + c]) * static_cast<Acc>(weight[c]);
      dx[base + c] = static_cast<T>(rs * (g - xh * b));
    }
  }
}

template <typename T, typename W>
void run_backward(const void* dy, const void* x, const void* rstd, const void* weight, void* dx, void* part_w,
                  int64_t chunks, int64_t rows, int64_t cols) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const int64_t begin = k * per_chunk, end = std::min(rows, begin + per_chunk);
      Acc* pw = static_cast<Acc*>(part_w) + k * cols;
      std::fill(pw, pw + cols, Acc(0));
      if (begin < end) {
        backward_rows<T, W, Acc>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const Acc*>(rstd),
                                 static_cast<const W*>(weight), static_cast<T*>(dx), pw, begin, end, cols);
      }
    }
  });
}

}  // namespace

bool rms_norm_backward_cpu(int x_dtype, int w_dtype, const void* dy, const void* x, const void* rstd,
                           const void* weight, void* dx, void* part_w, int64_t chunks, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0 || chunks < 1) return false;
  if (rows == 0 || cols == 0) return true;
  return with_cpu_dtypes(x_dtype, w_dtype, [&](auto t, auto w) {
    run_backward<decltype(t), decltype(w)>(dy, x, rstd, weight, dx, part_w, chunks, rows, cols);
  });
}

bool rms_norm_cpu(int x_dtype, int w_dtype, const void* x, const void* weight, void* y, void* rstd_out, int64_t rows,
                  int64_t cols, double eps) {
  if (rows < 0 || cols < 0) return false;
  if (rows == 0 || cols == 0) return true;
  return with_cpu_dtypes(x_dtype, w_dtype, [&](auto t, auto w) {
    run<decltype(t), decltype(w)>(x, weight, y, rstd_out, rows, cols, eps);
  });
}

}  // namespace vitfast
