// pybind11 bindings: fwdkern._C. Raw pointers (tensor.data_ptr()), shapes, strides
// and CUDA stream handles only -- no libtorch, so one build serves any torch.
// Argument errors from csrc/ (fwdkern::ArgError) surface as Python ValueError.
#include <pybind11/pybind11.h>

#include "bind_common.h"
#include "fwdkern/cpu_ops.h"
#ifdef FWDKERN_WITH_CUDA
#include "fwdkern/cuda_ops.h"
#endif

namespace py = pybind11;
using fwdkern_bind::as_ptr;
using fwdkern_bind::view;

// Further op families register themselves from their own binding files.
void fwdkern_bind_lora(py::module_& m);  // python/bind_lora.cpp
void fwdkern_bind_quant(py::module_& m);  // python/bind_quant.cpp
#ifdef FWDKERN_WITH_CUDA
void fwdkern_bind_lora_cuda(py::module_& m);  // python/bind_lora_cuda.cpp
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fwdkern compiled kernels (CPU C++ and, when built, CUDA). Internal: use fwdkern.*";
  py::register_exception<fwdkern::ArgError>(m, "ArgError", PyExc_ValueError);

  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("cpu_num_threads", &fwdkern::cpu::num_threads);
  m.def(
      "cpu_perturbation",
      [](uintptr_t out, int dtype, int64_t rows, int64_t cols, int64_t sr, int64_t sc, uint64_t seed,
         uint32_t pid, uint32_t k, int dist) {
        fwdkern::cpu::perturbation(view(out, dtype, rows, cols, sr, sc), seed, pid, k, dist);
      },
      py::arg("out"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("stride_r"),
      py::arg("stride_c"), py::arg("seed"), py::arg("param_id"), py::arg("k"), py::arg("dist"), nogil);
  m.def(
      "cpu_seeded_axpy",
      [](uintptr_t param, int dtype, int64_t rows, int64_t cols, int64_t sr, int64_t sc, uint64_t seed,
         uint32_t pid, uintptr_t ks, uintptr_t coeffs, int64_t K, float alpha, int dist) {
        fwdkern::cpu::seeded_axpy(view(param, dtype, rows, cols, sr, sc), seed, pid,
                                  as_ptr<const int64_t>(ks), as_ptr<const float>(coeffs), K, alpha, dist);
      },
      py::arg("param"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("stride_r"),
      py::arg("stride_c"), py::arg("seed"), py::arg("param_id"), py::arg("ks"), py::arg("coeffs"),
      py::arg("K"), py::arg("alpha"), py::arg("dist"), nogil);
  m.def(
      "cpu_seeded_dot",
      [](uintptr_t t, int dtype, int64_t rows, int64_t cols, int64_t sr, int64_t sc, uint64_t seed,
         uint32_t pid, uintptr_t ks, int64_t K, int dist, uintptr_t out) {
        fwdkern::cpu::seeded_dot(view(t, dtype, rows, cols, sr, sc), seed, pid, as_ptr<const int64_t>(ks),
                                 K, dist, as_ptr<float>(out));
      },
      py::arg("tensor"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("stride_r"),
      py::arg("stride_c"), py::arg("seed"), py::arg("param_id"), py::arg("ks"), py::arg("K"),
      py::arg("dist"), py::arg("out"), nogil);

#ifdef FWDKERN_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_device_count", &fwdkern::cuda::device_count);
  m.def(
      "cuda_perturbation",
      [](uintptr_t out, int dtype, int64_t rows, int64_t cols, int64_t sr, int64_t sc, uint64_t seed,
         uint32_t pid, uint32_t k, int dist, uintptr_t stream) {
        fwdkern::cuda::perturbation(view(out, dtype, rows, cols, sr, sc), seed, pid, k, dist, stream);
      },
      py::arg("out"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("stride_r"),
      py::arg("stride_c"), py::arg("seed"), py::arg("param_id"), py::arg("k"), py::arg("dist"),
      py::arg("stream"), nogil);
  m.def(
      "cuda_seeded_axpy",
      [](uintptr_t param, int dtype, int64_t rows, int64_t cols, int64_t sr, int64_t sc, uint64_t seed,
         uint32_t pid, uintptr_t ks, uintptr_t coeffs, int64_t K, float alpha, int dist, uintptr_t stream) {
        fwdkern::cuda::seeded_axpy(view(param, dtype, rows, cols, sr, sc), seed, pid,
                                   as_ptr<const int64_t>(ks), as_ptr<const float>(coeffs), K, alpha, dist,
                                   stream);
      },
      py::arg("param"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("stride_r"),
      py::arg("stride_c"), py::arg("seed"), py::arg("param_id"), py::arg("ks"), py::arg("coeffs"),
      py::arg("K"), py::arg("alpha"), py::arg("dist"), py::arg("stream"), nogil);
  m.def("cuda_seeded_dot_workspace", &fwdkern::cuda::seeded_dot_workspace);
  m.def(
      "cuda_seeded_dot",
      [](uintptr_t t, int dtype, int64_t rows, int64_t cols, int64_t sr, int64_t sc, uint64_t seed,
         uint32_t pid, uintptr_t ks, int64_t K, int dist, uintptr_t out, uintptr_t ws, uintptr_t stream) {
        fwdkern::cuda::seeded_dot(view(t, dtype, rows, cols, sr, sc), seed, pid, as_ptr<const int64_t>(ks),
                                  K, dist, as_ptr<float>(out), as_ptr<float>(ws), stream);
      },
      py::arg("tensor"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("stride_r"),
      py::arg("stride_c"), py::arg("seed"), py::arg("param_id"), py::arg("ks"), py::arg("K"),
      py::arg("dist"), py::arg("out"), py::arg("workspace"), py::arg("stream"), nogil);
  fwdkern_bind_lora_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
  fwdkern_bind_lora(m);
  fwdkern_bind_quant(m);
}
