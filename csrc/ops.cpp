// vitfast._C: the torch binding of the LayerNorm and RMSNorm kernels. Argument checks and registration
// only; the math lives in layer_norm_kernel.cu / rms_norm_kernel.cu (CUDA) and layer_norm_cpu.cpp /
// rms_norm_cpu.cpp (CPU).
//
//   vitfast::layer_norm(x [..., C], weight [C], bias [C], eps) -> y [..., C]
//   vitfast::add_layer_norm(x, residual [..., C], weight, bias, eps) -> (y, s = x + residual)
//   .out overloads of both write into caller-provided contiguous buffers (used by the tests to pass
//   NaN-poisoned outputs; eager only, no autograd).
//   vitfast::layer_norm_stats / add_layer_norm_stats: the same, plus each row's mean and rstd [...]
//   (float32; float64 for float64 x), saved for the backward:
//   vitfast::layer_norm_backward(dy, x (or s), mean, rstd, weight) -> (dx, dweight, dbias).
//   vitfast::rms_norm(x [..., C], weight [C], eps) -> y [..., C], its .out overload, rms_norm_stats (y and
//   each row's rstd) and vitfast::rms_norm_backward(dy, x, rstd, weight) -> (dx, dweight), as above.
//
// Outputs are contiguous, in x's dtype. Non-contiguous inputs are accepted and copied to contiguous
// ones first (one extra read and write of that input). The fake (meta) implementations and
// autograd are registered from Python, in vitfast/ops.py. `import vitfast._C` registers the ops.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <tuple>
#include <utility>

#ifdef VITFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "layer_norm.h"
#include "rms_norm.h"

namespace vitfast {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return VITFAST_FLOAT32;
    case at::kHalf:
      return VITFAST_FLOAT16;
    case at::kBFloat16:
      return VITFAST_BFLOAT16;
    case at::kDouble:
      return VITFAST_FLOAT64;
    default:
      return -1;
  }
}

// bias is null for RMSNorm (no bias), residual for all but add_layer_norm.
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                  const at::Tensor* bias, double eps) {
  TORCH_CHECK(dtype_code(x.scalar_type()) >= 0, op,
              ": x: expected dtype Float, Half, BFloat16 (or Double on the CPU), got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), op, ": x: expected a CPU or CUDA tensor, got device ",
              x.device());
  TORCH_CHECK(!(x.is_cuda() && x.scalar_type() == at::kDouble), op,
              ": x: expected dtype Float, Half or BFloat16 on CUDA, got Double");
  TORCH_CHECK(x.dim() >= 1, op, ": x: expected at least 1 dimension [..., C], got a 0-dim tensor");
  const int64_t cols = x.size(-1);
  const auto check_param = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == cols, op, ": ", name, ": expected shape [", cols,
                "] (the last dim of x ", x.sizes(), "), got ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, ": expected device ", x.device(), " (like x), got ",
                t.device());
  };
  check_param("weight", weight);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type(), op,
              ": weight: expected dtype ", x.scalar_type(), " (like x)",
              x.scalar_type() == at::kFloat ? "" : " or Float", ", got ", weight.scalar_type());
  if (bias != nullptr) {
    check_param("bias", *bias);
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias: expected dtype ", weight.scalar_type(),
                " (like weight), got ", bias->scalar_type());
  }
  if (residual != nullptr) {
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual: expected shape ", x.sizes(), " (like x), got ",
                residual->sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual: expected dtype ", x.scalar_type(),
                " (like x), got ", residual->scalar_type());
    TORCH_CHECK(residual->device() == x.device(), op, ": residual: expected device ", x.device(),
                " (like x), got ", residual->device());
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps: expected a finite value >= 0, got ", eps);
}

