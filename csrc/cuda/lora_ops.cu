// CUDA kernel of the seeded low-rank product of the LoRA dual forward:
// out[k] = X_k v_kᵀ with v_k = v(seed, param_id, ks[k]) [N, D] generated on the fly.
// No libtorch: raw device pointers, the caller's stream as an integer.
//
// The cuda backend's LoRA ops compose it with torch GEMMs (fwdkern/ops/_compose.py): it gives
// them the seeded terms x dA_kᵀ and h dB_kᵀ without a Triton dependency.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fwdkern/cuda_common.cuh"
#include "fwdkern/lora_cuda.h"

namespace fwdkern {
namespace cuda {
namespace {

// Block tile: kBM rows of X times kBN rows of v, walked over D in 128-column units
// (one Philox call per v row and unit for Rademacher). 256 threads = 8 warps; warp w
// owns output rows w, w+8, w+16, w+24 and lane l owns output column n0 + l.
// A CUDA-core (fp32 FMA) kernel with a 4-output register tile, meant for the rank-r
// products it serves (N or D = r), not a tensor-core GEMM (a GPU choice: fwdkern/backends.py).
constexpr int kBM = 32;
constexpr int kBN = 32;
constexpr int kUnitCols = 128;
constexpr int kMMThreads = 256;
constexpr int kRowsPerThread = kBM / (kMMThreads / 32);

template <int DT>
__global__ void __launch_bounds__(kMMThreads)
    seeded_matmul_kernel(View2D x, int64_t x_stride_k, uint64_t seed, uint32_t pid,
                         const int64_t* __restrict__ ks, int dist, int64_t N, float* __restrict__ out,
                         int64_t osk, int64_t osm, int64_t osn, float alpha, bool accumulate) {
  using E = Elem<DT>;
  // +1 column of padding: lane l reads vs[l][c], bank (l + c) % 32, conflict-free.
  __shared__ float xs[kBM][kUnitCols + 1];
  __shared__ float vs[kBN][kUnitCols + 1];
  __shared__ uint32_t words[kBN][4];

  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  const int64_t k = blockIdx.z;
  const uint32_t kj = static_cast<uint32_t>(ks[k]);
  const auto* xb = static_cast<const typename E::T*>(x.data) + k * x_stride_k;
  const int64_t units = (x.cols + kUnitCols - 1) / kUnitCols;

  float acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.f;

  for (int64_t u = 0; u < units; ++u) {
    const int64_t c0 = u * kUnitCols;
    // Stage the X tile as fp32; consecutive threads read consecutive columns.
    for (int i = t; i < kBM * kUnitCols; i += kMMThreads) {
      const int r = i / kUnitCols, c = i % kUnitCols;
      const int64_t m = m0 + r, col = c0 + c;
      xs[r][c] = (m < x.rows && col < x.cols) ? E::load(xb + m * x.stride_r + col * x.stride_c) : 0.f;
    }
    // Generate the v tile [kBN, 128]. Columns beyond D meet zeros in xs.
    if (dist == kRademacher) {
      if (t < kBN) {
        const U32x4 w = stream_words(seed, pid, kj, static_cast<uint32_t>(n0 + t), static_cast<uint32_t>(u));
        words[t][0] = w.x;
        words[t][1] = w.y;
        words[t][2] = w.z;
        words[t][3] = w.w;
      }
      __syncthreads();
      for (int i = t; i < kBN * kUnitCols; i += kMMThreads) {
        const int r = i / kUnitCols, c = i % kUnitCols;
        vs[r][c] = ((words[r][c >> 5] >> (c & 31)) & 1u) ? -1.f : 1.f;
      }
    } else {
      // 32 Philox calls (4 normals each) per v row and unit.
      for (int i = t; i < kBN * (kUnitCols / 4); i += kMMThreads) {
        const int r = i / (kUnitCols / 4), s = i % (kUnitCols / 4);
        float z[4];
        gaussian4(stream_words(seed, pid, kj, static_cast<uint32_t>(n0 + r), static_cast<uint32_t>(u * 32 + s)),
                  z);
#pragma unroll
        for (int e = 0; e < 4; ++e) vs[r][s * 4 + e] = z[e];
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kUnitCols; ++c) {
      const float v = vs[lane][c];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] = fmaf(xs[warp + 8 * i][c], v, acc[i]);
    }
    __syncthreads();  // xs / vs / words are rewritten by the next unit
  }

  const int64_t n = n0 + lane;
  if (n >= N) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t m = m0 + warp + 8 * i;
    if (m < x.rows) {
      float* p = out + k * osk + m * osm + n * osn;
      *p = (accumulate ? *p : 0.f) + alpha * acc[i];
    }
  }
}


}  // namespace

void seeded_matmul(const View2D& x, int64_t x_stride_k, uint64_t seed, uint32_t param_id, const int64_t* ks,
                   int64_t K, int dist, int64_t N, float* out, int64_t out_stride_k, int64_t out_stride_m,
                   int64_t out_stride_n, float alpha, bool accumulate, uintptr_t stream) {
  check_view(x, "x");
  check_common(dist, K, ks);
  FK_CHECK(N >= 0 && N <= 0xFFFFFFFFll, "N: expected 0 <= N < 2^32 (rows of the perturbation), got " << N);
  FK_CHECK(K <= 65535, "ks: at most 65535 perturbations per call, got " << K);
  const int64_t M = x.rows;
  if (K == 0 || M == 0 || N == 0) return;
  FK_CHECK(out != nullptr, "out: null pointer");
  const int64_t grid_m = (M + kBM - 1) / kBM, grid_n = (N + kBN - 1) / kBN;
  FK_CHECK(grid_m <= 0x7FFFFFFFll, "x: too many rows (" << M << ")");
  FK_CHECK(grid_n <= 65535, "N: at most " << 65535 * kBN << " rows of the perturbation, got " << N);
  const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n), static_cast<unsigned>(K));
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FK_DISPATCH_DTYPE(x.dtype, seeded_matmul_kernel<DTV><<<grid, kMMThreads, 0, st>>>(
                                      x, x_stride_k, seed, param_id, ks, dist, N, out, out_stride_k,
                                      out_stride_m, out_stride_n, alpha, accumulate));
  FK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fwdkern
