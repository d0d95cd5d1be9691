// CPU kernels of the seeded low-rank parts of the LoRA dual / perturbed forward
// (see fwdkern/lora_ops.h): seeded_matmul, lora_shrink, lora_expand.
// A task owns its output tile, so there are no races and the summation order does
// not depend on the thread count or on which thread runs it; tasks are scheduled
// dynamically, so one descheduled thread (a busy shared machine) does not stall the rest. Perturbation tiles are generated from Philox into
// thread-local fp32 buffers (a multiple of the 128-element unit wide) next to a
// converted input tile, and multiplied with vectorized loops: "dot" tiles when the
// reduction axis is long (x·Aᵀ, x·dAᵀ), register-blocked rows over 64 output columns
// (expand_rows) when it is a rank r (h·Bᵀ, h·dBᵀ).
#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fwdkern/cpu_common.h"
#include "fwdkern/lora_ops.h"

namespace fwdkern {
namespace cpu {
namespace {

constexpr int64_t kMB = 64;      // rows of X per task (dot path)
constexpr int64_t kDB = 512;     // columns of the D axis per tile (4 Philox units)
constexpr int64_t kNBDot = 32;   // v rows per task, dot-product path (D >= kSmallD)
constexpr int64_t kNBA = 128;    // output columns per task, expand_rows paths (small D, expand)
constexpr int64_t kSmallD = 32;  // below this, a dot product is too short to vectorize
constexpr int kLanes = 16;       // accumulator lanes (one AVX-512 / two AVX2 registers)
static_assert(kNBA == kUnit, "lora_expand reads db_k as one Philox unit per column block");

// Rows [n0, n0+nb), columns [d0, d0+dlen) of v_k into V (row stride ldv), zero-padded
// up to dpad. d0 must be a multiple of kUnit.
void gen_tile(int dist, uint64_t seed, uint32_t pid, uint32_t k, int64_t n0, int64_t nb, int64_t d0,
              int64_t dlen, int64_t dpad, float* V, int64_t ldv) {
  for (int64_t n = 0; n < nb; ++n) {
    float* vr = V + n * ldv;
    for (int64_t c = 0; c < dlen; c += kUnit)
      gen_unit(dist, seed, pid, k, static_cast<uint32_t>(n0 + n), static_cast<uint32_t>((d0 + c) / kUnit), vr + c,
               static_cast<int>(std::min<int64_t>(kUnit, dlen - c)));
    for (int64_t c = dlen; c < dpad; ++c) vr[c] = 0.0f;
  }
}

// a[r0.., c0..] -> fp32 tile T [nr, cpad] (row stride ld), zero-padded past nc.
void load_tile(const View2D& a, int64_t r0, int64_t nr, int64_t c0, int64_t nc, int64_t cpad, float* T, int64_t ld) {
  for (int64_t i = 0; i < nr; ++i) {
    float* tr = T + i * ld;
    if (a.dtype == kF32 && a.stride_c == 1) {
      std::memcpy(tr, static_cast<const float*>(a.data) + (r0 + i) * a.stride_r + c0, sizeof(float) * nc);
    } else {
      for (int64_t j = 0; j < nc; ++j) tr[j] = load_at(a, r0 + i, c0 + j);
    }
    for (int64_t j = nc; j < cpad; ++j) tr[j] = 0.0f;
  }
}

// O[m, n] += <X[m, :dpad], V[n, :dpad]>; dpad is a multiple of kLanes. Four v rows
// share each X load (4 x kLanes independent accumulators hide the FMA latency).
void dot_tile(const float* __restrict X, int64_t ldx, const float* __restrict V, int64_t ldv, int64_t mb,
              int64_t nb, int64_t dpad, float* __restrict O, int64_t ldo) {
  for (int64_t m = 0; m < mb; ++m) {
    const float* xr = X + m * ldx;
    int64_t n = 0;
    for (; n + 4 <= nb; n += 4) {
      const float* v0 = V + n * ldv;
      const float* v1 = v0 + ldv;
      const float* v2 = v1 + ldv;
      const float* v3 = v2 + ldv;
      float a0[kLanes] = {0}, a1[kLanes] = {0}, a2[kLanes] = {0}, a3[kLanes] = {0};
      for (int64_t d = 0; d < dpad; d += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const float xv = xr[d + l];
          a0[l] += xv * v0[d + l];
          a1[l] += xv * v1[d + l];
          a2[l] += xv * v2[d + l];
          a3[l] += xv * v3[d + l];
        }
      }
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int l = 0; l < kLanes; ++l) {
        s0 += a0[l];
        s1 += a1[l];
        s2 += a2[l];
        s3 += a3[l];
      }
      O[m * ldo + n] += s0;
      O[m * ldo + n + 1] += s1;
      O[m * ldo + n + 2] += s2;
      O[m * ldo + n + 3] += s3;
    }
    for (; n < nb; ++n) {
      const float* v0 = V + n * ldv;
      float a0[kLanes] = {0};
      for (int64_t d = 0; d < dpad; d += kLanes)
        for (int l = 0; l < kLanes; ++l) a0[l] += xr[d + l] * v0[d + l];
      float s0 = 0;
      for (int l = 0; l < kLanes; ++l) s0 += a0[l];
      O[m * ldo + n] += s0;
    }
  }
}

static_assert(kNBA % (4 * kLanes) == 0, "expand_rows processes 64 columns at a time");

// Y[m, n] = s * (sum_d h1[m, d] BT[d, n] + sum_d h2[m, d] dBT[d, n]) + brow[n] for m < M, n < nb
// (h1/h2 [M, r] row-major, either may be null; BT/dBT [r, kNBA]). For each 64-column chunk the
// accumulators stay in four registers over the whole d loop and Y is written once.
void expand_rows(int64_t M, int64_t r, const float* __restrict h1, const float* __restrict BT,
                 const float* __restrict h2, const float* __restrict dBT, float s, const float* __restrict brow,
                 float* __restrict Y, int64_t ldy, int64_t nb) {
  constexpr int kC = 4 * kLanes;
  for (int64_t nc = 0; nc < nb; nc += kC) {
    for (int64_t m = 0; m < M; ++m) {
      float a0[kLanes] = {0}, a1[kLanes] = {0}, a2[kLanes] = {0}, a3[kLanes] = {0};
      for (int pass = 0; pass < 2; ++pass) {
        const float* h = pass == 0 ? h1 : h2;
        const float* T = pass == 0 ? BT : dBT;
        if (h == nullptr) continue;
        for (int64_t d = 0; d < r; ++d) {
          const float xv = h[m * r + d];
          const float* vt = T + d * kNBA + nc;
          for (int l = 0; l < kLanes; ++l) {
            a0[l] += xv * vt[l];
            a1[l] += xv * vt[kLanes + l];
            a2[l] += xv * vt[2 * kLanes + l];
            a3[l] += xv * vt[3 * kLanes + l];
          }
        }
      }
      float* yr = Y + m * ldy + nc;
      const float* br = brow + nc;
      if (nc + kC <= nb) {
        for (int l = 0; l < kLanes; ++l) {
          yr[l] = s * a0[l] + br[l];
          yr[kLanes + l] = s * a1[l] + br[kLanes + l];
          yr[2 * kLanes + l] = s * a2[l] + br[2 * kLanes + l];
          yr[3 * kLanes + l] = s * a3[l] + br[3 * kLanes + l];
        }
      } else {
        alignas(64) float tmp[kC];
        for (int l = 0; l < kLanes; ++l) {
          tmp[l] = a0[l];
          tmp[kLanes + l] = a1[l];
          tmp[2 * kLanes + l] = a2[l];
          tmp[3 * kLanes + l] = a3[l];
        }
        for (int64_t e = 0; e < nb - nc; ++e) yr[e] = s * tmp[e] + br[e];
      }
    }
  }
}

// v_k rows [n0, n0+nb) of length D, transposed into VT[d, n] (row stride kNBA), columns
// past nb zeroed. `tmp` holds nb * D floats.
void gen_tile_t(int dist, uint64_t seed, uint32_t pid, uint32_t k, int64_t n0, int64_t nb, int64_t D, float* tmp,
                float* VT) {
  gen_tile(dist, seed, pid, k, n0, nb, 0, D, D, tmp, D);
  for (int64_t d = 0; d < D; ++d) {
    float* row = VT + d * kNBA;
    for (int64_t n = 0; n < nb; ++n) row[n] = tmp[n * D + d];
    for (int64_t n = nb; n < kNBA; ++n) row[n] = 0.0f;
  }
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

}  // namespace

void seeded_matmul(const View2D& x, int64_t x_stride_k, uint64_t seed, uint32_t param_id, const int64_t* ks,
                   int64_t K, int dist, int64_t N, float* out, int64_t out_stride_k, int64_t out_stride_m,
                   int64_t out_stride_n, float alpha, bool accumulate) {
  check_view(x, "x");
  check_common(dist, K, ks);
  check_ks(ks, K);
  FK_CHECK(N >= 0, "n: negative output width " << N);
  FK_CHECK(N <= 0xFFFFFFFFll, "n: more than 2^32-1 perturbation rows");
  const int64_t M = x.rows, D = x.cols;
  if (K == 0 || M == 0 || N == 0) return;
  FK_CHECK(out != nullptr, "out: null pointer");
  const int64_t es = elem_size(x.dtype);
  auto x_k = [&](int64_t k) { return shifted(x, k * x_stride_k * es); };
  auto store = [&](int64_t k, int64_t m, int64_t n0, int64_t nb, const float* o) {
    float* orow = out + k * out_stride_k + m * out_stride_m + n0 * out_stride_n;
    if (accumulate) {
      for (int64_t n = 0; n < nb; ++n) orow[n * out_stride_n] += alpha * o[n];
    } else {
      for (int64_t n = 0; n < nb; ++n) orow[n * out_stride_n] = alpha * o[n];
    }
  };

  if (D < kSmallD) {
    // Small D (e.g. h·dB_kᵀ with D = r): tasks (k, n-block); the v_k tile is generated once per
    // task and X_k is streamed in chunks of kMS rows through expand_rows.
    constexpr int64_t kMS = 256;
    const int64_t n_blocks = (N + kNBA - 1) / kNBA, tasks = K * n_blocks;
#pragma omp parallel
    {
      std::vector<float> tmp(kNBA * kSmallD), VT(kSmallD * kNBA), Xc(kMS * kSmallD), Oc(kMS * kNBA);
      alignas(64) float zeros[kNBA] = {0};
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t k = t / n_blocks, n0 = (t % n_blocks) * kNBA, nb = std::min(kNBA, N - n0);
        gen_tile_t(dist, seed, param_id, static_cast<uint32_t>(ks[k]), n0, nb, D, tmp.data(), VT.data());
        const View2D xk = x_k(k);
        for (int64_t m0 = 0; m0 < M; m0 += kMS) {
          const int64_t mb = std::min(kMS, M - m0);
          load_tile(xk, m0, mb, 0, D, D, Xc.data(), D);
          expand_rows(mb, D, Xc.data(), VT.data(), nullptr, nullptr, 1.0f, zeros, Oc.data(), kNBA, nb);
          for (int64_t m = 0; m < mb; ++m) store(k, m0 + m, n0, nb, Oc.data() + m * kNBA);
        }
      }
    }
    return;
  }

