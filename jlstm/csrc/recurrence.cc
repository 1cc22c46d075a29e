// The LSTM and GRU time loops for XLA CPU, as XLA FFI custom calls (compiled at install, once per
// ISA level; jlstm.native loads one and wraps them in jax.custom_vjp).
//
// XLA CPU runs a while loop's body on one core, and a step of a small recurrent layer is too little
// work for its thread pool to split, so a jitted lax.scan uses one of the machine's cores. Here the
// time loop runs in C++: each thread of a team owns a contiguous block of hidden units, computes
// the gates of those units from [x_t, h_{t-1}] with small register-tiled GEMMs (the weights packed
// once per call), updates their state, and meets the others at one barrier per step (the next
// step's GEMM reads every unit of h). This is how oneDNN's fused RNN kernels use several cores on a
// sequential recurrence.
//
// Per layer direction: a forward that saves what the backward needs (gate activations, and for the
// LSTM c_t), or nothing when no gradient is taken (then also both directions of a bidirectional
// layer in one call, half the team on each, see run_forward); a backward that runs the loop
// backwards and either sums the weight gradients itself or hands every step's gate gradients to
// XLA's whole-sequence GEMMs (jlstm.native chooses by size). Packed sequences: a step whose
// `valid` byte is 0 keeps the carry and passes its gradient through, with zero gate gradients.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <utility>
#include <thread>
#include <type_traits>
#include <vector>

#include <immintrin.h>
#include <sched.h>
#include <sys/mman.h>

#include "gate_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// glibc's vector math library (libmvec) has SIMD tanh; its headers announce it only under
// -ffast-math, which would also let the compiler assume there are no NaNs. Announced here instead,
// so the float64 gate loops vectorise with IEEE semantics otherwise intact (float32's gate
// functions are gate_math.h's, inline).
extern "C" {
__attribute__((simd("notinbranch"))) double tanh(double) noexcept;
}

namespace {

// ------------------------------------------------------------------------------------------------
// Scratch memory: each thread's packed weights and step buffers come from a per-thread arena that
// is kept from one call to the next. Allocated with malloc on every call, they were handed back to
// the system when freed (glibc trims the top of a heap and unmaps large blocks), so every call
// faulted its pages in again: about 450 page faults per training step of the mnist case, a fifth of
// its time. The arena keeps its largest call's worth (at most kArenaKeep bytes) per thread.

class Arena {
 public:
  static constexpr size_t kAlign = 64;
  static constexpr size_t kArenaKeep = size_t(256) << 20;

  static Arena& mine() {
    thread_local Arena arena;
    return arena;
  }

  void* take(size_t bytes) {
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    if (used_ + bytes <= block_.size) {
      void* p = block_.data + used_;
      used_ += bytes;
      return p;
    }
    overflow_.push_back(Block::make(bytes));  // until the next outermost scope ends
    return overflow_.back().data;
  }

  // Allocations taken inside a scope are released when it ends (scopes nest, like a stack).
  class Scope {
   public:
    Scope() : arena_(mine()), mark_(arena_.used_) { ++arena_.depth_; }
    ~Scope() {
      arena_.used_ = mark_;
      if (--arena_.depth_ == 0) arena_.settle();
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Arena& arena_;
    size_t mark_;
  };

 private:
  struct Block {
    char* data = nullptr;
    size_t size = 0;
    static Block make(size_t bytes) {
      Block b{static_cast<char*>(std::aligned_alloc(kAlign, bytes)), bytes};
      if (b.data == nullptr) throw std::bad_alloc();
      return b;
    }
    void release() {
      std::free(data);
      *this = Block{};
    }
  };

  // Nothing is live: fold what overflowed into one block for the next call (within kArenaKeep).
  void settle() {
    size_t wanted = block_.size;
    for (Block& b : overflow_) {
      wanted += b.size;
      b.release();
    }
    overflow_.clear();
    if (wanted > kArenaKeep) {
      block_.release();
    } else if (wanted > block_.size) {
      block_.release();
      block_ = Block::make(wanted);
    }
  }

  ~Arena() {
    block_.release();
    for (Block& b : overflow_) b.release();
  }

  Block block_;
  std::vector<Block> overflow_;
  size_t used_ = 0;
  int depth_ = 0;
};

// A std::allocator drawing on the calling thread's arena (freeing is the scope's business).
template <typename T>
struct ArenaAllocator {
  using value_type = T;
  ArenaAllocator() = default;
  template <typename U>
  ArenaAllocator(const ArenaAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(Arena::mine().take(n * sizeof(T))); }
  void deallocate(T*, size_t) {}
  template <typename U>
  bool operator==(const ArenaAllocator<U>&) const { return true; }
};

template <typename T>
using Scratch = std::vector<T, ArenaAllocator<T>>;

// ------------------------------------------------------------------------------------------------
// GEMM with a fixed right operand: C (m x n) = A (m x k, row-major) @ B (k x n).
//
// Every step multiplies by the same weights, so B is packed once per call into panels of kNV SIMD
// vectors of columns (k x kNV W each, W = kVecBytes / sizeof(T)), and a kMR-row x kNV W register
// tile runs over k with one broadcast of A per row and kNV vector loads of B. At the sizes of a
// step (a few dozen rows) this is about twice as fast as calling OpenBLAS, whose packing of A and
// B on every call dominates. The large GEMMs before and after the loop are XLA's.

// The register tile: kMR rows x kNV vectors of accumulators. With AVX-512 (32 registers of 64
// bytes) Vec<T> is one 64-byte register and the tile 8 x 3: 24 accumulators, 11 loads per 24 FMAs
// (8 x 2 loads 10 per 16: 5-14 % fewer GFLOP/s on one core of a 2-core Intel Xeon, Sapphire
// Rapids class, on each benchmark case's step shape, 2026-12-02, tools/perf/tiles.cc).
// With AVX2 (16 registers of 32 bytes) Vec<T> is one 32-byte register and the tile 6 x 2: 12
// accumulators, the 2 vectors of B and a broadcast fit the 16. (A 64-byte vector there is two
// registers, and an 8 x 2 tile of them, 32 accumulators, spilled to the stack on every FMA: built
// with -mno-avx512f on that Xeon, the loop ran 11-23x slower than with AVX-512.)
#ifdef __AVX512F__
constexpr int kVecBytes = 64, kMR = 8, kNV = 3;
#else
constexpr int kVecBytes = 32, kMR = 6, kNV = 2;
#endif

// Calls f(i, rows) for ceil(m / kMR) register tiles over rows [0, m), as equal in height as they
// can be (the first m % tiles of them a row taller): a batch of 32 with 6-row tiles is 6, 6, 5, 5,
// 5, 5 rather than five of 6 and a 2-row tile, whose 4 accumulators leave the FMA units waiting.
// On one core of a 2-core AMD EPYC (Zen 3, AVX2 only), 2026-12-02, the 2-row tile of a batch of
// 32 took about a tenth of the medium forward's GEMM time for a sixteenth of its rows.
template <typename F>
void for_row_tiles(int64_t m, F f) {
  if (m <= 0) return;
  const int64_t tiles = (m + kMR - 1) / kMR, base = m / tiles, taller = m % tiles;
  for (int64_t t = 0, i = 0; t < tiles; ++t) {
    const int64_t rows = base + (t < taller ? 1 : 0);
    f(i, rows);
    i += rows;
  }
}

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
class PackedB {
 public:
  static constexpr int kW = sizeof(Vec<T>) / sizeof(T);
  static_assert(kW > 1, "Vec<T> must be a vector");
  static constexpr int kNR = kNV * kW;
  // Rows of B ahead that a step asks the cache for (0: none). With AVX-512 the panel (k x kNV
  // vectors) is read from L2, and with the hardware prefetcher alone the FMAs wait on it: same
  // harness and Xeon, 7-9 % more on the large steps (wide's forward and backward, medium's second
  // layer), -2 to +3 % on the small ones. With AVX2 a row of the 6 x 2 panel is one cache line and
  // the hardware prefetcher keeps up: on one core of a 2-core AMD EPYC (Zen 3, AVX2 only),
  // 2026-12-02, the same prefetch lost 2-15 % on every step shape, once per line 8 or 16 rows
  // ahead -6 to +6 %.
#ifdef __AVX512F__
  static constexpr int kAhead = 8;
#else
  static constexpr int kAhead = 0;
#endif

  // B[r, col] = at(r, col) for r < k, col < n; zero-padded to whole vectors. Rows [0, split) of B
  // multiply the first left operand, rows [split, k) the second (see multiply). Panel p holds
  // columns [p kNR, p kNR + kNR), the last one as few vectors as its columns need, row by row.
  template <typename At>
  PackedB(int64_t k, int64_t n, int64_t split, At at)
      : k_(k), n_(n), split_(split), data_(panels() * k * kNR, T(0)) {
    for (int64_t col = 0; col < n; ++col) {
      const int64_t p = col / kNR, width = vectors(p) * kW;
      for (int64_t r = 0; r < k; ++r) data_[p * k * kNR + r * width + col % kNR] = at(r, col);
    }
  }

  int64_t panels() const { return (n_ + kNR - 1) / kNR; }

  // C = [A1 A2] @ B for A1 (m x split) and A2 (m x (k - split)), each row-major with its own
  // leading dimension (a step's x_t and h_{t-1}, without copying them side by side).
  void multiply(int64_t m, const T* a1, int64_t lda1, const T* a2, int64_t lda2, T* c,
                int64_t ldc) const {
    for (int64_t p = 0; p < panels(); ++p) {
      const T* bp = data_.data() + p * k_ * kNR;
      const int64_t cols = std::min<int64_t>(kNR, n_ - p * kNR), nv = vectors(p);
      for_row_tiles(m, [&](int64_t i, int64_t rows) {
        (this->*kTiles[nv - 1][rows - 1])(a1 + i * lda1, lda1, a2 + i * lda2, lda2, bp,
                                          c + i * ldc + p * kNR, ldc, cols);
      });
    }
  }

 private:
  using Tile = void (PackedB::*)(const T*, int64_t, const T*, int64_t, const T*, T*, int64_t,
                                 int64_t) const;
  template <int NV, size_t... MR>
  static constexpr std::array<Tile, kMR> row_tiles(std::index_sequence<MR...>) {
    return {&PackedB::tile<int(MR) + 1, NV>...};
  }
  template <size_t... NV>
  static constexpr std::array<std::array<Tile, kMR>, kNV> all_tiles(std::index_sequence<NV...>) {
    return {row_tiles<int(NV) + 1>(std::make_index_sequence<kMR>())...};
  }
  static constexpr std::array<std::array<Tile, kMR>, kNV> kTiles =
      all_tiles(std::make_index_sequence<kNV>());

