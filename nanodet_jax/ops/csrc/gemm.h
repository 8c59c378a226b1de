// The accumulating GEMM micro-kernel of the weight gradients (winograd_wgrad.cc,
// pointwise_wgrad.cc): both reduce over pixels (or tiles) into a small [C x K] result.
#ifndef NANODET_JAX_OPS_CSRC_GEMM_H_
#define NANODET_JAX_OPS_CSRC_GEMM_H_

#include <cstdint>

#include "common.h"

namespace nanodet_ffi {

// acc[MR x kNR] (+)= v[nt x MR]^T z[nt x kNR]: v rows at stride ldv, z rows at stride ldz,
// acc rows contiguous. kFirst: overwrite (a worker's first block), so that accumulators
// need no zeroing. kTail: only n0 / n1 lanes of z's two vectors are read (the last
// output channels); the other lanes of acc accumulate zeros.
template <int MR, bool kFirst, bool kTail>
inline void AccKernel(const float* v, int64_t ldv, const float* z, int64_t ldz, int64_t nt,
                      float* acc, int n0 = kLanes, int n1 = kLanes) {
  Vec a0[MR], a1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    a0[r] = kFirst ? Vec{} : Load(acc + r * kNR);
    a1[r] = kFirst ? Vec{} : Load(acc + r * kNR + kLanes);
  }
  for (int64_t t = 0; t < nt; ++t) {
    const Vec b0 = Ld<kTail>(z + t * ldz, n0), b1 = Ld<kTail>(z + t * ldz + kLanes, n1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float s = v[t * ldv + r];
      a0[r] += s * b0;
      a1[r] += s * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    Store(acc + r * kNR, a0[r]);
    Store(acc + r * kNR + kLanes, a1[r]);
  }
}

}  // namespace nanodet_ffi

#endif  // NANODET_JAX_OPS_CSRC_GEMM_H_
