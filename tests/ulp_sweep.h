// What tests/gate_math_check.cc and tools/perf/gate_math.cc share: the float32 values they
// judge a function on (every `stride`-th bit pattern of the finite non-negative floats, and its
// negation: every binade) and the error of a result in units in the last place (ulp) of the
// float32 nearest the exact value.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace jlstm_test {

inline std::vector<float> sweep_floats(uint64_t stride) {
  std::vector<float> x;
  for (uint64_t bits = 0; bits < 0x7F800000u; bits += stride) {
    const float v = std::bit_cast<float>(static_cast<uint32_t>(bits));
    x.push_back(v);
    x.push_back(-v);
  }
  return x;
}

// Where the exact value rounds to 0, the error in float32's smallest subnormals.
inline double ulp_error(float got, double exact) {
  const float nearest = static_cast<float>(exact);
  if (nearest == 0.0f)
    return got == 0.0f ? 0.0 : std::fabs(got) / std::numeric_limits<float>::denorm_min();
  const double ulp = std::nextafter(std::fabs(nearest), std::numeric_limits<float>::infinity()) -
                     std::fabs(nearest);
  return std::fabs(static_cast<double>(got) - exact) / ulp;
}

}  // namespace jlstm_test
