// Bindings of the LoRA dual-forward CPU kernels (csrc/cpu/lora_ops.cpp).
// Raw pointers, shapes and strides only (see python/bindings.cpp); pointer 0 = absent.
#include <pybind11/pybind11.h>

#include "bind_common.h"
#include "fwdkern/lora_ops.h"

namespace py = pybind11;
using fwdkern::View2D;
using fwdkern_bind::as_ptr;
using fwdkern_bind::view;

void fwdkern_bind_lora(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "cpu_seeded_matmul",
      [](uintptr_t x, int dtype, int64_t M, int64_t D, int64_t sxk, int64_t sxm, int64_t sxd, uint64_t seed,
         uint32_t pid, uintptr_t ks, int64_t K, int dist, int64_t N, uintptr_t out, int64_t sok, int64_t som,
         int64_t son, float alpha, bool accumulate) {
        fwdkern::cpu::seeded_matmul(view(x, dtype, M, D, sxm, sxd), sxk, seed, pid, as_ptr<const int64_t>(ks), K,
                                    dist, N, as_ptr<float>(out), sok, som, son, alpha, accumulate);
      },
      "out[k] (+)= alpha * X_k @ v(seed, pid, ks[k])[N, D]^T (fp32 out)", FK_SEEDED_MATMUL_ARGS, nogil);
  m.def(
      "cpu_lora_shrink",
      [](uintptr_t x, int x_dtype, int64_t M, int64_t D, int64_t sxm, int64_t sxd, uintptr_t xt, int xt_dtype,
         int64_t stk, int64_t stm, int64_t std_, uintptr_t A, int a_dtype, int64_t r, int64_t sam, int64_t sad,
         uint64_t seed, uint32_t pid_A, uintptr_t ks, int64_t K, int dist, bool perturb_A, uintptr_t H) {
        const View2D xt_view = view(xt, xt_dtype, M, D, stm, std_);
        fwdkern::cpu::lora_shrink(view(x, x_dtype, M, D, sxm, sxd), xt ? &xt_view : nullptr, stk,
                                  view(A, a_dtype, r, D, sam, sad), seed, pid_A, as_ptr<const int64_t>(ks), K, dist,
                                  perturb_A, as_ptr<float>(H));
      },
      "H[0] = x A^T, H[k+1] = xt_k A^T + x dA_k^T (fp32 [1+K, M, r])", py::arg("x"), py::arg("x_dtype"),
      py::arg("M"), py::arg("D"), py::arg("stride_xm"), py::arg("stride_xd"), py::arg("xt"), py::arg("xt_dtype"),
      py::arg("stride_tk"), py::arg("stride_tm"), py::arg("stride_td"), py::arg("A"), py::arg("a_dtype"),
      py::arg("r"), py::arg("stride_ar"), py::arg("stride_ad"), py::arg("seed"), py::arg("pid_A"), py::arg("ks"),
      py::arg("K"), py::arg("dist"), py::arg("perturb_A"), py::arg("H"), nogil);
  m.def(
      "cpu_lora_expand",
      [](uintptr_t H, int64_t M, int64_t r, uintptr_t B, int b_dtype, int64_t out_f, int64_t sbo, int64_t sbr,
         uintptr_t bias, int bias_dtype, int64_t sbias, float scaling, uint64_t seed, uint32_t pid_B,
         uint32_t pid_bias, uintptr_t ks, int64_t K, int dist, bool perturb_B, bool perturb_bias, bool tangent_h,
         uintptr_t Y0, uintptr_t Yt) {
        const View2D bias_view = view(bias, bias_dtype, 1, out_f, 0, sbias);
        fwdkern::cpu::lora_expand(as_ptr<const float>(H), M, view(B, b_dtype, out_f, r, sbo, sbr),
                                  bias ? &bias_view : nullptr, scaling, seed, pid_B, pid_bias,
                                  as_ptr<const int64_t>(ks), K, dist, perturb_B, perturb_bias, tangent_h,
                                  as_ptr<float>(Y0), as_ptr<float>(Yt));
      },
      "Y0 = s H[0] B^T + b [M, out]; Yt[k] = s (H[k+1] B^T + H[0] dB_k^T) + db_k [K, M, out] (fp32)", py::arg("H"),
      py::arg("M"), py::arg("r"), py::arg("B"), py::arg("b_dtype"), py::arg("out_f"), py::arg("stride_bo"),
      py::arg("stride_br"), py::arg("bias"), py::arg("bias_dtype"), py::arg("stride_bias"), py::arg("scaling"),
      py::arg("seed"), py::arg("pid_B"), py::arg("pid_bias"), py::arg("ks"), py::arg("K"), py::arg("dist"),
      py::arg("perturb_B"), py::arg("perturb_bias"), py::arg("tangent_h"), py::arg("Y0"), py::arg("Yt"), nogil);
}
