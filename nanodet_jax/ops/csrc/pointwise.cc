// 1x1 convolution with bias and activation for XLA:CPU inference, through the XLA FFI.
//
//   y[p, k] = act(sum_c x[p, c] * w[c, k] + bias[k]),  p over all N*H*W pixels (NHWC),
//
// with `wb` = [1, 1, C + 1, K]: the HWIO kernel's C input rows followed by the bias
// (BatchNorm folded into both); x's channels are read from `channel_offset` on (the
// half of a ShuffleNetV2 block's input its branch takes, without slicing it out first).
// XLA runs a 1x1 convolution as a dot and the bias and activation as a second pass over
// its output; here they are the epilogue of the GEMM's register tiles (epilogue.h).
//
// GEMM: register tiles of kMR pixels x kNR output channels; every input channel loads two
// weight vectors (contiguous in w's rows, so the weights need no packing) and broadcasts
// one activation per pixel. Pixels are split into chunks of whole kMB-pixel blocks,
// handed to threads. Measured on this project's 2-core Xeon (AVX-512), NanoDet-Plus-m's
// shapes at batch 1: 230-320 GFLOP/s against 90-150 for XLA's dot plus its epilogue pass
// (docs/benchmarks.md).
#include <algorithm>
#include <cstdint>

#include "common.h"
#include "epilogue.h"

namespace {

using namespace nanodet_ffi;  // NOLINT: Vec, loads/stores, ParallelFor, Epilogue, ffi

constexpr int64_t kMB = 8 * kMR;  // pixels per thread chunk

// out[MR x kNR] = epilogue(a[MR x C] * w[C x kNR]); kTail: the panel's last columns are
// past K (n0 / n1 valid lanes of its two vectors).
// a: MR rows of C inputs, row stride lda.
template <int MR, bool kTail>
inline void Tile(const float* a, int64_t lda, int64_t C, const float* w, int64_t K,
                 const Epilogue& epi, int64_t k0, int n0, int n1, float* out) {
  Vec acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = Vec{};
  for (int64_t c = 0; c < C; ++c) {
    const float* wr = w + c * K + k0;
    const Vec b0 = Ld<kTail>(wr, n0);
    const Vec b1 = Ld<kTail>(wr + kLanes, n1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float s = a[r * lda + c];
      acc0[r] += s * b0;
      acc1[r] += s * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* o = out + r * K + k0;
    St<kTail>(o, ApplyEpilogue<kTail>(epi, acc0[r], k0, n0), n0);
    if (!kTail || n1 > 0) {
      St<kTail>(o + kLanes, ApplyEpilogue<kTail>(epi, acc1[r], k0 + kLanes, n1), n1);
    }
  }
}

// One output panel (columns k0 .. k0 + kNR) of `rows` pixels: full register tiles, then
// the last rows with a narrower tile.
template <bool kTail>
void Panel(const float* a, int64_t lda, int64_t rows, int64_t C, const float* w, int64_t K,
           const Epilogue& epi, int64_t k0, int n0, int n1, float* out) {
  int64_t p = 0;
  for (; p + kMR <= rows; p += kMR) {
    Tile<kMR, kTail>(a + p * lda, lda, C, w, K, epi, k0, n0, n1, out + p * K);
  }
  if (p == rows) return;
  using TileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t,
                          const Epilogue&, int64_t, int, int, float*);
#if defined(__AVX512F__)
  static constexpr TileFn tail[] = {
      nullptr,          Tile<1, kTail>, Tile<2, kTail>, Tile<3, kTail>,
      Tile<4, kTail>,   Tile<5, kTail>, Tile<6, kTail>, Tile<7, kTail>,
      Tile<8, kTail>,   Tile<9, kTail>, Tile<10, kTail>, Tile<11, kTail>};
#else
  static constexpr TileFn tail[] = {nullptr,        Tile<1, kTail>, Tile<2, kTail>,
                                    Tile<3, kTail>, Tile<4, kTail>, Tile<5, kTail>};
#endif
  tail[rows - p](a + p * lda, lda, C, w, K, epi, k0, n0, n1, out + p * K);
}

// Panels outermost within a chunk of pixels: a panel's weights (C x kNR) stay in L1 while
// all of the chunk's tiles use them (measured 1.3-1.6x faster than sweeping every panel
// per tile once C * K outgrows L1).
// x: P pixels of lda channels, of which C are read (from x on; the caller offsets it).
void Pointwise(ffi::ThreadPool* pool, const float* x, int64_t lda, const float* wb, float* y,
               int64_t P, int64_t C, int64_t K, const Epilogue& epi) {
  const int64_t nblocks = (P + kMB - 1) / kMB;
  const int workers = NumWorkers(pool);
  const int64_t nchunks = NumChunks(nblocks, kMB * C * K, workers);
  ParallelFor(pool, workers, nchunks, [&](int, int64_t chunk) {
    const int64_t p0 = std::min(P, nblocks * chunk / nchunks * kMB);
    const int64_t p1 = std::min(P, nblocks * (chunk + 1) / nchunks * kMB);
    const float* a = x + p0 * lda;
    float* out = y + p0 * K;
    int64_t k0 = 0;
    for (; k0 + kNR <= K; k0 += kNR) {
      Panel<false>(a, lda, p1 - p0, C, wb, K, epi, k0, kLanes, kLanes, out);
    }
    if (k0 < K) {
      const int rest = static_cast<int>(K - k0);
      Panel<true>(a, lda, p1 - p0, C, wb, K, epi, k0, std::min(rest, kLanes),
                  std::max(rest - kLanes, 0), out);
    }
  });
}

ffi::Error PointwiseImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                         ffi::BufferR4<ffi::F32> wb, ffi::ResultBufferR4<ffi::F32> y,
                         int64_t act, float slope, int64_t offset) {
  const auto xd = x.dimensions(), wd = wb.dimensions(), yd = y->dimensions();
  const int64_t C = wd[2] - 1, K = wd[3];
  const bool same_pixels = yd[0] == xd[0] && yd[1] == xd[1] && yd[2] == xd[2];
  if (wd[0] != 1 || wd[1] != 1 || offset < 0 || offset + C > xd[3] || yd[3] != K ||
      !same_pixels) {
    return ffi::Error::InvalidArgument(
        "pointwise: x [N, H, W, >= channel_offset + C], weights [1, 1, C + 1, K], output "
        "[N, H, W, K] expected");
  }
  if (!ValidActivation(act)) return ffi::Error::InvalidArgument("pointwise: unknown activation");
  Epilogue epi;
  epi.bias = wb.typed_data() + C * K;
  epi.act = act;
  epi.slope = slope;
  Pointwise(&pool, x.typed_data() + offset, xd[3], wb.typed_data(), y->typed_data(),
            xd[0] * xd[1] * xd[2], C, K, epi);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetPointwiseBiasAct, PointwiseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("channel_offset"));
