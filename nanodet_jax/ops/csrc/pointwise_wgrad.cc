// Weight gradient of a 1x1 convolution for XLA:CPU training, through the XLA FFI:
//
//   dw[c, k] = sum_p x[p, c] * g[p, k],  p over all N*H*W pixels (NHWC, as stored).
//
// XLA computes it as a convolution with the batch as its feature dimension and first
// transposes both activations into that layout; those transposes were ~8% of a
// NanoDet-Plus training step (docs/benchmarks.md). Here the activations are read as they
// are: pixels in blocks of kPB, fixed runs of blocks per chunk; per block and output
// panel, the accumulating micro-kernel of gemm.h adds x_block^T g_block into the chunk's
// own [C x Kp] accumulator (panel-major, so a register tile is one contiguous run). At
// the end the chunks' accumulators are summed, in chunk order, into dw [1, 1, C, K].
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace {

using namespace nanodet_ffi;  // NOLINT: Vec, loads/stores, ParallelFor, AccKernel, ffi

constexpr int64_t kPB = 128;  // pixels per block: the micro-kernel's reduction length

// One block of np pixels into acc (panels of kNR channels, C rows each).
void AccumulateBlock(const float* x, const float* g, int64_t np, int64_t C, int64_t K,
                     float* acc) {
  for (int64_t k0 = 0; k0 < K; k0 += kNR) {
    float* panel = acc + (k0 / kNR) * C * kNR;
    const float* z = g + k0;
    const bool tail = k0 + kNR > K;
    const int rest = static_cast<int>(K - k0);
    const int n0 = std::min(rest, kLanes), n1 = std::max(std::min(rest - kLanes, kLanes), 0);
    int64_t c = 0;
    for (; c + kMR <= C; c += kMR) {
      if (tail) {
        AccKernel<kMR, false, true>(x + c, C, z, K, np, panel + c * kNR, n0, n1);
      } else {
        AccKernel<kMR, false, false>(x + c, C, z, K, np, panel + c * kNR);
      }
    }
    for (; c + 4 <= C; c += 4) {
      if (tail) {
        AccKernel<4, false, true>(x + c, C, z, K, np, panel + c * kNR, n0, n1);
      } else {
        AccKernel<4, false, false>(x + c, C, z, K, np, panel + c * kNR);
      }
    }
    for (; c < C; ++c) {
      if (tail) {
        AccKernel<1, false, true>(x + c, C, z, K, np, panel + c * kNR, n0, n1);
      } else {
        AccKernel<1, false, false>(x + c, C, z, K, np, panel + c * kNR);
      }
    }
  }
}

void WeightGrad(ffi::ThreadPool* pool, const float* x, const float* g, int64_t P, int64_t C,
                int64_t K, float* dw) {
  const int64_t npanels = (K + kNR - 1) / kNR;
  const int64_t acc_size = npanels * C * kNR;
  const int workers = NumWorkers(pool);
  const int64_t nblocks = (P + kPB - 1) / kPB;
  // One accumulator per *chunk*, a fixed run of blocks, summed in chunk order: which
  // thread runs a chunk varies from call to call, the result must not (training resumes
  // bit-exactly).
  const int64_t nchunks = NumChunks(nblocks, kPB * C * K, workers);
  std::vector<float> acc(nchunks * acc_size, 0.0f);
  ParallelFor(pool, workers, nchunks, [&](int, int64_t chunk) {
    float* a = acc.data() + chunk * acc_size;
    for (int64_t b = nblocks * chunk / nchunks; b < nblocks * (chunk + 1) / nchunks; ++b) {
      const int64_t p0 = b * kPB, np = std::min(kPB, P - p0);
      AccumulateBlock(x + p0 * C, g + p0 * K, np, C, K, a);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t at = ((k / kNR) * C + c) * kNR + k % kNR;
      float s = 0.0f;
      for (int64_t w = 0; w < nchunks; ++w) s += acc[w * acc_size + at];
      dw[c * K + k] = s;
    }
  }
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                          ffi::BufferR4<ffi::F32> g, ffi::ResultBufferR4<ffi::F32> dw) {
  const auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  const int64_t C = xd[3], K = gd[3];
  if (gd[0] != xd[0] || gd[1] != xd[1] || gd[2] != xd[2]) {
    return ffi::Error::InvalidArgument("pointwise weight grad: g must be [N, H, W, K]");
  }
  if (wd[0] != 1 || wd[1] != 1 || wd[2] != C || wd[3] != K) {
    return ffi::Error::InvalidArgument("pointwise weight grad: dw must be [1, 1, C, K]");
  }
  const int64_t P = xd[0] * xd[1] * xd[2];
  if (P == 0) {
    std::fill(dw->typed_data(), dw->typed_data() + C * K, 0.0f);
    return ffi::Error::Success();
  }
  WeightGrad(&pool, x.typed_data(), g.typed_data(), P, C, K, dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetPointwiseWeightGrad, WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>());
