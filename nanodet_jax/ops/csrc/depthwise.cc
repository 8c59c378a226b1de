// Depthwise 2-D convolution for XLA:CPU, exposed through the XLA FFI.
//
// Layouts: activations NHWC fp32, kernel [K, K, 1, C] (HWIO with I == 1), symmetric
// explicit padding P and stride S (PyTorch semantics). Three handlers:
//   forward      y[b,i,j,c]  = sum_{u,v} x[b, i*S+u-P, j*S+v-P, c] * w[u,v,c]
//   input grad   dx[b,h,q,c] = sum of g[b,i,j,c] * w[u,v,c] over h = i*S+u-P, q = j*S+v-P
//   weight grad  dw[u,v,c]   = sum_{b,i,j} x[b, i*S+u-P, j*S+v-P, c] * g[b,i,j,c]
//
// Both forward and input grad are written in "gather" form (each output pixel sums
// (tap, source pixel) pairs), so output rows are split across threads without write
// races. The weight grad splits rows across threads, each accumulating a private
// [K,K,C] buffer, reduced at the end.
//
// Inner loops vectorise over the contiguous channel dimension with GCC/Clang vector
// extensions (a zmm with AVX-512, ymm with AVX, xmm/NEON otherwise), so the source builds
// for whatever -march the loader picks; channel tails use masked loads. Along a row, JB
// output pixels are computed together and every source column loaded into a register
// feeds all (pixel, tap) pairs that use it ("register rotation"), which cuts loads per
// FMA from ~1.25 to ~0.45 for 5x5. Zero padding is virtual: a per-row table maps each
// padded column to its source pixel or to a zero vector, so border pixels take the same
// fast path as interior ones.
//
// Single-core throughput measured on Zen 4 (AVX-512): ~45 GFMA/s for 5x5 (about one
// zmm FMA per cycle, the FMA-throughput limit) for forward, input and weight gradients;
// 25-33 GFMA/s for 3x3 stride 1.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "epilogue.h"

