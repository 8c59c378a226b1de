// Pieces of the Winograd F(m x m, 3 x 3) convolutions shared by the forward (winograd.cc)
// and the weight gradient (winograd_wgrad.cc): the tiling geometry and the four 1-D
// transforms of each tile size, m = 2 (4x4 input patches, 16 GEMMs) and m = 4 (6x6
// patches, 36 GEMMs: 1.78x fewer multiplies again, at ~8x F(2x2)'s float32 rounding).
//
// With alpha = m + 2 and the matrices of Lavin & Gray (2016), a tile is
//   y = A^T [ (G w G^T) (.) (B^T d B) ] A.
// m = 2: B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], A^T = [1 1 1 0; 0 1 -1 -1],
//        G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
// m = 4 (points 0, +-1, +-2):
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
//          0 4 0 -5 0 1],
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1],
//   G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1].
// G is applied to the weights in JAX (ops/conv3x3.py); here B^T (input), A^T (output),
// A (the weight gradient's output-gradient transform) and G^T (its result).
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

template <int M>
struct Tile {
  static_assert(M == 2 || M == 4, "F(2x2, 3x3) and F(4x4, 3x3) only");
  static constexpr int kAlpha = M + 2;           // input patch side
  static constexpr int kPoints = kAlpha * kAlpha;  // GEMMs per convolution

  // e = B^T d (alpha values).
  static void Input(const Vec* d, Vec* e) {
    if constexpr (M == 2) {
      e[0] = d[0] - d[2];
      e[1] = d[1] + d[2];
      e[2] = d[2] - d[1];
      e[3] = d[1] - d[3];
    } else {
      const Vec four = Vec{} + 4.0f, two = Vec{} + 2.0f, five = Vec{} + 5.0f;
      const Vec p = d[4] - four * d[2], q = d[3] - four * d[1];
      const Vec r = d[4] - d[2], s = two * (d[3] - d[1]);
      e[0] = four * d[0] - five * d[2] + d[4];
      e[1] = p + q;
      e[2] = p - q;
      e[3] = r + s;
      e[4] = r - s;
      e[5] = four * d[1] - five * d[3] + d[5];
    }
  }

  // o = A^T m (alpha values -> m).
  static void Output(const Vec* m, Vec* o) {
    if constexpr (M == 2) {
      o[0] = m[0] + m[1] + m[2];
      o[1] = m[1] - m[2] - m[3];
    } else {
      const Vec two = Vec{} + 2.0f, four = Vec{} + 4.0f, eight = Vec{} + 8.0f;
      const Vec a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
      o[0] = m[0] + a + c;
      o[1] = b + two * d;
      o[2] = a + four * c;
      o[3] = b + eight * d + m[5];
    }
  }

  // z = A g (m values -> alpha).
  static void Grad(const Vec* g, Vec* z) {
    if constexpr (M == 2) {
      z[0] = g[0];
      z[1] = g[0] + g[1];
      z[2] = g[0] - g[1];
      z[3] = -g[1];
    } else {
      const Vec two = Vec{} + 2.0f, four = Vec{} + 4.0f, eight = Vec{} + 8.0f;
      const Vec even = g[0] + g[2], odd = g[1] + g[3];
      const Vec even2 = g[0] + four * g[2], odd2 = two * g[1] + eight * g[3];
      z[0] = g[0];
      z[1] = even + odd;
      z[2] = even - odd;
      z[3] = even2 + odd2;
      z[4] = even2 - odd2;
      z[5] = g[3];
    }
  }

  // w = G^T m (alpha values -> 3).
  static void Weight(const Vec* m, Vec* w) {
    if constexpr (M == 2) {
      const Vec half = Vec{} + 0.5f;
      const Vec mid = half * (m[1] + m[2]);
      w[0] = m[0] + mid;
      w[1] = half * (m[1] - m[2]);
      w[2] = mid + m[3];
    } else {
      const Vec sixth = Vec{} + (1.0f / 6.0f), quarter = Vec{} + 0.25f;
      const Vec twelfth = Vec{} + (1.0f / 12.0f), half = Vec{} + 0.5f;
      const Vec a = m[1] + m[2], b = m[2] - m[1], c = m[3] + m[4], d = m[3] - m[4];
      w[0] = quarter * m[0] - sixth * a + (twelfth * half) * c;
      w[1] = sixth * b + twelfth * d;
      w[2] = sixth * (c - a) + m[5];
    }
  }
};

struct Geometry {
  int64_t N, H, W, C, K;
  int64_t m;          // output tile side
  int64_t th, tw, T;  // tiles per column / row, tiles in all
  int64_t Cp, Kp;     // padded channel counts
  Geometry(int64_t n, int64_t h, int64_t w, int64_t c, int64_t k, int64_t tile)
      : N(n), H(h), W(w), C(c), K(k), m(tile), th((h + tile - 1) / tile),
        tw((w + tile - 1) / tile), T(n * th * tw),
        Cp((c + kLanes - 1) / kLanes * kLanes), Kp((k + kNR - 1) / kNR * kNR) {}
};

// V[ab][tt][:] = B^T d B for the tiles t0 .. t0 + tb - 1 (zeros past the last tile), d the
// alpha x alpha input patch of the tile (rows m i - 1 .., columns m j - 1 .., zero
// outside the image).
template <int M>
inline void InputTransform(const Geometry& g, const float* x, int64_t t0, int64_t tb,
                           float* V) {
  using nanodet_ffi::Load;
  using nanodet_ffi::LoadN;
  using nanodet_ffi::Store;
  constexpr int A = Tile<M>::kAlpha;
  const Vec zero = {};
  const int64_t ab_stride = tb * g.Cp;
  for (int64_t tt = 0; tt < tb; ++tt) {
    const int64_t t = t0 + tt;
    const float* src[A][A];
    if (t < g.T) {
      const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
      for (int r = 0; r < A; ++r) {
        for (int s = 0; s < A; ++s) {
          const int64_t h = M * i - 1 + r, w = M * j - 1 + s;
          const bool inside = h >= 0 && h < g.H && w >= 0 && w < g.W;
          src[r][s] = inside ? x + ((n * g.H + h) * g.W + w) * g.C : nullptr;
        }
      }
    } else {
      for (auto& row : src) std::fill(row, row + A, nullptr);
    }
    for (int64_t c = 0; c < g.Cp; c += kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, g.C - c));
      Vec e[A][A];  // e[.][s] = B^T d[.][s], column by column
      for (int s = 0; s < A; ++s) {
        Vec d[A], col[A];
        for (int r = 0; r < A; ++r) {
          const float* p = src[r][s];
          d[r] = p == nullptr ? zero : (n == kLanes ? Load(p + c) : LoadN(p + c, n));
        }
        Tile<M>::Input(d, col);
        for (int a = 0; a < A; ++a) e[a][s] = col[a];
      }
      float* v = V + tt * g.Cp + c;
      for (int a = 0; a < A; ++a) {  // (B^T d) B, row by row
        Vec row[A];
        Tile<M>::Input(e[a], row);
        for (int b = 0; b < A; ++b) Store(v + (A * a + b) * ab_stride, row[b]);
      }
    }
  }
}

}  // namespace nanodet_winograd

#endif  // NANODET_JAX_OPS_CSRC_WINOGRAD_H_