  // Dot path: tasks (m-block, n-block); per D-block, one X tile serves every k when X is shared.
  const int64_t m_blocks = (M + kMB - 1) / kMB, n_blocks = (N + kNBDot - 1) / kNBDot;
  const int64_t tasks = m_blocks * n_blocks;
#pragma omp parallel
  {
    std::vector<float> Xt(kMB * kDB), Vt(kNBDot * kDB), Ot(K * kMB * kNBDot);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t m0 = (t / n_blocks) * kMB, n0 = (t % n_blocks) * kNBDot;
      const int64_t mb = std::min(kMB, M - m0), nb = std::min(kNBDot, N - n0);
      std::fill(Ot.begin(), Ot.end(), 0.0f);
      for (int64_t d0 = 0; d0 < D; d0 += kDB) {
        const int64_t dlen = std::min(kDB, D - d0), dpad = round_up(dlen, kLanes);
        for (int64_t k = 0; k < K; ++k) {
          if (k == 0 || x_stride_k != 0) load_tile(x_k(k), m0, mb, d0, dlen, dpad, Xt.data(), kDB);
          gen_tile(dist, seed, param_id, static_cast<uint32_t>(ks[k]), n0, nb, d0, dlen, dpad, Vt.data(), kDB);
          dot_tile(Xt.data(), kDB, Vt.data(), kDB, mb, nb, dpad, Ot.data() + k * kMB * kNBDot, kNBDot);
        }
      }
      for (int64_t k = 0; k < K; ++k)
        for (int64_t m = 0; m < mb; ++m) store(k, m0 + m, n0, nb, Ot.data() + (k * kMB + m) * kNBDot);
    }
  }
}