namespace {

using namespace nanodet_ffi;  // NOLINT: Vec, loads/stores, ParallelFor, ffi

constexpr int kMaxK = 7;  // largest kernel accepted (sizes fixed-size per-row arrays)

// ---------------------------------------------------------------------------------
// Geometry.

struct RowTap {
  int32_t k;    // kernel row u
  int32_t src;  // source row
};

// Row taps of every output row, CSR style. transposed == false: forward, output row o
// reads source row o*S + u - P. transposed == true: input gradient, input row o reads
// gradient row (o + P - u) / S when that division is exact.
struct RowTaps {
  std::vector<int32_t> start;
  std::vector<RowTap> taps;
  RowTaps(int64_t out_n, int64_t src_n, int64_t K, int64_t S, int64_t P, bool transposed) {
    start.push_back(0);
    for (int64_t o = 0; o < out_n; ++o) {
      // Taps in increasing source row order (the transposed case walks u downwards):
      // measured ~1.7x faster for the input gradient than the descending order, as
      // the row not yet in cache is then the last one touched.
      for (int64_t i = 0; i < K; ++i) {
        const int64_t u = transposed ? K - 1 - i : i;
        const int64_t num = transposed ? o + P - u : o * S + u - P;
        if (transposed && (num < 0 || num % S != 0)) continue;
        const int64_t src = transposed ? num / S : num;
        if (src >= 0 && src < src_n) taps.push_back({int32_t(u), int32_t(src)});
      }
      start.push_back(static_cast<int32_t>(taps.size()));
    }
  }
  int Count(int64_t o) const { return start[o + 1] - start[o]; }
  const RowTap* Of(int64_t o) const { return taps.data() + start[o]; }
};

// Output columns that share one tap pattern: pixels a = 0..count-1 sit at output column
// q0 + a*out_step; pixel a, tap t reads table entry base + a*ss + t with kernel column
// vk[t]. Forward has one class (all columns); the input gradient has one per stride
// phase, since only kernel columns v == q + P (mod S) reach input column q.
struct ColClass {
  int nt = 0;
  int vk[kMaxK] = {};
  int64_t q0 = 0, out_step = 1, count = 0, base = 0, ss = 1;
};

// Column geometry: the classes plus the table mapping table index i to source column
// i + table_offset (a zero vector where that is outside [0, src_w)).
struct ColPlan {
  std::vector<ColClass> classes;
  int64_t table_size = 0, table_offset = 0, src_w = 0;
};

ColPlan ForwardColumns(int64_t W, int64_t Wo, int64_t K, int64_t S, int64_t P) {
  ColPlan plan;
  ColClass c;
  c.nt = static_cast<int>(K);
  for (int t = 0; t < K; ++t) c.vk[t] = t;
  c.count = Wo;
  c.ss = S;
  plan.classes.push_back(c);
  plan.table_size = (Wo - 1) * S + K;  // padded column j*S + v
  plan.table_offset = -P;
  plan.src_w = W;
  return plan;
}

ColPlan InputGradColumns(int64_t W, int64_t Wo, int64_t K, int64_t S, int64_t P) {
  ColPlan plan;
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  std::vector<int64_t> d0s;
  for (int64_t ph = 0; ph < std::min(S, W); ++ph) {
    ColClass c;
    c.q0 = ph;
    c.out_step = S;
    c.count = (W - ph + S - 1) / S;
    // Taps in increasing source column order, i.e. decreasing kernel column.
    for (int64_t v = K - 1; v >= 0; --v) {
      if (((ph + P - v) % S + S) % S == 0) c.vk[c.nt++] = static_cast<int>(v);
    }
    // Pixel a, tap t reads gradient column a + d0 + t.
    const int64_t d0 = c.nt ? (ph + P - c.vk[0]) / S : 0;
    d0s.push_back(d0);
    lo = std::min(lo, d0);
    hi = std::max(hi, d0 + c.count - 1 + std::max(c.nt - 1, 0));
    plan.classes.push_back(c);
  }
  for (size_t i = 0; i < plan.classes.size(); ++i) plan.classes[i].base = d0s[i] - lo;
  plan.table_size = hi - lo + 1;
  plan.table_offset = lo;
  plan.src_w = Wo;
  return plan;
}

// Fill `table` for one source row: entry i -> row + (i + offset)*C, or `zeros`.
void FillTable(const ColPlan& plan, const float* row, const float* zeros, int64_t C,
               const float** table) {
  for (int64_t i = 0; i < plan.table_size; ++i) {
    const int64_t src = i + plan.table_offset;
    table[i] = (src >= 0 && src < plan.src_w) ? row + src * C : zeros;
  }
}

// ---------------------------------------------------------------------------------
// Forward / input-gradient kernels.

// One row tap of a JB-pixel block: acc[m] += sum_t x(m*SS + t) * w(t). kDense: the
// block's source columns are all in range, so they are addressed arithmetically rather
// than through the table (saves one pointer load per column).
template <int NT, int SS, int JB, bool kTail, bool kDense>
inline void GatherRowTap(const float* const* tp, const float* wrow, const int* vk, int64_t C,
                         int64_t c0, int tail, Vec* acc) {
  constexpr int kCols = SS * (JB - 1) + NT;
  Vec wv[NT];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) wv[t] = Ld<kTail>(wrow + vk[t] * C + c0, tail);
  const float* p0 = tp[0] + c0;
#pragma GCC unroll 64
  for (int c = 0; c < kCols; ++c) {
    const Vec xv = LdReg<kTail>(kDense ? p0 + c * C : tp[c] + c0, tail);
#pragma GCC unroll 16
    for (int m = 0; m < JB; ++m) {
      const int t = c - SS * m;
      if (t >= 0 && t < NT) acc[m] += xv * wv[t];
    }
  }
}

