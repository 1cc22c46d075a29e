// The float32 gate functions of the C++ loops: exp, the logistic sigmoid and tanh, written so that
// GCC vectorises them inline in the gate loops (`#pragma omp simd`), in IEEE float32 throughout
// (no -ffast-math, no lower precision). Double keeps libm's.
//
// Why not libm: glibc's vector tanhf (libmvec, `_ZGVdN8v_tanhf_avx2`) is a call per 8 floats, and
// the sigmoid was built on it (0.5 tanh(x/2) + 0.5). In a `perf record` of the mnist forward on one
// core of a Zen 3 EPYC (2026-12-02) that tanhf took 18.6 % of the samples against 27.5 % for the
// GEMM tiles. Per float in a vectorised loop on one core of that EPYC (tools/perf/gate_math.cc,
// median of 7 rounds): libmvec's tanhf 1.02 ns and the sigmoid on it
// 1.10 ns; these 0.48 and 0.54 ns.
//
// Accuracy, largest error over every 97th float32 bit pattern of either sign, in units in the
// last place (ulp) of the exact value (tests/gate_math_check.cc; tests/test_native.py holds the
// bounds): tanh 5.6 ulp (near |x| = 8.5; 3.5 for |x| < 1), sigmoid 2.4 ulp. On the same floats:
// XLA CPU's own float32 tanh and sigmoid (jnp.tanh, jax.nn.sigmoid: the lax.scan paths', jaxlib
// 0.10.2) 4.3 and 2.4 ulp, torch's 0.5 and 2.4 ulp (`python -m tools.perf.gate_accuracy`);
// libmvec's tanhf 1.0 ulp (gate_math.cc).
//
// exp: x = n ln2 + r with |r| <= ln2/2 (Cody and Waite's two-part ln2, so n ln2's high part is
// exact), e^r = 1 + r + r^2 q(r) with q a degree-4 polynomial fitted for relative error (below
// 2^-27 on the interval before rounding), times 2^n built in the exponent bits. The argument is
// clamped to [-87, 88], where 2^n stays a normal float: e^x itself is then never 0 or inf, which
// the sigmoid does not need (1 / (1 + e^88) is 6e-39, below float32's resolution next to any gate
// value but 0).
//
// sigmoid: 1 / (1 + e^{-x}), accurate everywhere (the denominator is at least 1).
//
// tanh: x p(x^2) / q(x^2) with p and q of degree 4, fitted for relative error on [0, 9.1] (below
// 2^-25 before rounding); all their coefficients are positive, so evaluating them in float32
// cancels nothing. From |x| = 9 on, +-1 (1 - tanh(9) = 3.05e-8, half an ulp of float32 below 1).
// Both polynomials were fitted in float64 with numpy by least squares reweighted towards the
// minimax error.
//
// NaN: every clamp is a comparison that is false for NaN, so a NaN argument gives NaN. Build with
// -fno-trapping-math: without it GCC does not if-convert the selects and leaves the loops scalar.
#pragma once

#include <bit>
#include <cstdint>

namespace jlstm {

// e^x for float32 (see above): x clamped to [-87, 88]; NaN stays NaN.
inline float exp_clamped(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick: the float sum's low mantissa bits hold n.
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float m = x * 1.44269504088896341f + shifter;
  const float n = m - shifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 = 0.693359375 - 2.12e-4
  const float q = (((1.37539196e-3f * r + 8.36634263e-3f) * r + 4.16692160e-2f) * r +
                   1.66665405e-1f) * r + 4.99999911e-1f;
  const float p = 1.0f + (r + r * r * q);  // 1 added last: one rounding of the sum
  // 2^n: n + 127 in the exponent field. m's bits are 0x4B400000 + n for |n| < 2^22.
  const int32_t bits = (std::bit_cast<int32_t>(m) - 0x4B400000 + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }

inline float tanh_f(float x) {
  float a = x < 0.0f ? -x : x;
  a = a > 9.0f ? 9.0f : a;
  const float u = a * a;
  const float p = (((1.31802196e-8f * u + 2.04832674e-5f) * u + 3.48794297e-3f) * u +
                   1.33745879e-1f) * u + 1.0f;
  const float q = (((7.70519003e-7f * u + 3.27313231e-4f) * u + 2.58478969e-2f) * u +
                   4.67079014e-1f) * u + 1.0f;
  const float t = a >= 9.0f ? 1.0f : a * p / q;
  return x < 0.0f ? -t : t;
}

}  // namespace jlstm
