// Adafactor's compiled CPU step (ravine.optim.Adafactor, torch.optim.Adafactor's rule).
//
// For an n x m matrix (or each matrix of a batch, the last two dimensions of a
// tensor with more) with row factor R (n) and column factor C (m):
//
//   alpha = max(eps2, RMS(param)) * min(lr, 1/sqrt(t))      (param before weight decay)
//   R = lerp(R, rowmean(G^2), w),  C = lerp(C, colmean(G^2), w),  w = t^beta2_decay
//   U = G / sqrt(max(R_i C_j / max(mean(R), eps1), eps1^2))
//   param = param * (1 - lr wd) - alpha / max(1, RMS(U) / d) * U
//
// and for a vector V = lerp(V, G^2, w) replaces the rank-one estimate R_i C_j / ...
//
// A tensor takes three passes: (1) param and grad are read for the sum of squares of
// param and the row and column sums of G^2, (2) U is computed for its sum of squares
// (the clipping RMS), (3) param is written. A matrix (or batch of matrices) of at most
// 131,072 elements that one thread takes whole keeps U from pass 2 in a per-thread
// buffer for pass 3; larger ones and vectors compute U again in pass 3.
// A tensor goes whole to one thread when there are enough tensors to keep every
// thread busy (its three passes then run in that core's cache when it fits); a
// tensor too large for that is cut into row ranges shared by every thread (column
// sums then go through per-thread partial sums). Sums are accumulated
// in double; the element-wise operations round as torch's do (lerp as in common.h,
// the estimate as a rounded product, a rounded quotient and torch.maximum, 1/sqrt
// as two rounded operations, the final add as one FMA), with the hardware square
// root. The sums are added in another order than torch's, so the step is equal to
// torch.optim.Adafactor's within rounding, not bit-equal.

#include <vector>

#include "common.h"

namespace {

using namespace ravine_kernels;

// Columns of the tensor table, in the order ravine.optim.adafactor writes them.
enum Column { PARAM = 0, GRAD, ROW_VAR, COL_VAR, BATCH, ROWS, COLS, N_COLUMNS };
// Per-tensor scalars: w = 1 - beta2_t, rho = min(lr, 1/sqrt(t)), and 1 when rho is
// a float32 tensor learning rate (torch then forms alpha and alpha / clip in float32).
enum PerTensor { WEIGHT = 0, RELATIVE_STEP, FLOAT32_STEP, N_PER };
// Hyperparameters: eps1, eps2, d, 1 - lr weight_decay.
enum Hyper { EPS1 = 0, EPS2, CLIP_D, DECAY };
enum Flags { MAXIMIZE = 1, HAS_WEIGHT_DECAY = 2 };

// Rows of a shared tensor are cut into ranges of about this many elements.
constexpr int64_t kUnitElements = 1 << 15;
// A tensor is shared by every thread when it has at least this many elements and
// more than 1/(2 threads) of the call's: fewer, larger tensors would leave threads
// idle. The others go whole to one thread each, largest first, with no barrier.
constexpr int64_t kSharedElements = 1 << 16;
// A matrix (or batch) of at most this many elements taken whole by one thread keeps
// U from pass 2 in a buffer (512 KiB of float32) instead of computing it again.
constexpr int64_t kKeptElements = 1 << 17;

template <typename T>
struct Tensor {
  T* param;
  const T* grad;
  T* row_var;  // or the variance of a vector
  T* col_var;  // null for a vector
  int64_t batch, rows, cols;
  double weight, relative_step;
  bool float32_step;

