// What the extension's raw-pointer interfaces (layer_norm.h, rms_norm.h) share: the dtype codes ops.cpp passes
// the kernels. No torch types here, so the CUDA files compile with bare nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(VITFAST_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

enum vitfast_dtype : int {
  VITFAST_FLOAT32 = 0,
  VITFAST_FLOAT16 = 1,
  VITFAST_BFLOAT16 = 2,
  VITFAST_FLOAT64 = 3,  // CPU only
};
