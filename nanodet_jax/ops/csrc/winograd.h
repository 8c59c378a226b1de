// Pieces of the Winograd F(2x2, 3x3) convolution shared by the forward (winograd.cc) and
// the weight gradient (winograd_wgrad.cc): the register-tile sizes, the tiling geometry and
// the input transform V = B^T d B, which both passes need in the same layout.
#ifndef NANODET_JAX_OPS_CSRC_WINOGRAD_H_
#define NANODET_JAX_OPS_CSRC_WINOGRAD_H_

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace nanodet_winograd {

using nanodet_ffi::kLanes;
using nanodet_ffi::Vec;

using nanodet_ffi::kMR;
using nanodet_ffi::kNR;

struct Geometry {
  int64_t N, H, W, C, K;
  int64_t th, tw, T;  // tiles per column / row, tiles in all
  int64_t Cp, Kp;     // padded channel counts
  Geometry(int64_t n, int64_t h, int64_t w, int64_t c, int64_t k)
      : N(n), H(h), W(w), C(c), K(k), th((h + 1) / 2), tw((w + 1) / 2), T(n * th * tw),
        Cp((c + kLanes - 1) / kLanes * kLanes), Kp((k + kNR - 1) / kNR * kNR) {}
};

// V[ab][tt][:] = B^T d B for the tiles t0 .. t0 + tb - 1 (zeros past the last tile), with
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1] and d the 4x4 input patch of the tile
// (rows 2i-1 .. 2i+2, columns 2j-1 .. 2j+2, zero outside the image).
inline void InputTransform(const Geometry& g, const float* x, int64_t t0, int64_t tb,
                           float* V) {
  using nanodet_ffi::Load;
  using nanodet_ffi::LoadN;
  using nanodet_ffi::Store;
  const Vec zero = {};
  for (int64_t tt = 0; tt < tb; ++tt) {
    const int64_t t = t0 + tt;
    const float* src[4][4];
    if (t < g.T) {
      const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
      for (int r = 0; r < 4; ++r) {
        for (int s = 0; s < 4; ++s) {
          const int64_t h = 2 * i - 1 + r, w = 2 * j - 1 + s;
          const bool inside = h >= 0 && h < g.H && w >= 0 && w < g.W;
          src[r][s] = inside ? x + ((n * g.H + h) * g.W + w) * g.C : nullptr;
        }
      }
    } else {
      for (auto& row : src) std::fill(row, row + 4, nullptr);
    }
    for (int64_t c = 0; c < g.Cp; c += kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, g.C - c));
      Vec d[4][4];
      for (int r = 0; r < 4; ++r) {
        for (int s = 0; s < 4; ++s) {
          const float* p = src[r][s];
          d[r][s] = p == nullptr ? zero : (n == kLanes ? Load(p + c) : LoadN(p + c, n));
        }
      }
      Vec e[4][4];  // B^T d
      for (int s = 0; s < 4; ++s) {
        e[0][s] = d[0][s] - d[2][s];
        e[1][s] = d[1][s] + d[2][s];
        e[2][s] = d[2][s] - d[1][s];
        e[3][s] = d[1][s] - d[3][s];
      }
      float* v = V + tt * g.Cp + c;
      const int64_t ab_stride = tb * g.Cp;
      for (int a = 0; a < 4; ++a) {  // (B^T d) B
        Store(v + (4 * a + 0) * ab_stride, e[a][0] - e[a][2]);
        Store(v + (4 * a + 1) * ab_stride, e[a][1] + e[a][2]);
        Store(v + (4 * a + 2) * ab_stride, e[a][2] - e[a][1]);
        Store(v + (4 * a + 3) * ab_stride, e[a][1] - e[a][3]);
      }
    }
  }
}

}  // namespace nanodet_winograd

#endif  // NANODET_JAX_OPS_CSRC_WINOGRAD_H_
