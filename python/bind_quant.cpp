// Bindings of the CPU dequantization kernels (csrc/cpu/quant_ops.cpp). Raw pointers, shapes and
// strides only (see python/bindings.cpp).
#include <pybind11/pybind11.h>

#include "bind_common.h"
#include "fwdkern/quant_ops.h"

namespace py = pybind11;
using fwdkern_bind::as_ptr;
using fwdkern_bind::view;

void fwdkern_bind_quant(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "cpu_dequant_int8",
      [](uintptr_t q, int64_t ldq, uintptr_t scales, uintptr_t out, int dtype, int64_t N, int64_t D, int64_t sr,
         int64_t sc) {
        fwdkern::cpu::dequant_int8(as_ptr<const int8_t>(q), ldq, as_ptr<const float>(scales),
                                   view(out, dtype, N, D, sr, sc));
      },
      "out[n, d] = q[n, d] * scales[n]", py::arg("q"), py::arg("ldq"), py::arg("scales"), py::arg("out"),
      py::arg("dtype"), py::arg("N"), py::arg("D"), py::arg("stride_r"), py::arg("stride_c"), nogil);
  m.def(
      "cpu_dequant_int4",
      [](uintptr_t p, int64_t ldp, uintptr_t scales, uintptr_t offsets, int64_t G, int64_t group_size,
         uintptr_t out, int dtype, int64_t N, int64_t D, int64_t sr, int64_t sc) {
        fwdkern::cpu::dequant_int4(as_ptr<const uint8_t>(p), ldp, as_ptr<const float>(scales),
                                   as_ptr<const float>(offsets), G, group_size, view(out, dtype, N, D, sr, sc));
      },
      "out[n, d] = nibble(n, d) * scales[n, d / gs] + offsets[n, d / gs]", py::arg("p"), py::arg("ldp"),
      py::arg("scales"), py::arg("offsets"), py::arg("G"), py::arg("group_size"), py::arg("out"), py::arg("dtype"),
      py::arg("N"), py::arg("D"), py::arg("stride_r"), py::arg("stride_c"), nogil);
}
