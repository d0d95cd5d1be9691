// CPU (C++17 + OpenMP) seeded-perturbation kernels. No Python, no libtorch.
#pragma once
#include <cstdint>

#include "fwdkern/perturb.h"

namespace fwdkern {
namespace cpu {

// out[r, c] = v(seed, param_id, k)[r, c]
void perturbation(const View2D& out, uint64_t seed, uint32_t param_id, uint32_t k, int dist);

// param += alpha * sum_j coeffs[j] * v(seed, param_id, ks[j])  (fp32 accumulation, one rounding)
void seeded_axpy(const View2D& param, uint64_t seed, uint32_t param_id, const int64_t* ks,
                 const float* coeffs, int64_t K, float alpha, int dist);

// out[j] = <v(seed, param_id, ks[j]), t>  (fp32 out; deterministic summation order)
void seeded_dot(const View2D& t, uint64_t seed, uint32_t param_id, const int64_t* ks, int64_t K,
                int dist, float* out);

int num_threads();

}  // namespace cpu
}  // namespace fwdkern
