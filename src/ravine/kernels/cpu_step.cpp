// ravine's CPU optimizer steps: one pass over memory per step.
//
// Each family (SGD, Adagrad, RMSprop, Adam, Lion, ...) is one loop that reads a parameter's
// gradient and state once, does the whole update in registers and writes the
// parameter and state once. The work is a list of (tensor, start, length) items,
// spread over threads, so one big tensor and a thousand small ones balance alike.
//
// Every element goes through exactly the operations of torch.optim's for-loop path,
// in the same order and precision:
//   * torch's CPU kernels fuse `a + b * c` into one FMA (add with alpha, addcmul,
//     lerp); so does this file, with explicit fma() calls (it is compiled with
//     -ffp-contract=off so that nothing else is fused);
//   * torch takes square roots with MKL's vector math library (VML, high-accuracy
//     mode), which is not always correctly rounded. By default this file uses the
//     hardware square root (correctly rounded, so at most one unit in the last place
//     from VML's), which lets each update run as one vectorized loop; with
//     ravine_set_sqrt given VML's functions it calls them on chunks instead, and
//     every result is bit-equal to torch's for-loop path (about twice as slow).
// SGD takes no square root and is always bit-equal.
//
// The file has no dependency on torch's headers; ravine.kernels.cpu compiles it with
// the system C++ compiler and calls it through ctypes.

#include "common.h"

