// exp, tanh, erf, the logistic sigmoid and sums for the vectorised loops of csrc/*.cpp.
//
// The C library's functions are scalar calls that stop GCC from vectorising a loop (short of
// -ffast-math and glibc's libmvec, which also changes the rest of the arithmetic). The float
// versions here are branch-free polynomial and rational approximations that it vectorises;
// the double versions (gradcheck, tests) are the C library's.
//
// C++17 only: torch before 2.13 compiles extensions with -std=c++17 (2.13 with -std=c++20).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cfc_rl {

// std::bit_cast (C++20) in C++17: the bytes of `from` read as a `To`. GCC and Clang turn the
// memcpy into a register move (or nothing), so the loops calling it still vectorise.
template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  static_assert(std::is_trivially_copyable<To>::value && std::is_trivially_copyable<From>::value,
                "bit_cast of a type that is not trivially copyable");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename T>
struct Math {
  static T exp(T x) { return std::exp(x); }
  static T tanh(T x) { return std::tanh(x); }
  static T erf(T x) { return std::erf(x); }
};

template <>
struct Math<float> {
  // Cephes' expf: e^x = 2^n · e^r with |r| <= ln2/2, e^r a degree-7 polynomial; relative
  // error below 1.5 ulp on the clamped range, whose ends give the smallest normal float and
  // about 2.4e38 (no infinities: a sigmoid of a very negative input stays 0, not NaN).
  static float exp(float x) {
    x = x < -87.3365448f ? -87.3365448f : (x > 88.3762627f ? 88.3762627f : x);
    const float n = std::floor(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    return y * bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  }
  // Eigen's rational tanh (degree 13 over 6) on [-7.9053, 7.9053], where float tanh reaches
  // 1; absolute and relative error below 3e-7.
  static float tanh(float x) {
    constexpr float kClamp = 7.90531110763549805f;
    x = x < -kClamp ? -kClamp : (x > kClamp ? kClamp : x);
    const float x2 = x * x;
    float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
    p = p * x2 - 8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return x * p / q;
  }
  // Abramowitz and Stegun 7.1.26: absolute error below 1.5e-7.
  static float erf(float x) {
    const float ax = std::abs(x);
    const float t = 1.0f / (1.0f + 0.3275911f * ax);
    float y = 1.061405429f;
    y = y * t - 1.453152027f;
    y = y * t + 1.421413741f;
    y = y * t - 0.284496736f;
    y = y * t + 0.254829592f;
    y = 1.0f - y * t * exp(-ax * ax);
    return x < 0.0f ? -y : y;
  }
};

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + Math<T>::exp(-x));
}

// sigmoid(x) = (1 + tanh(x/2)) / 2, in float through the rational tanh: about a quarter fewer
// operations than 1 / (1 + exp(-x)), absolute error below 2e-7 but relative error up to 1e-4
// where the sigmoid is near 0 (a cancellation). For weighted sums of many sigmoids (the LTC's
// synapses: one per synapse and unfold, most of its time), where only the absolute error counts.
template <typename T>
inline T sigmoid_of_sum(T x) {
  return T(0.5) * Math<T>::tanh(T(0.5) * x) + T(0.5);
}

template <>
inline double sigmoid_of_sum(double x) {
  return sigmoid(x);
}

// Σ x[k]·y[k] and Σ x[k] over k < n. GCC does not reorder a floating-point sum by itself (no
// -ffast-math), so the partial sums of one vector register's lanes are spelled out, and those
// it vectorises.
template <typename T>
T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  T lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[k + l] * y[k + l];
  T total = T(0);
  for (; k < n; ++k) total += x[k] * y[k];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename T>
T sum(const T* __restrict x, int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  T lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[k + l];
  T total = T(0);
  for (; k < n; ++k) total += x[k];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

}  // namespace cfc_rl