void lora_shrink(const View2D& x, const View2D* xt, int64_t xt_stride_k, const View2D& A, uint64_t seed,
                 uint32_t pid_A, const int64_t* ks, int64_t K, int dist, bool perturb_A, float* H) {
  check_view(x, "x");
  check_view(A, "lora_A");
  if (xt) check_view(*xt, "x_tangents");
  const int64_t M = x.rows, D = x.cols, r = A.rows;
  FK_CHECK(A.cols == D && (!xt || (xt->rows == M && xt->cols == D)), "lora_shrink: shapes disagree");
  check_common(dist, K, ks);
  check_ks(ks, K);
  if (M == 0 || r == 0) return;
  FK_CHECK(H != nullptr, "H: null pointer");
  const int64_t J = 1 + K;  // output slabs
  const int64_t m_blocks = (M + kMB - 1) / kMB, n_blocks = (r + kNBDot - 1) / kNBDot;
  const int64_t tasks = m_blocks * n_blocks;
#pragma omp parallel
  {
    std::vector<float> Xt(kMB * kDB), X2(xt ? kMB * kDB : 0), At(kNBDot * kDB), Vt(kNBDot * kDB),
        Ot(J * kMB * kNBDot);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t m0 = (t / n_blocks) * kMB, n0 = (t % n_blocks) * kNBDot;
      const int64_t mb = std::min(kMB, M - m0), nb = std::min(kNBDot, r - n0);
      std::fill(Ot.begin(), Ot.end(), 0.0f);
      for (int64_t d0 = 0; d0 < D; d0 += kDB) {
        const int64_t dlen = std::min(kDB, D - d0), dpad = round_up(dlen, kLanes);
        load_tile(x, m0, mb, d0, dlen, dpad, Xt.data(), kDB);
        load_tile(A, n0, nb, d0, dlen, dpad, At.data(), kDB);
        dot_tile(Xt.data(), kDB, At.data(), kDB, mb, nb, dpad, Ot.data(), kNBDot);
        for (int64_t k = 0; k < K; ++k) {
          float* Ok = Ot.data() + (1 + k) * kMB * kNBDot;
          if (perturb_A) {
            gen_tile(dist, seed, pid_A, static_cast<uint32_t>(ks[k]), n0, nb, d0, dlen, dpad, Vt.data(), kDB);
            dot_tile(Xt.data(), kDB, Vt.data(), kDB, mb, nb, dpad, Ok, kNBDot);
          }
          if (xt) {
            load_tile(shifted(*xt, k * xt_stride_k * elem_size(xt->dtype)), m0, mb, d0, dlen, dpad, X2.data(), kDB);
            dot_tile(X2.data(), kDB, At.data(), kDB, mb, nb, dpad, Ok, kNBDot);
          }
        }
      }
      for (int64_t j = 0; j < J; ++j)
        for (int64_t m = 0; m < mb; ++m)
          std::memcpy(H + (j * M + m0 + m) * r + n0, Ot.data() + (j * kMB + m) * kNBDot, sizeof(float) * nb);
    }
  }
}