namespace {

using namespace ravine_kernels;

// Hyperparameters, in the order ravine.kernels.cpu passes them.
enum Family { SGD = 0, ADAGRAD = 1, RMSPROP = 2, ADAM = 3, ADAMAX = 4, NADAM = 5, RADAM = 6, LION = 7, SIGNUM = 8,
              SF_ADAMW = 9, SF_SGD = 10 };
enum Flags {
  MAXIMIZE = 1,
  NESTEROV = 2,       // SGD
  CENTERED = 4,       // RMSprop
  AMSGRAD = 8,        // Adam
  DECOUPLED = 16,     // Adam
  HAS_MOMENTUM = 32,  // SGD, RMSprop, Signum
  HAS_WEIGHT_DECAY = 64,
};

template <typename T>
inline T gradient(const T* grad, const T* param, int64_t i, int64_t flags, T weight_decay) {
  T g = grad[i];
  if (flags & MAXIMIZE) g = -g;
  if (flags & HAS_WEIGHT_DECAY) g = fused(param[i], weight_decay, g);
  return g;
}

// SGD. hp: lr, momentum, dampening, weight_decay. per-tensor: 1 if the momentum
// buffer was created by this step (it starts as a copy of the gradient).
template <typename T>
void sgd(T** slots, int64_t start, int64_t n, const double* hp, const double* per, int64_t flags) {
  T* param = slots[0] + start;
  const T* grad = slots[1] + start;
  const T neg_lr = static_cast<T>(-hp[0]);
  const T momentum = static_cast<T>(hp[1]);
  const T one_minus_dampening = static_cast<T>(1.0 - hp[2]);
  const T weight_decay = static_cast<T>(hp[3]);
  if (!(flags & HAS_MOMENTUM)) {
    for (int64_t i = 0; i < n; ++i) param[i] = fused(gradient(grad, param, i, flags, weight_decay), neg_lr, param[i]);
    return;
  }
  T* buffer = slots[2] + start;
  const bool fresh = per[0] != 0.0;
  const bool nesterov = flags & NESTEROV;
  for (int64_t i = 0; i < n; ++i) {
    T g = gradient(grad, param, i, flags, weight_decay);
    T b = fresh ? g : fused(g, one_minus_dampening, buffer[i] * momentum);
    buffer[i] = b;
    T d = nesterov ? fused(b, momentum, g) : b;
    param[i] = fused(d, neg_lr, param[i]);
  }
}

// Adagrad. hp: eps, weight_decay, sign (-1 to maximize). per-tensor:
// -lr / (1 + (step - 1) lr_decay).
template <typename T, bool WeightDecay>
struct AdagradRule {
  T* __restrict param;
  const T* __restrict grad;
  T* __restrict sum;
  T eps, weight_decay, sign, scale;
  inline T front(int64_t j, T& g) const {
    g = grad[j] * sign;
    if (WeightDecay) g = fused(param[j], weight_decay, g);
    T s = fused(g, g, sum[j]);
    sum[j] = s;
    return s;
  }
  inline void back(int64_t j, T root, T g) const { param[j] += scale * g / (root + eps); }
};

template <typename T>
void adagrad(T** slots, int64_t start, int64_t n, const double* hp, const double* per, int64_t flags) {
  with_bool(flags & HAS_WEIGHT_DECAY, [&](auto wd) {
    AdagradRule<T, decltype(wd)::value> rule{slots[0] + start, slots[1] + start, slots[2] + start,
                                             static_cast<T>(hp[0]), static_cast<T>(hp[1]),
                                             T((flags & MAXIMIZE) ? -1 : 1), static_cast<T>(per[0])};
    split_at_sqrt<T>(rule, n);
  });
}

// RMSprop. hp: lr, alpha, eps, weight_decay, momentum. Slots: param, grad,
// square_avg, [momentum_buffer], [grad_avg].
template <typename T, bool WeightDecay, bool Centered, bool Momentum, bool Small>
struct RMSpropRule {
  T* __restrict param;
  const T* __restrict grad;
  T* __restrict square_avg;
  T* __restrict buffer;
  T* __restrict grad_avg;
  T neg_lr, alpha, one_minus_alpha, one_minus_alpha_minus_one, eps, weight_decay, momentum, sign;
  bool small;
  inline T front(int64_t j, T& g) const {
    g = grad[j] * sign;
    if (WeightDecay) g = fused(param[j], weight_decay, g);
    T s = fused(one_minus_alpha * g, g, square_avg[j] * alpha);
    square_avg[j] = s;
    if (!Centered) return s;
    T a = lerp(grad_avg[j], g, one_minus_alpha, one_minus_alpha_minus_one, Small);
    grad_avg[j] = a;
    return fused(-a, a, s);
  }
  inline void back(int64_t j, T root, T g) const {
    if (Momentum) {
      T b = buffer[j] * momentum + g / (root + eps);
      buffer[j] = b;
      param[j] = fused(b, neg_lr, param[j]);
    } else {
      param[j] += neg_lr * g / (root + eps);
    }
  }
};

template <typename T>
void rmsprop(T** slots, int64_t start, int64_t n, const double* hp, const double*, int64_t flags) {
  const bool centered = flags & CENTERED, has_momentum = flags & HAS_MOMENTUM;
  int slot = 2;
  T* square_avg = slots[slot++] + start;
  T* buffer = has_momentum ? slots[slot++] + start : nullptr;
  T* grad_avg = centered ? slots[slot++] + start : nullptr;
  const T one_minus_alpha = static_cast<T>(1.0 - hp[1]);
  with_bool(flags & HAS_WEIGHT_DECAY, [&](auto wd) {
    with_bool(centered, [&](auto c) {
      with_bool(has_momentum, [&](auto mom) {
       // Only the centered rule uses lerp, so only it needs both weight forms.
       with_bool(centered && std::abs(one_minus_alpha) < T(0.5), [&](auto sm) {
        RMSpropRule<T, decltype(wd)::value, decltype(c)::value, decltype(mom)::value, decltype(sm)::value> rule{
            slots[0] + start, slots[1] + start, square_avg, buffer, grad_avg,
            static_cast<T>(-hp[0]), static_cast<T>(hp[1]), one_minus_alpha, one_minus_alpha - T(1),
            static_cast<T>(hp[2]), static_cast<T>(hp[3]), static_cast<T>(hp[4]),
            T((flags & MAXIMIZE) ? -1 : 1), std::abs(one_minus_alpha) < T(0.5)};
        split_at_sqrt<T>(rule, n);
       });
      });
    });
  });
}

// Adam / AdamW. hp: 1 - beta1, beta2, 1 - beta2, eps, weight_decay (L2), decay
// factor 1 - lr wd (decoupled). per-tensor: -lr / (1 - beta1^t), sqrt(1 - beta2^t).
// Slots: param, grad, exp_avg, exp_avg_sq, [max_exp_avg_sq].
template <typename T>
void adam(T** slots, int64_t start, int64_t n, const double* hp, const double* per, int64_t flags) {
  const bool weight_decay = flags & HAS_WEIGHT_DECAY;
  const bool decoupled = weight_decay && (flags & DECOUPLED);
  const T one_minus_beta1 = static_cast<T>(hp[0]);
  with_bool(weight_decay && !decoupled, [&](auto l2) {
    with_bool(decoupled, [&](auto dec) {
      with_bool(flags & AMSGRAD, [&](auto ams) {
       with_bool(std::abs(one_minus_beta1) < T(0.5), [&](auto sm) {
        AdamRule<T, decltype(l2)::value, decltype(dec)::value, decltype(ams)::value, decltype(sm)::value> rule{
            slots[0] + start, slots[1] + start, slots[2] + start, slots[3] + start,
            ams ? slots[4] + start : nullptr,
            one_minus_beta1, one_minus_beta1 - T(1), static_cast<T>(hp[1]), static_cast<T>(hp[2]),
            static_cast<T>(hp[3]), static_cast<T>(hp[4]), static_cast<T>(hp[5]),
            T((flags & MAXIMIZE) ? -1 : 1), static_cast<T>(per[0]), static_cast<T>(per[1])};
        split_at_sqrt<T>(rule, n);
       });
      });
    });
  });
}

// Adamax. hp: 1 - beta1, beta2, eps, weight_decay. per-tensor: -lr / (1 - beta1^t).
// Slots: param, grad, exp_avg, exp_inf. No square root: one loop.
template <typename T, bool WeightDecay, bool Small>
void adamax_loop(T** slots, int64_t start, int64_t n, const double* hp, const double* per, T sign) {
  T* __restrict param = slots[0] + start;
  const T* __restrict grad = slots[1] + start;
  T* __restrict exp_avg = slots[2] + start;
  T* __restrict exp_inf = slots[3] + start;
  const T one_minus_beta1 = static_cast<T>(hp[0]);
  const T one_minus_beta1_minus_one = one_minus_beta1 - T(1);
  const T beta2 = static_cast<T>(hp[1]);
  const T eps = static_cast<T>(hp[2]);
  const T weight_decay = static_cast<T>(hp[3]);
  const T neg_step_size = static_cast<T>(per[0]);
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    T g = grad[j] * sign;
    if (WeightDecay) g = fused(param[j], weight_decay, g);
    T m = lerp(exp_avg[j], g, one_minus_beta1, one_minus_beta1_minus_one, Small);
    exp_avg[j] = m;
    T u = maximum(exp_inf[j] * beta2, std::abs(g) + eps);
    exp_inf[j] = u;
    param[j] += neg_step_size * m / u;
  }
}

