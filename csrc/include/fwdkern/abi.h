// The interface between the bindings (python/) and the kernels (csrc/): dtype and distribution
// codes, the one 2-D strided view every kernel takes, and the argument checks and dtype
// dispatch every C++/CUDA entry point shares. Host code only (included by .cpp and .cu files).
//
// The Python ops validate every argument before calling a kernel; these checks are the cheap
// ones that keep a direct fwdkern._C call from touching memory it should not.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fwdkern {

// Storage dtypes (codes shared with fwdkern/ops/_validate.py DTYPE_CODE).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
// Distributions of the perturbation stream (codes shared with _validate.py DIST_CODE).
enum Dist : int { kRademacher = 0, kGaussian = 1 };

// Argument errors (flash-attention style): a message naming the argument; the bindings
// turn ArgError into Python's ValueError.
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

// Instantiates __VA_ARGS__ with `constexpr int DTV` = the storage dtype code `dt`.
#define FK_DISPATCH_DTYPE(dt, ...)                                                        \
  switch (dt) {                                                                           \
    case ::fwdkern::kF32: { constexpr int DTV = ::fwdkern::kF32; __VA_ARGS__; } break;   \
    case ::fwdkern::kF16: { constexpr int DTV = ::fwdkern::kF16; __VA_ARGS__; } break;   \
    case ::fwdkern::kBF16: { constexpr int DTV = ::fwdkern::kBF16; __VA_ARGS__; } break; \
    default: FK_CHECK(false, "unsupported dtype code " << dt);                            \
  }

// A 2-D strided view [rows, cols]: element (i, j) at data + i*stride_r + j*stride_c
// (strides in elements). Read-only inputs are passed as views too.
struct View2D {
  void* data;
  int dtype;
  int64_t rows, cols, stride_r, stride_c;
};

inline void check_view(const View2D& v, const char* name) {
  FK_CHECK(v.dtype == kF32 || v.dtype == kF16 || v.dtype == kBF16,
           name << ": unsupported dtype code " << v.dtype << " (float32, float16, bfloat16)");
  FK_CHECK(v.rows >= 0 && v.cols >= 0, name << ": negative shape");
  FK_CHECK(v.rows <= 0xFFFFFFFFll, name << ": more than 2^32-1 rows");
  FK_CHECK(v.cols <= (int64_t{1} << 36), name << ": last dimension too large");
  FK_CHECK(v.rows * v.cols == 0 || v.data != nullptr, name << ": null data pointer");
}

inline void check_common(int dist, int64_t K, const void* ks) {
  FK_CHECK(dist == kRademacher || dist == kGaussian, "dist: unknown distribution code " << dist);
  FK_CHECK(K >= 0, "ks: negative length");
  FK_CHECK(K == 0 || ks != nullptr, "ks: null pointer");
}

// Host-memory ks only (the CUDA launchers get device pointers).
inline void check_ks(const int64_t* ks, int64_t K) {
  for (int64_t j = 0; j < K; ++j)
    FK_CHECK(ks[j] >= 0 && ks[j] <= 0xFFFFFFFFll, "ks[" << j << "] = " << ks[j] << " is outside [0, 2^32)");
}

inline int elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

}  // namespace fwdkern
