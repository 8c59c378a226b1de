// Dense 3x3 convolution, stride 1, padding 1, for XLA:CPU through the XLA FFI, by
// Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016).
//
// Layouts: activations NHWC fp32. The output is cut into 2x2 tiles; each tile needs a
// 4x4 input patch d (zero outside the image). With the transforms
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1],
//   G   = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
// the tile is  y = A^T [ sum_c (G g_ck G^T) (.) (B^T d_c B) ] A,  i.e. 16 independent
// GEMMs  M_ab[tile, k] = sum_c V_ab[tile, c] * U_ab[c, k]  between the transformed input
// V and the transformed weights U, with 2.25x fewer multiplies than direct convolution.
//
// The weights are transformed (and packed for the GEMM micro-kernel) by the caller in JAX,
// once per layer and step, since a layer's weights are shared by all pyramid levels: U is
// [16, Kp / NR, Cp, NR] -- per (a, b) pair, output channels in panels of NR, input channels
// padded to Cp (a multiple of the vector width), zeros in the padding. NR and the channel
// alignment are exported below so that the Python side packs for this build.
//
// The input gradient of this convolution is the same convolution of the output gradient
// with the kernel flipped and its channel axes swapped, so the caller uses this forward
// for both. The weight gradient is winograd_wgrad.cc.
//
// Work is split in blocks of kTB tiles: a block's V (16 x kTB x Cp) and M (16 x kTB x Kp)
// stay in L2 while the micro-kernel computes kMR x NR register tiles of M over all input
// channels. Measured on Zen 4 (2 cores, AVX-512), [16, 40, 40, 192] -> 192: 43 ms against
// 92 ms for XLA's convolution (docs/benchmarks.md).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "winograd.h"

namespace {

using namespace nanodet_ffi;       // NOLINT: Vec, loads/stores, ParallelFor, ffi
using namespace nanodet_winograd;  // NOLINT: kNR, kMR, Geometry, InputTransform

constexpr int kTB = 3 * kMR;  // tiles per block

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

// y tiles t0 .. from M[ab][tt][:]: A^T M A, cropped at odd image sizes.
void OutputTransform(const Geometry& g, const float* M, int64_t t0, float* y) {
  for (int64_t tt = 0; tt < kTB && t0 + tt < g.T; ++tt) {
    const int64_t t = t0 + tt;
    const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
    const bool row1 = 2 * i + 1 < g.H, col1 = 2 * j + 1 < g.W;
    float* y00 = y + ((n * g.H + 2 * i) * g.W + 2 * j) * g.K;
    for (int64_t k = 0; k < g.K; k += kLanes) {
      const int nk = static_cast<int>(std::min<int64_t>(kLanes, g.K - k));
      Vec m[4][4];
      for (int ab = 0; ab < 16; ++ab) m[ab / 4][ab % 4] = Load(M + (ab * kTB + tt) * g.Kp + k);
      Vec q[2][4];  // A^T m
      for (int b = 0; b < 4; ++b) {
        q[0][b] = m[0][b] + m[1][b] + m[2][b];
        q[1][b] = m[1][b] - m[2][b] - m[3][b];
      }
      auto put = [&](float* dst, const Vec* qp) {  // (A^T m) A, one output row
        const Vec o0 = qp[0] + qp[1] + qp[2];
        const Vec o1 = qp[1] - qp[2] - qp[3];
        if (nk == kLanes) Store(dst + k, o0); else StoreN(dst + k, o0, nk);
        if (!col1) return;
        if (nk == kLanes) Store(dst + g.K + k, o1); else StoreN(dst + g.K + k, o1, nk);
      };
      put(y00, q[0]);
      if (row1) put(y00 + g.W * g.K, q[1]);
    }
  }
}

void Forward(ffi::ThreadPool* pool, const Geometry& g, const float* x, const float* u,
             float* y) {
  const int64_t npanels = g.Kp / kNR;
  const int64_t nblocks = (g.T + kTB - 1) / kTB;
  const int workers = NumWorkers(pool);
  // A block is ~16 * kTB * C * K multiply-adds: big enough to hand to another thread.
  ParallelFor(pool, workers, nblocks, [&](int, int64_t block) {
    thread_local std::vector<float> vbuf, mbuf;
    vbuf.resize(16 * kTB * g.Cp);
    mbuf.resize(16 * kTB * g.Kp);
    float* V = vbuf.data();
    float* M = mbuf.data();
    const int64_t t0 = block * kTB;
    InputTransform(g, x, t0, kTB, V);
    for (int ab = 0; ab < 16; ++ab) {
      for (int64_t p = 0; p < npanels; ++p) {
        const float* panel = u + (ab * npanels + p) * g.Cp * kNR;
        for (int64_t r0 = 0; r0 < kTB; r0 += kMR) {
          MicroKernel(V + (ab * kTB + r0) * g.Cp, g.Cp, panel, g.Cp,
                      M + (ab * kTB + r0) * g.Kp + p * kNR, g.Kp);
        }
      }
    }
    OutputTransform(g, M, t0, y);
  });
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                       ffi::BufferR4<ffi::F32> u, ffi::ResultBufferR4<ffi::F32> y) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  const Geometry g(xd[0], xd[1], xd[2], xd[3], yd[3]);
  if (yd[0] != g.N || yd[1] != g.H || yd[2] != g.W) {
    return ffi::Error::InvalidArgument("winograd conv3x3: output must be [N, H, W, K]");
  }
  if (ud[0] != 16 || ud[1] * kNR != g.Kp || ud[2] != g.Cp || ud[3] != kNR) {
    return ffi::Error::InvalidArgument(
        "winograd conv3x3: packed weights must be [16, ceil(K / NR), Cp, NR]");
  }
  Forward(&pool, g, x.typed_data(), u.typed_data(), y->typed_data());
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
