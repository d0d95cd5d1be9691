// CUDA kernels of the seeded-perturbation ops. No libtorch: raw device pointers,
// the caller's stream as an integer, errors reported as fwdkern::ArgError /
// std::runtime_error (turned into Python exceptions by the bindings).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "fwdkern/cuda_common.cuh"
#include "fwdkern/cuda_ops.h"

namespace fwdkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float element_value(int dist, uint64_t seed, uint32_t pid, uint32_t k,
                                               uint32_t row, int64_t col) {
  if (dist == kRademacher) {
    const U32x4 r = stream_words(seed, pid, k, row, static_cast<uint32_t>(col >> 7));
    return rademacher_bit(r, static_cast<int>(col & 127)) ? -1.0f : 1.0f;
  }
  const U32x4 r = stream_words(seed, pid, k, row, static_cast<uint32_t>(col >> 2));
  float z[4];
  gaussian4(r, z);
  return z[col & 3];
}

template <int DT>
__global__ void perturbation_kernel(View2D o, uint64_t seed, uint32_t pid, uint32_t k, int dist) {
  using E = Elem<DT>;
  const int64_t n = o.rows * o.cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / o.cols, col = i % o.cols;
    E::store(static_cast<typename E::T*>(o.data) + row * o.stride_r + col * o.stride_c,
             element_value(dist, seed, pid, k, static_cast<uint32_t>(row), col));
  }
}

// One warp per 128-element unit; lane l owns elements q*32 + l (q = 0..3), so
// loads/stores are coalesced. Rademacher: lane t computes the Philox words of
// perturbation jb + t and the warp shares them with shuffles, so every Philox
// call is made once per (unit, k) instead of once per element.
template <int DT>
__global__ void axpy_kernel(View2D p, uint64_t seed, uint32_t pid, const int64_t* __restrict__ ks,
                            const float* __restrict__ coeffs, int64_t K, float alpha, int dist) {
  using E = Elem<DT>;
  const int lane = threadIdx.x & 31;
  const int64_t per_row = (p.cols + 127) / 128, total = p.rows * per_row;
  const int64_t warp0 = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t u = warp0; u < total; u += nwarps) {
    const uint32_t row = static_cast<uint32_t>(u / per_row);
    const int64_t unit = u % per_row, c0 = unit * 128;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (dist == kRademacher) {
      for (int64_t jb = 0; jb < K; jb += 32) {
        const int64_t j = jb + lane;
        U32x4 r{0u, 0u, 0u, 0u};
        float c = 0.f;
        if (j < K) {
          r = stream_words(seed, pid, static_cast<uint32_t>(ks[j]), row, static_cast<uint32_t>(unit));
          c = coeffs[j];
        }
        const int nj = static_cast<int>(K - jb < 32 ? K - jb : 32);
        for (int t = 0; t < nj; ++t) {
          const float ct = __shfl_sync(0xffffffffu, c, t);
          const uint32_t w0 = __shfl_sync(0xffffffffu, r.x, t);
          const uint32_t w1 = __shfl_sync(0xffffffffu, r.y, t);
          const uint32_t w2 = __shfl_sync(0xffffffffu, r.z, t);
          const uint32_t w3 = __shfl_sync(0xffffffffu, r.w, t);
          acc[0] += flip_sign(ct, (w0 >> lane) & 1u);
          acc[1] += flip_sign(ct, (w1 >> lane) & 1u);
          acc[2] += flip_sign(ct, (w2 >> lane) & 1u);
          acc[3] += flip_sign(ct, (w3 >> lane) & 1u);
        }
      }
    } else {
      for (int64_t j = 0; j < K; ++j) {
        const float c = coeffs[j];
#pragma unroll
        for (int q = 0; q < 4; ++q)
          acc[q] += c * element_value(dist, seed, pid, static_cast<uint32_t>(ks[j]), row, c0 + q * 32 + lane);
      }
    }
    auto* rowp = static_cast<typename E::T*>(p.data) + row * p.stride_r;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t col = c0 + q * 32 + lane;
      if (col < p.cols) {
        auto* ptr = rowp + col * p.stride_c;
        E::store(ptr, E::load(ptr) + alpha * acc[q]);
      }
    }
  }
}