  // Vectors in panel p: kNV but in the last panel, which has only what its columns need.
  int64_t vectors(int64_t p) const {
    return std::min<int64_t>(kNV, (n_ - p * kNR + kW - 1) / kW);
  }

  // acc[r % KS][i] += A[i, r] * bp[r] for A's rows i < MR: the register tile's inner loop. A
  // vector FMA waits on the one before it into the same accumulator (4 cycles on current x86
  // cores, which start two a cycle), so a tile of few rows (a batch of 1-3: a matrix-vector
  // product per step) also splits k over KS partial sums to keep eight or more FMAs in flight.
  template <int MR, int NV, int KS>
  static void accumulate(Vec<T> (&acc)[KS][MR][NV], const T* a, int64_t lda, const T* bp,
                         int64_t rows) {
    int64_t r = 0;
    for (; r + KS <= rows; r += KS)
#pragma GCC unroll 8
      for (int s = 0; s < KS; ++s) step<MR, NV>(acc[s], a + r + s, lda, bp + (r + s) * NV * kW);
    for (; r < rows; ++r) step<MR, NV>(acc[0], a + r, lda, bp + r * NV * kW);
  }

  template <int MR, int NV>
  static void step(Vec<T> (&acc)[MR][NV], const T* a, int64_t lda, const T* b) {
    Vec<T> bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (kAhead > 0) __builtin_prefetch(b + (kAhead * NV + j) * kW);
      std::memcpy(&bv[j], b + j * kW, sizeof(bv[j]));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i * lda];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * bv[j];
    }
  }

  template <int MR, int NV>
  void tile(const T* a1, int64_t lda1, const T* a2, int64_t lda2, const T* bp, T* c, int64_t ldc,
            int64_t cols) const {
    // By rows only: a column's sum must not depend on the width of its panel (bit-identical results
    // whatever the split of the units over threads).
    constexpr int KS = MR >= 4 ? 1 : MR == 1 ? 4 : 2;
    Vec<T> acc[KS][MR][NV] = {};
    accumulate<MR, NV, KS>(acc, a1, lda1, bp, split_);
    accumulate<MR, NV, KS>(acc, a2, lda2, bp + split_ * NV * kW, k_ - split_);
#pragma GCC unroll 8
    for (int s = 1; s < KS; ++s)
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[0][i][j] += acc[s][i][j];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      if (cols == NV * kW) {
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j)
          std::memcpy(c + i * ldc + j * kW, &acc[0][i][j], sizeof(acc[0][i][j]));
      } else {
        T row[NV * kW];
        std::memcpy(row, acc[0][i], sizeof(row));
        std::copy(row, row + cols, c + i * ldc);
      }
    }
  }

  int64_t k_, n_, split_;
  Scratch<T> data_;
};

// C (m x n) += A^T B for A (k x m) with row stride lda, B (k x n) row-major with n a whole number
// of kNR-wide panels (PackedB's kNV vectors): the weight-gradient update of one step, sum over the
// batch rows b of dgates[b, rows] (x) [x_t, h_{t-1}][b, :], accumulated in registers tile by tile.
template <typename T>
class OuterAccumulate {
 public:
  static constexpr int kW = PackedB<T>::kW;
  static constexpr int kNR = kNV * kW;

  // n rounded up to whole panels: the width B and C are padded to.
  static constexpr int64_t padded(int64_t n) { return (n + kNR - 1) / kNR * kNR; }
  // A row stride for the loops' step buffers that run() reads (A and B): padded(n) and, where
  // that is an even number of cache lines, one line more. A tile reads k rows of A and of B's
  // panel, and at an even stride they fall into few sets of the L1 cache, more lines than those
  // sets hold (4 KiB: all in one set of 64, 8 lines; 3 KiB: 4 sets), so every panel of columns
  // read them from L2 again. Odd: the medium case's train step (a 2-core AMD EPYC, Zen 3) took
  // 0.94 of the time, gru 0.95, long 0.97 (`python -m tools.perf.profile_case`, 2026-12-03).
  static constexpr int64_t stride(int64_t n) {
    constexpr int64_t line = 64 / sizeof(T);
    return padded(n) / line % 2 ? padded(n) : padded(n) + line;
  }

  static void run(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                  int64_t ldb, T* c, int64_t ldc) {
    static constexpr auto tiles = row_tiles(std::make_index_sequence<kMR>());
    for (int64_t p = 0; p < n; p += kNR)
      for_row_tiles(m, [&](int64_t i, int64_t rows) {
        tiles[rows - 1](k, a + i, lda, b + p, ldb, c + i * ldc + p, ldc);
      });
  }

 private:
  using Tile = void (*)(int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t);
  template <size_t... MR>
  static constexpr std::array<Tile, kMR> row_tiles(std::index_sequence<MR...>) {
    return {&tile<int(MR) + 1>...};
  }

  template <int MR>
  static void tile(int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                   int64_t ldc) {
    Vec<T> acc[MR][kNV];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < kNV; ++j) std::memcpy(&acc[i][j], c + i * ldc + j * kW, sizeof(acc[i][j]));
    for (int64_t r = 0; r < k; ++r) {
      Vec<T> bv[kNV];
#pragma GCC unroll 4
      for (int j = 0; j < kNV; ++j) std::memcpy(&bv[j], b + r * ldb + j * kW, sizeof(bv[j]));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const T ai = a[r * lda + i];
#pragma GCC unroll 4
        for (int j = 0; j < kNV; ++j) acc[i][j] += ai * bv[j];
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < kNV; ++j) std::memcpy(c + i * ldc + j * kW, &acc[i][j], sizeof(acc[i][j]));
  }
};

// ------------------------------------------------------------------------------------------------
// Threads: a team formed from XLA's own intra-op thread pool (the caller is member 0), and a
// spinning barrier.
//
// The helpers are tasks on XLA's pool rather than threads of our own: right after the previous
// op those threads are awake looking for work, and a thread of ours would compete with them for
// the cores (measured: the mnist forward took 0.94 ms with a private thread against 0.62 ms
// alone in a C++ harness). A helper that has not started when the caller stops waiting (the pool
// is busy elsewhere) is left out and returns at once, so a step never waits on a task that cannot
// run: the team is whoever joined.

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

int max_threads() {
  static const int n = [] {
    const char* env = std::getenv("JLSTM_NATIVE_THREADS");
    int cores = available_cores();
    return env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : cores;
  }();
  return n;
}

inline void spin_pause(int& spins) {
  if (++spins < 4096) {
    _mm_pause();
  } else {
    std::this_thread::yield();  // oversubscribed: let others run
  }
}

// All `n` members of a team call wait(n) once per step; none returns before all have arrived.
class Barrier {
 public:
  void wait(int n) {
    if (n == 1) return;
    const int phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      return;
    }
    int spins = 0;
    while (phase_.load(std::memory_order_acquire) == phase) spin_pause(spins);
  }

 private:
  std::atomic<int> arrived_{0};
  std::atomic<int> phase_{0};
};

struct Team {
  static constexpr int kClosed = 1 << 24;  // added to `joined` when the team is closed
  const std::function<void(int, int)>* job = nullptr;
  std::atomic<int> joined{0};    // helpers that arrived (member k = arrival k + 1)
  std::atomic<int> size{0};      // the team's size, published once it is closed
  std::atomic<int> finished{0};  // helpers done with the job
};

// Runs job(k, size) for k < size on a team of at most n threads: the caller and the helpers from
// XLA's pool that start before the caller stops waiting for them. It waits longer the more work
// there is to share (`flops`: up to an eighth of the job's time on one core at ~80 GFLOP/s),
// between 20 us and 50 ms, since a sleeping pool thread takes tens of microseconds to wake, and
// one whose core is taken (another process, or the threads of a library that spin after their
// own work: torch's OpenMP team in a benchmark) waits for the scheduler, milliseconds. A call
// that starts alone runs alone to its end: with a 2 ms limit, 2-3 of 9 calls of the wide forward
// (0.6 s on two cores) took 1.2 s, one core, right after torch's (`python -m experiments.bench
// --cases wide --modes fwd --impls torch,jlstm,flax`, 2-core Zen 3 EPYC, 2026-12-02).
// Returns the team's size.
//
// Beside a spinning neighbour: torch's OpenMP team burns 3.7-7.5 ms of CPU after each of its calls
// (its default wait policy), and a member that shares a core with it stalls the team at every
// barrier until the scheduler runs it again (a helper lost 3.4 ms of a 1.1 ms mnist backward).
// Calls that remembered their stalls (a member's thread CPU clock behind the wall clock) and ran
// alone for a while after one, if their clean time was below the stall, were measured and not
// kept (make bench's "jlstm after torch / alone", cases mnist, small, small-gru and long, with and
// without, alternating; 2-core Xeon, Sapphire Rapids class, 2026-12-07). A while of 20 ms doubling
// to 0.2 s took mnist fwd after torch to 0.82-1.24 of its time alone in 3 of 4 runs (3.15 in the
// fourth; without: 2.10-4.53), but the while outlived the neighbour and jlstm alone got slower:
// mnist fwd 0.51-0.60 ms against 0.38-0.47. 10 ms doubling to 50 ms, or ending the while when
// /proc/loadavg showed a free core, gained nothing (2.29-3.46 against 1.17-3.51). The process' CPU
// clock cannot tell that the neighbour left: Linux adds a thread's time on another core at its
// next tick, and over a 0.4 ms call it read 0 to 1.9 times the call's wall time for the same one.
int run_team(ffi::ThreadPool& pool, int n, double flops,
             const std::function<void(int, int)>& job) {
  const int helpers = static_cast<int>(std::min<int64_t>(n - 1, pool.num_threads()));
  if (helpers <= 0) {
    job(0, 1);
    return 1;
  }
  auto team = std::make_shared<Team>();  // outlives this call for helpers that come late
  team->job = &job;
  for (int i = 0; i < helpers; ++i)
    pool.Schedule([team] {
      const int arrival = team->joined.fetch_add(1, std::memory_order_acq_rel);
      if (arrival >= Team::kClosed) return;  // too late: the team went without us
      int size, spins = 0;
      while ((size = team->size.load(std::memory_order_acquire)) == 0) spin_pause(spins);
      {
        Arena::Scope scratch;
        (*team->job)(arrival + 1, size);
      }
      team->finished.fetch_add(1, std::memory_order_acq_rel);
    });
  const double wait_us = std::clamp(flops / 80e3 / 8, 20.0, 50000.0);  // ~80 GFLOP/s per core
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration<double, std::micro>(wait_us);
  while (team->joined.load(std::memory_order_acquire) < helpers &&
         std::chrono::steady_clock::now() < deadline)
    _mm_pause();
  const int joined = team->joined.fetch_add(Team::kClosed, std::memory_order_acq_rel);
  team->size.store(joined + 1, std::memory_order_release);
  job(0, joined + 1);
  int spins = 0;
  while (team->finished.load(std::memory_order_acquire) < joined) spin_pause(spins);
  return joined + 1;
}

