// CPU (C++17 + OpenMP) dequantization of fwdkern's weight-only formats (fwdkern/ops/_qformat.py).
// No Python, no libtorch. The dense GEMM over the dequantized weight goes through torch.
//
// Formats (row n of an [N, D] weight, groups of `group_size` columns, the last one may be shorter):
//   int8: q int8 [N, D] (row stride ldq), w[n, d] = q[n, d] * scales[n]                (per channel)
//   int4: p uint8 [N, ceil(D/2)] (row stride ldp bytes), column d in byte d/2, low nibble for even d;
//         w[n, d] = nib(n, d) * scales[n, g] + offsets[n, g], g = d / group_size, G groups per row.
// scales / offsets are fp32, contiguous [N, G]. The output is a [N, D] view (fp32/fp16/bf16).
#pragma once
#include <cstdint>

#include "fwdkern/abi.h"

namespace fwdkern {
namespace cpu {

void dequant_int8(const int8_t* q, int64_t ldq, const float* scales, const View2D& out);

void dequant_int4(const uint8_t* p, int64_t ldp, const float* scales, const float* offsets, int64_t G,
                  int64_t group_size, const View2D& out);

}  // namespace cpu
}  // namespace fwdkern