template <typename T>
void adamax(T** slots, int64_t start, int64_t n, const double* hp, const double* per, int64_t flags) {
  const T sign = T((flags & MAXIMIZE) ? -1 : 1);
  with_bool(flags & HAS_WEIGHT_DECAY, [&](auto wd) {
    with_bool(std::abs(static_cast<T>(hp[0])) < T(0.5), [&](auto sm) {
      adamax_loop<T, decltype(wd)::value, decltype(sm)::value>(slots, start, n, hp, per, sign);
    });
  });
}

// NAdam. hp: 1 - beta1, beta2, 1 - beta2, eps, weight_decay (L2), decay factor
// 1 - lr wd (decoupled). per-tensor: 1 - beta2^t, the gradient's and the momentum's
// scales. Slots: param, grad, exp_avg, exp_avg_sq.
template <typename T, bool L2, bool Decoupled, bool Small>
struct NAdamRule {
  T* __restrict param;
  const T* __restrict grad;
  T* __restrict exp_avg;
  T* __restrict exp_avg_sq;
  T one_minus_beta1, one_minus_beta1_minus_one, beta2, one_minus_beta2, eps, weight_decay, decay_factor, sign;
  T bias_correction2, gradient_scale, momentum_scale;
  inline T front(int64_t j, T& g) const {
    T p = param[j];
    if (Decoupled) {
      p = p * decay_factor;
      param[j] = p;
    }
    g = grad[j] * sign;
    if (L2) g = fused(p, weight_decay, g);
    exp_avg[j] = lerp(exp_avg[j], g, one_minus_beta1, one_minus_beta1_minus_one, Small);
    T v = fused(one_minus_beta2 * g, g, exp_avg_sq[j] * beta2);
    exp_avg_sq[j] = v;
    return v / bias_correction2;
  }
  inline void back(int64_t j, T root, T g) const {
    T denominator = root + eps;
    T p = param[j] + gradient_scale * g / denominator;
    param[j] = p + momentum_scale * exp_avg[j] / denominator;
  }
};

