// Bindings of the LoRA dual-forward CUDA kernels (csrc/cuda/lora_*.cu).
#include <pybind11/pybind11.h>

namespace py = pybind11;

#ifdef FWDKERN_WITH_CUDA
void fwdkern_bind_lora_cuda(py::module_& m) { (void)m; }
#endif
