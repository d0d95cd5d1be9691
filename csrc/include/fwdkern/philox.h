// Philox4x32-10 (Salmon et al., Random123) and the fwdkern perturbation stream.
// Header-only, host + device. The layout is specified in docs/perturbations.md;
// the Triton kernels (fwdkern/triton/philox.py) and the PyTorch reference
// (fwdkern/ops/reference.py) implement the same mapping.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FK_HD __host__ __device__ __forceinline__
#else
#define FK_HD inline
#endif

namespace fwdkern {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Elements per Philox call for each distribution: 128 sign bits, or 4 normals
// (two Box-Muller pairs).
constexpr int64_t kRademacherChunk = 128;
constexpr int64_t kGaussianChunk = 4;

struct U32x4 {
  uint32_t x, y, z, w;
};

FK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

FK_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// The perturbation stream: the chunk `chunk` (col / chunk_size) of row `row` of
// perturbation k of tensor param_id under a 64-bit seed.
FK_HD U32x4 stream_words(uint64_t seed, uint32_t param_id, uint32_t k, uint32_t row,
                         uint32_t chunk) {
  return philox4x32_10(U32x4{chunk, row, param_id, k}, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

FK_HD uint32_t select_word(const U32x4& r, int q) {
  return q == 0 ? r.x : (q == 1 ? r.y : (q == 2 ? r.z : r.w));
}

// Rademacher: bit (col % 128) of the 128-bit chunk; bit 1 -> -1, bit 0 -> +1.
FK_HD uint32_t rademacher_bit(const U32x4& r, int lane) {
  return (select_word(r, lane >> 5) >> (lane & 31)) & 1u;
}

// x with its sign flipped when bit == 1: x * (1 - 2 bit) with one xor.
FK_HD float flip_sign(float x, uint32_t bit) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(__float_as_uint(x) ^ (bit << 31));
#else
  union {
    float f;
    uint32_t u;
  } v;
  v.f = x;
  v.u ^= (bit << 31);
  return v.f;
#endif
}

}  // namespace fwdkern
