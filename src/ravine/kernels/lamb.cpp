// LAMB's compiled CPU step (ravine.optim.lamb): Adam's direction rescaled per tensor
// by the trust ratio ||theta|| / ||u||, in two passes over memory.
//
//   pass 1: m <- lerp(m, g, 1 - beta1), v <- beta2 v + (1 - beta2) g^2, u from m, v
//           and theta; the squares of u and theta are summed in double (u is not
//           stored);
//   then:   per tensor, rho = ||theta|| / ||u|| (1 when either norm is 0 or NaN);
//   pass 2: u again from the new m, v and the old theta (the same operations, so
//           the same numbers), theta <- theta + (-lr rho) u.
//
// Each element takes the operations of the plain path (Lamb.update) in the same
// order and precision (see cpu_step.cpp's header), so u is the plain path's u; the
// norms are summed in another order than torch's _foreach_norm (eight double lanes
// per work item, the items of a tensor added in order), which makes the ratio, and so
// the step, differ in the last bits. The sums do not depend on the number of threads.

#include "common.h"

namespace {

using namespace ravine_kernels;

enum LambFlags { LAMB_MAXIMIZE = 1, LAMB_BIAS_CORRECTION = 2, LAMB_WEIGHT_DECAY = 4 };

// hp: lr, 1 - beta1, beta2, 1 - beta2, eps, weight_decay. per-tensor: 1 - beta1^t,
// sqrt(1 - beta2^t). Slots: param, grad, exp_avg, exp_avg_sq.
template <typename T, bool Maximize, bool BiasCorrection, bool WeightDecay, bool Small>
struct LambRule {
  T* __restrict param;
  const T* __restrict grad;
  T* __restrict exp_avg;
  T* __restrict exp_avg_sq;
  T one_minus_beta1, one_minus_beta1_minus_one, beta2, one_minus_beta2, eps, weight_decay;
  T bias_correction1, bias_correction2_root;

  // The moments' update; returns v, whose root the direction needs.
  inline T moments(int64_t j) const {
    const T g = Maximize ? -grad[j] : grad[j];
    exp_avg[j] = lerp(exp_avg[j], g, one_minus_beta1, one_minus_beta1_minus_one, Small);
    const T v = fused(one_minus_beta2 * g, g, exp_avg_sq[j] * beta2);
    exp_avg_sq[j] = v;
    return v;
  }

  // u: m / (sqrt(v) / sqrt(1 - beta2^t) + eps) / (1 - beta1^t), or m / (sqrt(v) + eps),
  // plus weight_decay theta (add with alpha: one FMA).
  inline T update(int64_t j, T root) const {
    T u = BiasCorrection ? exp_avg[j] / (root / bias_correction2_root + eps) / bias_correction1
                         : exp_avg[j] / (root + eps);
    if (WeightDecay) u = fused(param[j], weight_decay, u);
    return u;
  }
};

inline void roots_of(const float* values, float* roots, int64_t m) {
  if (has_vml_sqrt<float>()) return vector_sqrt(values, roots, m);
  for (int64_t i = 0; i < m; ++i) roots[i] = std::sqrt(values[i]);
}

inline void roots_of(const double* values, double* roots, int64_t m) {
  if (has_vml_sqrt<double>()) return vector_sqrt(values, roots, m);
  for (int64_t i = 0; i < m; ++i) roots[i] = std::sqrt(values[i]);
}

// lanes[k] += x[i]^2 for i = k mod 8, in double: eight independent sums, which
// vectorize without reordering any of them.
template <typename T>
inline void add_squares(const T* __restrict x, int64_t m, double* __restrict lanes) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8)
    for (int k = 0; k < 8; ++k) {
      const double a = x[i + k];
      lanes[k] = fused(a, a, lanes[k]);
    }
  for (; i < m; ++i) {
    const double a = x[i];
    lanes[i & 7] = fused(a, a, lanes[i & 7]);
  }
}

inline double sum_of(const double* lanes) {
  double sum = 0;
  for (int k = 0; k < 8; ++k) sum += lanes[k];
  return sum;
}

// Pass 1 over elements [start, start + n) of one tensor; partial[0] = sum of theta^2,
// partial[1] = sum of u^2.
template <typename T, typename Rule>
void first_pass(const Rule& rule, int64_t start, int64_t n, double* partial) {
  T values[kChunk], roots[kChunk], updates[kChunk];
  double weight_lanes[8] = {0}, update_lanes[8] = {0};
  for (int64_t base = start; base < start + n; base += kChunk) {
    const int64_t m = std::min(kChunk, start + n - base);
#pragma GCC ivdep
    for (int64_t i = 0; i < m; ++i) values[i] = rule.moments(base + i);
    roots_of(values, roots, m);
#pragma GCC ivdep
    for (int64_t i = 0; i < m; ++i) updates[i] = rule.update(base + i, roots[i]);
    add_squares(rule.param + base, m, weight_lanes);
    add_squares(updates, m, update_lanes);
  }
  partial[0] = sum_of(weight_lanes);
  partial[1] = sum_of(update_lanes);
}

