// Weight gradient of the Winograd F(m x m, 3 x 3) convolution in winograd.cc (m = 2 or
// 4, the matrices in winograd.h), for XLA:CPU.
//
// The forward computes each m x m output tile as y = A^T [ sum_c U_ck (.) V_c ] A with
// U = G w G^T and V = B^T d B. Differentiating, with gy the tile's output gradient (zero
// past the image's bottom and right edges):
//   dW_ck = G^T M_ck G,   M_ab[c, k] = sum_tiles V_ab[tile, c] * Z_ab[tile, k],
//   Z = A gy A^T,
// i.e. the forward's input transform, an output-gradient transform and alpha^2 GEMMs that
// reduce over the tiles (2.25x / 4x fewer multiplies than the direct weight gradient).
//
// Tiles are processed in blocks of kWTB: a block's V and Z are transformed into
// thread-local buffers, then a register-tiled micro-kernel adds V_ab^T Z_ab into the
// accumulator M of its chunk (a fixed run of blocks) (alpha^2 x Cp x Kp, in panels of kNR
// output channels so that a kMR x kNR register tile is one contiguous run). A long block
// amortises loading and storing the accumulator tile over many FMAs. At the end the
// chunks' accumulators are summed in chunk order and transformed by G^T . G into dW
// [3, 3, C, K].
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "winograd.h"

namespace {

using namespace nanodet_ffi;       // NOLINT: Vec, loads/stores, ParallelFor, ffi
using namespace nanodet_winograd;  // NOLINT: kNR, kMR, Geometry, InputTransform

// Tiles per block (the GEMMs' reduction length per pass). A block's V and Z (alpha^2 x
// kWTB x (Cp + Kp) floats) should stay in L2. Measured at [16, 40, 40, 192] on Zen 5:
// m = 4: 23.4 ms at 32 tiles, 24.8-25.1 at 48-128, 29.3 at 16; m = 2: 64-96 within noise.
template <int M>
constexpr int64_t kWTB = M == 2 ? 64 : 32;

// All Cp rows: kMR-row register tiles, then 4-row and single-row ones for the remainder
// (with AVX-512, Cp a multiple of 16 and kMR = 12, the remainder is 0, 4 or 8 rows).
template <bool kFirst>
inline void AccRows(const float* v, int64_t ldv, const float* z, int64_t nt, float* acc,
                    int64_t rows) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) {
    AccKernel<kMR, kFirst, false>(v + r, ldv, z, kNR, nt, acc + r * kNR);
  }
  for (; r + 4 <= rows; r += 4) {
    AccKernel<4, kFirst, false>(v + r, ldv, z, kNR, nt, acc + r * kNR);
  }
  for (; r < rows; ++r) AccKernel<1, kFirst, false>(v + r, ldv, z, kNR, nt, acc + r * kNR);
}

// Accumulator buffers kept between calls: fresh multi-megabyte allocations cost a page
// fault per 4 KiB, which is most of the time at the small pyramid levels. Concurrent
// calls each take their own buffer.
class BufferPool {
 public:
  std::vector<float> Take(size_t size) {
    std::vector<float> buf;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        buf = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (buf.size() < size) buf.resize(size);
    return buf;
  }
  void Give(std::vector<float> buf) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(buf));
  }

 private:
  std::mutex mu_;
  std::vector<std::vector<float>> free_;
};

// Z[ab][panel][tt][:] = A gy A^T for the tiles t0 .. t0 + tb - 1 (zeros past the last tile
// and in the padding channels K .. Kp).
template <int M>
void GradTransform(const Geometry& g, const float* gy, int64_t t0, int64_t tb, float* Z) {
  constexpr int A = Tile<M>::kAlpha;
  const Vec zero = {};
  const int64_t npanels = g.Kp / kNR;
  const int64_t ab_stride = npanels * tb * kNR;
  for (int64_t tt = 0; tt < tb; ++tt) {
    const int64_t t = t0 + tt;
    const float* src[M][M] = {};
    if (t < g.T) {
      const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
      for (int r = 0; r < M; ++r) {
        for (int s = 0; s < M; ++s) {
          if (M * i + r < g.H && M * j + s < g.W) {
            src[r][s] = gy + ((n * g.H + M * i + r) * g.W + M * j + s) * g.K;
          }
        }
      }
    }
    for (int64_t k = 0; k < g.Kp; k += kLanes) {
      const int64_t left = g.K - k;
      Vec q[A][M];  // q[.][s] = A gy[.][s], column by column
      for (int s = 0; s < M; ++s) {
        Vec d[M], col[A];
        for (int r = 0; r < M; ++r) {
          const float* p = src[r][s];
          d[r] = p == nullptr || left <= 0
                     ? zero
                     : (left >= kLanes ? Load(p + k) : LoadN(p + k, static_cast<int>(left)));
        }
        Tile<M>::Grad(d, col);
        for (int a = 0; a < A; ++a) q[a][s] = col[a];
      }
      float* z = Z + ((k / kNR) * tb + tt) * kNR + k % kNR;
      for (int a = 0; a < A; ++a) {  // (A gy) A^T, row by row
        Vec row[A];
        Tile<M>::Grad(q[a], row);
        for (int b = 0; b < A; ++b) Store(z + (A * a + b) * ab_stride, row[b]);
      }
    }
  }
}

