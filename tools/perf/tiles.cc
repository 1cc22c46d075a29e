// The register tile and the prefetch distance of PackedB in jlstm/csrc/recurrence.cc:
//
//   g++ -O3 -march=native -fno-math-errno -o /tmp/tiles tools/perf/tiles.cc
//   /tmp/tiles 128 1536 2048        # m k n: wide's step on one thread (2 threads split n)
//
// C (m x n) = A (m x k) @ B (k x n) on one core, B packed once into panels of NV SIMD vectors as
// recurrence.cc packs the weights, every tile MR rows x NV vectors of accumulators looping over the
// whole k (as the kernel does: a step's k is at most I + 4H). The vectors are as wide as the
// kernel's on the CPU it is built for: 64 bytes with AVX-512, with variants 8 x 2, 8 x 3, 8 x 3 prefetching B 8 rows ahead (the AVX-512 tile now) and 12 x 2; 32 bytes
// without, with variants 6 x 2, 6 x 2 prefetching B 8 rows ahead for every vector, or once per
// cache line 8 or 16 rows ahead, and 4 x 3 (16 registers: 12 accumulators, the B vectors and a
// broadcast of A). Rounds
// alternate the variants (default 5); printed: median, min and max GFLOP/s.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#ifdef __AVX512F__
constexpr int kBytes = 64;
#else
constexpr int kBytes = 32;
#endif
typedef float V __attribute__((vector_size(kBytes)));
constexpr int W = kBytes / sizeof(float);

// AHEAD > 0: prefetch B that many rows ahead, for every vector (LINE false) or once per 64-byte
// cache line (LINE true: with 32-byte vectors, every other vector).
template <int MR, int NV, int AHEAD, bool LINE = false>
void tile(int64_t k, const float* a, int64_t lda, const float* bp, float* c, int64_t ldc) {
  V acc[MR][NV] = {};
  for (int64_t r = 0; r < k; ++r) {
    V b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (AHEAD > 0 && (!LINE || j * kBytes % 64 == 0)) __builtin_prefetch(bp + ((r + AHEAD) * NV + j) * W);
      std::memcpy(&b[j], bp + (r * NV + j) * W, sizeof(V));
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i * lda + r];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * b[j];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(c + i * ldc + j * W, &acc[i][j], sizeof(V));
}

// GFLOP/s of C = A B for the largest m' <= m and n' <= n that are whole tiles and panels; the
// result is checked against a float64 product on a few entries.
template <int MR, int NV, int AHEAD, bool LINE = false>
double run(int64_t m, int64_t k, int64_t n) {
  constexpr int64_t NR = NV * W;
  m -= m % MR;
  n -= n % NR;
  std::mt19937 gen(1);
  std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
  std::vector<float> a(m * k), b(k * n), c(m * n), packed(k * n);
  for (auto& v : a) v = uniform(gen);
  for (auto& v : b) v = uniform(gen);
  for (int64_t col = 0; col < n; ++col)
    for (int64_t r = 0; r < k; ++r) packed[(col / NR * k + r) * NR + col % NR] = b[r * n + col];
  auto gemm = [&] {
    for (int64_t p = 0; p < n / NR; ++p)
      for (int64_t i = 0; i < m; i += MR)
        tile<MR, NV, AHEAD, LINE>(k, &a[i * k], k, &packed[p * k * NR], &c[i * n + p * NR], n);
  };
  gemm();
  for (int t = 0; t < 20; ++t) {
    const int64_t i = gen() % m, j = gen() % n;
    double want = 0;
    for (int64_t r = 0; r < k; ++r) want += double(a[i * k + r]) * b[r * n + j];
    if (std::abs(want - c[i * n + j]) > 1e-3) {
      std::fprintf(stderr, "wrong result at (%ld, %ld)\n", long(i), long(j));
      std::exit(1);
    }
  }
  const double flops = 2.0 * m * k * n;
  const int reps = std::max(3, int(3e10 / flops));
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) gemm();
  const std::chrono::duration<double> s = std::chrono::steady_clock::now() - start;
  return flops * reps / s.count() / 1e9;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s m k n [rounds]\n", argv[0]);
    return 2;
  }
  const int64_t m = std::atol(argv[1]), k = std::atol(argv[2]), n = std::atol(argv[3]);
  const int rounds = argc > 4 ? std::atoi(argv[4]) : 5;
  struct Variant {
    const char* name;
    double (*fn)(int64_t, int64_t, int64_t);
  };
#ifdef __AVX512F__
  const Variant variants[] = {{"8 x 2", run<8, 2, 0>},
                              {"8 x 3", run<8, 3, 0>},
                              {"8 x 3, B 8 rows ahead", run<8, 3, 8>},
                              {"12 x 2", run<12, 2, 0>}};
#else
  const Variant variants[] = {{"6 x 2", run<6, 2, 0>},
                              {"6 x 2, B 8 rows ahead", run<6, 2, 8>},
                              {"6 x 2, B 8 ahead/line", run<6, 2, 8, true>},
                              {"6 x 2, B 16 ahead/line", run<6, 2, 16, true>},
                              {"4 x 3", run<4, 3, 0>}};
#endif
  std::vector<std::vector<double>> rates(std::size(variants));
  for (int r = 0; r < rounds; ++r)
    for (size_t v = 0; v < std::size(variants); ++v) rates[v].push_back(variants[v].fn(m, k, n));
  std::printf("%ld x %ld x %ld, one core, %d-byte vectors, GFLOP/s over %d rounds\n", long(m),
              long(k), long(n), kBytes, rounds);
  for (size_t v = 0; v < std::size(variants); ++v) {
    auto& x = rates[v];
    std::sort(x.begin(), x.end());
    std::printf("  %-22s median %6.1f  min %6.1f  max %6.1f\n", variants[v].name, x[x.size() / 2],
                x.front(), x.back());
  }
}
