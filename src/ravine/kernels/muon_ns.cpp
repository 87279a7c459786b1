// Muon's Newton-Schulz iteration with the numbers of torch's bfloat16 CPU matrix
// product where torch has no native one (no AVX-512 or AMX: torch 2.x then runs the
// loops of ATen's cpublas gemm, in float32, and rounds each result to bfloat16).
//
// The matrices hold bfloat16 values stored as float32. A product of two bfloat16
// numbers is exact in float32, so each dot product depends only on the order of its
// float32 additions, and this file adds up in torch's orders:
//   - A @ B with A and B contiguous ("no transpose"): four partial sums, element l
//     going to sum l % 4, the leftover elements to sum 0, then ((s0 + s1) + s2) + s3;
//   - A @ B with B a transposed view (rows of A against rows of B, as X @ X.T): the
//     vectorised dot product, 64 elements at a time in 8 x 8 float32 accumulators,
//     then the 8 registers added pairwise (4, 2, 1), the 8 lanes added as AVX2's
//     reduction does, then 16-element tails in one 8-lane accumulator, then one by one;
//   - A @ B with A a transposed view: one running sum.
// addmm's result is fma(beta, C, alpha * dot) rounded once to bfloat16 (mm: alpha * dot).
// ravine.optim.muon checks these numbers against torch's once before using them.

#include "common.h"

#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// c10::BFloat16's rounding: nearest, ties to even; NaN becomes 0x7FC0.
inline float round_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if (value != value) {
    bits = 0x7FC00000u;
  } else {
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    bits &= 0xFFFF0000u;
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// AVX2's vec_reduce_all(+) of 8 lanes: halves, then pairs, then neighbours.
inline float lane_sum(const float* v) {
  float w0 = v[0] + v[4], w1 = v[1] + v[5], w2 = v[2] + v[6], w3 = v[3] + v[7];
  return (w0 + w2) + (w1 + w3);
}

// torch's dot product of two contiguous bfloat16 rows with float32 arithmetic.
float vector_dot(const float* __restrict__ x, const float* __restrict__ y, int64_t length) {
  float sums[64] = {0};
  const int64_t aligned = length & ~int64_t(63);
  for (int64_t j = 0; j < aligned; j += 64) {
    for (int e = 0; e < 64; ++e) sums[e] += x[j + e] * y[j + e];
  }
  for (int offset = 4; offset >= 1; offset /= 2) {  // registers of 8 lanes, pairwise
    for (int r = 0; r < offset; ++r) {
      for (int lane = 0; lane < 8; ++lane) sums[r * 8 + lane] += sums[(r + offset) * 8 + lane];
    }
  }
  float total = lane_sum(sums);
  float tail[8] = {0};
  const int64_t aligned16 = length & ~int64_t(15);
  for (int64_t j = aligned; j < aligned16; j += 16) {
    for (int e = 0; e < 8; ++e) tail[e] += x[j + e] * y[j + e];
    for (int e = 0; e < 8; ++e) tail[e] += x[j + 8 + e] * y[j + 8 + e];
  }
  total += lane_sum(tail);
  for (int64_t j = aligned16; j < length; ++j) total += x[j] * y[j];
  return total;
}

float running_dot(const float* x, const float* y, int64_t length) {
  float total = 0.0f;
  for (int64_t j = 0; j < length; ++j) total += x[j] * y[j];
  return total;
}

inline float combine(float beta, float c, float alpha, float dot, bool has_c) {
  return round_bf16(has_c ? std::fmaf(beta, c, alpha * dot) : alpha * dot);
}

// The four-partial-sum dot products of row i of a (m x k) with columns [j0, j0 + 8 * V)
// of b (k x n), in registers when AVX2 is there: sums[q][e] for column j0 + e.
template <int V>
inline void four_sums_block(const float* row, const float* b, int64_t k, int64_t n, int64_t j0, float* out) {
#ifdef __AVX2__
  __m256 acc[4][V];
  for (int q = 0; q < 4; ++q)
    for (int v = 0; v < V; ++v) acc[q][v] = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 4 <= k; l += 4) {
    for (int q = 0; q < 4; ++q) {
      const __m256 factor = _mm256_set1_ps(row[l + q]);
      const float* bl = b + (l + q) * n + j0;
      // a product of two bfloat16 numbers is exact, so mul then add is one rounding
      for (int v = 0; v < V; ++v) acc[q][v] = _mm256_add_ps(acc[q][v], _mm256_mul_ps(factor, _mm256_loadu_ps(bl + 8 * v)));
    }
  }
  for (; l < k; ++l) {
    const __m256 factor = _mm256_set1_ps(row[l]);
    const float* bl = b + l * n + j0;
    for (int v = 0; v < V; ++v) acc[0][v] = _mm256_add_ps(acc[0][v], _mm256_mul_ps(factor, _mm256_loadu_ps(bl + 8 * v)));
  }
  for (int v = 0; v < V; ++v) {
    const __m256 total = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0][v], acc[1][v]), acc[2][v]), acc[3][v]);
    _mm256_storeu_ps(out + 8 * v, total);
  }