void lora_expand(const float* H, int64_t M, const View2D& B, const View2D* bias, float scaling, uint64_t seed,
                 uint32_t pid_B, uint32_t pid_bias, const int64_t* ks, int64_t K, int dist, bool perturb_B,
                 bool perturb_bias, bool tangent_h, float* Y0, float* Yt) {
  check_view(B, "lora_B");
  if (bias) check_view(*bias, "bias");
  const int64_t out_f = B.rows, r = B.cols;
  FK_CHECK(M >= 0, "lora_expand: negative shape");
  FK_CHECK(!bias || bias->cols == out_f, "bias: expected " << out_f << " elements, got " << bias->cols);
  check_common(dist, K, ks);
  check_ks(ks, K);
  if (M == 0 || out_f == 0) return;  // nothing is read or written (an empty bias has a null pointer)
  FK_CHECK(!perturb_bias || bias != nullptr, "bias: perturbed but null");
  FK_CHECK(Y0 != nullptr && (K == 0 || Yt != nullptr) && (r == 0 || H != nullptr), "Y/H: null pointer");
  const int64_t J = 1 + K, n_blocks = (out_f + kNBA - 1) / kNBA, tasks = J * n_blocks;
  // Tasks (slab j, column block): the v tiles of a task are generated once and used for all M rows.
#pragma omp parallel
  {
    std::vector<float> BT(r * kNBA), dBT(r * kNBA), tmp(kNBA * r);
    alignas(64) float brow[kNBA];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t j = t / n_blocks, n0 = (t % n_blocks) * kNBA, nb = std::min(kNBA, out_f - n0);
      const bool use_B = j == 0 || tangent_h, use_dB = j > 0 && perturb_B;
      const uint32_t k = j > 0 ? static_cast<uint32_t>(ks[j - 1]) : 0u;
      if (use_B) {
        for (int64_t i = 0; i < r; ++i) {
          float* row = BT.data() + i * kNBA;
          for (int64_t n = 0; n < nb; ++n) row[n] = load_at(B, n0 + n, i);
          for (int64_t n = nb; n < kNBA; ++n) row[n] = 0.0f;
        }
      }
      if (use_dB) gen_tile_t(dist, seed, pid_B, k, n0, nb, r, tmp.data(), dBT.data());
      std::fill(brow, brow + kNBA, 0.0f);
      if (j == 0 && bias) {
        for (int64_t n = 0; n < nb; ++n) brow[n] = load_elem(bias->data, bias->dtype, (n0 + n) * bias->stride_c);
      } else if (j > 0 && perturb_bias) {
        // db_k has shape [out] = one row: columns [n0, n0+nb) are unit n0/128 of row 0.
        gen_unit(dist, seed, pid_bias, k, 0u, static_cast<uint32_t>(n0 / kUnit), brow, static_cast<int>(nb));
      }
      float* Yj = j == 0 ? Y0 : Yt + (j - 1) * M * out_f;
      expand_rows(M, r, use_B ? H + j * M * r : nullptr, BT.data(), use_dB ? H : nullptr, dBT.data(), scaling,
                  brow, Yj + n0, out_f, nb);
    }
  }
}

}  // namespace cpu
}  // namespace fwdkern