// How many threads for `hidden` units: each gets a block of at least 16 units (one AVX-512 vector
// of floats), and no more threads than cores.
int threads_for(int64_t hidden) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads(), hidden / 16)));
}

// Thread k's units [first, last) out of `hidden`, in blocks that are multiples of 16 but the last.
void unit_range(int64_t hidden, int k, int n, int64_t& first, int64_t& last) {
  const int64_t blocks = (hidden + 15) / 16;
  first = std::min(hidden, blocks * k / n * 16);
  last = std::min(hidden, blocks * (k + 1) / n * 16);
}

// How many steps the in-loop backward adds into the weight gradients at once for a batch of n: at
// least 64 rows of gate gradients per pass over a thread's rows (a pass loads and stores every
// entry: a batch of 1 added one step at a time did one multiply-add per entry per pass; grouped,
// the batch-1 `small` case's train step takes 0.54-0.72 of the time), at most 16 steps.
// JLSTM_ACCUMULATION_ROWS overrides the 64 (1: a step at a time), to measure the choice again
// (`python -m tools.perf.profile_case small train 50` under each setting).
int64_t accumulation_group(int64_t n) {
  static const int64_t rows = [] {
    const char* env = std::getenv("JLSTM_ACCUMULATION_ROWS");
    return env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : 64;
  }();
  return std::clamp<int64_t>(rows / std::max<int64_t>(n, 1), 1, 16);
}

