// CPU kernels of the seeded-perturbation ops. Work is split into "units" of 128
// consecutive elements of one row (one Philox call for Rademacher signs), the same
// decomposition the CUDA and Triton kernels use.
#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fwdkern/cpu_common.h"
#include "fwdkern/cpu_ops.h"

namespace fwdkern {
namespace cpu {
namespace {

struct Units {
  int64_t per_row, total;
  explicit Units(const View2D& v)
      : per_row((v.cols + kUnit - 1) / kUnit), total(v.rows * ((v.cols + kUnit - 1) / kUnit)) {}
};

template <int DT>
void perturbation_impl(const View2D& o, uint64_t seed, uint32_t pid, uint32_t k, int dist) {
  using E = Elem<DT>;
  auto* base = static_cast<typename E::T*>(o.data);
  const Units U(o);
#pragma omp parallel for schedule(static)
  for (int64_t u = 0; u < U.total; ++u) {
    const int64_t row = u / U.per_row, unit = u % U.per_row;
    alignas(64) float v[kUnit];
    gen_unit(dist, seed, pid, k, static_cast<uint32_t>(row), static_cast<uint32_t>(unit), v);
    const int64_t c0 = unit * kUnit, n = std::min<int64_t>(kUnit, o.cols - c0);
    for (int64_t e = 0; e < n; ++e) E::store(base + row * o.stride_r + (c0 + e) * o.stride_c, v[e]);
  }
}

template <int DT>
void axpy_impl(const View2D& p, uint64_t seed, uint32_t pid, const int64_t* ks, const float* coeffs,
               int64_t K, float alpha, int dist) {
  using E = Elem<DT>;
  auto* base = static_cast<typename E::T*>(p.data);
  const Units U(p);
#pragma omp parallel for schedule(static)
  for (int64_t u = 0; u < U.total; ++u) {
    const int64_t row = u / U.per_row, unit = u % U.per_row;
    alignas(64) float acc[kUnit] = {0.0f};
    alignas(64) float v[kUnit];
    for (int64_t j = 0; j < K; ++j) {
      const float c = coeffs[j];
      gen_unit(dist, seed, pid, static_cast<uint32_t>(ks[j]), static_cast<uint32_t>(row),
               static_cast<uint32_t>(unit), v);
      for (int e = 0; e < kUnit; ++e) acc[e] += c * v[e];
    }
    const int64_t c0 = unit * kUnit, n = std::min<int64_t>(kUnit, p.cols - c0);
    auto* rowp = base + row * p.stride_r;
    if (p.stride_c == 1) {
      for (int64_t e = 0; e < n; ++e) E::store(rowp + c0 + e, E::load(rowp + c0 + e) + alpha * acc[e]);
    } else {
      for (int64_t e = 0; e < n; ++e) {
        auto* q = rowp + (c0 + e) * p.stride_c;
        E::store(q, E::load(q) + alpha * acc[e]);
      }
    }
  }
}

// Units per reduction block. Partial sums are formed per fixed block and then added
// in block order, so the result does not depend on the number of threads.
constexpr int64_t kDotBlockUnits = 64;

template <int DT>
void dot_impl(const View2D& t, uint64_t seed, uint32_t pid, const int64_t* ks, int64_t K, int dist,
              float* out) {
  using E = Elem<DT>;
  const auto* base = static_cast<const typename E::T*>(t.data);
  const Units U(t);
  const int64_t nblocks = (U.total + kDotBlockUnits - 1) / kDotBlockUnits;
  std::vector<float> partial(static_cast<size_t>(nblocks * K), 0.0f);
#pragma omp parallel
  {
    // acc[j][32]: 32 lanes per perturbation keep the inner loop vectorizable.
    std::vector<float> acc(static_cast<size_t>(K) * 32);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t u_end = std::min(U.total, (b + 1) * kDotBlockUnits);
      for (int64_t u = b * kDotBlockUnits; u < u_end; ++u) {
        const int64_t row = u / U.per_row, unit = u % U.per_row;
        const int64_t c0 = unit * kUnit, n = std::min<int64_t>(kUnit, t.cols - c0);
        alignas(64) float x[kUnit];
        alignas(64) float v[kUnit];
        const auto* rowp = base + row * t.stride_r;
        for (int64_t e = 0; e < n; ++e) x[e] = E::load(rowp + (c0 + e) * t.stride_c);
        for (int64_t e = n; e < kUnit; ++e) x[e] = 0.0f;
        for (int64_t j = 0; j < K; ++j) {
          gen_unit(dist, seed, pid, static_cast<uint32_t>(ks[j]), static_cast<uint32_t>(row),
                   static_cast<uint32_t>(unit), v);
          float* a = acc.data() + j * 32;
          for (int q = 0; q < 4; ++q)
            for (int l = 0; l < 32; ++l) a[l] += x[q * 32 + l] * v[q * 32 + l];
        }
      }
      for (int64_t j = 0; j < K; ++j) {
        float s = 0.0f;
        for (int l = 0; l < 32; ++l) s += acc[j * 32 + l];
        partial[b * K + j] = s;
      }
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    double s = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) s += partial[b * K + j];
    out[j] = static_cast<float>(s);
  }
}

}  // namespace

void perturbation(const View2D& out, uint64_t seed, uint32_t param_id, uint32_t k, int dist) {
  check_view(out, "out");
  check_common(dist, 0, nullptr);
  FK_DISPATCH_DTYPE(out.dtype, perturbation_impl<DTV>(out, seed, param_id, k, dist));
}

void seeded_axpy(const View2D& param, uint64_t seed, uint32_t param_id, const int64_t* ks,
                 const float* coeffs, int64_t K, float alpha, int dist) {
  check_view(param, "param");
  check_common(dist, K, ks);
  FK_CHECK(K == 0 || coeffs != nullptr, "coeffs: null pointer");
  check_ks(ks, K);
  FK_DISPATCH_DTYPE(param.dtype, axpy_impl<DTV>(param, seed, param_id, ks, coeffs, K, alpha, dist));
}

void seeded_dot(const View2D& t, uint64_t seed, uint32_t param_id, const int64_t* ks, int64_t K,
                int dist, float* out) {
  check_view(t, "tensor");
  check_common(dist, K, ks);
  FK_CHECK(K == 0 || out != nullptr, "out: null pointer");
  check_ks(ks, K);
  FK_DISPATCH_DTYPE(t.dtype, dot_impl<DTV>(t, seed, param_id, ks, K, dist, out));
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace fwdkern
