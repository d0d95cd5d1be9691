// Bindings of the LoRA dual-forward CUDA kernels (csrc/cuda/lora_*.cu).
// Same argument list as cpu_seeded_matmul (python/bind_lora.cpp) plus the stream.
#include <pybind11/pybind11.h>

#ifdef FWDKERN_WITH_CUDA
#include "fwdkern/lora_cuda.h"
#endif

namespace py = pybind11;

#ifdef FWDKERN_WITH_CUDA
void fwdkern_bind_lora_cuda(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "cuda_seeded_matmul",
      [](uintptr_t x, int dtype, int64_t M, int64_t D, int64_t sxk, int64_t sxm, int64_t sxd, uint64_t seed,
         uint32_t pid, uintptr_t ks, int64_t K, int dist, int64_t N, uintptr_t out, int64_t sok, int64_t som,
         int64_t son, float alpha, bool accumulate, uintptr_t stream) {
        const fwdkern::View2D xv{reinterpret_cast<void*>(x), dtype, M, D, sxm, sxd};
        fwdkern::cuda::seeded_matmul(xv, sxk, seed, pid, reinterpret_cast<const int64_t*>(ks), K, dist, N,
                                     reinterpret_cast<float*>(out), sok, som, son, alpha, accumulate, stream);
      },
      "out[k] (+)= alpha * X_k @ v(seed, pid, ks[k])[N, D]^T (fp32 out, device pointers, K <= 65535)",
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("D"), py::arg("stride_xk"), py::arg("stride_xm"),
      py::arg("stride_xd"), py::arg("seed"), py::arg("param_id"), py::arg("ks"), py::arg("K"), py::arg("dist"),
      py::arg("N"), py::arg("out"), py::arg("stride_ok"), py::arg("stride_om"), py::arg("stride_on"),
      py::arg("alpha"), py::arg("accumulate"), py::arg("stream"), nogil);
}
#endif