// ------------------------------------------------------------------------------------------------
// Result buffers: XLA allocates them afresh on every run, so with 4 KiB pages the loop's first write
// to each page of a large result (the saved gates of a training forward, tens of MB) is a page
// fault, and the kernel zeroes one page at a time. Asking for transparent huge pages over the
// buffer before anything is written cuts the faults 512-fold where the system allows them on
// request (transparent_hugepage "madvise", the default of most distributions; "always" needs no
// request, "never" ignores it). Measured on a medium train step: about 60,000 page faults a step
// without, about 7,000 with. Only whole aligned 2 MiB runs inside the buffer are marked; the hint
// changes nothing about the values.
void prefer_huge_pages(const void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (data != nullptr && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// ------------------------------------------------------------------------------------------------
// LSTM

// The gate functions: float32's from gate_math.h (vectorised inline, about twice as fast as
// libmvec's tanhf, see there), double's from libm (libmvec).
template <typename T>
inline T sigmoid(T x) {
  return T(0.5) * std::tanh(T(0.5) * x) + T(0.5);
}
template <>
inline float sigmoid(float x) {
  return jlstm::sigmoid_f(x);
}
template <typename T>
inline T gate_tanh(T x) {
  return std::tanh(x);
}
template <>
inline float gate_tanh(float x) {
  return jlstm::tanh_f(x);
}

struct Sizes {
  int64_t length, batch, input, hidden;
  bool reverse, masked;
  // The time index of the s-th step processed.
  int64_t time(int64_t s) const { return reverse ? length - 1 - s : s; }
};

// The in-loop backward's step buffers, taken in turn (LSTM and GRU): step s's gate gradients and
// [x_t, h_{t-1}] go to slot s % slots, at least two so that a thread's next step never overwrites
// what another is still reading. The weight gradients are updated once per group of steps, at the
// group's last step processed (s % group == 0): steps s, s + 1, ... sit in slots 0, 1, ... in a
// row, so their rows are one matrix of rows(s) rows.
struct StepGroups {
  int64_t group, slots, batch, length;
  explicit StepGroups(const Sizes& z)
      : group(accumulation_group(z.batch)), slots(std::max<int64_t>(2, group)), batch(z.batch),
        length(z.length) {}
  int64_t slot(int64_t s) const { return s % slots; }
  // The rows of gate gradients to add into the weight gradients at step s: 0 but at a group's end.
  int64_t rows(int64_t s) const { return s % group ? 0 : (std::min(s + group, length) - s) * batch; }
};

// Pointers into XLA's buffers, null where a call has no such buffer. Shapes: x (L, N, I); w_ih
// (4H, I), dw_ih (4H, I); w_hh, dw_hh (4H, H); bias, db (4H); h0, c0, c_n, dh_n, dc_n, dh0, dc0
// (N, H); hs, cs, dys (L, N, H); dx (L, N, I) or null (not needed); acts (L, N, 4H); valid (L,
// N) bytes when masked.
template <typename T>
struct Buffers {
  const T *x, *w_ih, *w_hh, *bias, *h0, *c0;
  const uint8_t* valid;
  T *hs, *c_n, *cs, *acts;                          // forward results
  const T *dys, *dh_n, *dc_n;                       // backward inputs (with acts, cs, hs)
  T *dx, *dw_ih, *dw_hh, *db, *dgates, *dh0, *dc0;  // backward results (dgates or the rest)
};

// The forward loop. Each step multiplies [x_t, h_{t-1}] by this thread's columns of
// [W_ih W_hh]^T, so no (L, N, 4H) input projection is ever written to memory. Without `acts`
// (inference) nothing is saved for the backward: c lives in a per-thread buffer and only c_n is
// written; with it, every step's c and gate activations are saved (the backward recomputes
// tanh(c) from c rather than keep it as one more (L, N, H) buffer: less memory and traffic).
template <typename T>
void lstm_forward_hint_pages(const Sizes& z, const Buffers<T>& io) {
  const size_t seq_bytes = z.length * z.batch * z.hidden * sizeof(T);  // hs, cs; acts is 4x
  prefer_huge_pages(io.hs, seq_bytes);
  if (io.acts != nullptr) {
    prefer_huge_pages(io.cs, seq_bytes);
    prefer_huge_pages(io.acts, 4 * seq_bytes);
  }
}

// Member k of a team of `threads` that runs the loop (and meets at `barrier` once per step).
template <typename T>
void lstm_forward_member(const Sizes& z, const Buffers<T>& io, int k, int threads,
                         Barrier& barrier) {
  Arena::Scope scratch;  // this member's packed weights and buffers
  const int64_t N = z.batch, I = z.input, H = z.hidden, G = 4 * H;
  const bool save = io.acts != nullptr;
  int64_t u0, u1;
  unit_range(H, k, threads, u0, u1);
  const int64_t nu = u1 - u0;
  // This thread's columns of [W_ih W_hh]^T, gate-major: column g*nu + j is gate row g*H + u0 + j.
  const PackedB<T> wk(I + H, 4 * nu, I, [&](int64_t r, int64_t col) {
    const int64_t gate_row = col / nu * H + u0 + col % nu;
    return r < I ? io.w_ih[gate_row * I + r] : io.w_hh[gate_row * H + r - I];
  });
  Scratch<T> pre(N * 4 * nu), bias(4 * nu), c_own;
  for (int64_t g = 0; g < 4; ++g)
    std::copy(io.bias + g * H + u0, io.bias + g * H + u1, bias.begin() + g * nu);
  if (!save) {  // c of this thread's units, updated in place
    c_own.resize(N * nu);
    for (int64_t b = 0; b < N; ++b)
      std::copy(io.c0 + b * H + u0, io.c0 + b * H + u1, &c_own[b * nu]);
  }
  const T* bs = bias.data();
  for (int64_t s = 0; s < z.length; ++s) {
    const int64_t t = z.time(s);
    const T* h_prev = s == 0 ? io.h0 : io.hs + z.time(s - 1) * N * H;
    const T* c_prev = s == 0 ? io.c0 : io.cs + z.time(s - 1) * N * H;
    if (nu > 0) wk.multiply(N, io.x + t * N * I, I, h_prev, H, pre.data(), 4 * nu);
    for (int64_t b = 0; b < N; ++b) {
      const int64_t row = t * N + b;
      const T* p = pre.data() + b * 4 * nu;
      const T* hp = h_prev + b * H + u0;
      T* h = io.hs + row * H + u0;
      // Saved: in the (L, N, ...) buffers; inference: c in place, the gates not kept.
      T* c = save ? io.cs + row * H + u0 : &c_own[b * nu];
      const T* cp = save ? c_prev + b * H + u0 : c;
      T* a = save ? io.acts + row * G + u0 : nullptr;
      const bool keep = z.masked && !io.valid[row];
      if (keep && !save) {  // the carry stays, nothing to compute
        std::copy(hp, hp + nu, h);
        continue;
      }
      // Two loops, with and without the gates' stores: inference stored them into a scratch
      // buffer of N x 4H per thread that nothing read (without: small fwd 0.95 of the time,
      // wide 0.98, medium and mnist unchanged; Zen 3 EPYC, tools.perf.profile_case).
      auto cell = [&](auto saving) {
#pragma omp simd
        for (int64_t j = 0; j < nu; ++j) {
          const T i = sigmoid(p[j] + bs[j]);
          const T f = sigmoid(p[nu + j] + bs[nu + j]);
          const T g = gate_tanh(p[2 * nu + j] + bs[2 * nu + j]);
          const T o = sigmoid(p[3 * nu + j] + bs[3 * nu + j]);
          const T c_new = f * cp[j] + i * g;
          if constexpr (decltype(saving)::value) {
            a[j] = i;
            a[H + j] = f;
            a[2 * H + j] = g;
            a[3 * H + j] = o;
          }
          c[j] = c_new;
          h[j] = o * gate_tanh(c_new);
        }
      };
      save ? cell(std::true_type{}) : cell(std::false_type{});
      if (keep) {
        std::copy(cp, cp + nu, c);
        std::copy(hp, hp + nu, h);
      }
    }
    barrier.wait(threads);
  }
  const int64_t last = z.time(z.length - 1);
  for (int64_t b = 0; b < N; ++b) {
    const T* c = save ? io.cs + (last * N + b) * H + u0 : &c_own[b * nu];
    std::copy(c, c + nu, io.c_n + b * H + u0);
  }
}

// The backward loop. Thread k owns the dh, dc of its units. A step: the gate gradients of its
// units (elementwise); after the barrier, when every unit's gate gradients are in, dh_{t-1} of its
// units (dgates_t @ W_hh[:, own]). Then one of two ways to the rest:
// - weights in the loop (io.dw_ih given): thread k also owns the rows of its units' gates in the
//   weight gradients and adds each step into them (dgates[:, own]^T [x_t, h_{t-1}]), and forms
//   its block of dx_t's columns (dgates_t @ W_ih[:, block]; not if io.dx is null, an input that
//   nothing differentiates); no (L, N, 4H) buffer of gate gradients is written, a few step buffers
//   take turns. Pays while a thread's rows of the weight gradients stay in its core's cache
//   (jlstm.native chooses). A small batch adds a group of steps at once (accumulation_group):
//   each pass over the rows then does more multiply-adds per entry.
// - gate gradients out (io.dgates given): every step's gate gradients go to io.dgates, and XLA
//   forms dW, db and dx as whole-sequence GEMMs on every core (large layers). io.dgates may be
//   io.acts itself (jlstm.native aliases them): each thread writes a step's gate gradients of its
//   units where it has just read their gates, and nothing reads those gates again.
template <typename T>
void lstm_backward(ffi::ThreadPool& pool, const Sizes& z, const Buffers<T>& io) {
  Arena::Scope scratch;  // this call's scratch on the calling thread
  const int64_t N = z.batch, I = z.input, H = z.hidden, G = 4 * H, K = I + H;
  const int64_t KP = OuterAccumulate<T>::padded(K), KV = OuterAccumulate<T>::stride(K);
  const int n = threads_for(H);
  const bool in_loop = io.dw_ih != nullptr;
  const StepGroups steps(z);
  // The row stride of the gate gradients: G in io.dgates; in the loop's own step buffers an odd
  // number of cache lines (OuterAccumulate::stride), since the weight-gradient tiles read k of
  // their rows, and at 4 KiB (a hidden size of 256) all k lines fall into one set of the L1 cache.
  const int64_t ldg = in_loop ? OuterAccumulate<T>::stride(G) : G;
  Scratch<T> step_dgates(in_loop ? steps.slots * N * ldg : 0);
  prefer_huge_pages(in_loop ? io.dx : io.dgates, z.length * N * (in_loop ? I : G) * sizeof(T));
  Barrier barrier;
  run_team(pool, n, 8.0 * z.length * N * G * (K + H), [&](int k, int threads) {
    int64_t u0, u1, x0, x1;
    unit_range(H, k, threads, u0, u1);
    unit_range(I, k, threads, x0, x1);  // this thread's block of dx's columns
    const int64_t nu = u1 - u0, nx = in_loop && io.dx ? x1 - x0 : 0;  // no dx: no columns
    const PackedB<T> w_hh_own(G, nu, G, [&](int64_t r, int64_t j) { return io.w_hh[r * H + u0 + j]; });
    const PackedB<T> w_ih_own(G, nx, G, [&](int64_t r, int64_t j) { return io.w_ih[r * I + x0 + j]; });
    // dh, dc of this thread's units; the GEMM's dh_{t-1}; [x_t, h_{t-1}] zero-padded to KP columns;
    // this thread's rows of [dW_ih dW_hh] (gate-major, KP columns) and of db.
    Scratch<T> dh(N * nu), dc(N * nu), dh_prev(N * nu), v(in_loop ? steps.slots * N * KV : 0, T(0));
    Scratch<T> dw(in_loop ? 4 * nu * KP : 0, T(0)), db(4 * nu, T(0));
    for (int64_t b = 0; b < N; ++b) {
      std::copy(io.dh_n + b * H + u0, io.dh_n + b * H + u1, &dh[b * nu]);
      std::copy(io.dc_n + b * H + u0, io.dc_n + b * H + u1, &dc[b * nu]);
    }
    for (int64_t s = z.length - 1; s >= 0; --s) {
      const int64_t t = z.time(s);
      const T* c_prev = s == 0 ? io.c0 : io.cs + z.time(s - 1) * N * H;
      const T* h_prev = s == 0 ? io.h0 : io.hs + z.time(s - 1) * N * H;
      const int64_t slot = steps.slot(s);
      T* dgates = in_loop ? step_dgates.data() + slot * N * ldg : io.dgates + t * N * G;
      for (int64_t b = 0; b < N; ++b) {
        const int64_t row = t * N + b;
        T* dg = dgates + b * ldg + u0;
        if (z.masked && !io.valid[row]) {  // carry passed through, no gate gradients
          for (int64_t q = 0; q < 4; ++q) std::fill(dg + q * H, dg + q * H + nu, T(0));
          continue;
        }
        const T* a = io.acts + row * G + u0;
        const T* c = io.cs + row * H + u0;
        const T* dy = io.dys + row * H + u0;
        const T* cp = c_prev + b * H + u0;
        T* dhb = dh.data() + b * nu;
        T* dcb = dc.data() + b * nu;
        T* dbs = db.data();
#pragma omp simd
        for (int64_t j = 0; j < nu; ++j) {
          const T i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
          const T dh_total = dhb[j] + dy[j];
          const T tc = gate_tanh(c[j]);  // as the forward computed it
          const T dc_total = dcb[j] + dh_total * o * (T(1) - tc * tc);
          const T di = dc_total * g * i * (T(1) - i);
          const T df = dc_total * cp[j] * f * (T(1) - f);
          const T dgg = dc_total * i * (T(1) - g * g);
          const T d_o = dh_total * tc * o * (T(1) - o);
          dg[j] = di;
          dg[H + j] = df;
          dg[2 * H + j] = dgg;
          dg[3 * H + j] = d_o;
          // Summed whether or not the loop keeps the bias gradient (in_loop): a branch here keeps
          // GCC from vectorizing the loop without AVX-512's masked stores, and the tanh then runs
          // one float at a time through libm (expm1f and tanhf: 14 % of a perf profile of the mnist
          // train step on a Zen 3 EPYC, 2026-12-02).
          dbs[j] += di;
          dbs[nu + j] += df;
          dbs[2 * nu + j] += dgg;
          dbs[3 * nu + j] += d_o;
          dcb[j] = dc_total * f;
        }
      }
      if (in_loop && nu > 0) {  // dW[own gate rows] += dgates[:, own]^T [x_t, h_{t-1}], by groups
        T* vs = &v[slot * N * KV];
        for (int64_t b = 0; b < N; ++b) {
          std::copy(io.x + (t * N + b) * I, io.x + (t * N + b + 1) * I, &vs[b * KV]);
          std::copy(h_prev + b * H, h_prev + (b + 1) * H, &vs[b * KV + I]);
        }
        if (const int64_t rows = steps.rows(s)) {  // from slot 0 (= `slot`) on
          for (int64_t g = 0; g < 4; ++g)
            OuterAccumulate<T>::run(nu, KP, rows, dgates + g * H + u0, ldg, vs, KV, &dw[g * nu * KP], KP);
        }
      }
      barrier.wait(threads);  // every unit's gate gradients of step t are written
      if (nu > 0) w_hh_own.multiply(N, dgates, ldg, dgates + G, ldg, dh_prev.data(), nu);
      if (in_loop && nx > 0) w_ih_own.multiply(N, dgates, ldg, dgates + G, ldg, io.dx + t * N * I + x0, I);
      for (int64_t b = 0; b < N; ++b)
        if (!z.masked || io.valid[t * N + b])
          std::copy(&dh_prev[b * nu], &dh_prev[(b + 1) * nu], &dh[b * nu]);
    }
    for (int64_t b = 0; b < N; ++b) {
      std::copy(&dh[b * nu], &dh[(b + 1) * nu], io.dh0 + b * H + u0);
      std::copy(&dc[b * nu], &dc[(b + 1) * nu], io.dc0 + b * H + u0);
    }
    for (int64_t g = 0; in_loop && g < 4; ++g)
      for (int64_t j = 0; j < nu; ++j) {
        const T* row = &dw[(g * nu + j) * KP];
        std::copy(row, row + I, io.dw_ih + (g * H + u0 + j) * I);
        std::copy(row + I, row + K, io.dw_hh + (g * H + u0 + j) * H);
        io.db[g * H + u0 + j] = db[g * nu + j];
      }
  });
}

// ------------------------------------------------------------------------------------------------
// GRU: r, z, n gates in torch's order; b (3H) is b_ih + [b_hr, b_hz, 0] and b_hn (H) stays apart,
// inside r * (W_hn h + b_hn). The threads split the units as for the LSTM; the x and h parts of a
// step are two GEMMs, since the n gate needs W_hn h on its own. Saved per step: r, z, n and
// hn = W_hn h + b_hn ("acts", (L, N, 4H) as [r | z | n | hn]).

template <typename T>
struct GruBuffers {
  const T *x, *w_ih, *w_hh, *bias, *b_hn, *h0;
  const uint8_t* valid;
  T *hs, *acts;                                   // forward results (acts: training only)
  const T *dys, *dh_n;                            // backward inputs (with acts, hs)
  T *dx, *dw_ih, *dw_hh, *db, *db_hn, *dh0;       // backward results, weights in the loop
  T *dxw, *dhw;                                   // backward results, gate gradients out
};

template <typename T>
void gru_forward_hint_pages(const Sizes& z, const GruBuffers<T>& io) {
  prefer_huge_pages(io.hs, z.length * z.batch * z.hidden * sizeof(T));
  if (io.acts != nullptr) prefer_huge_pages(io.acts, z.length * z.batch * 4 * z.hidden * sizeof(T));
}

// Member k of a team of `threads` that runs the loop (and meets at `barrier` once per step).
template <typename T>
void gru_forward_member(const Sizes& z, const GruBuffers<T>& io, int k, int threads,
                        Barrier& barrier) {
  Arena::Scope scratch;  // this member's packed weights and buffers
  const int64_t N = z.batch, I = z.input, H = z.hidden;
  const bool save = io.acts != nullptr;
  int64_t u0, u1;
  unit_range(H, k, threads, u0, u1);
  const int64_t nu = u1 - u0;
  auto gate_row = [&](int64_t col) { return col / nu * H + u0 + col % nu; };
  const PackedB<T> wx(I, 3 * nu, I, [&](int64_t r, int64_t c) { return io.w_ih[gate_row(c) * I + r]; });
  const PackedB<T> wh(H, 3 * nu, H, [&](int64_t r, int64_t c) { return io.w_hh[gate_row(c) * H + r]; });
  Scratch<T> px(N * 3 * nu), ph(N * 3 * nu), bias(3 * nu), a_own(save ? 0 : 4 * H);
  for (int64_t g = 0; g < 3; ++g)
    std::copy(io.bias + g * H + u0, io.bias + g * H + u1, bias.begin() + g * nu);
  const T* bs = bias.data();
  const T* bn = io.b_hn + u0;
  for (int64_t s = 0; s < z.length; ++s) {
    const int64_t t = z.time(s);
    const T* h_prev = s == 0 ? io.h0 : io.hs + z.time(s - 1) * N * H;
    if (nu > 0) {
      wx.multiply(N, io.x + t * N * I, I, io.x + t * N * I, I, px.data(), 3 * nu);
      wh.multiply(N, h_prev, H, h_prev, H, ph.data(), 3 * nu);
    }
    for (int64_t b = 0; b < N; ++b) {
      const int64_t row = t * N + b;
      const T* qx = px.data() + b * 3 * nu;
      const T* qh = ph.data() + b * 3 * nu;
      const T* hp = h_prev + b * H + u0;
      T* h = io.hs + row * H + u0;
      if (z.masked && !io.valid[row]) {  // the carry stays
        std::copy(hp, hp + nu, h);
        continue;
      }
      T* a = save ? io.acts + row * 4 * H + u0 : a_own.data();
#pragma omp simd
      for (int64_t j = 0; j < nu; ++j) {
        const T r = sigmoid(qx[j] + qh[j] + bs[j]);
        const T u = sigmoid(qx[nu + j] + qh[nu + j] + bs[nu + j]);
        const T hn = qh[2 * nu + j] + bn[j];
        const T n = gate_tanh(qx[2 * nu + j] + bs[2 * nu + j] + r * hn);
        a[j] = r;
        a[H + j] = u;
        a[2 * H + j] = n;
        a[3 * H + j] = hn;
        h[j] = n + u * (hp[j] - n);
      }
    }
    barrier.wait(threads);
  }
}

// ------------------------------------------------------------------------------------------------
// The forward loops on a team: one direction, or both directions of a bidirectional layer at
// inference side by side. For two, the team splits in two: the first half runs the forward
// direction and the second the reverse one, each half with its own barrier (with two cores, a
// thread per direction and no barrier at all); a team of one (no helper came) runs them one after
// the other. Run one after the other by a team of two, a medium layer's directions (32 x 128 x 128
// -> 256) wait at 128 barriers each and every step's GEMM is split in two; side by side, two
// processes of one thread each took 0.94 of the time of one direction after the other on two cores
// (0.97 with 512 inputs), 2-core Zen 3 EPYC; one call for both directions took 0.93-0.98 of the
// time of a call per direction on medium fwd and 0.96-0.99 on gru fwd (alternating calls there).
//
// z[d], io[d]: direction d's sizes and buffers (d = 1 reverse); `gates` per unit (LSTM 4, GRU 3),
// for the flop count that bounds how long the caller waits for helpers; hint(z, io) asks for huge
// pages over the results, member(z, io, k, threads, barrier) runs member k of a team of `threads`.
template <typename Io, typename Hint, typename Member>
void run_forward(ffi::ThreadPool& pool, int directions, const Sizes* z, const Io* io, int gates,
                 Hint hint, Member member) {
  const double flops =
      2.0 * gates * directions * z[0].length * z[0].batch * (z[0].input + z[0].hidden) * z[0].hidden;
  for (int d = 0; d < directions; ++d) hint(z[d], io[d]);
  Barrier barriers[2];
  const int n = std::min(max_threads(), directions * threads_for(z[0].hidden));
  run_team(pool, n, flops, [&](int k, int threads) {
    if (directions == 1) {
      member(z[0], io[0], k, threads, barriers[0]);
    } else if (threads == 1) {
      member(z[0], io[0], 0, 1, barriers[0]);
      member(z[1], io[1], 0, 1, barriers[1]);
    } else if (const int half = threads / 2; k < half) {
      member(z[0], io[0], k, half, barriers[0]);
    } else {
      member(z[1], io[1], k - half, threads - half, barriers[1]);
    }
  });
}

template <typename T>
void lstm_forward(ffi::ThreadPool& pool, int directions, const Sizes* z, const Buffers<T>* io) {
  run_forward(pool, directions, z, io, 4, lstm_forward_hint_pages<T>, lstm_forward_member<T>);
}

template <typename T>
void gru_forward(ffi::ThreadPool& pool, int directions, const Sizes* z, const GruBuffers<T>* io) {
  run_forward(pool, directions, z, io, 3, gru_forward_hint_pages<T>, gru_forward_member<T>);
}

// As lstm_backward: weights in the loop (io.dw_ih given) or every step's gate gradients out,
// dxw = [dr, dz, dn] (the x side and the folded bias) and dhw = [dr, dz, dn * r] (the h side).
template <typename T>
void gru_backward(ffi::ThreadPool& pool, const Sizes& z, const GruBuffers<T>& io) {
  Arena::Scope scratch;  // this call's scratch on the calling thread
  const int64_t N = z.batch, I = z.input, H = z.hidden, G = 3 * H;
  const int64_t IP = OuterAccumulate<T>::padded(I), HP = OuterAccumulate<T>::padded(H);
  const int64_t IV = OuterAccumulate<T>::stride(I), HV = OuterAccumulate<T>::stride(H);
  const bool in_loop = io.dw_ih != nullptr;
  const StepGroups steps(z);  // step s's dxw in slot steps.slot(s) of the first half, dhw the second
  const int64_t ldg = in_loop ? OuterAccumulate<T>::stride(G) : G;  // as in the LSTM's backward
  Scratch<T> step(in_loop ? 2 * steps.slots * N * ldg : 0);
  if (in_loop) {
    prefer_huge_pages(io.dx, z.length * N * I * sizeof(T));
  } else {
    for (const T* out : {io.dxw, io.dhw}) prefer_huge_pages(out, z.length * N * G * sizeof(T));
  }
  Barrier barrier;
  run_team(pool, threads_for(H), 6.0 * z.length * N * G * (I + 2 * H), [&](int k, int threads) {
    int64_t u0, u1, x0, x1;
    unit_range(H, k, threads, u0, u1);
    unit_range(I, k, threads, x0, x1);
    const int64_t nu = u1 - u0, nx = in_loop && io.dx ? x1 - x0 : 0;  // no dx: no columns
    const PackedB<T> w_hh_own(G, nu, G, [&](int64_t r, int64_t j) { return io.w_hh[r * H + u0 + j]; });
    const PackedB<T> w_ih_own(G, nx, G, [&](int64_t r, int64_t j) { return io.w_ih[r * I + x0 + j]; });
    // dh of this thread's units, the GEMM's part of dh_{t-1} and the direct part (dh_total * z);
    // x_t and h_{t-1} zero-padded to whole panels; this thread's rows of dW_ih, dW_hh, db, db_hn.
    Scratch<T> dh(N * nu), dh_prev(N * nu), direct(N * nu);
    Scratch<T> vx(in_loop ? steps.slots * N * IV : 0, T(0));
    Scratch<T> vh(in_loop ? steps.slots * N * HV : 0, T(0));
    Scratch<T> dwx(in_loop ? 3 * nu * IP : 0, T(0)), dwh(in_loop ? 3 * nu * HP : 0, T(0));
    Scratch<T> db(3 * nu, T(0)), db_hn(nu, T(0));
    for (int64_t b = 0; b < N; ++b) std::copy(io.dh_n + b * H + u0, io.dh_n + b * H + u1, &dh[b * nu]);
    for (int64_t s = z.length - 1; s >= 0; --s) {
      const int64_t t = z.time(s);
      const T* h_prev = s == 0 ? io.h0 : io.hs + z.time(s - 1) * N * H;
      const int64_t slot = steps.slot(s);
      T* dxw = in_loop ? step.data() + slot * N * ldg : io.dxw + t * N * G;
      T* dhw = in_loop ? dxw + steps.slots * N * ldg : io.dhw + t * N * G;
      for (int64_t b = 0; b < N; ++b) {
        const int64_t row = t * N + b;
        T* gx = dxw + b * ldg + u0;
        T* gh = dhw + b * ldg + u0;
        T* dd = direct.data() + b * nu;
        if (z.masked && !io.valid[row]) {  // carry passed through, no gate gradients
          for (int64_t q = 0; q < 3; ++q) {
            std::fill(gx + q * H, gx + q * H + nu, T(0));
            std::fill(gh + q * H, gh + q * H + nu, T(0));
          }
          std::copy(&dh[b * nu], &dh[(b + 1) * nu], dd);
          continue;
        }
        const T* a = io.acts + row * 4 * H + u0;
        const T* dy = io.dys + row * H + u0;
        const T* hp = h_prev + b * H + u0;
        const T* dhb = dh.data() + b * nu;
        T* dbs = db.data();
        T* dbn = db_hn.data();
#pragma omp simd
        for (int64_t j = 0; j < nu; ++j) {
          const T r = a[j], u = a[H + j], n = a[2 * H + j], hn = a[3 * H + j];
          const T dh_total = dhb[j] + dy[j];
          const T dn = dh_total * (T(1) - u) * (T(1) - n * n);
          const T du = dh_total * (hp[j] - n) * u * (T(1) - u);
          const T dr = dn * hn * r * (T(1) - r);
          gx[j] = dr;
          gx[H + j] = du;
          gx[2 * H + j] = dn;
          gh[j] = dr;
          gh[H + j] = du;
          gh[2 * H + j] = dn * r;
          dd[j] = dh_total * u;  // dh_{t-1} through h' = n + z (h - n); the GEMM adds the gates'
          // Summed whether or not in_loop keeps them, as in the LSTM's backward: no branch here.
          dbs[j] += dr;
          dbs[nu + j] += du;
          dbs[2 * nu + j] += dn;
          dbn[j] += dn * r;
        }
      }
      if (in_loop && nu > 0) {  // own gate rows: dW_ih += dxw^T x_t, dW_hh += dhw^T h_{t-1}
        T* xs = &vx[slot * N * IV];
        T* hps = &vh[slot * N * HV];
        for (int64_t b = 0; b < N; ++b) {
          std::copy(io.x + (t * N + b) * I, io.x + (t * N + b + 1) * I, &xs[b * IV]);
          std::copy(h_prev + b * H, h_prev + (b + 1) * H, &hps[b * HV]);
        }
        if (const int64_t rows = steps.rows(s)) {  // a group of steps at once, as the LSTM's
          for (int64_t g = 0; g < 3; ++g) {
            OuterAccumulate<T>::run(nu, IP, rows, dxw + g * H + u0, ldg, xs, IV, &dwx[g * nu * IP], IP);
            OuterAccumulate<T>::run(nu, HP, rows, dhw + g * H + u0, ldg, hps, HV, &dwh[g * nu * HP], HP);
          }
        }
      }
      barrier.wait(threads);  // every unit's gate gradients of step t are written
      if (nu > 0) w_hh_own.multiply(N, dhw, ldg, dhw, ldg, dh_prev.data(), nu);
      if (in_loop && nx > 0) w_ih_own.multiply(N, dxw, ldg, dxw, ldg, io.dx + t * N * I + x0, I);
      for (int64_t b = 0; b < N; ++b) {
        const bool valid = !z.masked || io.valid[t * N + b];
        for (int64_t j = 0; j < nu; ++j)
          dh[b * nu + j] = direct[b * nu + j] + (valid ? dh_prev[b * nu + j] : T(0));
      }
    }
    for (int64_t b = 0; b < N; ++b) std::copy(&dh[b * nu], &dh[(b + 1) * nu], io.dh0 + b * H + u0);
    for (int64_t g = 0; in_loop && g < 3; ++g)
      for (int64_t j = 0; j < nu; ++j) {
        const int64_t out_row = g * H + u0 + j;
        std::copy(&dwx[(g * nu + j) * IP], &dwx[(g * nu + j) * IP] + I, io.dw_ih + out_row * I);
        std::copy(&dwh[(g * nu + j) * HP], &dwh[(g * nu + j) * HP] + H, io.dw_hh + out_row * H);
        io.db[out_row] = db[g * nu + j];
      }
    for (int64_t j = 0; in_loop && j < nu; ++j) io.db_hn[u0 + j] = db_hn[j];
  });
}

// ------------------------------------------------------------------------------------------------
// The backward's whole-sequence GEMMs through a BLAS, for a backward that hands its gate gradients
// out (too large to sum the weight gradients in the loop):
//
//   dW_ih = sum_t a_t^T x_t,  dW_hh = sum_t b_t^T h_{t-1},  dx_t = a_t @ W_ih,
//
// a_t and b_t the step's gate gradients through W_ih and W_hh (the same for the LSTM; for the GRU
// they differ by the reset gate). jlstm.native hands in OpenBLAS's cblas_sgemm and cblas_dgemm (the
// scipy-openblas32 wheel, set to one thread) through JlstmUseBlas; each member of the team calls
// the BLAS on its shares of the output rows, so no BLAS thread pool runs beside XLA's (OpenBLAS's
// own workers spin for about a tenth of a second after each call). h_{t-1} is read in place: the
// steps after the first processed pair with hs shifted by one step, the first with h0. On a 2-core
// AMD EPYC (Zen 3) the wide case's three GEMMs ran at 142-174 GFLOP/s this way against 122-149 as
// XLA's dots (tools/perf/sequence_gemms.py).

// cblas_?gemm with 32-bit integers: order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta,
// c, ldc.
template <typename T>
using BlasGemm = void (*)(int, int, int, int, int, int, T, const T*, int, const T*, int, T, T*,
                          int);
std::atomic<BlasGemm<float>> blas_sgemm{nullptr};
std::atomic<BlasGemm<double>> blas_dgemm{nullptr};

template <typename T>
BlasGemm<T> blas_gemm() {
  if constexpr (std::is_same_v<T, float>)
    return blas_sgemm.load(std::memory_order_acquire);
  else
    return blas_dgemm.load(std::memory_order_acquire);
}

// C (m x n) = op(A) @ B, plus C if `accumulate`; op(A) = A^T (A is k x m) if `transpose_a`.
template <typename T>
void blas_multiply(bool transpose_a, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  blas_gemm<T>()(kRowMajor, transpose_a ? kTrans : kNoTrans, kNoTrans, int(m), int(n), int(k),
                 T(1), a, int(lda), b, int(ldb), accumulate ? T(1) : T(0), c, int(ldc));
}

template <typename T>
struct SequenceGrads {
  const T *d_in, *d_h, *x, *hs, *h0, *w_ih;
  T *dw_ih, *dw_hh, *dx;  // dx: null when nothing needs it
};

template <typename T>
void sequence_grads(ffi::ThreadPool& pool, int64_t L, int64_t N, int64_t I, int64_t H, int64_t G,
                    bool reverse, const SequenceGrads<T>& io) {
  const int64_t rows = L * N, later = rows - N;  // steps after the first processed, as rows
  const double flops = 2.0 * rows * G * (I + H) + (io.dx ? 2.0 * rows * G * I : 0.0);
  // The first step processed (whose h_{t-1} is h0) and the rows of dh and hs the others pair.
  const T* dh_first = io.d_h + (reverse ? later * G : 0);
  const T* dh_later = io.d_h + (reverse ? 0 : N * G);
  const T* hs_prev = io.hs + (reverse ? N * H : 0);
  // The outputs' rows in as many shares as the team may have members, whoever joins taking them in
  // turn: a BLAS's sums can depend on how many rows a call has, and a share's rows must not depend
  // on how many helpers joined, so that a call gives the same bits every time. (Unlike the loops'
  // own kernels, the last bits of these GEMMs may change with the number of threads,
  // JLSTM_NATIVE_THREADS or the cores.)
  const int shares = max_threads();
  run_team(pool, shares, flops, [&](int k, int n) {
    for (int s = k; s < shares; s += n) {
      const int64_t g0 = G * s / shares, g1 = G * (s + 1) / shares;  // rows of dW_ih, dW_hh
      blas_multiply(true, g1 - g0, I, rows, io.d_in + g0, G, io.x, I, io.dw_ih + g0 * I, I,
                    false);
      blas_multiply(true, g1 - g0, H, N, dh_first + g0, G, io.h0, H, io.dw_hh + g0 * H, H, false);
      if (later > 0)
        blas_multiply(true, g1 - g0, H, later, dh_later + g0, G, hs_prev, H, io.dw_hh + g0 * H,
                      H, true);
      if (io.dx != nullptr) {
        const int64_t r0 = rows * s / shares, r1 = rows * (s + 1) / shares;
        blas_multiply(false, r1 - r0, I, G, io.d_in + r0 * G, G, io.w_ih, I, io.dx + r0 * I, I,
                      false);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// FFI handlers: decode, dispatch on the dtype, run.

template <typename T>
const T* in(const ffi::AnyBuffer& b) {
  return b.typed_data<T>();
}

template <typename T>
T* out(ffi::Result<ffi::AnyBuffer>& b) {
  return b->typed_data<T>();
}

// A result that may be left out: jlstm.native gives it no elements when nothing needs it (a GRU
// forward's acts at inference, the in-loop backward's dx where the input is not differentiated);
// null then.
template <typename T>
T* optional_out(ffi::Result<ffi::AnyBuffer>& b) {
  return b->element_count() > 0 ? out<T>(b) : nullptr;
}

// Runs run.template operator()<T>() for T the float type of `dtype`.
template <typename Run>
ffi::Error by_dtype(ffi::DataType dtype, Run run) {
  switch (dtype) {
    case ffi::F32:
      run.template operator()<float>();
      return ffi::Error::Success();
    case ffi::F64:
      run.template operator()<double>();
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("jlstm native LSTM: float32 or float64 only");
  }
}

Sizes sizes_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& h0, int64_t reverse,
               int64_t masked) {
  const auto d = x.dimensions();
  return Sizes{d[0], d[1], d[2], h0.dimensions()[1], reverse != 0, masked != 0};
}

ffi::Error LstmForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih, ffi::AnyBuffer w_hh,
                           ffi::AnyBuffer bias, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                           ffi::Buffer<ffi::U8> valid, int64_t reverse, int64_t masked,
                           ffi::Result<ffi::AnyBuffer> hs, ffi::Result<ffi::AnyBuffer> c_n,
                           ffi::Result<ffi::AnyBuffer> cs, ffi::Result<ffi::AnyBuffer> acts) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    const Sizes z = sizes_of(x, h0, reverse, masked);
    const Buffers<T> io{in<T>(x), in<T>(w_ih), in<T>(w_hh), in<T>(bias), in<T>(h0), in<T>(c0),
                        valid.typed_data(), out<T>(hs), out<T>(c_n), out<T>(cs), out<T>(acts)};
    lstm_forward<T>(pool, 1, &z, &io);
  });
}

ffi::Error LstmInferenceImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih, ffi::AnyBuffer w_hh,
                             ffi::AnyBuffer bias, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                             ffi::Buffer<ffi::U8> valid, int64_t reverse, int64_t masked,
                             ffi::Result<ffi::AnyBuffer> hs, ffi::Result<ffi::AnyBuffer> c_n) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    const Sizes z = sizes_of(x, h0, reverse, masked);
    const Buffers<T> io{in<T>(x), in<T>(w_ih), in<T>(w_hh), in<T>(bias), in<T>(h0), in<T>(c0),
                        valid.typed_data(), out<T>(hs), out<T>(c_n)};
    lstm_forward<T>(pool, 1, &z, &io);
  });
}