// Pass 2: theta <- theta + scale u, with scale = -lr rho (a multiply, then an add,
// as the plain path's _foreach_mul_ and _foreach_add_).
template <typename T, typename Rule>
void second_pass(const Rule& rule, int64_t start, int64_t n, T scale) {
  T roots[kChunk];
  for (int64_t base = start; base < start + n; base += kChunk) {
    const int64_t m = std::min(kChunk, start + n - base);
    roots_of(rule.exp_avg_sq + base, roots, m);
#pragma GCC ivdep
    for (int64_t i = 0; i < m; ++i) {
      const int64_t j = base + i;
      rule.param[j] = rule.param[j] + rule.update(j, roots[i]) * scale;
    }
  }
}

template <typename T, bool Maximize, bool BiasCorrection, bool WeightDecay, bool Small>
void lamb(int64_t n_items, const int64_t* items, int64_t n_tensors, const int64_t* pointers, const double* per_tensor,
          const double* hp, double* partials, double* norms, int64_t threads) {
  const T one_minus_beta1 = static_cast<T>(hp[1]);
  auto rule_of = [&](int64_t tensor) {
    const int64_t* slots = pointers + 4 * tensor;
    return LambRule<T, Maximize, BiasCorrection, WeightDecay, Small>{
        reinterpret_cast<T*>(slots[0]), reinterpret_cast<const T*>(slots[1]), reinterpret_cast<T*>(slots[2]),
        reinterpret_cast<T*>(slots[3]), one_minus_beta1, one_minus_beta1 - T(1), static_cast<T>(hp[2]),
        static_cast<T>(hp[3]), static_cast<T>(hp[4]), static_cast<T>(hp[5]),
        static_cast<T>(per_tensor[2 * tensor]), static_cast<T>(per_tensor[2 * tensor + 1])};
  };
  const double lr = hp[0];
#pragma omp parallel num_threads(threads) if (threads > 1 && n_items > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_items; ++k)
      first_pass<T>(rule_of(items[3 * k]), items[3 * k + 1], items[3 * k + 2], partials + 2 * k);
#pragma omp single
    {
      for (int64_t t = 0; t < n_tensors; ++t) norms[3 * t] = norms[3 * t + 1] = 0;
      for (int64_t k = 0; k < n_items; ++k) {
        norms[3 * items[3 * k]] += partials[2 * k];
        norms[3 * items[3 * k] + 1] += partials[2 * k + 1];
      }
      for (int64_t t = 0; t < n_tensors; ++t) {
        // The norms as torch returns them, in the tensor's dtype, then in double.
        const double weight = static_cast<T>(std::sqrt(norms[3 * t]));
        const double update = static_cast<T>(std::sqrt(norms[3 * t + 1]));
        norms[3 * t] = weight;
        norms[3 * t + 1] = update;
        norms[3 * t + 2] = weight > 0 && update > 0 ? weight / update : 1.0;
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_items; ++k) {
      const int64_t tensor = items[3 * k];
      second_pass<T>(rule_of(tensor), items[3 * k + 1], items[3 * k + 2], static_cast<T>(-lr * norms[3 * tensor + 2]));
    }
  }
}

template <typename T>
void lamb_dispatch(int64_t n_items, const int64_t* items, int64_t n_tensors, const int64_t* pointers,
                   const double* per_tensor, const double* hp, int64_t flags, double* partials, double* norms,
                   int64_t threads) {
  with_bool(flags & LAMB_MAXIMIZE, [&](auto mx) {
    with_bool(flags & LAMB_BIAS_CORRECTION, [&](auto bc) {
      with_bool(flags & LAMB_WEIGHT_DECAY, [&](auto wd) {
        with_bool(std::abs(static_cast<T>(hp[1])) < T(0.5), [&](auto sm) {
          lamb<T, decltype(mx)::value, decltype(bc)::value, decltype(wd)::value, decltype(sm)::value>(
              n_items, items, n_tensors, pointers, per_tensor, hp, partials, norms, threads);
        });
      });
    });
  });
}

}  // namespace

extern "C" {

// One LAMB step over the work items (tensor, start, length) of n_tensors tensors with
// pointers[4 t + s] (s = 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq). dtype: 0 float32,
// 1 float64. flags: 1 maximize, 2 bias correction, 4 weight decay. partials: 2 doubles
// per item (scratch); norms: 3 per tensor, written: ||theta||, ||u||, rho.
void ravine_lamb_step(int64_t dtype, int64_t n_items, const int64_t* items, int64_t n_tensors, const int64_t* pointers,
                      const double* per_tensor, const double* hp, int64_t flags, double* partials, double* norms,
                      int64_t threads) {
  if (dtype == 0)
    lamb_dispatch<float>(n_items, items, n_tensors, pointers, per_tensor, hp, flags, partials, norms, threads);
  else
    lamb_dispatch<double>(n_items, items, n_tensors, pointers, per_tensor, hp, flags, partials, norms, threads);
}

}  // extern "C"
