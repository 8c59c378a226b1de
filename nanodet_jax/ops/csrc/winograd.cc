// Dense 3x3 convolution, stride 1, padding 1, for XLA:CPU through the XLA FFI, by
// Winograd's minimal filtering F(m x m, 3 x 3), m = 2 or 4 (Lavin & Gray, 2016; the
// matrices are in winograd.h).
//
// Layouts: activations NHWC fp32. The output is cut into m x m tiles; each tile needs an
// alpha x alpha input patch d (alpha = m + 2, zero outside the image), and is
//   y = A^T [ sum_c (G g_ck G^T) (.) (B^T d_c B) ] A,
// i.e. alpha^2 independent GEMMs  M_ab[tile, k] = sum_c V_ab[tile, c] * U_ab[c, k]  between
// the transformed input V and the transformed weights U: 2.25x (m = 2) or 4x (m = 4)
// fewer multiplies than direct convolution.
//
// The weights are transformed (and packed for the GEMM micro-kernel) by the caller in JAX,
// once per layer and step, since a layer's weights are shared by all pyramid levels: U is
// [alpha^2, Kp / NR, Cp, NR] -- per (a, b) pair, output channels in panels of NR, input
// channels padded to Cp (a multiple of the vector width), zeros in the padding. NR and the
// channel alignment are exported below so that the Python side packs for this build; the
// tile size is read from U's first dimension (16 or 36).
//
// The input gradient of this convolution is the same convolution of the output gradient
// with the kernel flipped and its channel axes swapped, so the caller uses this forward
// for both. The weight gradient is winograd_wgrad.cc.
//
// Work is split in blocks of kTB tiles: a block's V and M stay in L2 while the
// micro-kernel computes kMR x NR register tiles of M over all input channels. Measured on
// Zen 4 (2 cores, AVX-512), [16, 40, 40, 192] -> 192 with m = 2: 43 ms against 92 ms for
// XLA's convolution (docs/benchmarks.md).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "winograd.h"