// out must not overlap any input: other threads still read x, weight and bias while it is written.
void check_out(const char* op, const char* name, const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
               const at::Tensor* bias) {
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": ", name, ": expected shape ", x.sizes(), " (like x), got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": ", name, ": expected dtype ", x.scalar_type(),
              " (like x), got ", out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), op, ": ", name, ": expected device ", x.device(), " (like x), got ",
              out.device());
  TORCH_CHECK(out.is_contiguous(), op, ": ", name, ": expected a contiguous tensor, got strides ", out.strides());
  at::assert_no_overlap(out, x);
  at::assert_no_overlap(out, weight);
  if (bias != nullptr) at::assert_no_overlap(out, *bias);
}

// The row statistics' dtype: float32, float64 for float64 x.
at::ScalarType stats_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

#ifndef VITFAST_WITH_CUDA
[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, op, ": x is a CUDA tensor but vitfast._C was built without CUDA; rebuild it against a "
              "CUDA-enabled torch: pip install --no-build-isolation -e .");
}
#endif

// Runs the kernel into the contiguous outputs y (and sum_out for add_layer_norm, mean / rstd when given).
void run(const char* op, const at::Tensor& x_in, const at::Tensor* residual_in, const at::Tensor& weight_in,
         const at::Tensor& bias_in, double eps, at::Tensor& y, at::Tensor* sum_out, at::Tensor* mean = nullptr,
         at::Tensor* rstd = nullptr) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = residual_in != nullptr ? residual_in->contiguous() : at::Tensor();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  const int x_dtype = dtype_code(x.scalar_type());
  const int w_dtype = dtype_code(weight.scalar_type());
  const void* residual_ptr = residual.defined() ? residual.const_data_ptr() : nullptr;
  void* sum_ptr = sum_out != nullptr ? sum_out->data_ptr() : nullptr;
  void* mean_ptr = mean != nullptr ? mean->data_ptr() : nullptr;
  void* rstd_ptr = rstd != nullptr ? rstd->data_ptr() : nullptr;
  if (x.is_cuda()) {
#ifdef VITFAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    const cudaError_t err = vitfast_layer_norm_cuda(
        x_dtype, w_dtype, x.const_data_ptr(), residual_ptr, weight.const_data_ptr(), bias.const_data_ptr(),
        y.data_ptr(), sum_ptr, static_cast<float*>(mean_ptr), static_cast<float*>(rstd_ptr), rows, cols, eps, stream);
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
#else
    no_cuda(op);
#endif
  } else {
    const bool ok = layer_norm_cpu(x_dtype, w_dtype, x.const_data_ptr(), residual_ptr, weight.const_data_ptr(),
                                   bias.const_data_ptr(), y.data_ptr(), sum_ptr, mean_ptr, rstd_ptr, rows, cols, eps);
    TORCH_CHECK(ok, op, ": unsupported dtypes: x ", x.scalar_type(), ", weight ", weight.scalar_type());
  }
}

at::Tensor empty_like_contiguous(const at::Tensor& x) { return at::empty(x.sizes(), x.options()); }

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  constexpr const char* op = "vitfast::layer_norm";
  check_inputs(op, x, nullptr, weight, &bias, eps);
  at::Tensor y = empty_like_contiguous(x);
  run(op, x, nullptr, weight, bias, eps, y, nullptr);
  return y;
}