template <typename T>
void nadam(T** slots, int64_t start, int64_t n, const double* hp, const double* per, int64_t flags) {
  const bool weight_decay = flags & HAS_WEIGHT_DECAY;
  const bool decoupled = weight_decay && (flags & DECOUPLED);
  const T one_minus_beta1 = static_cast<T>(hp[0]);
  with_bool(weight_decay && !decoupled, [&](auto l2) {
    with_bool(decoupled, [&](auto dec) {
      with_bool(std::abs(one_minus_beta1) < T(0.5), [&](auto sm) {
        NAdamRule<T, decltype(l2)::value, decltype(dec)::value, decltype(sm)::value> rule{
            slots[0] + start, slots[1] + start, slots[2] + start, slots[3] + start,
            one_minus_beta1, one_minus_beta1 - T(1), static_cast<T>(hp[1]), static_cast<T>(hp[2]),
            static_cast<T>(hp[3]), static_cast<T>(hp[4]), static_cast<T>(hp[5]),
            T((flags & MAXIMIZE) ? -1 : 1), static_cast<T>(per[0]), static_cast<T>(per[1]),
            static_cast<T>(per[2])};
        split_at_sqrt<T>(rule, n);
      });
    });
  });
}

// RAdam. hp: 1 - beta1, beta2, 1 - beta2, eps, weight_decay (L2), decay factor
// 1 - lr wd (decoupled), lr. per-tensor: 1 - beta1^t, whether rho_t > 5 (1 or 0),
// sqrt(1 - beta2^t), r_t. Slots: param, grad, exp_avg, exp_avg_sq.
template <typename T, bool L2, bool Decoupled, bool Small, bool Rectified>
struct RAdamRule {
  T* __restrict param;
  const T* __restrict grad;
  T* __restrict exp_avg;
  T* __restrict exp_avg_sq;
  T one_minus_beta1, one_minus_beta1_minus_one, beta2, one_minus_beta2, eps, weight_decay, decay_factor, sign, lr;
  T bias_correction1, bias_correction2_root, rectification;
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
    return v;
  }
  inline void back(int64_t j, T root, T) const {
    T update = exp_avg[j] / bias_correction1 * lr;
    if (Rectified) {
      T adaptive = T(1) / (root + eps) * bias_correction2_root;
      update = update * adaptive * rectification;
    }
    param[j] = fused(update, T(-1), param[j]);
  }
};

