// Helpers shared by the XLA:CPU FFI kernels (depthwise.cc, winograd.cc): the vector type
// for the build's widest SIMD registers, unaligned/masked loads and stores, and a parallel
// loop on XLA's intra-op thread pool.
#ifndef NANODET_JAX_OPS_CSRC_COMMON_H_
#define NANODET_JAX_OPS_CSRC_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace nanodet_ffi {

namespace ffi = xla::ffi;

// One vector register per Vec: zmm (AVX-512), ymm (AVX) or xmm/NEON.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// Register tile of the GEMM micro-kernels (winograd*.cc, pointwise.cc): kMR rows x kNR
// channels; 2 * kMR accumulators plus two operand vectors fit the register file
// (32 zmm / 16 ymm).
constexpr int kNR = 2 * kLanes;
#if defined(__AVX512F__)
constexpr int kMR = 12;
#else
constexpr int kMR = 6;
#endif

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));  // one unaligned vector load
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// First n < kLanes lanes only: never touch memory past the end of the channel row.
inline Vec LoadN(const float* p, int n) {
#if defined(__AVX512F__)
  return (Vec)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#else
  Vec v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
#endif
}
inline void StoreN(float* p, Vec v, int n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#else
  std::memcpy(p, &v, n * sizeof(float));
#endif
}
template <bool kTail>
inline Vec Ld(const float* p, int n) { return kTail ? LoadN(p, n) : Load(p); }

// Load into a register that the compiler must reuse. Without this GCC folds the load into
// each FMA as a memory operand, re-reading a source column once per (pixel, tap) pair
// and undoing the register rotation below.
template <bool kTail>
inline Vec LdReg(const float* p, int n) {
  Vec v = Ld<kTail>(p, n);
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}
template <bool kTail>
inline void St(float* p, Vec v, int n) {
  if (kTail) StoreN(p, v, n); else Store(p, v);
}

// ---------------------------------------------------------------------------------
// Parallel loop on XLA's intra-op thread pool.
//
// The caller works too, claiming chunks from a shared counter, so completion never
// depends on the pool running our task (no deadlock when it is busy, graceful when the
// OS is slow to wake a pool thread). A task that starts after all chunks are claimed
// returns without touching the caller's stack, only the shared_ptr-owned state.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> worker{1};
  int64_t nchunks = 0;
  std::function<void(int, int64_t)> body;  // (worker id, chunk index)

  void Run(int wid) {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      body(wid, c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Workers ParallelFor may use; worker ids passed to the body are in [0, result).
inline int NumWorkers(ffi::ThreadPool* pool) {
  if (pool == nullptr) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool->num_threads(), 64)));
}

inline void ParallelFor(ffi::ThreadPool* pool, int workers, int64_t nchunks,
                 std::function<void(int, int64_t)> body) {
  if (pool == nullptr || workers <= 1 || nchunks <= 1) {
    for (int64_t c = 0; c < nchunks; ++c) body(0, c);
    return;
  }
  auto st = std::make_shared<ParallelState>();
  st->nchunks = nchunks;
  st->body = std::move(body);
  const int tasks = static_cast<int>(std::min<int64_t>(workers - 1, nchunks - 1));
  for (int t = 0; t < tasks; ++t) {
    pool->Schedule([st]() { st->Run(st->worker.fetch_add(1)); });
  }
  st->Run(0);
  while (st->done.load(std::memory_order_acquire) < nchunks) std::this_thread::yield();
}

// Chunks for `rows` rows of `work_per_row` FMAs: tiny ops stay on the calling thread
// (a hand-off costs microseconds); otherwise a few chunks per worker for balance.
inline int64_t NumChunks(int64_t rows, int64_t work_per_row, int workers) {
  constexpr int64_t kMinChunkWork = 1 << 16;
  const int64_t by_work = std::max<int64_t>(1, rows * work_per_row / kMinChunkWork);
  return std::max<int64_t>(1, std::min({rows, by_work, int64_t{4} * workers}));
}

}  // namespace nanodet_ffi

#endif  // NANODET_JAX_OPS_CSRC_COMMON_H_