// JB pixels of one class, one channel vector, all row taps.
template <int NT, int SS, int JB, bool kTail>
inline void GatherBlock(const float* const* const* tabs, const float* const* wrows,
                        const int* vk, int nr, int64_t C, int64_t c0, int tail, int64_t base,
                        const float* zeros, const Epilogue& epi, float* out,
                        int64_t out_step) {
  constexpr int kCols = SS * (JB - 1) + NT;
  Vec acc[JB] = {};
  for (int r = 0; r < nr; ++r) {
    const float* const* tp = tabs[r] + base;
    // Table entries are contiguous source columns where valid, so valid ends => dense.
    if (tp[0] != zeros && tp[kCols - 1] != zeros) {
      GatherRowTap<NT, SS, JB, kTail, true>(tp, wrows[r], vk, C, c0, tail, acc);
    } else {
      GatherRowTap<NT, SS, JB, kTail, false>(tp, wrows[r], vk, C, c0, tail, acc);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < JB; ++m) {
    St<kTail>(out + m * out_step + c0, ApplyEpilogue<kTail>(epi, acc[m], c0, tail), tail);
  }
}

// Channels innermost: a block's source strip (all channels of kCols columns per row tap)
// is consumed while in L1. With channels outermost, source rows were re-streamed from L2
// once per channel vector: measured 1.2x (116 ch, 20x20) to 1.6x (116 ch, 40x40, s2)
// slower.
template <int NT, int SS, int JB>
inline void GatherBlocks(const float* const* const* tabs, const float* const* wrows,
                         const ColClass& cl, int nr, int64_t C, const float* zeros,
                         const Epilogue& epi, float* out, int64_t& a) {
  const int64_t step = cl.out_step * C;
  for (; a + JB <= cl.count; a += JB) {
    const int64_t base = cl.base + a * SS;
    float* o = out + a * step;
    int64_t c0 = 0;
    for (; c0 + kLanes <= C; c0 += kLanes) {
      GatherBlock<NT, SS, JB, false>(tabs, wrows, cl.vk, nr, C, c0, 0, base, zeros, epi, o,
                                     step);
    }
    if (c0 < C) {
      GatherBlock<NT, SS, JB, true>(tabs, wrows, cl.vk, nr, C, c0, int(C - c0), base, zeros,
                                    epi, o, step);
    }
  }
}

// Blocks of 8 pixels (16 measured no faster for 3x3), then narrower ones for the rest.
template <int NT, int SS>
void GatherClass(const float* const* const* tabs, const float* const* wrows, const ColClass& cl,
                 int nr, int64_t C, const float* zeros, const Epilogue& epi, float* orow) {
  float* out = orow + cl.q0 * C;
  int64_t a = 0;
  GatherBlocks<NT, SS, 8>(tabs, wrows, cl, nr, C, zeros, epi, out, a);
  GatherBlocks<NT, SS, 4>(tabs, wrows, cl, nr, C, zeros, epi, out, a);
  GatherBlocks<NT, SS, 1>(tabs, wrows, cl, nr, C, zeros, epi, out, a);
}

// Tap counts / strides without a specialisation (only K in {1, 3, 5} and S <= 2 are
// instantiated, to keep the build short): one pixel at a time, taps in a runtime loop.
template <bool kTail>
void GatherPixelGeneric(const float* const* const* tabs, const float* const* wrows,
                        const ColClass& cl, int nr, int64_t C, int64_t c0, int tail, int64_t a,
                        const Epilogue& epi, float* orow) {
  Vec acc = {};
  for (int r = 0; r < nr; ++r) {
    const float* const* tp = tabs[r] + cl.base + a * cl.ss;
    for (int t = 0; t < cl.nt; ++t) {
      acc += Ld<kTail>(tp[t] + c0, tail) * Ld<kTail>(wrows[r] + cl.vk[t] * C + c0, tail);
    }
  }
  St<kTail>(orow + (cl.q0 + a * cl.out_step) * C + c0, ApplyEpilogue<kTail>(epi, acc, c0, tail),
            tail);
}

void GatherClassGeneric(const float* const* const* tabs, const float* const* wrows,
                        const ColClass& cl, int nr, int64_t C, const float*,
                        const Epilogue& epi, float* orow) {
  for (int64_t a = 0; a < cl.count; ++a) {
    int64_t c0 = 0;
    for (; c0 + kLanes <= C; c0 += kLanes) {
      GatherPixelGeneric<false>(tabs, wrows, cl, nr, C, c0, 0, a, epi, orow);
    }
    if (c0 < C) {
      GatherPixelGeneric<true>(tabs, wrows, cl, nr, C, c0, int(C - c0), a, epi, orow);
    }
  }
}

using GatherFn = void (*)(const float* const* const*, const float* const*, const ColClass&, int,
                          int64_t, const float*, const Epilogue&, float*);

GatherFn GatherDispatch(int nt, int64_t ss) {
#define NANODET_DW_CASE(N) \
  case N:                  \
    return ss == 1 ? GatherClass<N, 1> : GatherClass<N, 2>;
  if (ss <= 2) {
    switch (nt) {
      NANODET_DW_CASE(1)
      NANODET_DW_CASE(2)
      NANODET_DW_CASE(3)
      NANODET_DW_CASE(5)
      default: break;
    }
  }
#undef NANODET_DW_CASE
  return GatherClassGeneric;
}

// out[b, o, :, :] for every output row o: sum over its row taps and the column classes.
// (Hs, Ws) is the source spatial size; out is [N, Ho, Wo, C].
void Gather(ffi::ThreadPool* pool, const float* src, const float* w, float* out, int64_t N,
            int64_t Hs, int64_t Ws, int64_t Ho, int64_t Wo, int64_t C, int64_t K,
            const RowTaps& rows_of, const ColPlan& plan, const Epilogue& epi = Epilogue()) {
  std::vector<GatherFn> fns;
  for (const ColClass& cl : plan.classes) fns.push_back(GatherDispatch(cl.nt, cl.ss));
  const std::vector<float> zeros(C + kLanes, 0.0f);
  const int workers = NumWorkers(pool);
  const int64_t rows = N * Ho;
  const int64_t nchunks = NumChunks(rows, Wo * C * K * K, workers);
  ParallelFor(pool, workers, nchunks, [&](int, int64_t chunk) {
    std::vector<const float*> table_mem(kMaxK * plan.table_size);
    const float* const* tabs[kMaxK];
    const float* wrows[kMaxK];
    for (int64_t br = rows * chunk / nchunks; br < rows * (chunk + 1) / nchunks; ++br) {
      const int64_t b = br / Ho, o = br % Ho;
      const int nr = rows_of.Count(o);
      for (int r = 0; r < nr; ++r) {
        const RowTap tap = rows_of.Of(o)[r];
        const float** table = table_mem.data() + r * plan.table_size;
        FillTable(plan, src + (b * Hs + tap.src) * Ws * C, zeros.data(), C, table);
        tabs[r] = table;
        wrows[r] = w + tap.k * K * C;
      }
      float* orow = out + br * Wo * C;
      if (nr == 0) {  // e.g. input rows that no output row reads: zero gradient
        std::fill(orow, orow + Wo * C, 0.0f);
        if (epi.bias != nullptr) {  // a forward row of padding only: act(bias)
          for (int64_t j = 0; j < Wo; ++j) {
            for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
              const int n = static_cast<int>(std::min<int64_t>(kLanes, C - c0));
              StoreN(orow + j * C + c0, ApplyEpilogue<true>(epi, Vec{}, c0, n), n);
            }
          }
        }
        continue;
      }
      for (size_t k = 0; k < plan.classes.size(); ++k) {
        fns[k](tabs, wrows, plan.classes[k], nr, C, zeros.data(), epi, orow);
      }
    }
  });
}