// Both directions of a bidirectional layer at inference (lstm_inference_pair): the same x,
// `valid` and sizes, the forward direction's weights and states first.
ffi::Error LstmInferencePairImpl(
    ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih_f, ffi::AnyBuffer w_hh_f,
    ffi::AnyBuffer bias_f, ffi::AnyBuffer h0_f, ffi::AnyBuffer c0_f, ffi::AnyBuffer w_ih_b,
    ffi::AnyBuffer w_hh_b, ffi::AnyBuffer bias_b, ffi::AnyBuffer h0_b, ffi::AnyBuffer c0_b,
    ffi::Buffer<ffi::U8> valid, int64_t masked, ffi::Result<ffi::AnyBuffer> hs_f,
    ffi::Result<ffi::AnyBuffer> c_n_f, ffi::Result<ffi::AnyBuffer> hs_b,
    ffi::Result<ffi::AnyBuffer> c_n_b) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    const Sizes z[2] = {sizes_of(x, h0_f, false, masked), sizes_of(x, h0_b, true, masked)};
    const Buffers<T> io[2] = {
        {in<T>(x), in<T>(w_ih_f), in<T>(w_hh_f), in<T>(bias_f), in<T>(h0_f), in<T>(c0_f),
         valid.typed_data(), out<T>(hs_f), out<T>(c_n_f)},
        {in<T>(x), in<T>(w_ih_b), in<T>(w_hh_b), in<T>(bias_b), in<T>(h0_b), in<T>(c0_b),
         valid.typed_data(), out<T>(hs_b), out<T>(c_n_b)}};
    lstm_forward<T>(pool, 2, z, io);
  });
}