  Tensor(const int64_t* row, const double* per) {
    param = reinterpret_cast<T*>(row[PARAM]);
    grad = reinterpret_cast<const T*>(row[GRAD]);
    row_var = reinterpret_cast<T*>(row[ROW_VAR]);
    col_var = reinterpret_cast<T*>(row[COL_VAR]);
    batch = row[BATCH];
    rows = row[ROWS];
    cols = row[COLS];
    weight = per[WEIGHT];
    relative_step = per[RELATIVE_STEP];
    float32_step = per[FLOAT32_STEP] != 0.0;
  }
  bool factored() const { return col_var != nullptr; }
  int64_t numel() const { return batch * rows * cols; }
};

// torch's lerp_(end, w) with a scalar weight.
template <typename T>
inline T lerp_scalar(T self, T end, double weight) {
  const T w = static_cast<T>(weight);
  return lerp(self, end, w, static_cast<T>(w - T(1)), std::abs(w) < T(0.5));
}

// The mean of squares torch forms from a norm: norm(x)^2 / count, in T.
template <typename T>
inline T mean_of_squares(double sum, int64_t count) {
  const T norm = static_cast<T>(std::sqrt(sum));
  return (norm * norm) / static_cast<T>(count);
}

template <typename T, bool Maximize, bool WeightDecay>
struct Rule {
  T eps1, eps1_squared;
  double eps2, d;
  T decay;

  explicit Rule(const double* hp)
      : eps1(static_cast<T>(hp[EPS1])),
        eps1_squared(static_cast<T>(hp[EPS1] * hp[EPS1])),
        eps2(hp[EPS2]),
        d(hp[CLIP_D]),
        decay(static_cast<T>(hp[DECAY])) {}

  static T load(const T* grad, int64_t j) { return Maximize ? -grad[j] : grad[j]; }

  // alpha / clip, negated and rounded to T as add_(update, alpha=...) does.
  T scale(const Tensor<T>& t, double param_squares, double update_squares) const {
    const double root_numel = std::sqrt(static_cast<double>(t.numel()));
    const double rms = std::max(eps2, std::sqrt(param_squares) / root_numel);
    const double clip = std::max(1.0, std::sqrt(update_squares) / (root_numel * d));
    if (t.float32_step) {  // tensor arithmetic in float32, as torch's with a float32 lr
      const float alpha = static_cast<float>(rms) * static_cast<float>(t.relative_step);
      return static_cast<T>(-alpha / static_cast<float>(clip));
    }
    return static_cast<T>(-(rms * t.relative_step) / clip);
  }

  // -- factored tensors -------------------------------------------------------

  // Pass 1 over rows [r0, r1) of matrix b: returns the sum of squares of param,
  // lerps the rows' factors and adds the column sums of G^2 into col_sums (m).
  double rows_pass(const Tensor<T>& t, int64_t b, int64_t r0, int64_t r1, double* __restrict col_sums) const {
    const int64_t m = t.cols;
    double param_squares = 0.0;
    for (int64_t i = r0; i < r1; ++i) {
      const T* __restrict p = t.param + (b * t.rows + i) * m;
      const T* __restrict g = t.grad + (b * t.rows + i) * m;
      double row_sum = 0.0, squares = 0.0;
#pragma omp simd reduction(+ : row_sum, squares)
      for (int64_t j = 0; j < m; ++j) {
        const double x = p[j], y = g[j];
        squares += x * x;
        row_sum += y * y;
        col_sums[j] += y * y;
      }
      param_squares += squares;
      T& r = t.row_var[b * t.rows + i];
      r = lerp_scalar(r, mean_of_squares<T>(row_sum, m), t.weight);
    }
    return param_squares;
  }

  // Lerps the column factors [j0, j1) of matrix b from their sums of G^2.
  void finish_cols(const Tensor<T>& t, int64_t b, int64_t j0, int64_t j1, const double* col_sums) const {
    for (int64_t j = j0; j < j1; ++j) {
      T& c = t.col_var[b * t.cols + j];
      c = lerp_scalar(c, mean_of_squares<T>(col_sums[j - j0], t.rows), t.weight);
    }
  }

  // max(mean(R), eps1) of matrix b.
  T row_mean(const Tensor<T>& t, int64_t b) const {
    const T* r = t.row_var + b * t.rows;
    double sum = 0.0;
    for (int64_t i = 0; i < t.rows; ++i) sum += r[i];
    return maximum(static_cast<T>(sum / static_cast<double>(t.rows)), eps1);
  }

