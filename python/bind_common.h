// Helpers shared by the binding files: raw pointers (tensor.data_ptr()) to kernel arguments.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "fwdkern/abi.h"

namespace fwdkern_bind {

inline fwdkern::View2D view(uintptr_t ptr, int dtype, int64_t rows, int64_t cols, int64_t sr, int64_t sc) {
  return fwdkern::View2D{reinterpret_cast<void*>(ptr), dtype, rows, cols, sr, sc};
}

template <typename T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace fwdkern_bind

// Argument names of cpu_seeded_matmul / cuda_seeded_matmul (the cuda one adds `stream`).
#define FK_SEEDED_MATMUL_ARGS                                                                              \
  pybind11::arg("x"), pybind11::arg("dtype"), pybind11::arg("M"), pybind11::arg("D"),                     \
      pybind11::arg("stride_xk"), pybind11::arg("stride_xm"), pybind11::arg("stride_xd"),                 \
      pybind11::arg("seed"), pybind11::arg("param_id"), pybind11::arg("ks"), pybind11::arg("K"),         \
      pybind11::arg("dist"), pybind11::arg("N"), pybind11::arg("out"), pybind11::arg("stride_ok"),       \
      pybind11::arg("stride_om"), pybind11::arg("stride_on"), pybind11::arg("alpha"), pybind11::arg("accumulate")
