// CUDA kernels of the LoRA dual forward (csrc/cuda/lora_ops.cu). Host launchers take
// raw device pointers and the caller's stream as an integer (no libtorch), like
// fwdkern/cuda_ops.h.
#pragma once
#include <cstdint>

#include "fwdkern/perturb.h"

namespace fwdkern {
namespace cuda {

// The contract of fwdkern::cpu::seeded_matmul (fwdkern/lora_ops.h) on device memory: x, ks
// (K <= 65535 int64 counters) and out are device pointers, and the v_k tiles are generated in
// shared memory 128 columns at a time. The cuda backend's LoRA ops use it for x dA_kᵀ and
// h dB_kᵀ (fwdkern/ops/_compose.py).
void seeded_matmul(const View2D& x, int64_t x_stride_k, uint64_t seed, uint32_t param_id,
                   const int64_t* ks, int64_t K, int dist, int64_t N, float* out,
                   int64_t out_stride_k, int64_t out_stride_m, int64_t out_stride_n, float alpha,
                   bool accumulate, uintptr_t stream);

}  // namespace cuda
}  // namespace fwdkern