at::Tensor& layer_norm_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                           at::Tensor& out) {
  constexpr const char* op = "vitfast::layer_norm.out";
  check_inputs(op, x, nullptr, weight, &bias, eps);
  check_out(op, "out", out, x, weight, &bias);
  run(op, x, nullptr, weight, bias, eps, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  constexpr const char* op = "vitfast::add_layer_norm";
  check_inputs(op, x, &residual, weight, &bias, eps);
  at::Tensor y = empty_like_contiguous(x);
  at::Tensor s = empty_like_contiguous(x);
  run(op, x, &residual, weight, bias, eps, y, &s);
  return {y, s};
}

std::tuple<at::Tensor&, at::Tensor&> add_layer_norm_out(const at::Tensor& x, const at::Tensor& residual,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        double eps, at::Tensor& out, at::Tensor& sum_out) {
  constexpr const char* op = "vitfast::add_layer_norm.out";
  check_inputs(op, x, &residual, weight, &bias, eps);
  check_out(op, "out", out, x, weight, &bias);
  check_out(op, "sum_out", sum_out, x, weight, &bias);
  at::assert_no_overlap(out, residual);
  at::assert_no_overlap(sum_out, residual);
  at::assert_no_overlap(out, sum_out);
  run(op, x, &residual, weight, bias, eps, out, &sum_out);
  return {out, sum_out};
}

at::Tensor empty_stats(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stats_type(x)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_stats(const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& bias, double eps) {
  constexpr const char* op = "vitfast::layer_norm_stats";
  check_inputs(op, x, nullptr, weight, &bias, eps);
  at::Tensor y = empty_like_contiguous(x);
  at::Tensor mean = empty_stats(x), rstd = empty_stats(x);
  run(op, x, nullptr, weight, bias, eps, y, nullptr, &mean, &rstd);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_stats(const at::Tensor& x,
                                                                                const at::Tensor& residual,
                                                                                const at::Tensor& weight,
                                                                                const at::Tensor& bias, double eps) {
  constexpr const char* op = "vitfast::add_layer_norm_stats";
  check_inputs(op, x, &residual, weight, &bias, eps);
  at::Tensor y = empty_like_contiguous(x);
  at::Tensor s = empty_like_contiguous(x);
  at::Tensor mean = empty_stats(x), rstd = empty_stats(x);
  run(op, x, &residual, weight, bias, eps, y, &s, &mean, &rstd);
  return {y, s, mean, rstd};
}

// Row chunks whose column sums the kernels write separately (then added here): enough to fill the
// machine, few enough that adding them up is cheap.
int64_t backward_chunks(int64_t rows, bool cuda) {
  const int64_t target = cuda ? 256 : std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(target, (rows + 31) / 32));
}

// The backward's inputs: dy like x; for each of `stats`, one value per row of x in the statistics' dtype; weight
// [C] in Float or x's dtype. -> the row count.
int64_t check_backward(const char* op, const at::Tensor& dy, const at::Tensor& x,
                       std::initializer_list<std::pair<const char*, const at::Tensor&>> stats,
                       const at::Tensor& weight) {
  TORCH_CHECK(dtype_code(x.scalar_type()) >= 0 && x.dim() >= 1, op,
              ": x: expected a Float, Half, BFloat16 or Double tensor [..., C], got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device(), op,
              ": dy: expected ", x.sizes(), " ", x.scalar_type(), " on ", x.device(), " (like x), got ", dy.sizes(),
              " ", dy.scalar_type(), " on ", dy.device());
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  for (const auto& [name, t] : stats) {
    TORCH_CHECK(t.numel() == rows && t.scalar_type() == stats_type(x) && t.device() == x.device(), op, ": ",
                name, ": expected ", rows, " ", stats_type(x), " values on ", x.device(), " (one per row of x), got ",
                t.sizes(), " ", t.scalar_type(), " on ", t.device());
  }
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == cols && weight.device() == x.device() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type()),
              op, ": weight: expected [", cols, "] Float or ", x.scalar_type(), " on ", x.device(), ", got ",
              weight.sizes(), " ", weight.scalar_type(), " on ", weight.device());
  return rows;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                   const at::Tensor& mean_in,
                                                                   const at::Tensor& rstd_in,
                                                                   const at::Tensor& weight_in) {
  constexpr const char* op = "vitfast::layer_norm_backward";
  const int64_t rows = check_backward(op, dy_in, x_in, {{"mean", mean_in}, {"rstd", rstd_in}}, weight_in);
  const int64_t cols = x_in.size(-1);
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), mean = mean_in.contiguous(),
                   rstd = rstd_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor dx = empty_like_contiguous(x);
  const int64_t chunks = backward_chunks(rows, x.is_cuda());
  at::Tensor part_w = at::empty({chunks, cols}, x.options().dtype(stats_type(x)));
  at::Tensor part_b = at::empty({chunks, cols}, x.options().dtype(stats_type(x)));
  const int x_dtype = dtype_code(x.scalar_type()), w_dtype = dtype_code(weight.scalar_type());
  if (rows > 0 && cols > 0) {
    if (x.is_cuda()) {
#ifdef VITFAST_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
      const cudaError_t err = vitfast_layer_norm_backward_cuda(
          x_dtype, w_dtype, dy.const_data_ptr(), x.const_data_ptr(), mean.const_data_ptr<float>(),
          rstd.const_data_ptr<float>(), weight.const_data_ptr(), dx.data_ptr(), part_w.data_ptr<float>(),
          part_b.data_ptr<float>(), chunks, rows, cols, stream);
      TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
#else
      no_cuda(op);
#endif
    } else {
      const bool ok = layer_norm_backward_cpu(x_dtype, w_dtype, dy.const_data_ptr(), x.const_data_ptr(),
                                              mean.const_data_ptr(), rstd.const_data_ptr(), weight.const_data_ptr(),
                                              dx.data_ptr(), part_w.data_ptr(), part_b.data_ptr(), chunks, rows, cols);
      TORCH_CHECK(ok, op, ": unsupported dtypes: x ", x.scalar_type(), ", weight ", weight.scalar_type());
    }
  } else {
    part_w.zero_();
    part_b.zero_();
  }
  return {dx, part_w.sum(0).to(weight.scalar_type()), part_b.sum(0).to(weight.scalar_type())};
}