template <typename T>
void radam(T** slots, int64_t start, int64_t n, const double* hp, const double* per, int64_t flags) {
  const bool weight_decay = flags & HAS_WEIGHT_DECAY;
  const bool decoupled = weight_decay && (flags & DECOUPLED);
  const T one_minus_beta1 = static_cast<T>(hp[0]);
  with_bool(weight_decay && !decoupled, [&](auto l2) {
    with_bool(decoupled, [&](auto dec) {
      with_bool(std::abs(one_minus_beta1) < T(0.5), [&](auto sm) {
        with_bool(per[1] != 0.0, [&](auto rect) {
          RAdamRule<T, decltype(l2)::value, decltype(dec)::value, decltype(sm)::value, decltype(rect)::value> rule{
              slots[0] + start, slots[1] + start, slots[2] + start, slots[3] + start,
              one_minus_beta1, one_minus_beta1 - T(1), static_cast<T>(hp[1]), static_cast<T>(hp[2]),
              static_cast<T>(hp[3]), static_cast<T>(hp[4]), static_cast<T>(hp[5]),
              T((flags & MAXIMIZE) ? -1 : 1), static_cast<T>(hp[6]),
              static_cast<T>(per[0]), static_cast<T>(per[2]), static_cast<T>(per[3])};
          split_at_sqrt<T>(rule, n);
        });
      });
    });
  });
}

// torch.sign: (0 < x) - (x < 0), so sign(NaN) = sign(-0) = +0.
template <typename T>
inline T sign_of(T x) {
  return T(x > T(0)) - T(x < T(0));
}

// Lion. hp: beta1, 1 - beta1, beta2, 1 - beta2, -lr, 1 - lr weight_decay. Slots: param,
// grad, exp_avg. No square root: one loop, bit-equal to Lion's plain path, which
// averages as b m + (1 - b) g (a multiply, then an add with alpha: one FMA), not as
// a lerp.
template <typename T, bool WeightDecay>
void lion_loop(T** slots, int64_t start, int64_t n, const double* hp, T sign) {
  T* __restrict param = slots[0] + start;
  const T* __restrict grad = slots[1] + start;
  T* __restrict exp_avg = slots[2] + start;
  const T beta1 = static_cast<T>(hp[0]), one_minus_beta1 = static_cast<T>(hp[1]);
  const T beta2 = static_cast<T>(hp[2]), one_minus_beta2 = static_cast<T>(hp[3]);
  const T neg_lr = static_cast<T>(hp[4]), decay = static_cast<T>(hp[5]);
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    const T g = grad[j] * sign;
    const T m = exp_avg[j];
    const T direction = sign_of(fused(g, one_minus_beta1, m * beta1)) * neg_lr;
    T p = param[j];
    if (WeightDecay) p = p * decay;
    param[j] = p + direction;
    exp_avg[j] = fused(g, one_minus_beta2, m * beta2);
  }
}

template <typename T>
void lion(T** slots, int64_t start, int64_t n, const double* hp, const double*, int64_t flags) {
  const T sign = T((flags & MAXIMIZE) ? -1 : 1);
  with_bool(flags & HAS_WEIGHT_DECAY, [&](auto wd) { lion_loop<T, decltype(wd)::value>(slots, start, n, hp, sign); });
}

// Signum (signSGD without momentum). hp: momentum, 1 - momentum, -lr,
// 1 - lr weight_decay. Slots: param, grad, [momentum_buffer]. As the plain path,
// signSGD negates the sign to maximize (not the gradient: -sign(0) is -0).
template <typename T, bool Momentum, bool WeightDecay, bool Maximize>
void signum_loop(T** slots, int64_t start, int64_t n, const double* hp) {
  T* __restrict param = slots[0] + start;
  const T* __restrict grad = slots[1] + start;
  T* __restrict buffer = Momentum ? slots[2] + start : nullptr;
  const T momentum = static_cast<T>(hp[0]), one_minus_momentum = static_cast<T>(hp[1]);
  const T neg_lr = static_cast<T>(hp[2]), decay = static_cast<T>(hp[3]);
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    T s;
    if (Momentum) {
      const T g = Maximize ? -grad[j] : grad[j];
      const T m = fused(g, one_minus_momentum, buffer[j] * momentum);
      buffer[j] = m;
      s = sign_of(m);
    } else {
      s = sign_of(grad[j]);
      if (Maximize) s = -s;
    }
    T p = param[j];
    if (WeightDecay) p = p * decay;
    param[j] = p + s * neg_lr;
  }
}

