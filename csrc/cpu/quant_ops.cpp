// CPU dequantization of the int8 / int4 weight formats (see fwdkern/quant_ops.h).
// One task = a block of rows; each output element is written once, independently of the
// thread count. fp32 output loops are plain enough for the compiler to vectorize
// (-O3 -march=native); fp16/bf16 outputs convert through a thread-local fp32 row.
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fwdkern/cpu_common.h"
#include "fwdkern/quant_ops.h"

namespace fwdkern {
namespace cpu {
namespace {

constexpr int64_t kRowsPerTask = 16;

inline void dequant_row_int8(const int8_t* q, float s, int64_t D, float* o) {
  for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(q[d]) * s;
}

// Columns [c0, c1) of one int4 row (c0 even: a byte never straddles two calls).
inline void dequant_span_int4(const uint8_t* p, float s, float m, int64_t c0, int64_t c1, float* o) {
  const int64_t pairs_end = c0 + ((c1 - c0) & ~int64_t{1});
  for (int64_t c = c0; c < pairs_end; c += 2) {
    const uint8_t b = p[c >> 1];
    o[c] = static_cast<float>(b & 0xF) * s + m;
    o[c + 1] = static_cast<float>(b >> 4) * s + m;
  }
  if (pairs_end < c1) o[pairs_end] = static_cast<float>(p[pairs_end >> 1] & 0xF) * s + m;
}

template <int DT, typename RowFn>
void for_rows(const View2D& out, RowFn row_fn) {
  using E = Elem<DT>;
  const int64_t N = out.rows, D = out.cols;
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel
  {
    std::vector<float> tmp(DT == kF32 && out.stride_c == 1 ? 0 : static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n1 = std::min(N, (t + 1) * kRowsPerTask);
      for (int64_t n = t * kRowsPerTask; n < n1; ++n) {
        auto* orow = static_cast<typename E::T*>(out.data) + n * out.stride_r;
        if (tmp.empty()) {
          row_fn(n, reinterpret_cast<float*>(orow));
        } else {
          row_fn(n, tmp.data());
          for (int64_t d = 0; d < D; ++d) E::store(orow + d * out.stride_c, tmp[d]);
        }
      }
    }
  }
}

}  // namespace

void dequant_int8(const int8_t* q, int64_t ldq, const float* scales, const View2D& out) {
  check_view(out, "out");
  FK_CHECK(out.rows * out.cols == 0 || (q != nullptr && scales != nullptr), "dequant_int8: null pointer");
  FK_CHECK(ldq >= out.cols, "dequant_int8: row stride " << ldq << " < D " << out.cols);
  FK_DISPATCH_DTYPE(out.dtype, for_rows<DTV>(out, [&](int64_t n, float* o) {
    dequant_row_int8(q + n * ldq, scales[n], out.cols, o);
  }));
}

void dequant_int4(const uint8_t* p, int64_t ldp, const float* scales, const float* offsets, int64_t G,
                  int64_t group_size, const View2D& out) {
  check_view(out, "out");
  const int64_t D = out.cols;
  FK_CHECK(group_size > 0 && group_size % 2 == 0, "dequant_int4: group_size must be positive and even, got "
                                                      << group_size);
  FK_CHECK(G == (D + group_size - 1) / group_size, "dequant_int4: " << G << " groups for D " << D
                                                                    << " and group_size " << group_size);
  FK_CHECK(ldp >= (D + 1) / 2, "dequant_int4: row stride " << ldp << " bytes < ceil(D/2)");
  FK_CHECK(out.rows * D == 0 || (p != nullptr && scales != nullptr && offsets != nullptr),
           "dequant_int4: null pointer");
  FK_DISPATCH_DTYPE(out.dtype, for_rows<DTV>(out, [&](int64_t n, float* o) {
    const uint8_t* row = p + n * ldp;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * group_size, c1 = std::min(D, c0 + group_size);
      dequant_span_int4(row, scales[n * G + g], offsets[n * G + g], c0, c1, o);
    }
  }));
}

}  // namespace cpu
}  // namespace fwdkern