#else
  float acc[4][8 * V] = {};
  int64_t l = 0;
  for (; l + 4 <= k; l += 4)
    for (int q = 0; q < 4; ++q)
      for (int e = 0; e < 8 * V; ++e) acc[q][e] += row[l + q] * b[(l + q) * n + j0 + e];
  for (; l < k; ++l)
    for (int e = 0; e < 8 * V; ++e) acc[0][e] += row[l] * b[l * n + j0 + e];
  for (int e = 0; e < 8 * V; ++e) out[e] = ((acc[0][e] + acc[1][e]) + acc[2][e]) + acc[3][e];
#endif
}

// out (m x n) = round(beta * c + alpha * (a @ b)), a (m x k) and b (k x n) contiguous,
// each dot product in four partial sums (torch's order for this layout).
void product_four_sums(const float* a, const float* b, const float* c, float* out, int64_t m, int64_t k,
                       int64_t n, float alpha, float beta, int threads) {
  const bool has_c = beta != 0.0f;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    const float* row = a + i * k;
    float* out_row = out + i * n;
    int64_t j0 = 0;
    for (; j0 + 16 <= n; j0 += 16) four_sums_block<2>(row, b, k, n, j0, out_row + j0);
    for (; j0 + 8 <= n; j0 += 8) four_sums_block<1>(row, b, k, n, j0, out_row + j0);
    if (j0 < n && n >= 8) {
      // The last columns: a block ending at column n (columns are independent, so
      // the overlap recomputes the same numbers).
      float last[8];
      four_sums_block<1>(row, b, k, n, n - 8, last);
      for (; j0 < n; ++j0) out_row[j0] = last[j0 - (n - 8)];
    }
    for (; j0 < n; ++j0) {
      float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t l = 0;
      for (; l + 4 <= k; l += 4)
        for (int q = 0; q < 4; ++q) sums[q] += row[l + q] * b[(l + q) * n + j0];
      for (; l < k; ++l) sums[0] += row[l] * b[l * n + j0];
      out_row[j0] = ((sums[0] + sums[1]) + sums[2]) + sums[3];
    }
    const float* c_row = c + i * n;
    for (int64_t j = 0; j < n; ++j) out_row[j] = combine(beta, has_c ? c_row[j] : 0.0f, alpha, out_row[j], has_c);
  }
}

// One matrix, rows <= columns, x normalised: steps of A = X X^T, B = bA + cA^2,
// X <- aX + BX, each rounded to bfloat16. tall: x is the transpose of the
// parameter, as torch's view, so the first step's products sum in that layout's order.
void newton_schulz(float* x, int64_t rows, int64_t cols, bool tall, float a, float b, float c, int64_t steps,
                   float* work, int threads) {
  float* gram = work;
  float* polynomial = gram + rows * rows;
  float* following = polynomial + rows * rows;
  float* columns = following + rows * cols;
  for (int64_t step = 0; step < steps; ++step) {
    const bool transposed_view = tall && step == 0;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 4)
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        const float* xi = x + i * cols;
        const float* xj = x + j * cols;
        const float dot = transposed_view ? running_dot(xi, xj, cols) : vector_dot(xi, xj, cols);
        gram[i * rows + j] = gram[j * rows + i] = round_bf16(dot);
      }
    }
    product_four_sums(gram, gram, gram, polynomial, rows, rows, rows, c, b, threads);
    if (transposed_view) {
      // X = P^T (P the parameter's orientation, contiguous in torch): polynomial @ X
      // multiplies rows of the polynomial with rows of P.
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) columns[j * rows + i] = x[i * cols + j];
      }
      const bool has_c = a != 0.0f;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          const float dot = vector_dot(polynomial + i * rows, columns + j * rows, rows);
          following[i * cols + j] = combine(a, has_c ? x[i * cols + j] : 0.0f, 1.0f, dot, has_c);
        }
      }
    } else {
      product_four_sums(polynomial, x, x, following, rows, rows, cols, 1.0f, a, threads);
    }
    std::memcpy(x, following, sizeof(float) * rows * cols);
  }
}

}  // namespace

extern "C" {

// Floats of work space newton_schulz needs for one matrix.
int64_t ravine_muon_work_size(int64_t rows, int64_t cols) {
  return 2 * rows * rows + 2 * rows * cols;
}

// x: batch contiguous (rows x cols) matrices, rows <= cols, normalised, bfloat16
// values; overwritten with the result. One matrix per thread when there are at least
// as many matrices as threads, else the threads share each matrix's rows. Every
// element's sum is the same either way.
void ravine_muon_newton_schulz(float* x, int64_t batch, int64_t rows, int64_t cols, int32_t tall, float a, float b,
                               float c, int64_t steps, int32_t threads) {
  const int64_t size = ravine_muon_work_size(rows, cols);
  if (batch < threads) {
    std::vector<float> work(size);
    for (int64_t index = 0; index < batch; ++index) {
      newton_schulz(x + index * rows * cols, rows, cols, tall != 0, a, b, c, steps, work.data(), threads);
    }
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> work(size);
#pragma omp for schedule(dynamic)
    for (int64_t index = 0; index < batch; ++index) {
      newton_schulz(x + index * rows * cols, rows, cols, tall != 0, a, b, c, steps, work.data(), 1);
    }
  }
}

}  // extern "C"