template <typename T>
void signum(T** slots, int64_t start, int64_t n, const double* hp, const double*, int64_t flags) {
  with_bool(flags & HAS_MOMENTUM, [&](auto mo) {
    with_bool(flags & HAS_WEIGHT_DECAY, [&](auto wd) {
      with_bool(flags & MAXIMIZE, [&](auto mx) {
        signum_loop<T, decltype(mo)::value, decltype(wd)::value, decltype(mx)::value>(slots, start, n, hp);
      });
    });
  });
}

// Schedule-free AdamW and SGD (Defazio et al., 2024), bit-equal to the schedulefree
// package's step and to ravine's plain path. The parameter holds y; with the
// direction d and the averaging weight c of the step:
//   [d <- d + wd y]           (add with alpha: one FMA, decay taken at the old y)
//   y <- lerp(y, z, c)
//   y <- y + lr (beta (1 - c) - 1) d   (add with alpha: one FMA)
//   z <- z - lr d                      (sub with alpha: one FMA)
// hp: weight_decay, c, lr (beta (1 - c) - 1), -lr, then for AdamW beta2, 1 - beta2,
// 1 - beta2^k, eps. Slots: param, grad, z, [exp_avg_sq].
template <typename T, bool WeightDecay, bool Small>
struct ScheduleFreeMove {
  static constexpr bool kWeightDecay = WeightDecay, kSmall = Small;
  T* __restrict param;
  T* __restrict z;
  T weight_decay, averaging, averaging_minus_one, y_scale, neg_lr;
  inline void operator()(int64_t j, T d) const {
    const T y = param[j], zj = z[j];
    if (WeightDecay) d = fused(y, weight_decay, d);
    param[j] = fused(d, y_scale, lerp(y, zj, averaging, averaging_minus_one, Small));
    z[j] = fused(d, neg_lr, zj);
  }
};

// AdamW's direction: v <- beta2 v + (1 - beta2) g^2 (a multiply, then addcmul: one
// FMA), d = g / (sqrt(v / (1 - beta2^k)) + eps).
template <typename T, bool WeightDecay, bool Small>
struct ScheduleFreeAdamWRule {
  ScheduleFreeMove<T, WeightDecay, Small> move;
  const T* __restrict grad;
  T* __restrict exp_avg_sq;
  T beta2, one_minus_beta2, bias_correction2, eps;
  inline T front(int64_t j, T& g) const {
    g = grad[j];
    const T v = fused(one_minus_beta2 * g, g, exp_avg_sq[j] * beta2);
    exp_avg_sq[j] = v;
    return v / bias_correction2;
  }
  inline void back(int64_t j, T root, T g) const { move(j, g / (root + eps)); }
};

template <typename T, typename F>
inline void with_schedule_free_move(T** slots, int64_t start, const double* hp, int64_t flags, F&& f) {
  const T averaging = static_cast<T>(hp[1]);
  with_bool(flags & HAS_WEIGHT_DECAY, [&](auto wd) {
    with_bool(std::abs(averaging) < T(0.5), [&](auto sm) {
      f(ScheduleFreeMove<T, decltype(wd)::value, decltype(sm)::value>{
          slots[0] + start, slots[2] + start, static_cast<T>(hp[0]), averaging, averaging - T(1),
          static_cast<T>(hp[2]), static_cast<T>(hp[3])});
    });
  });
}

