// CUDA kernels of the LoRA dual forward (csrc/cuda/lora_ops.cu). Host launchers take
// raw device pointers and the caller's stream as an integer (no libtorch), like
// fwdkern/cuda_ops.h.
#pragma once
#include <cstdint>

#include "fwdkern/perturb.h"

namespace fwdkern {
namespace cuda {

// out[k, m, n] = (accumulate ? out[k, m, n] : 0) + alpha * sum_d X_k[m, d] * v_k[n, d]
// with v_k = v(seed, param_id, ks[k]) of shape [N, D] (row n, column d of its 2-D view),
// generated in shared memory 128 columns at a time (never materialized whole).
// Same contract as fwdkern::cpu::seeded_matmul (fwdkern/lora_ops.h):
//   x    [M, D] view (fp32/fp16/bf16, any strides, device memory); X_k starts at
//        x.data + k * x_stride_k elements (x_stride_k = 0: one X shared by all k).
//   ks   device pointer to K int64 counters (K <= 65535).
//   out  fp32 device memory, element (k, m, n) at out[k*out_stride_k + m*out_stride_m + n*out_stride_n].
// Used for x dA_kᵀ (v = dA_k [r, in]) and h dB_kᵀ (v = dB_k [out, r]).
void seeded_matmul(const View2D& x, int64_t x_stride_k, uint64_t seed, uint32_t param_id,
                   const int64_t* ks, int64_t K, int dist, int64_t N, float* out,
                   int64_t out_stride_k, int64_t out_stride_m, int64_t out_stride_n, float alpha,
                   bool accumulate, uintptr_t stream);

}  // namespace cuda
}  // namespace fwdkern