  // U_ij = G_ij / sqrt(max(R_i C_j / M, eps1^2)), torch's operations in order.
  T factored_update(T r, T c, T mean, T g) const {
    const T estimate = maximum((r * c) / mean, eps1_squared);
    return (T(1) / std::sqrt(estimate)) * g;
  }

  // Pass 2: the sum of squares of U over rows [r0, r1) of matrix b; with Keep, U
  // is also written to kept (row-major from row r0) for pass 3 to read back.
  template <bool Keep = false>
  double update_squares(const Tensor<T>& t, int64_t b, int64_t r0, int64_t r1, T mean,
                        T* __restrict kept = nullptr) const {
    const int64_t m = t.cols;
    const T* __restrict c = t.col_var + b * m;
    double total = 0.0;
    for (int64_t i = r0; i < r1; ++i) {
      const T* __restrict g = t.grad + (b * t.rows + i) * m;
      const T r = t.row_var[b * t.rows + i];
      T* __restrict out = Keep ? kept + (i - r0) * m : nullptr;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < m; ++j) {
        const T u = factored_update(r, c[j], mean, load(g, j));
        if (Keep) out[j] = u;
        const double x = u;
        sum += x * x;
      }
      total += sum;
    }
    return total;
  }

  // Pass 3 from the U that pass 2 kept: param = param * decay + scale * U.
  void write_kept(T* __restrict p, const T* __restrict kept, int64_t n, T scale) const {
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) {
      const T x = WeightDecay ? p[j] * decay : p[j];
      p[j] = fused(scale, kept[j], x);
    }
  }

  // Pass 3: param = param * decay + scale * U over rows [r0, r1) of matrix b.
  void write_rows(const Tensor<T>& t, int64_t b, int64_t r0, int64_t r1, T mean, T scale) const {
    const int64_t m = t.cols;
    const T* __restrict c = t.col_var + b * m;
    for (int64_t i = r0; i < r1; ++i) {
      T* __restrict p = t.param + (b * t.rows + i) * m;
      const T* __restrict g = t.grad + (b * t.rows + i) * m;
      const T r = t.row_var[b * t.rows + i];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) {
        const T u = factored_update(r, c[j], mean, load(g, j));
        const T x = WeightDecay ? p[j] * decay : p[j];
        p[j] = fused(scale, u, x);
      }
    }
  }

  // -- vectors ----------------------------------------------------------------

  template <bool Small>
  double vector_first(const Tensor<T>& t, int64_t s, int64_t e) const {
    const T* __restrict p = t.param;
    const T* __restrict g = t.grad;
    T* __restrict v = t.row_var;
    const T w = static_cast<T>(t.weight), w1 = static_cast<T>(w - T(1));
    double squares = 0.0;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = s; j < e; ++j) {
      const double x = p[j];
      squares += x * x;
      const T y = load(g, j);
      v[j] = lerp(v[j], y * y, w, w1, Small);
    }
    return squares;
  }

  // Pass 1 over elements [s, e): the sum of squares of param; V = lerp(V, G^2, w).
  double vector_pass(const Tensor<T>& t, int64_t s, int64_t e) const {
    return std::abs(static_cast<T>(t.weight)) < T(0.5) ? vector_first<true>(t, s, e) : vector_first<false>(t, s, e);
  }

  T vector_update(T v, T g) const { return (T(1) / std::sqrt(maximum(v, eps1_squared))) * g; }

  double vector_squares(const Tensor<T>& t, int64_t s, int64_t e) const {
    const T* __restrict g = t.grad;
    const T* __restrict v = t.row_var;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = s; j < e; ++j) {
      const double u = vector_update(v[j], load(g, j));
      sum += u * u;
    }
    return sum;
  }

  void vector_write(const Tensor<T>& t, int64_t s, int64_t e, T scale) const {
    T* __restrict p = t.param;
    const T* __restrict g = t.grad;
    const T* __restrict v = t.row_var;
#pragma GCC ivdep
    for (int64_t j = s; j < e; ++j) {
      const T u = vector_update(v[j], load(g, j));
      const T x = WeightDecay ? p[j] * decay : p[j];
      p[j] = fused(scale, u, x);
    }
  }

  // -- one tensor on one thread ------------------------------------------------

  void whole(const Tensor<T>& t, std::vector<double>& col_sums, std::vector<T>& means, std::vector<T>& kept) const {
    if (!t.factored()) {
      const int64_t n = t.numel();
      const double param_squares = vector_pass(t, 0, n);
      const double squares = vector_squares(t, 0, n);
      vector_write(t, 0, n, scale(t, param_squares, squares));
      return;
    }
    col_sums.resize(t.cols);
    means.resize(t.batch);
    double param_squares = 0.0;
    for (int64_t b = 0; b < t.batch; ++b) {
      std::fill(col_sums.begin(), col_sums.end(), 0.0);
      param_squares += rows_pass(t, b, 0, t.rows, col_sums.data());
      finish_cols(t, b, 0, t.cols, col_sums.data());
      means[b] = row_mean(t, b);
    }
    double squares = 0.0;
    const int64_t n = t.numel(), matrix = t.rows * t.cols;
    if (n <= kKeptElements) {  // U fits in cache: keep it for pass 3
      kept.resize(n);
      for (int64_t b = 0; b < t.batch; ++b)
        squares += update_squares<true>(t, b, 0, t.rows, means[b], kept.data() + b * matrix);
      write_kept(t.param, kept.data(), n, scale(t, param_squares, squares));
      return;
    }
    for (int64_t b = 0; b < t.batch; ++b) squares += update_squares(t, b, 0, t.rows, means[b]);
    const T s = scale(t, param_squares, squares);
    for (int64_t b = 0; b < t.batch; ++b) write_rows(t, b, 0, t.rows, means[b], s);
  }

  // -- one tensor shared by every thread (called by all threads of a team) -----

  // Work units: (matrix, first row, end row), or element ranges of a vector.
  static std::vector<int64_t> units(const Tensor<T>& t) {
    std::vector<int64_t> out;
    if (!t.factored()) {
      const int64_t n = t.numel();
      for (int64_t s = 0; s < n; s += kUnitElements) out.insert(out.end(), {0, s, std::min(n, s + kUnitElements)});
      return out;
    }
    const int64_t step = std::max<int64_t>(1, kUnitElements / t.cols);
    for (int64_t b = 0; b < t.batch; ++b)
      for (int64_t r = 0; r < t.rows; r += step) out.insert(out.end(), {b, r, std::min(t.rows, r + step)});
    return out;
  }

  // Scratch of a shared tensor: units, per-thread partial sums (param's and U's
  // squares, and the column sums of every matrix), the row means.
  struct Shared {
    std::vector<int64_t> units;
    std::vector<double> partial_cols, param_squares, update_squares;
    std::vector<T> means;
  };

  void shared(const Tensor<T>& t, Shared& work, int threads) const {
    const int thread = omp_get_thread_num();
    const int64_t n_units = static_cast<int64_t>(work.units.size() / 3);
    const int64_t* units = work.units.data();
    const int64_t matrix_cols = t.factored() ? t.batch * t.cols : 0;
    double sum = 0.0;
    double* cols = matrix_cols ? work.partial_cols.data() + thread * matrix_cols : nullptr;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n_units; ++k) {
      const int64_t b = units[3 * k], s = units[3 * k + 1], e = units[3 * k + 2];
      sum += t.factored() ? rows_pass(t, b, s, e, cols + b * t.cols) : vector_pass(t, s, e);
    }
    work.param_squares[thread] = sum;
    if (t.factored()) {
      // Add the threads' column sums (in thread order) and lerp the column factors.
#pragma omp for schedule(static)
      for (int64_t k = 0; k < matrix_cols; ++k) {
        double total = 0.0;
        for (int other = 0; other < threads; ++other) total += work.partial_cols[other * matrix_cols + k];
        finish_cols(t, k / t.cols, k % t.cols, k % t.cols + 1, &total);
      }
#pragma omp for schedule(static)
      for (int64_t b = 0; b < t.batch; ++b) work.means[b] = row_mean(t, b);
    }
    sum = 0.0;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n_units; ++k) {
      const int64_t b = units[3 * k], s = units[3 * k + 1], e = units[3 * k + 2];
      sum += t.factored() ? update_squares(t, b, s, e, work.means[b]) : vector_squares(t, s, e);
    }
    work.update_squares[thread] = sum;
