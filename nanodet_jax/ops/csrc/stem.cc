// The backbones' first convolution (few input channels: the RGB image) with bias and
// activation, for XLA:CPU inference, through the XLA FFI.
//
//   y[b, i, j, k] = act(sum_{u,v,c} xpad[b, i*S + u, j*S + v, c] * w[u, v, c, k] + bias[k])
//
// `wb` is [1, 1, R*R*C + 1, K]: the HWIO kernel's R*R*C rows followed by the bias (BatchNorm
// folded into both); R is recovered from the row count and C. XLA:CPU runs a convolution
// with 3 input channels at ~13 GFLOP/s here (its dot-based algorithms want many input
// channels), which made the 3x3 stride-2 stem of NanoDet-Plus-m a third of its batch-16
// forward. Here each output pixel is a dot of its R*R*C input values with the kernel:
// register tiles of kJB pixels x kNR output channels, one broadcast input value and two
// weight vectors per tap. The R input rows of an output row are first copied with their
// zero padding into a thread-local buffer, so the inner loops have no bounds checks.
// Optionally (ShuffleNetV2's stem) the 3x3 stride-2 max pool that follows is applied to
// each group of three finished output rows before anything is stored, which saves the
// round trip of the largest activation in the network through memory.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "epilogue.h"

namespace {

using namespace nanodet_ffi;  // NOLINT: Vec, loads/stores, ParallelFor, Epilogue, ffi

constexpr int kJB = 8;  // output pixels per register tile (2 * kJB accumulators)
constexpr int kMaxR = 7;

struct StemGeometry {
  int64_t N, H, W, C, K, R, S, P, Ho, Wo, Wp;  // Wp: padded input row width
};

// kJB (or JB) output pixels from column j0, output channels k0.. of one output row.
template <int JB, bool kTail>
inline void StemTile(const StemGeometry& g, const float* const* rows, const float* w,
                     const Epilogue& epi, int64_t j0, int64_t k0, int n0, int n1, float* out) {
  Vec acc0[JB], acc1[JB];
#pragma GCC unroll 8
  for (int m = 0; m < JB; ++m) acc0[m] = acc1[m] = Vec{};
  const int64_t taps_per_row = g.R * g.C;
  for (int64_t u = 0; u < g.R; ++u) {
    const float* src = rows[u] + j0 * g.S * g.C;  // padded column j*S + v, channel c
    const float* wr = w + u * taps_per_row * g.K + k0;
    for (int64_t t = 0; t < taps_per_row; ++t) {  // t = v * C + c
      const Vec b0 = Ld<kTail>(wr + t * g.K, n0);
      const Vec b1 = Ld<kTail>(wr + t * g.K + kLanes, n1);
#pragma GCC unroll 8
      for (int m = 0; m < JB; ++m) {
        const float s = src[m * g.S * g.C + t];
        acc0[m] += s * b0;
        acc1[m] += s * b1;
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < JB; ++m) {
    float* o = out + (j0 + m) * g.K + k0;
    St<kTail>(o, ApplyEpilogue<kTail>(epi, acc0[m], k0, n0), n0);
    if (!kTail || n1 > 0) {
      St<kTail>(o + kLanes, ApplyEpilogue<kTail>(epi, acc1[m], k0 + kLanes, n1), n1);
    }
  }
}

template <bool kTail>
void StemRowPanel(const StemGeometry& g, const float* const* rows, const float* w,
                  const Epilogue& epi, int64_t k0, int n0, int n1, float* out) {
  int64_t j = 0;
  for (; j + kJB <= g.Wo; j += kJB) StemTile<kJB, kTail>(g, rows, w, epi, j, k0, n0, n1, out);
  for (; j < g.Wo; ++j) StemTile<1, kTail>(g, rows, w, epi, j, k0, n0, n1, out);
}

// Input rows of output row i of image b, zero padded, into `buf` (R rows of Wp * C).
void PadRows(const StemGeometry& g, const float* x, int64_t b, int64_t i, float* buf,
             const float** rowp) {
  for (int64_t u = 0; u < g.R; ++u) {
    float* dst = buf + u * g.Wp * g.C;
    const int64_t h = i * g.S + u - g.P;
    std::fill(dst, dst + g.Wp * g.C, 0.0f);
    if (h >= 0 && h < g.H) {
      std::memcpy(dst + g.P * g.C, x + (b * g.H + h) * g.W * g.C, g.W * g.C * sizeof(float));
    }
    rowp[u] = dst;
  }
}

// Output row i of image b into `out` (Wo * K).
void ConvRow(const StemGeometry& g, const float* x, const float* wb, const Epilogue& epi,
             int64_t b, int64_t i, float* buf, float* out) {
  const float* rowp[kMaxR];
  PadRows(g, x, b, i, buf, rowp);
  int64_t k0 = 0;
  for (; k0 + kNR <= g.K; k0 += kNR) {
    StemRowPanel<false>(g, rowp, wb, epi, k0, kLanes, kLanes, out);
  }
  if (k0 < g.K) {
    const int rest = static_cast<int>(g.K - k0);
    StemRowPanel<true>(g, rowp, wb, epi, k0, std::min(rest, kLanes), std::max(rest - kLanes, 0),
                       out);
  }
}

// 3x3 stride-2 max pool with padding 1 (padding never wins: at least one input is real)
// of conv rows `rows[0..nr)` into one pooled row of Wq pixels.
void PoolRow(const StemGeometry& g, const float* const* rows, int nr, int64_t Wq, float* out) {
  for (int64_t q = 0; q < Wq; ++q) {
    const int64_t j0 = std::max<int64_t>(2 * q - 1, 0), j1 = std::min<int64_t>(2 * q + 1, g.Wo - 1);
    for (int64_t k0 = 0; k0 < g.K; k0 += kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, g.K - k0));
      Vec m = LoadN(rows[0] + j0 * g.K + k0, n);
      for (int r = 0; r < nr; ++r) {
        for (int64_t j = j0; j <= j1; ++j) {
          const Vec v = LoadN(rows[r] + j * g.K + k0, n);
          m = v > m ? v : m;
        }
      }
      StoreN(out + q * g.K + k0, m, n);
    }
  }
}

void Stem(ffi::ThreadPool* pool, const StemGeometry& g, const float* x, const float* wb,
          int64_t act, float slope, bool max_pool, float* y) {
  Epilogue epi;
  epi.bias = wb + g.R * g.R * g.C * g.K;
  epi.act = act;
  epi.slope = slope;
  const int workers = NumWorkers(pool);
  const int64_t Hq = max_pool ? (g.Ho - 1) / 2 + 1 : g.Ho, Wq = (g.Wo - 1) / 2 + 1;
  const int64_t rows = g.N * Hq;
  const int64_t per_row = (max_pool ? 2 : 1) * g.Wo * g.K * g.R * g.R * g.C;
  const int64_t nchunks = NumChunks(rows, per_row, workers);
  ParallelFor(pool, workers, nchunks, [&](int, int64_t chunk) {
    thread_local std::vector<float> buf, ring;
    buf.resize(g.R * g.Wp * g.C);
    if (!max_pool) {
      for (int64_t br = rows * chunk / nchunks; br < rows * (chunk + 1) / nchunks; ++br) {
        ConvRow(g, x, wb, epi, br / g.Ho, br % g.Ho, buf.data(), y + br * g.Wo * g.K);
      }
      return;
    }
    // Pooled row p reads conv rows 2p - 1 .. 2p + 1; a ring of three keeps the shared one.
    ring.resize(3 * g.Wo * g.K);
    int64_t tag[3] = {-1, -1, -1};  // (image * Ho + conv row) held by each ring slot
    for (int64_t bp = rows * chunk / nchunks; bp < rows * (chunk + 1) / nchunks; ++bp) {
      const int64_t b = bp / Hq, p = bp % Hq;
      const float* in[3];
      int nr = 0;
      for (int64_t i = std::max<int64_t>(2 * p - 1, 0); i <= std::min(2 * p + 1, g.Ho - 1); ++i) {
        const int slot = static_cast<int>(i % 3);
        float* row = ring.data() + slot * g.Wo * g.K;
        if (tag[slot] != b * g.Ho + i) {
          ConvRow(g, x, wb, epi, b, i, buf.data(), row);
          tag[slot] = b * g.Ho + i;
        }
        in[nr++] = row;
      }
      PoolRow(g, in, nr, Wq, y + bp * Wq * g.K);
    }
  });
}

ffi::Error StemImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x, ffi::BufferR4<ffi::F32> wb,
                    ffi::ResultBufferR4<ffi::F32> y, int64_t stride, int64_t padding,
                    int64_t act, float slope, int64_t max_pool) {
  const auto xd = x.dimensions(), wd = wb.dimensions(), yd = y->dimensions();
  StemGeometry g{xd[0], xd[1], xd[2], xd[3], wd[3], 1, stride, padding, 0, 0, 0};
  while ((g.R + 1) * (g.R + 1) * g.C + 1 <= wd[2]) ++g.R;
  if (g.S < 1 || g.P < 0 || g.H + 2 * g.P < g.R || g.W + 2 * g.P < g.R) {
    return ffi::Error::InvalidArgument("stem conv: bad stride / padding for this input");
  }
  g.Ho = (g.H + 2 * g.P - g.R) / g.S + 1;
  g.Wo = (g.W + 2 * g.P - g.R) / g.S + 1;
  g.Wp = std::max(g.W + 2 * g.P, (g.Wo - 1) * g.S + g.R);
  // With max_pool the output is the 3x3 / 2 (padding 1) pool of the convolution's.
  const int64_t Hy = max_pool ? (g.Ho - 1) / 2 + 1 : g.Ho;
  const int64_t Wy = max_pool ? (g.Wo - 1) / 2 + 1 : g.Wo;
  const bool shapes_ok = wd[0] == 1 && wd[1] == 1 && g.R * g.R * g.C + 1 == wd[2] &&
                         g.R <= kMaxR && yd[0] == g.N && yd[3] == g.K && yd[1] == Hy &&
                         yd[2] == Wy;
  if (!shapes_ok) {
    return ffi::Error::InvalidArgument(
        "stem conv: x [N, H, W, C], weights [1, 1, R*R*C + 1, K] (R <= 7), output "
        "[N, Ho, Wo, K] (pooled: [N, (Ho-1)/2+1, (Wo-1)/2+1, K]) expected");
  }
  if (!ValidActivation(act)) return ffi::Error::InvalidArgument("stem conv: unknown activation");
  Stem(&pool, g, x.typed_data(), wb.typed_data(), act, slope, max_pool != 0, y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetStemConvBiasAct, StemImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("max_pool"));
