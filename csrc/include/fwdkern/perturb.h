// Value mapping of the perturbation stream (docs/perturbations.md), host + device.
#pragma once
#include <cmath>
#include <cstdint>

#include "fwdkern/abi.h"
#include "fwdkern/philox.h"

namespace fwdkern {

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

}  // namespace fwdkern
