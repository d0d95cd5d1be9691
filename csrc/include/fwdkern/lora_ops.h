// CPU (C++17 + OpenMP) kernels of the LoRA dual forward. No Python, no libtorch.
//
// Layer y = x Wᵀ + b + s·(x Aᵀ) Bᵀ. The dense GEMM (x, ẋ_k times Wᵀ) goes through
// torch; everything of rank r, including the seeded perturbations dA_k = v(seed,
// pid_A, k) [r, in], dB_k [out, r], db_k [out], is computed here:
//   lora_shrink:  H_0 = x Aᵀ,  H_k = ẋ_k Aᵀ + x dA_kᵀ                      [1+K, M, r]
//   lora_expand:  Y_0 = s·H_0 Bᵀ + b,  Y_k = s·(H_k Bᵀ + H_0 dB_kᵀ) + db_k  [1+K, M, out]
// after which the caller adds the dense part with one GEMM (beta = 1).
// Perturbations are generated tile by tile into thread-local fp32 buffers and never
// exist whole. Accumulation is fp32 in a fixed order (independent of thread count).
#pragma once
#include <cstdint>

#include "fwdkern/perturb.h"

namespace fwdkern {
namespace cpu {

// out[k, m, n] = (accumulate ? out[k, m, n] : 0) + alpha * sum_d X_k[m, d] * v_k[n, d]
// with v_k = v(seed, param_id, ks[k]) of shape [N, D] (row n, column d of its 2-D view).
//   x    [M, D] view (fp32/fp16/bf16, any strides); X_k starts at
//        x.data + k * x_stride_k elements (x_stride_k = 0: one X shared by all k).
//   out  fp32, element (k, m, n) at out[k*out_stride_k + m*out_stride_m + n*out_stride_n].
void seeded_matmul(const View2D& x, int64_t x_stride_k, uint64_t seed, uint32_t param_id,
                   const int64_t* ks, int64_t K, int dist, int64_t N, float* out,
                   int64_t out_stride_k, int64_t out_stride_m, int64_t out_stride_n, float alpha,
                   bool accumulate);

// H (fp32, contiguous [1+K, M, r]):
//   H[0] = x Aᵀ;  H[k+1] = (xt ? xt_k Aᵀ : 0) + (perturb_A ? x dA_kᵀ : 0).
//   x [M, D]; xt: null or X_k = xt.data + k * xt_stride_k elements, [M, D] each; A [r, D].
void lora_shrink(const View2D& x, const View2D* xt, int64_t xt_stride_k, const View2D& A, uint64_t seed,
                 uint32_t pid_A, const int64_t* ks, int64_t K, int dist, bool perturb_A, float* H);

// Y = [Y0; Yt] (fp32, Y0 contiguous [M, out], Yt contiguous [K, M, out]), fully overwritten:
//   Y[0]   = s·H[0] Bᵀ + bias
//   Y[k+1] = s·((tangent_h ? H[k+1] Bᵀ : 0) + (perturb_B ? H[0] dB_kᵀ : 0)) + (perturb_bias ? db_k : 0)
//   H fp32 contiguous [1+K, M, r]; B [out, r]; bias: null or a [1, out] row.
//   tangent_h = false promises H[1:] == 0 (skips that work).
void lora_expand(const float* H, int64_t M, const View2D& B, const View2D* bias, float scaling, uint64_t seed,
                 uint32_t pid_B, uint32_t pid_bias, const int64_t* ks, int64_t K, int dist, bool perturb_B,
                 bool perturb_bias, bool tangent_h, float* Y0, float* Yt);

}  // namespace cpu
}  // namespace fwdkern
