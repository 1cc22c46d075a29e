// The float32 gate functions of jlstm/csrc/gate_math.h against double-precision libm, over floats
// spread through every binade (every `stride`-th bit pattern, both signs), vectorised as the gate
// loops run them. Prints the largest error of each function in units in the last place of the
// float32 nearest the exact value, then the special cases' results; tests/test_native.py holds the
// bounds. Usage: gate_math_check [stride]
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "gate_math.h"
#include "ulp_sweep.h"

using jlstm_test::ulp_error;

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 97;
  const std::vector<float> x = jlstm_test::sweep_floats(stride);
  std::vector<float> t(x.size()), s(x.size());
  const float* xp = x.data();
  float *tp = t.data(), *sp = s.data();
#pragma omp simd
  for (size_t i = 0; i < x.size(); ++i) {
    tp[i] = jlstm::tanh_f(xp[i]);
    sp[i] = jlstm::sigmoid_f(xp[i]);
  }
  double worst_t = 0, worst_s = 0, worst_s_gate = 0;
  float at_t = 0, at_s = 0, at_s_gate = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    const double et = std::tanh(v), es = 1.0 / (1.0 + std::exp(-v));
    const double dt = ulp_error(t[i], et), ds = ulp_error(s[i], es);
    if (dt > worst_t) worst_t = dt, at_t = x[i];
    // The sigmoid's clamp: below -87 it gives e^-88-sized values rather than the exact ones,
    // which are under 1e-38: judged by absolute error there (against 2^-126, float's smallest
    // normal), by ulp elsewhere.
    if (v >= -87.0) {
      if (ds > worst_s) worst_s = ds, at_s = x[i];
    } else {
      const double abs_err = std::fabs(s[i] - es) / std::ldexp(1.0, -126);
      if (abs_err > worst_s_gate) worst_s_gate = abs_err, at_s_gate = x[i];
    }
  }
  std::printf("values %zu\n", x.size());
  std::printf("tanh_ulp %.3f at %.9g\n", worst_t, at_t);
  std::printf("sigmoid_ulp %.3f at %.9g\n", worst_s, at_s);
  std::printf("sigmoid_far_error_in_min_normals %.3f at %.9g\n", worst_s_gate, at_s_gate);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  std::printf("tanh(+inf) %g tanh(-inf) %g sigmoid(+inf) %g sigmoid(-inf) %g\n", jlstm::tanh_f(inf),
              jlstm::tanh_f(-inf), jlstm::sigmoid_f(inf), jlstm::sigmoid_f(-inf));
  std::printf("tanh(nan) %g sigmoid(nan) %g\n", jlstm::tanh_f(nan), jlstm::sigmoid_f(nan));
  return 0;
}