// RMSNorm: runs the kernel into the contiguous output y (and rstd when given).
void run_rms(const char* op, const at::Tensor& x_in, const at::Tensor& weight_in, double eps, at::Tensor& y,
             at::Tensor* rstd = nullptr) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  const int x_dtype = dtype_code(x.scalar_type());
  const int w_dtype = dtype_code(weight.scalar_type());
  void* rstd_ptr = rstd != nullptr ? rstd->data_ptr() : nullptr;
  if (x.is_cuda()) {
#ifdef VITFAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    const cudaError_t err = vitfast_rms_norm_cuda(x_dtype, w_dtype, x.const_data_ptr(), weight.const_data_ptr(),
                                                  y.data_ptr(), static_cast<float*>(rstd_ptr), rows, cols, eps,
                                                  stream);
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
#else
    no_cuda(op);
#endif
  } else {
    const bool ok = rms_norm_cpu(x_dtype, w_dtype, x.const_data_ptr(), weight.const_data_ptr(), y.data_ptr(),
                                 rstd_ptr, rows, cols, eps);
    TORCH_CHECK(ok, op, ": unsupported dtypes: x ", x.scalar_type(), ", weight ", weight.scalar_type());
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "vitfast::rms_norm";
  check_inputs(op, x, nullptr, weight, nullptr, eps);
  at::Tensor y = empty_like_contiguous(x);
  run_rms(op, x, weight, eps, y);
  return y;
}