template <typename T>
void schedule_free_adamw(T** slots, int64_t start, int64_t n, const double* hp, const double*, int64_t flags) {
  with_schedule_free_move<T>(slots, start, hp, flags, [&](auto move) {
    using Move = decltype(move);
    ScheduleFreeAdamWRule<T, Move::kWeightDecay, Move::kSmall> rule{
        move, slots[1] + start, slots[3] + start, static_cast<T>(hp[4]), static_cast<T>(hp[5]),
        static_cast<T>(hp[6]), static_cast<T>(hp[7])};
    split_at_sqrt<T>(rule, n);
  });
}

template <typename T>
void schedule_free_sgd(T** slots, int64_t start, int64_t n, const double* hp, const double*, int64_t flags) {
  with_schedule_free_move<T>(slots, start, hp, flags, [&](auto move) {
    const T* __restrict grad = slots[1] + start;
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) move(j, grad[j]);
  });
}

template <typename T>
void run(int64_t family, int64_t n_items, const int64_t* items, const int64_t* pointers, int64_t n_slots,
         const double* per_tensor, int64_t n_per, const double* hp, int64_t flags, int64_t threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && n_items > 1)
  for (int64_t k = 0; k < n_items; ++k) {
    const int64_t tensor = items[3 * k], start = items[3 * k + 1], length = items[3 * k + 2];
    T* slots[8];
    for (int64_t s = 0; s < n_slots && s < 8; ++s) slots[s] = reinterpret_cast<T*>(pointers[tensor * n_slots + s]);
    const double* per = per_tensor + tensor * n_per;
    switch (family) {
      case SGD: sgd<T>(slots, start, length, hp, per, flags); break;
      case ADAGRAD: adagrad<T>(slots, start, length, hp, per, flags); break;
      case RMSPROP: rmsprop<T>(slots, start, length, hp, per, flags); break;
      case ADAM: adam<T>(slots, start, length, hp, per, flags); break;
      case ADAMAX: adamax<T>(slots, start, length, hp, per, flags); break;
      case NADAM: nadam<T>(slots, start, length, hp, per, flags); break;
      case RADAM: radam<T>(slots, start, length, hp, per, flags); break;
      case LION: lion<T>(slots, start, length, hp, per, flags); break;
      case SIGNUM: signum<T>(slots, start, length, hp, per, flags); break;
      case SF_ADAMW: schedule_free_adamw<T>(slots, start, length, hp, per, flags); break;
      case SF_SGD: schedule_free_sgd<T>(slots, start, length, hp, per, flags); break;
    }
  }
}

}  // namespace

extern "C" {

// The square root functions torch uses (MKL VML's vmsSqrt/vmdSqrt, Fortran
// interface), or null for std::sqrt.
void ravine_set_sqrt(void* f32, void* f64) {
  g_sqrt_f32 = reinterpret_cast<vml_sqrt_f32>(f32);
  g_sqrt_f64 = reinterpret_cast<vml_sqrt_f64>(f64);
}

// One step of `family` over the work items (tensor index, start, length) of tensors
// whose pointers are pointers[t * n_slots + s] (s = 0 param, 1 grad, 2... state).
// dtype: 0 float32, 1 float64.
void ravine_step(int64_t family, int64_t dtype, int64_t n_items, const int64_t* items, const int64_t* pointers,
                 int64_t n_slots, const double* per_tensor, int64_t n_per, const double* hp, int64_t flags,
                 int64_t threads) {
  if (dtype == 0)
    run<float>(family, n_items, items, pointers, n_slots, per_tensor, n_per, hp, flags, threads);
  else
    run<double>(family, n_items, items, pointers, n_slots, per_tensor, n_per, hp, flags, threads);
}

int64_t ravine_abi_version() { return 1; }

}  // extern "C"
