// ravine's CPU optimizer steps: one pass over memory per step.
//
// Each family (SGD, Adagrad, RMSprop, Adam) is one loop that reads a parameter's
// gradient and state once, does the whole update in registers and writes the
// parameter and state once. The work is a list of (tensor, start, length) items,
// spread over threads, so one big tensor and a thousand small ones balance alike.
//
// Every element goes through exactly the operations of torch.optim's for-loop path,
// in the same order and precision, so results are bit-equal to it:
//   * torch's CPU kernels fuse `a + b * c` into one FMA (add with alpha, addcmul,
//     lerp); so does this file, with explicit fma() calls (it is compiled with
//     -ffp-contract=off so that nothing else is fused);
//   * torch takes square roots with MKL's vector math library (VML, high-accuracy
//     mode), which is not always correctly rounded; the same function is called
//     here, through a pointer set by ravine_set_sqrt (std::sqrt when MKL is absent).
//
// The file has no dependency on torch's headers; ravine.kernels.cpu compiles it with
// the system C++ compiler and calls it through ctypes.

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <omp.h>

namespace {

typedef void (*vml_sqrt_f32)(const int32_t*, const float*, float*, const int64_t*);
typedef void (*vml_sqrt_f64)(const int32_t*, const double*, double*, const int64_t*);

vml_sqrt_f32 g_sqrt_f32 = nullptr;
vml_sqrt_f64 g_sqrt_f64 = nullptr;
// VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, as ATen/cpu/vml.h passes them.
const int64_t kVmlMode = 0x2 | 0x00140000 | 0x100;

const int64_t kChunk = 1024;  // elements per inner pass; its buffers stay in L1

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
// end - (1 - w)(end - self), each as one FMA.
template <typename T>
inline T lerp(T self, T end, T weight) {
  T diff = end - self;
  return std::abs(weight) < T(0.5) ? fused(weight, diff, self) : fused(weight - T(1), diff, end);
}

template <typename T>
inline T maximum(T a, T b) {
  // NaN propagates, as in torch.maximum.
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// Hyperparameters, in the order ravine.kernels.cpu passes them.
enum Family { SGD = 0, ADAGRAD = 1, RMSPROP = 2, ADAM = 3 };
enum Flags {
  MAXIMIZE = 1,
  NESTEROV = 2,       // SGD
  CENTERED = 4,       // RMSprop
  AMSGRAD = 8,        // Adam
  DECOUPLED = 16,     // Adam
  HAS_MOMENTUM = 32,  // SGD, RMSprop
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

// Adagrad. hp: eps, weight_decay. per-tensor: -lr / (1 + (step - 1) lr_decay).
template <typename T>
void adagrad(T** slots, int64_t start, int64_t n, const double* hp, const double* per, int64_t flags) {
  T* param = slots[0] + start;
  const T* grad = slots[1] + start;
  T* sum = slots[2] + start;
  const T eps = static_cast<T>(hp[0]);
  const T weight_decay = static_cast<T>(hp[1]);
  const T scale = static_cast<T>(per[0]);
  T g_chunk[kChunk], root[kChunk];
  for (int64_t base = 0; base < n; base += kChunk) {
    const int64_t m = std::min(kChunk, n - base);
    for (int64_t i = 0; i < m; ++i) {
      T g = gradient(grad + base, param + base, i, flags, weight_decay);
      g_chunk[i] = g;
      sum[base + i] = fused(g, g, sum[base + i]);
    }
    vector_sqrt(sum + base, root, m);
    for (int64_t i = 0; i < m; ++i) param[base + i] += scale * g_chunk[i] / (root[i] + eps);
  }
}

// RMSprop. hp: lr, alpha, eps, weight_decay, momentum. Slots: param, grad,
// square_avg, [momentum_buffer], [grad_avg].
template <typename T>
void rmsprop(T** slots, int64_t start, int64_t n, const double* hp, const double*, int64_t flags) {
  T* param = slots[0] + start;
  const T* grad = slots[1] + start;
  int slot = 2;
  T* square_avg = slots[slot++] + start;
  T* buffer = (flags & HAS_MOMENTUM) ? slots[slot++] + start : nullptr;
  T* grad_avg = (flags & CENTERED) ? slots[slot++] + start : nullptr;
  const T neg_lr = static_cast<T>(-hp[0]);
  const T alpha = static_cast<T>(hp[1]);
  const T one_minus_alpha = static_cast<T>(1.0 - hp[1]);
  const T eps = static_cast<T>(hp[2]);
  const T weight_decay = static_cast<T>(hp[3]);
  const T momentum = static_cast<T>(hp[4]);
  T g_chunk[kChunk], variance[kChunk], root[kChunk];
  for (int64_t base = 0; base < n; base += kChunk) {
    const int64_t m = std::min(kChunk, n - base);
    for (int64_t i = 0; i < m; ++i) {
      T g = gradient(grad + base, param + base, i, flags, weight_decay);
      g_chunk[i] = g;
      T s = fused(one_minus_alpha * g, g, square_avg[base + i] * alpha);
      square_avg[base + i] = s;
      if (flags & CENTERED) {
        T a = lerp(grad_avg[base + i], g, one_minus_alpha);
        grad_avg[base + i] = a;
        variance[i] = fused(-a, a, s);
      } else {
        variance[i] = s;
      }
    }
    vector_sqrt(variance, root, m);
    if (flags & HAS_MOMENTUM) {
      for (int64_t i = 0; i < m; ++i) {
        T b = buffer[base + i] * momentum + g_chunk[i] / (root[i] + eps);
        buffer[base + i] = b;
        param[base + i] = fused(b, neg_lr, param[base + i]);
      }
    } else {
      for (int64_t i = 0; i < m; ++i) param[base + i] += neg_lr * g_chunk[i] / (root[i] + eps);
    }
  }
}

// Adam / AdamW. hp: 1 - beta1, beta2, 1 - beta2, eps, weight_decay (L2), decay
// factor 1 - lr wd (decoupled). per-tensor: -lr / (1 - beta1^t), sqrt(1 - beta2^t).
// Slots: param, grad, exp_avg, exp_avg_sq, [max_exp_avg_sq].
template <typename T>
void adam(T** slots, int64_t start, int64_t n, const double* hp, const double* per, int64_t flags) {
  T* param = slots[0] + start;
  const T* grad = slots[1] + start;
  T* exp_avg = slots[2] + start;
  T* exp_avg_sq = slots[3] + start;
  T* max_exp_avg_sq = (flags & AMSGRAD) ? slots[4] + start : nullptr;
  const T one_minus_beta1 = static_cast<T>(hp[0]);
  const T beta2 = static_cast<T>(hp[1]);
  const T one_minus_beta2 = static_cast<T>(hp[2]);
  const T eps = static_cast<T>(hp[3]);
  const T weight_decay = static_cast<T>(hp[4]);
  const T decay_factor = static_cast<T>(hp[5]);
  const T neg_step_size = static_cast<T>(per[0]);
  const T bias_correction2_root = static_cast<T>(per[1]);
  const bool decoupled = (flags & DECOUPLED) && (flags & HAS_WEIGHT_DECAY);
  const int64_t l2_flags = decoupled ? (flags & ~HAS_WEIGHT_DECAY) : flags;
  T second[kChunk], root[kChunk];
  for (int64_t base = 0; base < n; base += kChunk) {
    const int64_t m = std::min(kChunk, n - base);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t j = base + i;
      if (decoupled) param[j] = param[j] * decay_factor;
      T g = gradient(grad, param, j, l2_flags, weight_decay);
      exp_avg[j] = lerp(exp_avg[j], g, one_minus_beta1);
      T v = fused(one_minus_beta2 * g, g, exp_avg_sq[j] * beta2);
      exp_avg_sq[j] = v;
      if (flags & AMSGRAD) {
        v = maximum(max_exp_avg_sq[j], v);
        max_exp_avg_sq[j] = v;
      }
      second[i] = v;
    }
    vector_sqrt(second, root, m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t j = base + i;
      param[j] += neg_step_size * exp_avg[j] / (root[i] / bias_correction2_root + eps);
    }
  }
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