// ---------------------------------------------------------------------------------
// Weight gradient.

// JB consecutive output pixels: acc[(m & 1)*K + v] += x(m*SS + v) * g(m), v < K, m < JB.
template <int K, int SS, int JB, bool kTail, bool kDense>
inline void WgradBlock(const float* const* tp, const float* g, int64_t C, int64_t c0, int tail,
                       Vec* acc) {
  constexpr int kCols = SS * (JB - 1) + K;
  Vec gv[JB];
#pragma GCC unroll 16
  for (int m = 0; m < JB; ++m) gv[m] = Ld<kTail>(g + m * C + c0, tail);
  const float* p0 = tp[0] + c0;
#pragma GCC unroll 64
  for (int c = 0; c < kCols; ++c) {
    const Vec xv = LdReg<kTail>(kDense ? p0 + c * C : tp[c] + c0, tail);
#pragma GCC unroll 16
    for (int m = 0; m < JB; ++m) {
      const int v = c - SS * m;
      // Two accumulator sets (even / odd pixels) halve the FMA dependency chains, which
      // otherwise make 3x3 latency-bound.
      if (v >= 0 && v < K) acc[(m & 1) * K + v] += xv * gv[m];
    }
  }
}

template <int K, int SS, int JB, bool kTail>
inline void WgradBlocks(const float* const* table, const float* grow, int64_t C, int64_t c0,
                        int tail, const float* zeros, int64_t& j, int64_t Wo, Vec* acc) {
  constexpr int kCols = SS * (JB - 1) + K;
  for (; j + JB <= Wo; j += JB) {
    const float* const* tp = table + j * SS;
    if (tp[0] != zeros && tp[kCols - 1] != zeros) {
      WgradBlock<K, SS, JB, kTail, true>(tp, grow + j * C, C, c0, tail, acc);
    } else {
      WgradBlock<K, SS, JB, kTail, false>(tp, grow + j * C, C, c0, tail, acc);
    }
  }
}

