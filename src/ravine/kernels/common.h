// What ravine's compiled CPU steps share: torch's rounding rules (fused multiply-add,
// lerp, NaN-propagating maximum), the square root (hardware or torch's VML, see
// cpu_step.cpp), and compile-time option dispatch. Every .cpp file in this folder
// includes it; ravine.kernels.cpu compiles them all into one library.

#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <type_traits>
#include <omp.h>

namespace ravine_kernels {

typedef void (*vml_sqrt_f32)(const int32_t*, const float*, float*, const int64_t*);
typedef void (*vml_sqrt_f64)(const int32_t*, const double*, double*, const int64_t*);

inline vml_sqrt_f32 g_sqrt_f32 = nullptr;
inline vml_sqrt_f64 g_sqrt_f64 = nullptr;
// VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, as ATen/cpu/vml.h passes them.
inline constexpr int64_t kVmlMode = 0x2 | 0x00140000 | 0x100;

inline constexpr int64_t kChunk = 1024;  // elements per inner pass; its buffers stay in L1

inline float fused(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double fused(double a, double b, double c) { return std::fma(a, b, c); }

inline void vector_sqrt(const float* in, float* out, int64_t n) {
  if (g_sqrt_f32) {
    int32_t count = static_cast<int32_t>(n);
    g_sqrt_f32(&count, in, out, &kVmlMode);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(in[i]);
  }
}

inline void vector_sqrt(const double* in, double* out, int64_t n) {
  if (g_sqrt_f64) {
    int32_t count = static_cast<int32_t>(n);
    g_sqrt_f64(&count, in, out, &kVmlMode);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(in[i]);
  }
}

// torch's lerp(self, end, w): self + w (end - self) for |w| < 0.5, else
// end - (1 - w)(end - self), each as one FMA. `small` is |w| < 0.5; callers pass it
// as a compile-time constant, without which gcc does not vectorize their loops.
template <typename T>
inline T lerp(T self, T end, T weight, T weight_minus_one, bool small) {
  T diff = end - self;
  return small ? fused(weight, diff, self) : fused(weight_minus_one, diff, end);
}

// torch.maximum: NaN propagates (a > b is false when either is NaN).
template <typename T>
inline T maximum(T a, T b) {
  T larger = a > b ? a : b;
  return a != a ? a : larger;  // two selects, which vectorize (|| would branch)
}

// Calls f(std::integral_constant<bool, value>) so that options become constants
// and every option set gets its own branch-free, vectorized loop.
template <typename F>
inline void with_bool(bool value, F&& f) {
  if (value)
    f(std::true_type{});
  else
    f(std::false_type{});
}

template <typename T>
inline bool has_vml_sqrt();
template <>
inline bool has_vml_sqrt<float>() { return g_sqrt_f32 != nullptr; }
template <>
inline bool has_vml_sqrt<double>() { return g_sqrt_f64 != nullptr; }

// Runs a rule split around its square root: x = rule.front(j, saved) is the value
// whose root the rule needs, rule.back(j, root, saved) finishes element j. With
// the hardware square root this is one loop; with VML's, the values of a chunk
// are collected, rooted in one call, and finished in a second loop over the chunk
// (which is still in L1).
template <typename T, typename Rule>
inline void split_at_sqrt(const Rule rule, int64_t n) {  // by value: its pointers cannot alias the data
  // The tensors of one rule never overlap (torch.optim assumes it too), so the
  // loops need no run-time alias checks.
  if (!has_vml_sqrt<T>()) {
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      T saved;
      T x = rule.front(j, saved);
      rule.back(j, std::sqrt(x), saved);
    }
    return;
  }
  T values[kChunk], roots[kChunk], saved[kChunk];
  for (int64_t base = 0; base < n; base += kChunk) {
    const int64_t m = std::min(kChunk, n - base);
#pragma GCC ivdep
    for (int64_t i = 0; i < m; ++i) values[i] = rule.front(base + i, saved[i]);
    vector_sqrt(values, roots, m);
#pragma GCC ivdep
    for (int64_t i = 0; i < m; ++i) rule.back(base + i, roots[i], saved[i]);
  }
}

// Adam / AdamW's element rule, as torch's list operations round it (cpu_step.cpp's
// Adam family on the parameters' own state, quantized.cpp's on decoded 8-bit state):
// p *= 1 - lr wd (decoupled); g = -grad (maximize) + wd p (L2);
// m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g g; vmax = max(vmax, v)
// (AMSGrad); p += (-lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
// Split around the square root for split_at_sqrt.
template <typename T, bool L2, bool Decoupled, bool Amsgrad, bool Small>
struct AdamRule {
  T* __restrict param;
  const T* __restrict grad;
  T* __restrict exp_avg;
  T* __restrict exp_avg_sq;
  T* __restrict max_exp_avg_sq;
  T one_minus_beta1, one_minus_beta1_minus_one, beta2, one_minus_beta2, eps, weight_decay, decay_factor, sign;
  T neg_step_size, bias_correction2_root;
  inline T front(int64_t j, T&) const {
    T p = param[j];
    if (Decoupled) {
      p = p * decay_factor;
      param[j] = p;
    }
    T g = grad[j] * sign;
    if (L2) g = fused(p, weight_decay, g);
    exp_avg[j] = lerp(exp_avg[j], g, one_minus_beta1, one_minus_beta1_minus_one, Small);
    T v = fused(one_minus_beta2 * g, g, exp_avg_sq[j] * beta2);
    exp_avg_sq[j] = v;
    if (Amsgrad) {
      v = maximum(max_exp_avg_sq[j], v);
      max_exp_avg_sq[j] = v;
    }
    return v;
  }
  inline void back(int64_t j, T root, T) const {
    param[j] += neg_step_size * exp_avg[j] / (root / bias_correction2_root + eps);
  }
};

}  // namespace ravine_kernels