#define JLSTM_BACKWARD_PARAMS                                                                 \
  ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih, ffi::AnyBuffer w_hh,             \
      ffi::AnyBuffer acts, ffi::AnyBuffer cs, ffi::AnyBuffer hs,                                \
      ffi::AnyBuffer h0, ffi::AnyBuffer c0, ffi::AnyBuffer dys, ffi::AnyBuffer dh_n,            \
      ffi::AnyBuffer dc_n, ffi::Buffer<ffi::U8> valid, int64_t reverse, int64_t masked

template <typename T>
Buffers<T> backward_inputs(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w_ih,
                           const ffi::AnyBuffer& w_hh, const ffi::AnyBuffer& acts,
                           const ffi::AnyBuffer& cs, const ffi::AnyBuffer& hs,
                           const ffi::AnyBuffer& h0,
                           const ffi::AnyBuffer& c0, const ffi::AnyBuffer& dys,
                           const ffi::AnyBuffer& dh_n, const ffi::AnyBuffer& dc_n,
                           const ffi::Buffer<ffi::U8>& valid) {
  // The forward's saved buffers are inputs here, read only (Buffers holds them as results).
  auto saved = [](const ffi::AnyBuffer& b) { return const_cast<T*>(in<T>(b)); };
  Buffers<T> io{};
  io.x = in<T>(x), io.w_ih = in<T>(w_ih), io.w_hh = in<T>(w_hh);
  io.h0 = in<T>(h0), io.c0 = in<T>(c0), io.valid = valid.typed_data();
  io.acts = saved(acts), io.cs = saved(cs), io.hs = saved(hs);
  io.dys = in<T>(dys), io.dh_n = in<T>(dh_n), io.dc_n = in<T>(dc_n);
  return io;
}