// One (gradient row, kernel row) pair, one channel vector: dw[u, :, c0..] += ...
template <int K, int SS, bool kTail>
void WgradRow(const float* const* table, const float* grow, int64_t Wo, int64_t C, int64_t c0,
              int tail, const float* zeros, float* dw_u) {
  Vec acc[2 * K] = {};
  int64_t j = 0;
  WgradBlocks<K, SS, 8, kTail>(table, grow, C, c0, tail, zeros, j, Wo, acc);
  WgradBlocks<K, SS, 4, kTail>(table, grow, C, c0, tail, zeros, j, Wo, acc);
  WgradBlocks<K, SS, 1, kTail>(table, grow, C, c0, tail, zeros, j, Wo, acc);
#pragma GCC unroll 16
  for (int v = 0; v < K; ++v) {
    float* d = dw_u + v * C + c0;
    St<kTail>(d, Ld<kTail>(d, tail) + (acc[v] + acc[K + v]), tail);
  }
}

// K or S without a specialisation: plain loop straight into memory.
template <bool kTail>
void WgradRowGeneric(const float* const* table, const float* grow, int64_t Wo, int64_t C,
                     int64_t c0, int tail, float* dw_u, int64_t K, int64_t S) {
  for (int64_t j = 0; j < Wo; ++j) {
    const Vec gv = Ld<kTail>(grow + j * C + c0, tail);
    for (int64_t v = 0; v < K; ++v) {
      float* d = dw_u + v * C + c0;
      St<kTail>(d, Ld<kTail>(d, tail) + Ld<kTail>(table[j * S + v] + c0, tail) * gv, tail);
    }
  }
}

using WgradFn = void (*)(const float* const*, const float*, int64_t, int64_t, int64_t, int,
                         const float*, float*);

template <bool kTail>
WgradFn WgradDispatch(int64_t K, int64_t S) {
#define NANODET_DW_CASE(N)                                            \
  case N:                                                             \
    return S == 1 ? WgradRow<N, 1, kTail> : WgradRow<N, 2, kTail>;
  if (S <= 2) {
    switch (K) {
      NANODET_DW_CASE(1)
      NANODET_DW_CASE(3)
      NANODET_DW_CASE(5)
      default: break;
    }
  }
#undef NANODET_DW_CASE
  return nullptr;
}

