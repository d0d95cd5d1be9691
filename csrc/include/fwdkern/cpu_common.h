// Helpers shared by the CPU kernels: fp16/bf16 <-> fp32 conversion (no hardware half
// on generic x86-64), typed element access and unit generation of the perturbation
// stream (docs/perturbations.md).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fwdkern/perturb.h"

namespace fwdkern {
namespace cpu {

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half -> float (exact).
inline float half2float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return u2f(sign | 0x7F800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return u2f(sign);
    return (h & 0x8000u ? -1.0f : 1.0f) * static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24
  }
  return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}
// float -> IEEE half, round-to-nearest-even.
inline uint16_t float2half(float f) {
  const uint32_t u = f2u(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7FFFFFFFu;
  if (au >= 0x7F800000u) return sign | (au > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (au >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520 -> inf
  if (au < 0x38800000u) {                        // below 2^-14: subnormal half
    return sign | static_cast<uint16_t>(std::nearbyint(u2f(au) * 16777216.0f));  // FPU rounds to even
  }
  const uint32_t mant = au + 0xC8000FFFu + ((au >> 13) & 1u);  // rebias exponent + RNE
  return sign | static_cast<uint16_t>(mant >> 13);
}
inline float bf162float(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
inline uint16_t float2bf16(float f) {
  uint32_t u = f2u(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <int DT>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  static float load(const T* p) { return *p; }
  static void store(T* p, float v) { *p = v; }
};
template <>
struct Elem<kF16> {
  using T = uint16_t;
  static float load(const T* p) { return half2float(*p); }
  static void store(T* p, float v) { *p = float2half(v); }
};
template <>
struct Elem<kBF16> {
  using T = uint16_t;
  static float load(const T* p) { return bf162float(*p); }
  static void store(T* p, float v) { *p = float2bf16(v); }
};

inline float load_elem(const void* base, int dtype, int64_t off) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(base)[off];
    case kF16: return half2float(static_cast<const uint16_t*>(base)[off]);
    default: return bf162float(static_cast<const uint16_t*>(base)[off]);
  }
}

// Element (i, j) of a view, as fp32.
inline float load_at(const View2D& a, int64_t i, int64_t j) {
  return load_elem(a.data, a.dtype, i * a.stride_r + j * a.stride_c);
}

// The view `v` with its data pointer moved by `bytes` (X_k of a stack of equal-shaped matrices).
inline View2D shifted(const View2D& v, int64_t bytes) {
  View2D out = v;
  out.data = static_cast<char*>(v.data) + bytes;
  return out;
}

// The first `cnt` (<= kUnit) values of unit (row, unit) of perturbation k into v:
// Rademacher = the 128 bits of one Philox call (bit 1 -> -1); Gaussian = 4
// Box-Muller normals per Philox call (chunk = col / 4).
inline void gen_unit(int dist, uint64_t seed, uint32_t pid, uint32_t k, uint32_t row, uint32_t unit,
                     float* __restrict v, int cnt = kUnit) {
  if (dist == kRademacher) {
    const U32x4 r = stream_words(seed, pid, k, row, unit);
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    const uint32_t one = f2u(1.0f);
    if (cnt == kUnit) {  // fixed trip counts: vectorizes
      for (int q = 0; q < 4; ++q)
        for (int b = 0; b < 32; ++b) v[q * 32 + b] = u2f(one ^ (((w[q] >> b) & 1u) << 31));
    } else {
      for (int e = 0; e < cnt; ++e) v[e] = u2f(one ^ (((w[e >> 5] >> (e & 31)) & 1u) << 31));
    }
  } else {
    float z[4];
    for (int s = 0; 4 * s < cnt; ++s) {
      gaussian4(stream_words(seed, pid, k, row, unit * (kUnit / 4) + s), z);
      for (int e = 0; e < 4 && 4 * s + e < cnt; ++e) v[4 * s + e] = z[e];
    }
  }
}

}  // namespace cpu
}  // namespace fwdkern
