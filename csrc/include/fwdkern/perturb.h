// Value mapping of the perturbation stream (docs/perturbations.md), host + device,
// plus the dtype codes and argument checks shared by every C++/CUDA entry point.
#pragma once
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "fwdkern/philox.h"

namespace fwdkern {

// Storage dtypes understood by the kernels (codes shared with fwdkern/_dtypes.py).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Elements covered by one "unit" of work: one Philox call for Rademacher,
// 32 calls (4 normals each) for Gaussian. Kernels iterate over units so both
// distributions share one loop structure.
constexpr int kUnit = 128;

constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24

// Four N(0,1) values from one Philox output: two Box-Muller pairs,
// u = (w >> 8 + 1) * 2^-24 in (0, 1], angle = 2*pi * (w >> 8) * 2^-24.
// Host code evaluates in double and rounds once (so it agrees with the float64
// PyTorch reference); device code uses precise float intrinsics.
FK_HD void gaussian4(const U32x4& r, float z[4]) {
#if defined(__CUDA_ARCH__)
  const float u0 = static_cast<float>((r.x >> 8) + 1u) * kTwoPow24Inv;
  const float a0 = static_cast<float>(r.y >> 8) * kTwoPow24Inv;
  const float u1 = static_cast<float>((r.z >> 8) + 1u) * kTwoPow24Inv;
  const float a1 = static_cast<float>(r.w >> 8) * kTwoPow24Inv;
  const float rad0 = sqrtf(-2.0f * logf(u0));
  const float rad1 = sqrtf(-2.0f * logf(u1));
  float s0, c0, s1, c1;
  sincospif(2.0f * a0, &s0, &c0);
  sincospif(2.0f * a1, &s1, &c1);
  z[0] = rad0 * c0;
  z[1] = rad0 * s0;
  z[2] = rad1 * c1;
  z[3] = rad1 * s1;
#else
  constexpr double kInv = 1.0 / 16777216.0;
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const double u0 = static_cast<double>((r.x >> 8) + 1u) * kInv;
  const double a0 = static_cast<double>(r.y >> 8) * kInv;
  const double u1 = static_cast<double>((r.z >> 8) + 1u) * kInv;
  const double a1 = static_cast<double>(r.w >> 8) * kInv;
  const double rad0 = std::sqrt(-2.0 * std::log(u0));
  const double rad1 = std::sqrt(-2.0 * std::log(u1));
  z[0] = static_cast<float>(rad0 * std::cos(kTwoPi * a0));
  z[1] = static_cast<float>(rad0 * std::sin(kTwoPi * a0));
  z[2] = static_cast<float>(rad1 * std::cos(kTwoPi * a1));
  z[3] = static_cast<float>(rad1 * std::sin(kTwoPi * a1));
#endif
}

// ---- argument checks (flash-attention style): throw with a message naming the argument.
class ArgError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

#define FK_CHECK(cond, ...)                                          \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::ostringstream fk_oss_;                                    \
      fk_oss_ << "fwdkern: " << __VA_ARGS__;                         \
      throw ::fwdkern::ArgError(fk_oss_.str());                      \
    }                                                                \
  } while (0)

// A 2-D strided view [rows, cols] of a tensor (its last dim is `cols`).
struct View2D {
  void* data;
  int dtype;
  int64_t rows, cols, stride_r, stride_c;  // strides in elements
};

inline void check_view(const View2D& v, const char* name) {
  FK_CHECK(v.dtype == kF32 || v.dtype == kF16 || v.dtype == kBF16,
           name << ": unsupported dtype code " << v.dtype << " (float32, float16, bfloat16)");
  FK_CHECK(v.rows >= 0 && v.cols >= 0, name << ": negative shape");
  FK_CHECK(v.rows <= 0xFFFFFFFFll, name << ": more than 2^32-1 rows");
  FK_CHECK(v.cols <= (int64_t{1} << 36), name << ": last dimension too large");
  FK_CHECK(v.rows * v.cols == 0 || v.data != nullptr, name << ": null data pointer");
}

inline void check_common(uint32_t /*param_id*/, int dist, int64_t K, const void* ks) {
  FK_CHECK(dist == kRademacher || dist == kGaussian, "dist: unknown distribution code " << dist);
  FK_CHECK(K >= 0, "ks: negative length");
  FK_CHECK(K == 0 || ks != nullptr, "ks: null pointer");
}

}  // namespace fwdkern
