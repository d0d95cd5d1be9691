// Bindings of the LoRA CUDA kernel (csrc/cuda/lora_ops.cu).
// Same argument list as cpu_seeded_matmul (python/bind_lora.cpp) plus the stream.
#include <pybind11/pybind11.h>

#ifdef FWDKERN_WITH_CUDA
#include "bind_common.h"
#include "fwdkern/lora_cuda.h"

namespace py = pybind11;
using fwdkern_bind::as_ptr;
using fwdkern_bind::view;

void fwdkern_bind_lora_cuda(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "cuda_seeded_matmul",
      [](uintptr_t x, int dtype, int64_t M, int64_t D, int64_t sxk, int64_t sxm, int64_t sxd, uint64_t seed,
         uint32_t pid, uintptr_t ks, int64_t K, int dist, int64_t N, uintptr_t out, int64_t sok, int64_t som,
         int64_t son, float alpha, bool accumulate, uintptr_t stream) {
        fwdkern::cuda::seeded_matmul(view(x, dtype, M, D, sxm, sxd), sxk, seed, pid, as_ptr<const int64_t>(ks), K,
                                     dist, N, as_ptr<float>(out), sok, som, son, alpha, accumulate, stream);
      },
      "out[k] (+)= alpha * X_k @ v(seed, pid, ks[k])[N, D]^T (fp32 out, device pointers, K <= 65535)",
      FK_SEEDED_MATMUL_ARGS, py::arg("stream"), nogil);
}
#endif
