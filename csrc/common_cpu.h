// What the CPU kernels (layer_norm_cpu.cpp, rms_norm_cpu.cpp) share: the dtype dispatch, the ISA clones of the
// row loops and the parallel grain.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common.h"

namespace vitfast {

// x86-64 Linux: the row loops are compiled for AVX2 and for the baseline ISA; the loader picks one.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VITFAST_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VITFAST_CPU_CLONES
#endif

constexpr int64_t kGrainElements = 32768;  // elements per parallel task, at least one row

// Calls f(T{}, W{}) with the element types of x and weight for a supported pair: x float32, float64, float16 or
// bfloat16; weight float32 or x's dtype. Returns false without calling f for any other pair.
template <typename F>
bool with_cpu_dtypes(int x_dtype, int w_dtype, F&& f) {
  const bool w32 = w_dtype == VITFAST_FLOAT32;
  const bool same = w_dtype == x_dtype;
  if (x_dtype == VITFAST_FLOAT32 && w32) return f(float{}, float{}), true;
  if (x_dtype == VITFAST_FLOAT64 && same) return f(double{}, double{}), true;
  if (x_dtype == VITFAST_FLOAT64 && w32) return f(double{}, float{}), true;
  if (x_dtype == VITFAST_FLOAT16 && same) return f(c10::Half{}, c10::Half{}), true;
  if (x_dtype == VITFAST_FLOAT16 && w32) return f(c10::Half{}, float{}), true;
  if (x_dtype == VITFAST_BFLOAT16 && same) return f(c10::BFloat16{}, c10::BFloat16{}), true;
  if (x_dtype == VITFAST_BFLOAT16 && w32) return f(c10::BFloat16{}, float{}), true;
  return false;
}

}  // namespace vitfast