// dw[u][v][c][:] = (G^T m G)[u][v] for the accumulator rows c0 .. c1 - 1, summed over
// the chunks' accumulators.
template <int M>
void WeightTransform(const Geometry& g, const float* const* accs, int nacc, int64_t c0,
                     int64_t c1, float* dw) {
  constexpr int A = Tile<M>::kAlpha;
  const int64_t npanels = g.Kp / kNR;
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t k = 0; k < g.K; k += kLanes) {
      const int nk = static_cast<int>(std::min<int64_t>(kLanes, g.K - k));
      Vec e[3][A];  // e[.][b] = G^T m[.][b], column by column
      for (int b = 0; b < A; ++b) {
        Vec m[A], col[3];
        for (int a = 0; a < A; ++a) {
          const int64_t at = (((A * a + b) * npanels + k / kNR) * g.Cp + c) * kNR + k % kNR;
          Vec s = Load(accs[0] + at);
          for (int w = 1; w < nacc; ++w) s += Load(accs[w] + at);
          m[a] = s;
        }
        Tile<M>::Weight(m, col);
        for (int u = 0; u < 3; ++u) e[u][b] = col[u];
      }
      for (int u = 0; u < 3; ++u) {  // (G^T m) G
        Vec o[3];
        Tile<M>::Weight(e[u], o);
        for (int v = 0; v < 3; ++v) {
          float* dst = dw + ((u * 3 + v) * g.C + c) * g.K + k;
          if (nk == kLanes) Store(dst, o[v]); else StoreN(dst, o[v], nk);
        }
      }
    }
  }
}

template <int M>
void WeightGrad(ffi::ThreadPool* pool, const Geometry& g, const float* x, const float* gy,
                float* dw) {
  const int64_t npanels = g.Kp / kNR;
  const int workers = NumWorkers(pool);
  // Blocks of up to kWTB tiles, as many as a multiple of the workers when there are few
  // (small images), so that no worker waits on another's extra block.
  int64_t nblocks = (g.T + kWTB<M> - 1) / kWTB<M>;
  if (nblocks < 8 * workers) {
    nblocks = std::min(g.T, (nblocks + workers - 1) / workers * workers);
  }
  const int64_t tb = (g.T + nblocks - 1) / nblocks;
  nblocks = (g.T + tb - 1) / tb;
  // One accumulator per *chunk*, a fixed run of blocks (a chunk's first block stores, so
  // nothing needs zeroing), summed in chunk order: which thread runs a chunk varies from
  // call to call, the result must not (training resumes bit-exactly).
  const int64_t nacc = std::min<int64_t>(workers, nblocks);
  constexpr int P = Tile<M>::kPoints;
  const int64_t acc_size = P * g.Cp * g.Kp;
  static BufferPool buffers;
  std::vector<float> acc = buffers.Take(nacc * acc_size);
  ParallelFor(pool, workers, nacc, [&](int, int64_t chunk) {
    thread_local std::vector<float> vbuf, zbuf;
    vbuf.resize(P * tb * g.Cp);
    zbuf.resize(P * tb * g.Kp);
    float* V = vbuf.data();
    float* Z = zbuf.data();
    float* acc_m = acc.data() + chunk * acc_size;
    const int64_t b0 = nblocks * chunk / nacc, b1 = nblocks * (chunk + 1) / nacc;
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t t0 = block * tb;
      InputTransform<M>(g, x, t0, tb, V);
      GradTransform<M>(g, gy, t0, tb, Z);
      for (int ab = 0; ab < P; ++ab) {
        for (int64_t p = 0; p < npanels; ++p) {
          const float* v = V + ab * tb * g.Cp;
          const float* z = Z + (ab * npanels + p) * tb * kNR;
          float* m = acc_m + (ab * npanels + p) * g.Cp * kNR;
          if (block == b0) {
            AccRows<true>(v, g.Cp, z, tb, m, g.Cp);
          } else {
            AccRows<false>(v, g.Cp, z, tb, m, g.Cp);
          }
        }
      }
    }
  });
  std::vector<const float*> used;
  for (int64_t w = 0; w < nacc; ++w) used.push_back(acc.data() + w * acc_size);
  const int nused = static_cast<int>(used.size());
  // Rows of dW in parallel: each reads all accumulators (P x nused x K floats per row).
  const int64_t chunks = NumChunks(g.C, P * nused * g.K, workers);
  ParallelFor(pool, workers, chunks, [&](int, int64_t chunk) {
    const int64_t c0 = chunk * g.C / chunks, c1 = (chunk + 1) * g.C / chunks;
    WeightTransform<M>(g, used.data(), nused, c0, c1, dw);
  });
  buffers.Give(std::move(acc));
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                          ffi::BufferR4<ffi::F32> gy, ffi::ResultBufferR4<ffi::F32> dw,
                          int32_t tile) {
  const auto xd = x.dimensions(), gd = gy.dimensions(), wd = dw->dimensions();
  if (tile != 2 && tile != 4) {
    return ffi::Error::InvalidArgument("winograd conv3x3 weight grad: tile must be 2 or 4");
  }
  const Geometry g(xd[0], xd[1], xd[2], xd[3], gd[3], tile);
  if (gd[0] != g.N || gd[1] != g.H || gd[2] != g.W) {
    return ffi::Error::InvalidArgument("winograd conv3x3 weight grad: g must be [N, H, W, K]");
  }
  if (wd[0] != 3 || wd[1] != 3 || wd[2] != g.C || wd[3] != g.K) {
    return ffi::Error::InvalidArgument("winograd conv3x3 weight grad: dw must be [3, 3, C, K]");
  }
  if (g.T == 0) {  // empty batch or image: the gradient is zero
    std::fill(dw->typed_data(), dw->typed_data() + 9 * g.C * g.K, 0.0f);
    return ffi::Error::Success();
  }
  if (tile == 4) {
    WeightGrad<4>(&pool, g, x.typed_data(), gy.typed_data(), dw->typed_data());
  } else {
    WeightGrad<2>(&pool, g, x.typed_data(), gy.typed_data(), dw->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetWinogradConv3x3WeightGrad, WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Attr<int32_t>("tile"));
