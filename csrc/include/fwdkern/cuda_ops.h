// CUDA seeded-perturbation kernels. Host launchers take raw device pointers and a
// cudaStream_t passed as an integer (the caller's current stream), so this library
// never links libtorch. ks / coeffs / out are device pointers.
#pragma once
#include <cstdint>

#include "fwdkern/perturb.h"

namespace fwdkern {
namespace cuda {

void perturbation(const View2D& out, uint64_t seed, uint32_t param_id, uint32_t k, int dist,
                  uintptr_t stream);
void seeded_axpy(const View2D& param, uint64_t seed, uint32_t param_id, const int64_t* ks,
                 const float* coeffs, int64_t K, float alpha, int dist, uintptr_t stream);
// `workspace` must hold seeded_dot_workspace(n, K) floats.
int64_t seeded_dot_workspace(int64_t rows, int64_t cols, int64_t K);
void seeded_dot(const View2D& t, uint64_t seed, uint32_t param_id, const int64_t* ks, int64_t K,
                int dist, float* out, float* workspace, uintptr_t stream);
int device_count();

}  // namespace cuda
}  // namespace fwdkern