// Dot: lane t of a warp owns perturbation jb + t and sums the unit's 128 products,
// reading the unit (staged in shared memory as fp32) by broadcast. Per-block
// partials go to workspace[block, j]; a second kernel adds them in block order so
// the result is deterministic.
template <int DT>
__global__ void dot_kernel(View2D t, uint64_t seed, uint32_t pid, const int64_t* __restrict__ ks,
                           int64_t K, int dist, float* __restrict__ partial) {
  using E = Elem<DT>;
  __shared__ float xs[kWarps][128];
  __shared__ float red[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t per_row = (t.cols + 127) / 128, total = t.rows * per_row;
  const int64_t warp0 = blockIdx.x * int64_t(kWarps) + warp;
  const int64_t nwarps = int64_t(gridDim.x) * kWarps;
  const auto* base = static_cast<const typename E::T*>(t.data);
  for (int64_t jb = 0; jb < K; jb += 32) {
    const int64_t j = jb + lane;
    const uint32_t kj = j < K ? static_cast<uint32_t>(ks[j]) : 0u;
    float acc = 0.f;
    for (int64_t u = warp0; u < total; u += nwarps) {
      const uint32_t row = static_cast<uint32_t>(u / per_row);
      const int64_t unit = u % per_row, c0 = unit * 128;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t col = c0 + q * 32 + lane;
        xs[warp][q * 32 + lane] =
            col < t.cols ? E::load(base + row * t.stride_r + col * t.stride_c) : 0.f;
      }
      __syncwarp();
      if (dist == kRademacher) {
        const U32x4 r = stream_words(seed, pid, kj, row, static_cast<uint32_t>(unit));
        const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll 8
          for (int b = 0; b < 32; ++b) acc += flip_sign(xs[warp][q * 32 + b], (w[q] >> b) & 1u);
      } else {
        for (int s = 0; s < 32; ++s) {
          float z[4];
          gaussian4(stream_words(seed, pid, kj, row, static_cast<uint32_t>(unit * 32 + s)), z);
#pragma unroll
          for (int e = 0; e < 4; ++e) acc += z[e] * xs[warp][s * 4 + e];
        }
      }
      __syncwarp();
    }
    red[warp][lane] = acc;
    __syncthreads();
    if (warp == 0) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += red[w][lane];
      if (j < K) partial[blockIdx.x * K + j] = s;
    }
    __syncthreads();
  }
}

__global__ void reduce_partials(const float* __restrict__ partial, int64_t nblocks, int64_t K,
                                float* __restrict__ out) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= K) return;
  float s = 0.f;
  for (int64_t b = 0; b < nblocks; ++b) s += partial[b * K + j];
  out[j] = s;
}

// Grid sizes depend only on the problem size (never on the device), so results are
// reproducible across GPUs.
int64_t unit_blocks(int64_t rows, int64_t cols) {
  const int64_t units = rows * ((cols + 127) / 128);
  int64_t b = (units + kWarps - 1) / kWarps;
  return b < 1 ? 1 : (b > 2048 ? 2048 : b);
}


}  // namespace

void perturbation(const View2D& o, uint64_t seed, uint32_t pid, uint32_t k, int dist,
                  uintptr_t stream) {
  check_view(o, "out");
  check_common(dist, 0, nullptr);
  const int64_t n = o.rows * o.cols;
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FK_DISPATCH_DTYPE(o.dtype, perturbation_kernel<DTV><<<blocks, kThreads, 0, st>>>(o, seed, pid, k, dist));
  FK_CUDA_CHECK(cudaGetLastError());
}

void seeded_axpy(const View2D& p, uint64_t seed, uint32_t pid, const int64_t* ks, const float* coeffs,
                 int64_t K, float alpha, int dist, uintptr_t stream) {
  check_view(p, "param");
  check_common(dist, K, ks);
  FK_CHECK(K == 0 || coeffs != nullptr, "coeffs: null pointer");
  if (p.rows * p.cols == 0 || K == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t blocks = unit_blocks(p.rows, p.cols);
  FK_DISPATCH_DTYPE(p.dtype, axpy_kernel<DTV><<<blocks, kThreads, 0, st>>>(p, seed, pid, ks, coeffs, K, alpha, dist));
  FK_CUDA_CHECK(cudaGetLastError());
}

int64_t seeded_dot_workspace(int64_t rows, int64_t cols, int64_t K) {
  return unit_blocks(rows, cols) * K;
}

void seeded_dot(const View2D& t, uint64_t seed, uint32_t pid, const int64_t* ks, int64_t K, int dist,
                float* out, float* workspace, uintptr_t stream) {
  check_view(t, "tensor");
  check_common(dist, K, ks);
  FK_CHECK(K == 0 || (out != nullptr && workspace != nullptr), "out/workspace: null pointer");
  if (K == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t blocks = unit_blocks(t.rows, t.cols);
  if (t.rows * t.cols == 0) {
    FK_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float) * K, st));
    return;
  }
  FK_DISPATCH_DTYPE(t.dtype, dot_kernel<DTV><<<blocks, kThreads, 0, st>>>(t, seed, pid, ks, K, dist, workspace));
  FK_CUDA_CHECK(cudaGetLastError());
  reduce_partials<<<(K + 255) / 256, 256, 0, st>>>(workspace, blocks, K, out);
  FK_CUDA_CHECK(cudaGetLastError());
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace fwdkern