#pragma omp barrier
    double param_squares = 0.0, update_squares_total = 0.0;
    for (int other = 0; other < threads; ++other) {
      param_squares += work.param_squares[other];
      update_squares_total += work.update_squares[other];
    }
    const T s = scale(t, param_squares, update_squares_total);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n_units; ++k) {
      const int64_t b = units[3 * k], first = units[3 * k + 1], end = units[3 * k + 2];
      if (t.factored())
        write_rows(t, b, first, end, work.means[b], s);
      else
        vector_write(t, first, end, s);
    }
  }

  void run(int64_t n, const int64_t* table, const double* per, int threads) const {
    std::vector<Tensor<T>> tensors;
    std::vector<int64_t> alone;
    std::vector<Shared> shared_work;
    std::vector<int64_t> shared_index;
    tensors.reserve(n);
    int64_t total = 0;
    for (int64_t k = 0; k < n; ++k) {
      tensors.emplace_back(table + k * N_COLUMNS, per + k * N_PER);
      total += tensors.back().numel();
    }
    for (int64_t k = 0; k < n; ++k) {
      const Tensor<T>& t = tensors[k];
      const int64_t numel = t.numel();
      if (threads > 1 && numel >= kSharedElements && numel * 2 * threads > total) {
        Shared work;
        work.units = units(t);
        if (t.factored()) {
          work.partial_cols.assign(static_cast<size_t>(threads) * t.batch * t.cols, 0.0);
          work.means.resize(t.batch);
        }
        work.param_squares.assign(threads, 0.0);
        work.update_squares.assign(threads, 0.0);
        shared_work.push_back(std::move(work));
        shared_index.push_back(k);
      } else {
        alone.push_back(k);
      }
    }
    // Largest first, so that the last tensors handed out are the small ones.
    std::stable_sort(alone.begin(), alone.end(),
                     [&](int64_t a, int64_t b) { return tensors[a].numel() > tensors[b].numel(); });
    const int64_t n_alone = static_cast<int64_t>(alone.size());
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      // Large tensors first, every thread on each; then the others, one thread each.
      for (size_t k = 0; k < shared_index.size(); ++k) shared(tensors[shared_index[k]], shared_work[k], threads);
      std::vector<double> col_sums;
      std::vector<T> means, kept;
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < n_alone; ++k) whole(tensors[alone[k]], col_sums, means, kept);
    }
  }
};