// Weights in the loop: results dx, dW_ih, dW_hh, db, dh0, dc0.
ffi::Error LstmBackwardImpl(JLSTM_BACKWARD_PARAMS, ffi::Result<ffi::AnyBuffer> dx,
                            ffi::Result<ffi::AnyBuffer> dw_ih, ffi::Result<ffi::AnyBuffer> dw_hh,
                            ffi::Result<ffi::AnyBuffer> db, ffi::Result<ffi::AnyBuffer> dh0,
                            ffi::Result<ffi::AnyBuffer> dc0) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    Buffers<T> io = backward_inputs<T>(x, w_ih, w_hh, acts, cs, hs, h0, c0, dys, dh_n, dc_n, valid);
    io.dx = optional_out<T>(dx), io.dw_ih = out<T>(dw_ih), io.dw_hh = out<T>(dw_hh), io.db = out<T>(db);
    io.dh0 = out<T>(dh0), io.dc0 = out<T>(dc0);
    lstm_backward<T>(pool, sizes_of(x, h0, reverse, masked), io);
  });
}

// Gate gradients out: results dgates, dh0, dc0.
ffi::Error LstmBackwardGatesImpl(JLSTM_BACKWARD_PARAMS, ffi::Result<ffi::AnyBuffer> dgates,
                                 ffi::Result<ffi::AnyBuffer> dh0,
                                 ffi::Result<ffi::AnyBuffer> dc0) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    Buffers<T> io = backward_inputs<T>(x, w_ih, w_hh, acts, cs, hs, h0, c0, dys, dh_n, dc_n, valid);
    io.dgates = out<T>(dgates), io.dh0 = out<T>(dh0), io.dc0 = out<T>(dc0);
    lstm_backward<T>(pool, sizes_of(x, h0, reverse, masked), io);
  });
}

// A GRU forward's buffers (one direction), without `acts` (inference).
template <typename T>
GruBuffers<T> gru_forward_buffers(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w_ih,
                                  const ffi::AnyBuffer& w_hh, const ffi::AnyBuffer& bias,
                                  const ffi::AnyBuffer& b_hn, const ffi::AnyBuffer& h0,
                                  const ffi::Buffer<ffi::U8>& valid,
                                  ffi::Result<ffi::AnyBuffer>& hs) {
  GruBuffers<T> io{};
  io.x = in<T>(x), io.w_ih = in<T>(w_ih), io.w_hh = in<T>(w_hh), io.bias = in<T>(bias);
  io.b_hn = in<T>(b_hn), io.h0 = in<T>(h0), io.valid = valid.typed_data(), io.hs = out<T>(hs);
  return io;
}

ffi::Error GruForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih,
                          ffi::AnyBuffer w_hh, ffi::AnyBuffer bias, ffi::AnyBuffer b_hn,
                          ffi::AnyBuffer h0, ffi::Buffer<ffi::U8> valid, int64_t reverse,
                          int64_t masked, ffi::Result<ffi::AnyBuffer> hs,
                          ffi::Result<ffi::AnyBuffer> acts) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    GruBuffers<T> io = gru_forward_buffers<T>(x, w_ih, w_hh, bias, b_hn, h0, valid, hs);
    io.acts = optional_out<T>(acts);
    const Sizes z = sizes_of(x, h0, reverse, masked);
    gru_forward<T>(pool, 1, &z, &io);
  });
}

// Both directions of a bidirectional GRU layer at inference (gru_inference_pair), as for the
// LSTM.
ffi::Error GruInferencePairImpl(
    ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih_f, ffi::AnyBuffer w_hh_f,
    ffi::AnyBuffer bias_f, ffi::AnyBuffer b_hn_f, ffi::AnyBuffer h0_f, ffi::AnyBuffer w_ih_b,
    ffi::AnyBuffer w_hh_b, ffi::AnyBuffer bias_b, ffi::AnyBuffer b_hn_b, ffi::AnyBuffer h0_b,
    ffi::Buffer<ffi::U8> valid, int64_t masked, ffi::Result<ffi::AnyBuffer> hs_f,
    ffi::Result<ffi::AnyBuffer> hs_b) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    const Sizes z[2] = {sizes_of(x, h0_f, false, masked), sizes_of(x, h0_b, true, masked)};
    const GruBuffers<T> io[2] = {
        gru_forward_buffers<T>(x, w_ih_f, w_hh_f, bias_f, b_hn_f, h0_f, valid, hs_f),
        gru_forward_buffers<T>(x, w_ih_b, w_hh_b, bias_b, b_hn_b, h0_b, valid, hs_b)};
    gru_forward<T>(pool, 2, z, io);
  });
}

template <typename T>
GruBuffers<T> gru_backward_inputs(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w_ih,
                                  const ffi::AnyBuffer& w_hh, const ffi::AnyBuffer& acts,
                                  const ffi::AnyBuffer& hs, const ffi::AnyBuffer& h0,
                                  const ffi::AnyBuffer& dys, const ffi::AnyBuffer& dh_n,
                                  const ffi::Buffer<ffi::U8>& valid) {
  GruBuffers<T> io{};
  io.x = in<T>(x), io.w_ih = in<T>(w_ih), io.w_hh = in<T>(w_hh), io.h0 = in<T>(h0);
  io.valid = valid.typed_data();
  io.acts = const_cast<T*>(in<T>(acts)), io.hs = const_cast<T*>(in<T>(hs));  // read only
  io.dys = in<T>(dys), io.dh_n = in<T>(dh_n);
  return io;
}

#define JLSTM_GRU_BACKWARD_PARAMS                                                              \
  ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_ih, ffi::AnyBuffer w_hh,             \
      ffi::AnyBuffer acts, ffi::AnyBuffer hs, ffi::AnyBuffer h0, ffi::AnyBuffer dys,            \
      ffi::AnyBuffer dh_n, ffi::Buffer<ffi::U8> valid, int64_t reverse, int64_t masked

// Weights in the loop: results dx, dW_ih, dW_hh, d(folded bias), db_hn, dh0.
ffi::Error GruBackwardImpl(JLSTM_GRU_BACKWARD_PARAMS, ffi::Result<ffi::AnyBuffer> dx,
                           ffi::Result<ffi::AnyBuffer> dw_ih, ffi::Result<ffi::AnyBuffer> dw_hh,
                           ffi::Result<ffi::AnyBuffer> db, ffi::Result<ffi::AnyBuffer> db_hn,
                           ffi::Result<ffi::AnyBuffer> dh0) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    GruBuffers<T> io = gru_backward_inputs<T>(x, w_ih, w_hh, acts, hs, h0, dys, dh_n, valid);
    io.dx = optional_out<T>(dx), io.dw_ih = out<T>(dw_ih), io.dw_hh = out<T>(dw_hh), io.db = out<T>(db);
    io.db_hn = out<T>(db_hn), io.dh0 = out<T>(dh0);
    gru_backward<T>(pool, sizes_of(x, h0, reverse, masked), io);
  });
}

// Gate gradients out: results dxw, dhw, dh0.
ffi::Error GruBackwardGatesImpl(JLSTM_GRU_BACKWARD_PARAMS, ffi::Result<ffi::AnyBuffer> dxw,
                                ffi::Result<ffi::AnyBuffer> dhw, ffi::Result<ffi::AnyBuffer> dh0) {
  return by_dtype(x.element_type(), [&]<typename T>() {
    GruBuffers<T> io = gru_backward_inputs<T>(x, w_ih, w_hh, acts, hs, h0, dys, dh_n, valid);
    io.dxw = out<T>(dxw), io.dhw = out<T>(dhw), io.dh0 = out<T>(dh0);
    gru_backward<T>(pool, sizes_of(x, h0, reverse, masked), io);
  });
}