void WeightGrad(ffi::ThreadPool* pool, const float* x, const float* g, float* dw, int64_t N,
                int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t C, int64_t K, int64_t S,
                int64_t P) {
  const RowTaps rows_of(Ho, H, K, S, P, false);
  const ColPlan plan = ForwardColumns(W, Wo, K, S, P);
  const WgradFn fn = WgradDispatch<false>(K, S), tail_fn = WgradDispatch<true>(K, S);
  const std::vector<float> zeros(C + kLanes, 0.0f);
  const int64_t kkc = K * K * C;
  const int workers = NumWorkers(pool);
  const int64_t rows = N * Ho;
  const int64_t nchunks = NumChunks(rows, Wo * C * K * K, workers);
  // One accumulator per *chunk* (chunk 0 accumulates into the output), summed in chunk
  // order: which thread runs a chunk varies from call to call, the result must not.
  std::fill(dw, dw + kkc, 0.0f);
  std::vector<float> priv(static_cast<size_t>((nchunks - 1) * kkc), 0.0f);
  ParallelFor(pool, workers, nchunks, [&](int, int64_t chunk) {
    float* acc = chunk == 0 ? dw : priv.data() + (chunk - 1) * kkc;
    std::vector<const float*> table(plan.table_size);
    for (int64_t br = rows * chunk / nchunks; br < rows * (chunk + 1) / nchunks; ++br) {
      const int64_t b = br / Ho, i = br % Ho;
      const float* grow = g + br * Wo * C;
      for (int r = 0; r < rows_of.Count(i); ++r) {
        const RowTap tap = rows_of.Of(i)[r];
        FillTable(plan, x + (b * H + tap.src) * W * C, zeros.data(), C, table.data());
        float* dw_u = acc + tap.k * K * C;
        int64_t c0 = 0;
        for (; c0 + kLanes <= C; c0 += kLanes) {
          if (fn) fn(table.data(), grow, Wo, C, c0, 0, zeros.data(), dw_u);
          else WgradRowGeneric<false>(table.data(), grow, Wo, C, c0, 0, dw_u, K, S);
        }
        if (c0 < C) {
          const int tail = static_cast<int>(C - c0);
          if (tail_fn) tail_fn(table.data(), grow, Wo, C, c0, tail, zeros.data(), dw_u);
          else WgradRowGeneric<true>(table.data(), grow, Wo, C, c0, tail, dw_u, K, S);
        }
      }
    }
  });
  for (int64_t c = 1; c < nchunks; ++c) {
    const float* p = priv.data() + (c - 1) * kkc;
    for (int64_t i = 0; i < kkc; ++i) dw[i] += p[i];
  }
}

// ---------------------------------------------------------------------------------
// FFI handlers.

ffi::Error Check(int64_t H, int64_t W, int64_t Ho, int64_t Wo, ffi::Span<const int64_t> wd,
                 int64_t C, int64_t S, int64_t P) {
  const int64_t K = wd[0];
  if (wd[1] != K || wd[2] != 1 || wd[3] != C) {
    return ffi::Error::InvalidArgument("depthwise: kernel must be [K, K, 1, C]");
  }
  if (K < 1 || K > kMaxK) return ffi::Error::InvalidArgument("depthwise: K must be in [1, 7]");
  if (S < 1 || P < 0 || H + 2 * P < K || W + 2 * P < K ||
      (H + 2 * P - K) / S + 1 != Ho || (W + 2 * P - K) / S + 1 != Wo) {
    return ffi::Error::InvalidArgument("depthwise: inconsistent shapes/stride/padding");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                       ffi::BufferR4<ffi::F32> w, ffi::ResultBufferR4<ffi::F32> y, int64_t S,
                       int64_t P) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], K = w.dimensions()[0];
  if (auto e = Check(H, W, yd[1], yd[2], w.dimensions(), C, S, P); e.failure()) return e;
  Gather(&pool, x.typed_data(), w.typed_data(), y->typed_data(), N, H, W, yd[1], yd[2], C, K,
         RowTaps(yd[1], H, K, S, P, false), ForwardColumns(W, yd[2], K, S, P));
  return ffi::Error::Success();
}