template <typename T>
void run(int64_t n, const int64_t* table, const double* per, const double* hp, int64_t flags, int threads) {
  with_bool(flags & MAXIMIZE, [&](auto maximize) {
    with_bool(flags & HAS_WEIGHT_DECAY, [&](auto decay) {
      Rule<T, decltype(maximize)::value, decltype(decay)::value>(hp).run(n, table, per, threads);
    });
  });
}

}  // namespace

extern "C" {

// One Adafactor step over n tensors of one dtype (0 float32, 1 float64). table:
// n rows of (param, grad, row_var or variance, col_var or 0, batch, rows, cols)
// as int64; per_tensor: n rows of (1 - beta2_t, min(lr, 1/sqrt(t)), whether that is
// a float32 tensor);
// hp: eps1, eps2, d, 1 - lr weight_decay; flags: 1 maximize, 2 weight decay.
void ravine_adafactor_step(int64_t dtype, int64_t n, const int64_t* table, const double* per_tensor,
                           const double* hp, int64_t flags, int64_t threads) {
  const int team = static_cast<int>(std::max<int64_t>(1, threads));
  if (dtype == 0)
    run<float>(n, table, per_tensor, hp, flags, team);
  else
    run<double>(n, table, per_tensor, hp, flags, team);
}

}  // extern "C"