namespace {

using namespace nanodet_ffi;       // NOLINT: Vec, loads/stores, ParallelFor, ffi
using namespace nanodet_winograd;  // NOLINT: kNR, kMR, Geometry, InputTransform

// Tiles per block: the block's V (alpha^2 x kTB x Cp) and M (alpha^2 x kTB x Kp) stay in
// L2. Measured at [16, 40, 40, 192] -> 192 on Zen 5, blocks of 12 - 48 tiles: within 10%
// of each other at m = 2 (36 chosen), 12 fastest at m = 4 (17.0 vs 18.0 ms at 24).
template <int M>
constexpr int kTB = M == 2 ? 3 * kMR : kMR;

// out[kMR x kNR] = a[kMR x kc] (row stride lda) * b[kc x kNR] (rows contiguous).
inline void MicroKernel(const float* a, int64_t lda, const float* b, int64_t kc, float* out,
                        int64_t ldo) {
  Vec acc0[kMR], acc1[kMR];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = Vec{};
  for (int64_t c = 0; c < kc; ++c) {
    const Vec b0 = Load(b + c * kNR), b1 = Load(b + c * kNR + kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const float s = a[r * lda + c];
      acc0[r] += s * b0;
      acc1[r] += s * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    Store(out + r * ldo, acc0[r]);
    Store(out + r * ldo + kLanes, acc1[r]);
  }
}

// y tiles t0 .. from M[ab][tt][:]: A^T M A, cropped at the image's bottom and right edges.
template <int M>
void OutputTransform(const Geometry& g, const float* Mt, int64_t t0, int64_t TB, float* y) {
  constexpr int A = Tile<M>::kAlpha;
  for (int64_t tt = 0; tt < TB && t0 + tt < g.T; ++tt) {
    const int64_t t = t0 + tt;
    const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
    const int rows = static_cast<int>(std::min<int64_t>(M, g.H - M * i));
    const int cols = static_cast<int>(std::min<int64_t>(M, g.W - M * j));
    float* y00 = y + ((n * g.H + M * i) * g.W + M * j) * g.K;
    for (int64_t k = 0; k < g.K; k += kLanes) {
      const int nk = static_cast<int>(std::min<int64_t>(kLanes, g.K - k));
      Vec q[M][A];  // q[.][b] = A^T m[.][b], column by column
      for (int b = 0; b < A; ++b) {
        Vec m[A], col[M];
        for (int a = 0; a < A; ++a) m[a] = Load(Mt + ((A * a + b) * TB + tt) * g.Kp + k);
        Tile<M>::Output(m, col);
        for (int r = 0; r < M; ++r) q[r][b] = col[r];
      }
      for (int r = 0; r < rows; ++r) {  // (A^T m) A, one output row
        Vec o[M];
        Tile<M>::Output(q[r], o);
        float* dst = y00 + r * g.W * g.K + k;
        for (int s = 0; s < cols; ++s) {
          if (nk == kLanes) Store(dst + s * g.K, o[s]); else StoreN(dst + s * g.K, o[s], nk);
        }
      }
    }
  }
}

template <int M>
void Forward(ffi::ThreadPool* pool, const Geometry& g, const float* x, const float* u,
             float* y) {
  constexpr int P = Tile<M>::kPoints;
  constexpr int64_t TB = kTB<M>;
  const int64_t npanels = g.Kp / kNR;
  const int64_t nblocks = (g.T + TB - 1) / TB;
  const int workers = NumWorkers(pool);
  // A block is ~P * TB * C * K multiply-adds: big enough to hand to another thread.
  ParallelFor(pool, workers, nblocks, [&](int, int64_t block) {
    thread_local std::vector<float> vbuf, mbuf;
    vbuf.resize(P * TB * g.Cp);
    mbuf.resize(P * TB * g.Kp);
    float* V = vbuf.data();
    float* Mt = mbuf.data();
    const int64_t t0 = block * TB;
    InputTransform<M>(g, x, t0, TB, V);
    for (int ab = 0; ab < P; ++ab) {
      for (int64_t p = 0; p < npanels; ++p) {
        const float* panel = u + (ab * npanels + p) * g.Cp * kNR;
        for (int64_t r0 = 0; r0 < TB; r0 += kMR) {
          MicroKernel(V + (ab * TB + r0) * g.Cp, g.Cp, panel, g.Cp,
                      Mt + (ab * TB + r0) * g.Kp + p * kNR, g.Kp);
        }
      }
    }
    OutputTransform<M>(g, Mt, t0, TB, y);
  });
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                       ffi::BufferR4<ffi::F32> u, ffi::ResultBufferR4<ffi::F32> y) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  // The tile size follows from the packed weights: 16 points for m = 2, 36 for m = 4.
  const int64_t tile = ud[0] == Tile<4>::kPoints ? 4 : 2;
  const Geometry g(xd[0], xd[1], xd[2], xd[3], yd[3], tile);
  if (yd[0] != g.N || yd[1] != g.H || yd[2] != g.W) {
    return ffi::Error::InvalidArgument("winograd conv3x3: output must be [N, H, W, K]");
  }
  if ((ud[0] != Tile<2>::kPoints && ud[0] != Tile<4>::kPoints) || ud[1] * kNR != g.Kp ||
      ud[2] != g.Cp || ud[3] != kNR) {
    return ffi::Error::InvalidArgument(
        "winograd conv3x3: packed weights must be [16 or 36, ceil(K / NR), Cp, NR]");
  }
  if (tile == 4) {
    Forward<4>(&pool, g, x.typed_data(), u.typed_data(), y->typed_data());
  } else {
    Forward<2>(&pool, g, x.typed_data(), u.typed_data(), y->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetWinogradConv3x3, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>());

// Packing parameters of this build, for the Python side.
extern "C" int NanodetWinogradPanelWidth() { return kNR; }
extern "C" int NanodetWinogradChannelAlign() { return kLanes; }