at::Tensor& rms_norm_out(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  constexpr const char* op = "vitfast::rms_norm.out";
  check_inputs(op, x, nullptr, weight, nullptr, eps);
  check_out(op, "out", out, x, weight, nullptr);
  run_rms(op, x, weight, eps, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_stats(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "vitfast::rms_norm_stats";
  check_inputs(op, x, nullptr, weight, nullptr, eps);
  at::Tensor y = empty_like_contiguous(x);
  at::Tensor rstd = empty_stats(x);
  run_rms(op, x, weight, eps, y, &rstd);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                     const at::Tensor& rstd_in, const at::Tensor& weight_in) {
  constexpr const char* op = "vitfast::rms_norm_backward";
  const int64_t rows = check_backward(op, dy_in, x_in, {{"rstd", rstd_in}}, weight_in);
  const int64_t cols = x_in.size(-1);
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), rstd = rstd_in.contiguous(),
                   weight = weight_in.contiguous();
  at::Tensor dx = empty_like_contiguous(x);
  const int64_t chunks = backward_chunks(rows, x.is_cuda());
  at::Tensor part_w = at::empty({chunks, cols}, x.options().dtype(stats_type(x)));
  const int x_dtype = dtype_code(x.scalar_type()), w_dtype = dtype_code(weight.scalar_type());
  if (rows > 0 && cols > 0) {
    if (x.is_cuda()) {
#ifdef VITFAST_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
      const cudaError_t err = vitfast_rms_norm_backward_cuda(
          x_dtype, w_dtype, dy.const_data_ptr(), x.const_data_ptr(), rstd.const_data_ptr<float>(),
          weight.const_data_ptr(), dx.data_ptr(), part_w.data_ptr<float>(), chunks, rows, cols, stream);
      TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
#else
      no_cuda(op);
#endif
    } else {
      const bool ok = rms_norm_backward_cpu(x_dtype, w_dtype, dy.const_data_ptr(), x.const_data_ptr(),
                                            rstd.const_data_ptr(), weight.const_data_ptr(), dx.data_ptr(),
                                            part_w.data_ptr(), chunks, rows, cols);
      TORCH_CHECK(ok, op, ": unsupported dtypes: x ", x.scalar_type(), ", weight ", weight.scalar_type());
    }
  } else {
    part_w.zero_();
  }
  return {dx, part_w.sum(0).to(weight.scalar_type())};
}

}  // namespace
}  // namespace vitfast

TORCH_LIBRARY(vitfast, m) {
  // The fake implementations and autograd formulas are registered in this Python module.
  m.set_python_module("vitfast.ops");
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def("layer_norm.out(Tensor x, Tensor weight, Tensor bias, float eps, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)");
  m.def(
      "add_layer_norm.out(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, *, Tensor(a!) out, "
      "Tensor(b!) sum_out) -> (Tensor(a!), Tensor(b!))");
  m.def("layer_norm_stats(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm_stats(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, "
      "Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm.out(Tensor x, Tensor weight, float eps, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("rms_norm_stats(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor rstd, Tensor weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("layer_norm", &vitfast::layer_norm);
  m.impl("layer_norm.out", &vitfast::layer_norm_out);
  m.impl("add_layer_norm", &vitfast::add_layer_norm);
  m.impl("add_layer_norm.out", &vitfast::add_layer_norm_out);
  m.impl("layer_norm_stats", &vitfast::layer_norm_stats);
  m.impl("add_layer_norm_stats", &vitfast::add_layer_norm_stats);
  m.impl("layer_norm_backward", &vitfast::layer_norm_backward);
  m.impl("rms_norm", &vitfast::rms_norm);
  m.impl("rms_norm.out", &vitfast::rms_norm_out);
  m.impl("rms_norm_stats", &vitfast::rms_norm_stats);
  m.impl("rms_norm_backward", &vitfast::rms_norm_backward);
}

// Registered even without VITFAST_WITH_CUDA, so CUDA tensors reach the clear "built without CUDA"
// error in run() instead of the dispatcher's generic "could not run ... with the 'CUDA' backend".
TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("layer_norm", &vitfast::layer_norm);
  m.impl("layer_norm.out", &vitfast::layer_norm_out);
  m.impl("add_layer_norm", &vitfast::add_layer_norm);
  m.impl("add_layer_norm.out", &vitfast::add_layer_norm_out);
  m.impl("layer_norm_stats", &vitfast::layer_norm_stats);
  m.impl("add_layer_norm_stats", &vitfast::add_layer_norm_stats);
  m.impl("layer_norm_backward", &vitfast::layer_norm_backward);
  m.impl("rms_norm", &vitfast::rms_norm);
  m.impl("rms_norm.out", &vitfast::rms_norm_out);
  m.impl("rms_norm_stats", &vitfast::rms_norm_stats);
  m.impl("rms_norm_backward", &vitfast::rms_norm_backward);
}

// `import vitfast._C` loads this library, which runs the registrations above. The module holds one
// constant, WITH_CUDA: 1 when the CUDA kernels are compiled in (`make gpu` checks it after its build).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "vitfast's LayerNorm and RMSNorm ops, registered as torch.ops.vitfast",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef VITFAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (m != nullptr && PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
