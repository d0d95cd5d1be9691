// Helpers shared by the CUDA kernels: error checks and typed element access.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fwdkern/perturb.h"

#define FK_CUDA_CHECK(expr)                                                            \
  do {                                                                                 \
    cudaError_t fk_err_ = (expr);                                                      \
    if (fk_err_ != cudaSuccess)                                                        \
      throw std::runtime_error(std::string("fwdkern CUDA error: ") +                   \
                               cudaGetErrorString(fk_err_) + " at " #expr);            \
  } while (0)

namespace fwdkern {
namespace cuda {

template <int DT>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  static __device__ __forceinline__ float load(const T* p) { return *p; }
  static __device__ __forceinline__ void store(T* p, float v) { *p = v; }
};
template <>
struct Elem<kF16> {
  using T = __half;
  static __device__ __forceinline__ float load(const T* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(T* p, float v) { *p = __float2half_rn(v); }
};
template <>
struct Elem<kBF16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float load(const T* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(T* p, float v) { *p = __float2bfloat16_rn(v); }
};

}  // namespace cuda
}  // namespace fwdkern
