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
// The interleaving variant also takes `pass` [N, H, W, >= K] and writes [N, H, W, 2K] with
// y[p, 2k] = pass[p, k] and y[p, 2k + 1] = act(...)[p, k]: ShuffleNetV2's channel shuffle
// of concat([pass, branch]) done as the tiles are stored. As a separate XLA fusion the
// shuffle was ~12% of NanoDet-Plus-m's batch-16 forward (a custom call's operands and
// results are materialised, so XLA cannot fuse it into the kernels around it).
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

// Where the tiles go: `y` rows of `ldy` floats; with `pass`, interleaved with its rows
// (stride `ldp`), output channel k landing at 2k + 1 (ldy = 2K).
struct Output {
  float* y;
  int64_t ldy;
  const float* pass = nullptr;
  int64_t ldp = 0;
};

// o[2i] = p[i], o[2i + 1] = v[i] for the first n lanes.
template <bool kTail>
inline void StoreInterleaved(float* o, Vec p, Vec v, int n) {
#if defined(__AVX512F__)
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                           15, 31);
  const Vec lo = (Vec)_mm512_permutex2var_ps((__m512)p, lo_idx, (__m512)v);
  const Vec hi = (Vec)_mm512_permutex2var_ps((__m512)p, hi_idx, (__m512)v);
  if (!kTail || n == kLanes) {
    Store(o, lo);
    Store(o + kLanes, hi);
  } else {
    St<true>(o, lo, std::min(2 * n, kLanes));
    if (2 * n > kLanes) St<true>(o + kLanes, hi, 2 * n - kLanes);
  }
#else
  float pv[kLanes], vv[kLanes], t[2 * kLanes];
  std::memcpy(pv, &p, sizeof(pv));
  std::memcpy(vv, &v, sizeof(vv));
  for (int i = 0; i < kLanes; ++i) {
    t[2 * i] = pv[i];
    t[2 * i + 1] = vv[i];
  }
  std::memcpy(o, t, (kTail ? 2 * n : 2 * kLanes) * sizeof(float));
#endif
}

// out[MR x kNR] = epilogue(a[MR x C] * w[C x kNR]); kTail: the panel's last columns are
// past K (n0 / n1 valid lanes of its two vectors).
// a: MR rows of C inputs, row stride lda; out: the output's rows from this tile's first
// pixel on (o.pass likewise).
template <int MR, bool kTail, bool kInterleave>
inline void Tile(const float* a, int64_t lda, int64_t C, const float* w, int64_t K,
                 const Epilogue& epi, int64_t k0, int n0, int n1, const Output& out) {
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
    const Vec v0 = ApplyEpilogue<kTail>(epi, acc0[r], k0, n0);
    if (kInterleave) {
      float* o = out.y + r * out.ldy + 2 * k0;
      const float* p = out.pass + r * out.ldp + k0;
      StoreInterleaved<kTail>(o, Ld<kTail>(p, n0), v0, n0);
      if (!kTail || n1 > 0) {
        const Vec v1 = ApplyEpilogue<kTail>(epi, acc1[r], k0 + kLanes, n1);
        StoreInterleaved<kTail>(o + 2 * kLanes, Ld<kTail>(p + kLanes, n1), v1, n1);
      }
    } else {
      float* o = out.y + r * out.ldy + k0;
      St<kTail>(o, v0, n0);
      if (!kTail || n1 > 0) {
        St<kTail>(o + kLanes, ApplyEpilogue<kTail>(epi, acc1[r], k0 + kLanes, n1), n1);
      }
    }
  }
}

inline Output Advance(const Output& o, int64_t rows) {
  Output r = o;
  r.y += rows * o.ldy;
  if (r.pass != nullptr) r.pass += rows * o.ldp;
  return r;
}

// One output panel (columns k0 .. k0 + kNR) of `rows` pixels: full register tiles, then
// the last rows with a narrower tile.
template <bool kTail, bool kI>
void Panel(const float* a, int64_t lda, int64_t rows, int64_t C, const float* w, int64_t K,
           const Epilogue& epi, int64_t k0, int n0, int n1, const Output& out) {
  int64_t p = 0;
  for (; p + kMR <= rows; p += kMR) {
    Tile<kMR, kTail, kI>(a + p * lda, lda, C, w, K, epi, k0, n0, n1, Advance(out, p));
  }
  if (p == rows) return;
  using TileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t,
                          const Epilogue&, int64_t, int, int, const Output&);
#if defined(__AVX512F__)
  static constexpr TileFn tail[] = {
      nullptr,              Tile<1, kTail, kI>, Tile<2, kTail, kI>,  Tile<3, kTail, kI>,
      Tile<4, kTail, kI>,   Tile<5, kTail, kI>, Tile<6, kTail, kI>,  Tile<7, kTail, kI>,
      Tile<8, kTail, kI>,   Tile<9, kTail, kI>, Tile<10, kTail, kI>, Tile<11, kTail, kI>};
