// The speed and libmvec figures of jlstm/csrc/gate_math.h's header:
//
//   g++ -O3 -march=native -fno-math-errno -fno-trapping-math -fopenmp-simd -std=c++20 \
//       -o /tmp/gate_math tools/perf/gate_math.cc -lmvec
//   /tmp/gate_math [rounds]
//
// 1. Time per float of each gate function in a vectorised loop on one core (4096 floats in
//    [-5, 5), kept in L1), as the C++ loop's gate loops call them: glibc's libmvec tanhf and the
//    sigmoid the loop used to build on it (0.5 tanh(x/2) + 0.5), against gate_math.h's tanh_f and
//    sigmoid_f. Rounds alternate the four; printed: the median ns per float.
// 2. libmvec tanhf's largest error in ulp over the floats tests/gate_math_check.cc sweeps (every
//    97th bit pattern of either sign), against double-precision libm: what gate_math.h is compared
//    with.
#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../../jlstm/csrc/gate_math.h"
#include "../../tests/ulp_sweep.h"

extern "C" {
__attribute__((simd("notinbranch"))) float tanhf(float) noexcept;
}

namespace {

template <typename F>
double ns_per_float(F f, const std::vector<float>& x, std::vector<float>& y) {
  const float* xp = x.data();
  float* yp = y.data();
  const int64_t n = int64_t(x.size()), reps = 20000;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) {
    // yp feeds back (scaled to nothing) so that no round can be skipped or hoisted.
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yp[i] = f(xp[i] + yp[i] * 1e-30f);
  }
  const std::chrono::duration<double> s = std::chrono::steady_clock::now() - start;
  return s.count() / double(reps * n) * 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 7;
  std::vector<float> x(4096), y(4096, 0.0f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = -5.0f + 10.0f * float(i) / float(x.size());
  struct Variant {
    const char* name;
    double (*run)(const std::vector<float>&, std::vector<float>&);
  };
  const Variant variants[] = {
      {"libmvec tanhf", [](const std::vector<float>& a, std::vector<float>& b) {
         return ns_per_float([](float v) { return std::tanh(v); }, a, b);
       }},
      {"libmvec sigmoid", [](const std::vector<float>& a, std::vector<float>& b) {
         return ns_per_float([](float v) { return 0.5f * std::tanh(0.5f * v) + 0.5f; }, a, b);
       }},
      {"gate_math tanh_f", [](const std::vector<float>& a, std::vector<float>& b) {
         return ns_per_float([](float v) { return jlstm::tanh_f(v); }, a, b);
       }},
      {"gate_math sigmoid_f", [](const std::vector<float>& a, std::vector<float>& b) {
         return ns_per_float([](float v) { return jlstm::sigmoid_f(v); }, a, b);
       }},
  };
  std::vector<std::vector<double>> times(std::size(variants));
  for (int r = 0; r < rounds; ++r)
    for (size_t v = 0; v < std::size(variants); ++v) times[v].push_back(variants[v].run(x, y));
  std::printf("ns per float, one core, median of %d rounds\n", rounds);
  for (size_t v = 0; v < std::size(variants); ++v) {
    std::sort(times[v].begin(), times[v].end());
    std::printf("  %-20s %.3f\n", variants[v].name, times[v][times[v].size() / 2]);
  }

  const std::vector<float> sweep = jlstm_test::sweep_floats(97);
  std::vector<float> out(sweep.size());
  const float* sp = sweep.data();
  float* op = out.data();
#pragma omp simd
  for (size_t i = 0; i < sweep.size(); ++i) op[i] = std::tanh(sp[i]);
  double worst = 0;
  float at = 0;
  for (size_t i = 0; i < sweep.size(); ++i) {
    const double e = jlstm_test::ulp_error(out[i], std::tanh(double(sweep[i])));
    if (e > worst) worst = e, at = sweep[i];
  }
  std::printf("libmvec tanhf: largest error %.3f ulp (at %.9g) over %zu floats\n", worst, at,
              sweep.size());
}