// Results dW_ih, dW_hh and dx (no elements: not needed) from d_in, d_h (L, N, G), x (L, N, I),
// hs (L, N, H), h0 (N, H) and W_ih (G, I).
ffi::Error SequenceGradsImpl(ffi::ThreadPool pool, ffi::AnyBuffer d_in, ffi::AnyBuffer d_h,
                             ffi::AnyBuffer x, ffi::AnyBuffer hs, ffi::AnyBuffer h0,
                             ffi::AnyBuffer w_ih, int64_t reverse,
                             ffi::Result<ffi::AnyBuffer> dw_ih, ffi::Result<ffi::AnyBuffer> dw_hh,
                             ffi::Result<ffi::AnyBuffer> dx) {
  if (blas_sgemm.load() == nullptr || blas_dgemm.load() == nullptr)
    return ffi::Error::Internal("jlstm native: no BLAS was handed in (jlstm.native loads it)");
  const auto xd = x.dimensions(), gd = d_in.dimensions();
  const int64_t L = xd[0], N = xd[1], I = xd[2], H = h0.dimensions()[1], G = gd[2];
  if (L * N * std::max({G, I, H}) >= (int64_t(1) << 31))
    return ffi::Error::InvalidArgument("jlstm native: sequence too large for a 32-bit BLAS");
  return by_dtype(x.element_type(), [&]<typename T>() {
    const SequenceGrads<T> io{in<T>(d_in),     in<T>(d_h),     in<T>(x),
                              in<T>(hs),       in<T>(h0),      in<T>(w_ih),
                              out<T>(dw_ih),   out<T>(dw_hh),  optional_out<T>(dx)};
    sequence_grads<T>(pool, L, N, I, H, G, reverse != 0, io);
  });
}

}  // namespace

// Hands the C++ loops a BLAS for the backward's whole-sequence GEMMs: cblas_sgemm and cblas_dgemm
// with 32-bit integers, set to run on the calling thread (jlstm.native, at load).
extern "C" __attribute__((visibility("default"))) void JlstmUseBlas(void* sgemm, void* dgemm) {
  blas_sgemm.store(reinterpret_cast<BlasGemm<float>>(sgemm), std::memory_order_release);
  blas_dgemm.store(reinterpret_cast<BlasGemm<double>>(dgemm), std::memory_order_release);
}

#define JLSTM_FORWARD_ARGS                      \
  ffi::Ffi::Bind()                              \
      .Ctx<ffi::ThreadPool>()                   \
      .Arg<ffi::AnyBuffer>() /* x */            \
      .Arg<ffi::AnyBuffer>() /* w_ih */         \
      .Arg<ffi::AnyBuffer>() /* w_hh */         \
      .Arg<ffi::AnyBuffer>() /* bias */         \
      .Arg<ffi::AnyBuffer>() /* h0 */           \
      .Arg<ffi::AnyBuffer>() /* c0 */           \
      .Arg<ffi::Buffer<ffi::U8>>() /* valid */  \
      .Attr<int64_t>("reverse")                 \
      .Attr<int64_t>("masked")                  \
      .Ret<ffi::AnyBuffer>() /* hs */           \
      .Ret<ffi::AnyBuffer>() /* c_n */

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmLstmForward, LstmForwardImpl,
                              JLSTM_FORWARD_ARGS
                                  .Ret<ffi::AnyBuffer>()    // cs
                                  .Ret<ffi::AnyBuffer>());  // gate activations

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmLstmInference, LstmInferenceImpl, JLSTM_FORWARD_ARGS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmLstmInferencePair, LstmInferencePairImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x
                                  .Arg<ffi::AnyBuffer>()        // w_ih, forward direction
                                  .Arg<ffi::AnyBuffer>()        // w_hh
                                  .Arg<ffi::AnyBuffer>()        // bias
                                  .Arg<ffi::AnyBuffer>()        // h0
                                  .Arg<ffi::AnyBuffer>()        // c0
                                  .Arg<ffi::AnyBuffer>()        // w_ih, reverse direction
                                  .Arg<ffi::AnyBuffer>()        // w_hh
                                  .Arg<ffi::AnyBuffer>()        // bias
                                  .Arg<ffi::AnyBuffer>()        // h0
                                  .Arg<ffi::AnyBuffer>()        // c0
                                  .Arg<ffi::Buffer<ffi::U8>>()  // valid
                                  .Attr<int64_t>("masked")
                                  .Ret<ffi::AnyBuffer>()    // hs, forward direction
                                  .Ret<ffi::AnyBuffer>()    // c_n
                                  .Ret<ffi::AnyBuffer>()    // hs, reverse direction
                                  .Ret<ffi::AnyBuffer>());  // c_n

#define JLSTM_BACKWARD_ARGS                                   \
  ffi::Ffi::Bind()                                            \
      .Ctx<ffi::ThreadPool>()                                 \
      .Arg<ffi::AnyBuffer>()       /* x */                    \
      .Arg<ffi::AnyBuffer>()       /* w_ih */                 \
      .Arg<ffi::AnyBuffer>()       /* w_hh */                 \
      .Arg<ffi::AnyBuffer>()       /* gate activations */     \
      .Arg<ffi::AnyBuffer>()       /* cs */                   \
      .Arg<ffi::AnyBuffer>()       /* hs */                   \
      .Arg<ffi::AnyBuffer>()       /* h0 */                   \
      .Arg<ffi::AnyBuffer>()       /* c0 */                   \
      .Arg<ffi::AnyBuffer>()       /* dys */                  \
      .Arg<ffi::AnyBuffer>()       /* dh_n */                 \
      .Arg<ffi::AnyBuffer>()       /* dc_n */                 \
      .Arg<ffi::Buffer<ffi::U8>>() /* valid */                \
      .Attr<int64_t>("reverse")                               \
      .Attr<int64_t>("masked")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmLstmBackward, LstmBackwardImpl,
                              JLSTM_BACKWARD_ARGS
                                  .Ret<ffi::AnyBuffer>()    // dx
                                  .Ret<ffi::AnyBuffer>()    // dW_ih
                                  .Ret<ffi::AnyBuffer>()    // dW_hh
                                  .Ret<ffi::AnyBuffer>()    // db
                                  .Ret<ffi::AnyBuffer>()    // dh0
                                  .Ret<ffi::AnyBuffer>());  // dc0

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmLstmBackwardGates, LstmBackwardGatesImpl,
                              JLSTM_BACKWARD_ARGS
                                  .Ret<ffi::AnyBuffer>()    // dgates
                                  .Ret<ffi::AnyBuffer>()    // dh0
                                  .Ret<ffi::AnyBuffer>());  // dc0

// The GRU's forward serves training and inference alike: for inference `acts` is an empty buffer.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmGruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x
                                  .Arg<ffi::AnyBuffer>()        // w_ih
                                  .Arg<ffi::AnyBuffer>()        // w_hh
                                  .Arg<ffi::AnyBuffer>()        // folded bias
                                  .Arg<ffi::AnyBuffer>()        // b_hn
                                  .Arg<ffi::AnyBuffer>()        // h0
                                  .Arg<ffi::Buffer<ffi::U8>>()  // valid
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("masked")
                                  .Ret<ffi::AnyBuffer>()    // hs
                                  .Ret<ffi::AnyBuffer>());  // [r | z | n | hn] or empty

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmGruInferencePair, GruInferencePairImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // x
                                  .Arg<ffi::AnyBuffer>()        // w_ih, forward direction
                                  .Arg<ffi::AnyBuffer>()        // w_hh
                                  .Arg<ffi::AnyBuffer>()        // folded bias
                                  .Arg<ffi::AnyBuffer>()        // b_hn
                                  .Arg<ffi::AnyBuffer>()        // h0
                                  .Arg<ffi::AnyBuffer>()        // w_ih, reverse direction
                                  .Arg<ffi::AnyBuffer>()        // w_hh
                                  .Arg<ffi::AnyBuffer>()        // folded bias
                                  .Arg<ffi::AnyBuffer>()        // b_hn
                                  .Arg<ffi::AnyBuffer>()        // h0
                                  .Arg<ffi::Buffer<ffi::U8>>()  // valid
                                  .Attr<int64_t>("masked")
                                  .Ret<ffi::AnyBuffer>()    // hs, forward direction
                                  .Ret<ffi::AnyBuffer>());  // hs, reverse direction

#define JLSTM_GRU_BACKWARD_ARGS                               \
  ffi::Ffi::Bind()                                            \
      .Ctx<ffi::ThreadPool>()                                 \
      .Arg<ffi::AnyBuffer>()       /* x */                    \
      .Arg<ffi::AnyBuffer>()       /* w_ih */                 \
      .Arg<ffi::AnyBuffer>()       /* w_hh */                 \
      .Arg<ffi::AnyBuffer>()       /* [r | z | n | hn] */     \
      .Arg<ffi::AnyBuffer>()       /* hs */                   \
      .Arg<ffi::AnyBuffer>()       /* h0 */                   \
      .Arg<ffi::AnyBuffer>()       /* dys */                  \
      .Arg<ffi::AnyBuffer>()       /* dh_n */                 \
      .Arg<ffi::Buffer<ffi::U8>>() /* valid */                \
      .Attr<int64_t>("reverse")                               \
      .Attr<int64_t>("masked")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmGruBackward, GruBackwardImpl,
                              JLSTM_GRU_BACKWARD_ARGS
                                  .Ret<ffi::AnyBuffer>()    // dx
                                  .Ret<ffi::AnyBuffer>()    // dW_ih
                                  .Ret<ffi::AnyBuffer>()    // dW_hh
                                  .Ret<ffi::AnyBuffer>()    // d(folded bias)
                                  .Ret<ffi::AnyBuffer>()    // db_hn
                                  .Ret<ffi::AnyBuffer>());  // dh0

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmGruBackwardGates, GruBackwardGatesImpl,
                              JLSTM_GRU_BACKWARD_ARGS
                                  .Ret<ffi::AnyBuffer>()    // dxw
                                  .Ret<ffi::AnyBuffer>()    // dhw
                                  .Ret<ffi::AnyBuffer>());  // dh0

XLA_FFI_DEFINE_HANDLER_SYMBOL(JlstmSequenceGrads, SequenceGradsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // d_in: gate gradients through W_ih
                                  .Arg<ffi::AnyBuffer>()  // d_h: gate gradients through W_hh
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // hs
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // w_ih
                                  .Attr<int64_t>("reverse")
                                  .Ret<ffi::AnyBuffer>()    // dW_ih
                                  .Ret<ffi::AnyBuffer>()    // dW_hh
                                  .Ret<ffi::AnyBuffer>());  // dx, or no elements