#else
  static constexpr TileFn tail[] = {nullptr,            Tile<1, kTail, kI>, Tile<2, kTail, kI>,
                                    Tile<3, kTail, kI>, Tile<4, kTail, kI>, Tile<5, kTail, kI>};
#endif
  tail[rows - p](a + p * lda, lda, C, w, K, epi, k0, n0, n1, Advance(out, p));
}

// Panels outermost within a chunk of pixels: a panel's weights (C x kNR) stay in L1 while
// all of the chunk's tiles use them (measured 1.3-1.6x faster than sweeping every panel
// per tile once C * K outgrows L1).
// x: P pixels of lda channels, of which C are read (from x on; the caller offsets it).
template <bool kI>
void Pointwise(ffi::ThreadPool* pool, const float* x, int64_t lda, const float* wb,
               const Output& y, int64_t P, int64_t C, int64_t K, const Epilogue& epi) {
  const int64_t nblocks = (P + kMB - 1) / kMB;
  const int workers = NumWorkers(pool);
  const int64_t nchunks = NumChunks(nblocks, kMB * C * K, workers);
  ParallelFor(pool, workers, nchunks, [&](int, int64_t chunk) {
    const int64_t p0 = std::min(P, nblocks * chunk / nchunks * kMB);
    const int64_t p1 = std::min(P, nblocks * (chunk + 1) / nchunks * kMB);
    const float* a = x + p0 * lda;
    const Output out = Advance(y, p0);
    int64_t k0 = 0;
    for (; k0 + kNR <= K; k0 += kNR) {
      Panel<false, kI>(a, lda, p1 - p0, C, wb, K, epi, k0, kLanes, kLanes, out);
    }
    if (k0 < K) {
      const int rest = static_cast<int>(K - k0);
      Panel<true, kI>(a, lda, p1 - p0, C, wb, K, epi, k0, std::min(rest, kLanes),
                      std::max(rest - kLanes, 0), out);
    }
  });
}

// Both handlers: `pass` null for the plain store, else its buffer's dimensions in pd.
ffi::Error Run(ffi::ThreadPool& pool, const ffi::BufferR4<ffi::F32>& x,
               const ffi::BufferR4<ffi::F32>& wb, const float* pass,
               ffi::Span<const int64_t> pd, ffi::ResultBufferR4<ffi::F32>& y, int64_t act,
               float slope, int64_t offset) {
  const auto xd = x.dimensions(), wd = wb.dimensions(), yd = y->dimensions();
  const int64_t C = wd[2] - 1, K = wd[3];
  const bool interleave = pass != nullptr;
  bool ok = wd[0] == 1 && wd[1] == 1 && offset >= 0 && offset + C <= xd[3] &&
            yd[3] == (interleave ? 2 * K : K) && yd[0] == xd[0] && yd[1] == xd[1] &&
            yd[2] == xd[2];
  if (interleave) ok = ok && pd[0] == xd[0] && pd[1] == xd[1] && pd[2] == xd[2] && pd[3] >= K;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        interleave ? "pointwise (interleaved): x [N, H, W, >= channel_offset + C], weights "
                     "[1, 1, C + 1, K], passthrough [N, H, W, >= K], output [N, H, W, 2K] "
                     "expected"
                   : "pointwise: x [N, H, W, >= channel_offset + C], weights [1, 1, C + 1, "
                     "K], output [N, H, W, K] expected");
  }
  if (!ValidActivation(act)) return ffi::Error::InvalidArgument("pointwise: unknown activation");
  Epilogue epi;
  epi.bias = wb.typed_data() + C * K;
  epi.act = act;
  epi.slope = slope;
  const float* a = x.typed_data() + offset;
  const int64_t P = xd[0] * xd[1] * xd[2];
  if (interleave) {
    const Output out{y->typed_data(), 2 * K, pass, pd[3]};
    Pointwise<true>(&pool, a, xd[3], wb.typed_data(), out, P, C, K, epi);
  } else {
    Pointwise<false>(&pool, a, xd[3], wb.typed_data(), Output{y->typed_data(), K}, P, C, K, epi);
  }
  return ffi::Error::Success();
}

ffi::Error PointwiseImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                         ffi::BufferR4<ffi::F32> wb, ffi::ResultBufferR4<ffi::F32> y,
                         int64_t act, float slope, int64_t offset) {
  return Run(pool, x, wb, nullptr, x.dimensions(), y, act, slope, offset);
}

ffi::Error PointwiseInterleaveImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                                   ffi::BufferR4<ffi::F32> wb, ffi::BufferR4<ffi::F32> pass,
                                   ffi::ResultBufferR4<ffi::F32> y, int64_t act, float slope,
                                   int64_t offset) {
  return Run(pool, x, wb, pass.typed_data(), pass.dimensions(), y, act, slope, offset);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetPointwiseBiasActInterleave, PointwiseInterleaveImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("channel_offset"));
