// Epilogue of the fused inference kernels (depthwise.cc, pointwise.cc): bias and
// activation applied to each finished output vector while it is still in a register,
// instead of XLA's separate pass over the output (BatchNorm folded into kernel and bias).
// Activation codes match nanodet_jax/ops/epilogue.py.
#ifndef NANODET_JAX_OPS_CSRC_EPILOGUE_H_
#define NANODET_JAX_OPS_CSRC_EPILOGUE_H_

#include <cstdint>

#include "common.h"

namespace nanodet_ffi {

enum Activation : int64_t { kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kRelu6 = 3, kHardSwish = 4 };

struct Epilogue {
  const float* bias = nullptr;  // [C], or null: nothing to do
  int64_t act = kIdentity;
  float slope = 0.0f;  // LeakyReLU's negative slope
};

template <bool kTail>
inline Vec ApplyEpilogue(const Epilogue& e, Vec v, int64_t c0, int tail) {
  if (e.bias == nullptr) return v;
  v += Ld<kTail>(e.bias + c0, tail);
  const Vec zero = {}, six = zero + 6.0f;
  switch (e.act) {
    case kRelu: return v > zero ? v : zero;
    case kLeakyRelu: return v > zero ? v : v * e.slope;
    case kRelu6: {
      const Vec r = v > zero ? v : zero;
      return r < six ? r : six;
    }
    case kHardSwish: {  // x * relu6(x + 3) / 6
      Vec r = v + 3.0f;
      r = r > zero ? r : zero;
      r = r < six ? r : six;
      return v * r * (1.0f / 6.0f);
    }
    default: return v;
  }
}

inline bool ValidActivation(int64_t act) { return act >= kIdentity && act <= kHardSwish; }

}  // namespace nanodet_ffi

#endif  // NANODET_JAX_OPS_CSRC_EPILOGUE_H_
