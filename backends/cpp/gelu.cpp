// Exact (erf) GELU, y = x / 2 * (1 + erf(x / sqrt 2)), for float32 arrays.
//
// Why our own: torch's vectorised erf (ATen's kernel, and the code Inductor generates) takes
// an accurate exp per element plus a polynomial. Here erf is the rational minimax
// approximation Eigen and XLA use for float (odd degree-13 numerator over even degree-8
// denominator on [-4, 4], beyond which erf is +-1 in float): no exp, one division. Its error
// is a few float ulps, so GELU matches torch's to the rounding of 1 + erf, as torch's own does.
#include "sparse_common.h"

#include <algorithm>

namespace graphopt {
namespace {

using namespace detail;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kAlpha[7] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                             -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                             -1.60960333262415e-02f};  // numerator, highest power first
constexpr float kBeta[5] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                            -7.37332916720468e-03f, -1.42647390514189e-02f};  // denominator

template <typename T>
inline T gelu_of(T x, T four, T minus_four, T half, T one) {
  T z = x * kInvSqrt2;
  z = z < four ? z : four;
  z = z > minus_four ? z : minus_four;
  const T z2 = z * z;
  T p = z2 * kAlpha[0] + kAlpha[1];
  for (int i = 2; i < 7; ++i) p = p * z2 + kAlpha[i];
  T q = z2 * kBeta[0] + kBeta[1];
  for (int i = 2; i < 5; ++i) q = q * z2 + kBeta[i];
  return half * x * (one + z * p / q);
}

}  // namespace

void gelu_forward(const float* x, float* y, int64_t n) {
  parallel_range((n + 7) / 8, n * 4, [&](int64_t g0, int64_t g1) {
    const int64_t end = std::min(n, g1 * 8);
    int64_t i = g0 * 8;
    const v8f four = v8f{} + 4.f, minus_four = v8f{} - 4.f, half = v8f{} + 0.5f, one = v8f{} + 1.f;
    for (; i + 8 <= end; i += 8) store8(y + i, gelu_of(load8(x + i), four, minus_four, half, one));
    for (; i < end; ++i) y[i] = gelu_of(x[i], 4.f, -4.f, 0.5f, 1.f);
  });
}

}  // namespace graphopt