// Forward with the epilogue: `wb` is [K*K + 1, 1, 1, C], the kernel's K*K rows followed by
// the bias (one operand, so that the sharding and batching wrappers of the plain forward
// apply unchanged).
ffi::Error ForwardFusedImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                            ffi::BufferR4<ffi::F32> wb, ffi::ResultBufferR4<ffi::F32> y,
                            int64_t S, int64_t P, int64_t act, float slope) {
  const auto xd = x.dimensions(), yd = y->dimensions(), wd = wb.dimensions();
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3];
  int64_t K = 1;
  while ((K + 1) * (K + 1) + 1 <= wd[0]) ++K;
  if (K * K + 1 != wd[0] || wd[1] != 1 || wd[2] != 1 || wd[3] != C) {
    return ffi::Error::InvalidArgument("depthwise fused: weights must be [K*K + 1, 1, 1, C]");
  }
  if (!ValidActivation(act)) {
    return ffi::Error::InvalidArgument("depthwise fused: unknown activation code");
  }
  const int64_t kernel_dims[4] = {K, K, 1, C};
  if (auto e = Check(H, W, yd[1], yd[2], ffi::Span<const int64_t>(kernel_dims, 4), C, S, P);
      e.failure()) {
    return e;
  }
  Epilogue epi;
  epi.bias = wb.typed_data() + K * K * C;
  epi.act = act;
  epi.slope = slope;
  Gather(&pool, x.typed_data(), wb.typed_data(), y->typed_data(), N, H, W, yd[1], yd[2], C, K,
         RowTaps(yd[1], H, K, S, P, false), ForwardColumns(W, yd[2], K, S, P), epi);
  return ffi::Error::Success();
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> g,
                         ffi::BufferR4<ffi::F32> w, ffi::ResultBufferR4<ffi::F32> dx,
                         int64_t S, int64_t P) {
  const auto gd = g.dimensions(), xd = dx->dimensions();
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3], K = w.dimensions()[0];
  if (auto e = Check(H, W, gd[1], gd[2], w.dimensions(), C, S, P); e.failure()) return e;
  Gather(&pool, g.typed_data(), w.typed_data(), dx->typed_data(), N, gd[1], gd[2], H, W, C, K,
         RowTaps(H, gd[1], K, S, P, true), InputGradColumns(W, gd[2], K, S, P));
  return ffi::Error::Success();
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                          ffi::BufferR4<ffi::F32> g, ffi::ResultBufferR4<ffi::F32> dw,
                          int64_t S, int64_t P) {
  const auto xd = x.dimensions(), gd = g.dimensions();
  const int64_t C = xd[3], K = dw->dimensions()[0];
  if (auto e = Check(xd[1], xd[2], gd[1], gd[2], dw->dimensions(), C, S, P); e.failure()) {
    return e;
  }
  WeightGrad(&pool, x.typed_data(), g.typed_data(), dw->typed_data(), xd[0], xd[1], xd[2], gd[1],
             gd[2], C, K, S, P);
  return ffi::Error::Success();
}

}  // namespace

#define NANODET_DW_BINDING                     \
  ffi::Ffi::Bind()                             \
      .Ctx<ffi::ThreadPool>()                  \
      .Arg<ffi::BufferR4<ffi::F32>>()          \
      .Arg<ffi::BufferR4<ffi::F32>>()          \
      .Ret<ffi::BufferR4<ffi::F32>>()          \
      .Attr<int64_t>("stride")                 \
      .Attr<int64_t>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetDepthwiseFwd, ForwardImpl, NANODET_DW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetDepthwiseInputGrad, InputGradImpl, NANODET_DW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetDepthwiseWeightGrad, WeightGradImpl, NANODET_DW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(NanodetDepthwiseFwdFused, ForwardFusedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("slope"));
