// ravine's compiled step for 8-bit optimizer state (ravine.optim.quantized: Adam8bit,
// AdamW8bit, SGD8bit): one pass over memory per step.
//
// A state buffer is one byte (a code) per element and one float32 absmax per block of
// 256 elements; its value is codebook[code] * absmax. Per group of up to four blocks
// this file reads the codes back to float32 (that product, rounded once, as the plain
// path's multiply), runs the optimizer's float32 rule on them exactly as
// cpu_step.cpp does (the same operations, FMAs and order as torch's list
// operations, which the plain path uses), and quantizes each new state block as the
// plain path does:
//   absmax = max |x| over the block (NaN if the block holds one),
//   scale  = absmax > 0 ? absmax : 1,   y = x / scale (a true division),
//   code   = table[bits(y) >> 15 & 0x1FFFF] + (y > midpoints[that])
// which a table derived from the plain path's gives with one lookup (see Codebook;
// ties go to the lower code).
// The result is bit-equal to the plain path's, square roots aside (torch's own with
// ravine_set_sqrt, see common.h). Blocks never straddle work items, so the result does
// not depend on the number of threads.

#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace ravine_kernels;

constexpr int64_t kBlock = 256;
constexpr int64_t kGroup = 4 * kBlock;  // elements per inner pass (kChunk of common.h)
constexpr int kTableShift = 15;
constexpr uint32_t kTableMask = (1u << (32 - kTableShift)) - 1;

enum Family { SGD = 0, ADAM = 1 };
// The flags of ravine.kernels.fast (shared with cpu_step.cpp).
enum Flags { MAXIMIZE = 1, NESTEROV = 2, AMSGRAD = 8, DECOUPLED = 16, HAS_MOMENTUM = 32, HAS_WEIGHT_DECAY = 64 };

// A codebook and its encoding table (ravine.kernels.quantized._encoding_table): for
// each float32 bucket (the top 17 bits) the plain path's code for the bucket's
// smallest values (bits 0-7), whether its values fall as the low 15 bits rise (bit 8:
// negative buckets, and inf/NaN ones), and the threshold t (bits 16-31): the code is
// one more where the low 15 bits, reversed if bit 8 is set, are >= t. The plain path
// compares with the midpoint between two codes instead; within a bucket that
// comparison is a threshold on those bits (a bucket holds at most one midpoint).
struct Codebook {
  const float* values;    // 256
  const int32_t* table;   // 1 << 17
};

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// values[i] = codebook[codes[i]] * absmax[i / 256] for n elements starting at a block.
inline void decode(const uint8_t* codes, const float* absmax, const Codebook& book, float* values, int64_t n) {
  for (int64_t b = 0; b * kBlock < n; ++b) {
    const float scale = absmax[b];
    const int64_t m = std::min(kBlock, n - b * kBlock);
    const uint8_t* c = codes + b * kBlock;
    float* v = values + b * kBlock;
    for (int64_t i = 0; i < m; ++i) v[i] = book.values[c[i]] * scale;
  }
}

// Quantizes n values starting at a block into codes and one absmax per block.
inline void encode(const float* values, const Codebook& book, uint8_t* codes, float* absmax, int64_t n) {
  for (int64_t b = 0; b * kBlock < n; ++b) {
    const int64_t m = std::min(kBlock, n - b * kBlock);
    const float* x = values + b * kBlock;
    // max |x| as the largest bit pattern of |x|: NaN's patterns lie above inf's, so a
    // NaN in the block makes the absmax a NaN, as torch's amax does. (The padding
    // of a short last block holds zeros, which never raise it.)
    uint32_t largest = 0;
    for (int64_t i = 0; i < m; ++i) largest = std::max(largest, bits_of(x[i]) & 0x7FFFFFFFu);
    const float block_absmax = float_of(largest);
    absmax[b] = block_absmax;
    const float scale = block_absmax > 0.0f ? block_absmax : 1.0f;  // NaN > 0 is false, as in torch.where
    uint8_t* c = codes + b * kBlock;
    int64_t i = 0;
#ifdef __AVX2__
    // The same steps on eight values at a time, with one gather for the table.
    const __m256 scales = _mm256_set1_ps(scale);
    const __m256i bucket_mask = _mm256_set1_epi32(static_cast<int32_t>(kTableMask));
    const __m256i low_mask = _mm256_set1_epi32(0x7FFF);
    const __m256i byte_mask = _mm256_set1_epi32(0xFF);
    const __m256i one = _mm256_set1_epi32(1);
    // Byte 0 of each 32-bit lane, then the two 128-bit halves' four bytes side by side.
    const __m256i bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                           0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i halves = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
    for (; i + 8 <= m; i += 8) {
      const __m256i y = _mm256_castps_si256(_mm256_div_ps(_mm256_loadu_ps(x + i), scales));
      const __m256i bucket = _mm256_and_si256(_mm256_srli_epi32(y, kTableShift), bucket_mask);
      const __m256i entry = _mm256_i32gather_epi32(book.table, bucket, 4);
      // all ones where bit 8 is set: reverse the low bits
      const __m256i reverse = _mm256_srai_epi32(_mm256_slli_epi32(entry, 23), 31);
      const __m256i low = _mm256_xor_si256(_mm256_and_si256(y, low_mask), _mm256_and_si256(reverse, low_mask));
      const __m256i threshold = _mm256_sub_epi32(_mm256_srli_epi32(entry, 16), one);
      const __m256i above = _mm256_cmpgt_epi32(low, threshold);  // low >= t; a true mask is -1
      const __m256i code = _mm256_sub_epi32(_mm256_and_si256(entry, byte_mask), above);
      const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(code, bytes), halves);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(c + i), _mm256_castsi256_si128(packed));
    }
#endif
    for (; i < m; ++i) {
      const uint32_t y = bits_of(x[i] / scale);
      const uint32_t entry = static_cast<uint32_t>(book.table[(y >> kTableShift) & kTableMask]);
      const uint32_t low = (y & 0x7FFFu) ^ ((entry & 0x100u) ? 0x7FFFu : 0u);
      c[i] = static_cast<uint8_t>((entry & 0xFFu) + (low >= (entry >> 16) ? 1u : 0u));
    }
  }
}

// SGD with momentum, as cpu_step.cpp's sgd: g = -grad (maximize) + wd p;
// b = g on the step that creates the buffer, else fma(g, 1 - dampening, b momentum);
// d = fma(b, momentum, g) (Nesterov) or b; p = fma(d, -lr, p).
template <bool Nesterov, bool Maximize, bool WeightDecay>
void sgd_group(float* __restrict param, const float* __restrict grad, float* __restrict buffer, int64_t n,
               const double* hp, bool fresh) {
  const float neg_lr = static_cast<float>(-hp[0]);
  const float momentum = static_cast<float>(hp[1]);
  const float one_minus_dampening = static_cast<float>(1.0 - hp[2]);
  const float weight_decay = static_cast<float>(hp[3]);
  if (fresh) {
    for (int64_t i = 0; i < n; ++i) {
      float g = Maximize ? -grad[i] : grad[i];
      if (WeightDecay) g = fused(param[i], weight_decay, g);
      buffer[i] = g;
      const float d = Nesterov ? fused(g, momentum, g) : g;
      param[i] = fused(d, neg_lr, param[i]);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    float g = Maximize ? -grad[i] : grad[i];
    if (WeightDecay) g = fused(param[i], weight_decay, g);
    const float b = fused(g, one_minus_dampening, buffer[i] * momentum);
    buffer[i] = b;
    const float d = Nesterov ? fused(b, momentum, g) : b;
    param[i] = fused(d, neg_lr, param[i]);
  }
}

// One tensor's work item: blocks [first, first + count) of a tensor of `numel`
// elements. slots: param, grad, numel, then (codes, absmax) per state buffer.
struct Item {
  float* param;
  const float* grad;
  int64_t numel;
  uint8_t* codes[3];
  float* absmax[3];
};

template <typename Rule>
void run_groups(const Item& item, int64_t first, int64_t count, int n_states, const Codebook* const* books,
                Rule make_and_run) {
  alignas(64) float state[3][kGroup];
  const int64_t begin = first * kBlock;
  const int64_t end = std::min(item.numel, (first + count) * kBlock);
  for (int64_t start = begin; start < end; start += kGroup) {
    const int64_t n = std::min(kGroup, end - start);
    const int64_t block = start / kBlock;
    for (int k = 0; k < n_states; ++k) decode(item.codes[k] + start, item.absmax[k] + block, *books[k], state[k], n);
    make_and_run(start, n, state);
    for (int k = 0; k < n_states; ++k) encode(state[k], *books[k], item.codes[k] + start, item.absmax[k] + block, n);
  }
}

void adam_item(const Item& item, int64_t first, int64_t count, const double* hp, const double* per, int64_t flags,
               const Codebook& signed_book, const Codebook& unsigned_book) {
  const bool weight_decay = flags & HAS_WEIGHT_DECAY;
  const bool decoupled = weight_decay && (flags & DECOUPLED);
  const bool amsgrad = flags & AMSGRAD;
  const Codebook* books[3] = {&signed_book, &unsigned_book, &unsigned_book};
  const float one_minus_beta1 = static_cast<float>(hp[0]);
  with_bool(weight_decay && !decoupled, [&](auto l2) {
    with_bool(decoupled, [&](auto dec) {
      with_bool(amsgrad, [&](auto ams) {
        with_bool(std::abs(one_minus_beta1) < 0.5f, [&](auto sm) {
          run_groups(item, first, count, amsgrad ? 3 : 2, books, [&](int64_t start, int64_t n, float (*state)[kGroup]) {
            AdamRule<float, decltype(l2)::value, decltype(dec)::value, decltype(ams)::value, decltype(sm)::value> rule{
                item.param + start, item.grad + start, state[0], state[1], state[2],
                one_minus_beta1, one_minus_beta1 - 1.0f, static_cast<float>(hp[1]), static_cast<float>(hp[2]),
                static_cast<float>(hp[3]), static_cast<float>(hp[4]), static_cast<float>(hp[5]),
                (flags & MAXIMIZE) ? -1.0f : 1.0f, static_cast<float>(per[0]), static_cast<float>(per[1])};
            split_at_sqrt<float>(rule, n);
          });
        });
      });
    });
  });
}

void sgd_item(const Item& item, int64_t first, int64_t count, const double* hp, const double* per, int64_t flags,
              const Codebook& signed_book) {
  const Codebook* books[1] = {&signed_book};
  const bool fresh = per[0] != 0.0;
  with_bool(flags & NESTEROV, [&](auto nesterov) {
    with_bool(flags & MAXIMIZE, [&](auto maximize) {
      with_bool(flags & HAS_WEIGHT_DECAY, [&](auto wd) {
        run_groups(item, first, count, 1, books, [&](int64_t start, int64_t n, float (*state)[kGroup]) {
          sgd_group<decltype(nesterov)::value, decltype(maximize)::value, decltype(wd)::value>(
              item.param + start, item.grad + start, state[0], n, hp, fresh);
        });
      });
    });
  });
}

}  // namespace

extern "C" {

// One step over work items (tensor, first block, blocks) of tensors whose row in
// `pointers` is (param, grad, numel, codes_0, absmax_0, codes_1, absmax_1, ...):
// family 0 SGD with momentum (state: momentum_buffer), 1 Adam (exp_avg, exp_avg_sq,
// [max_exp_avg_sq]). hp and per_tensor are those of ravine.kernels.fast for the
// float family. books: the signed codebook's values and encoding table, then the
// unsigned one's.
void ravine_quantized8_step(int64_t family, int64_t n_items, const int64_t* items, const int64_t* pointers,
                            int64_t n_slots, const double* per_tensor, int64_t n_per, const double* hp,
                            int64_t flags, const int64_t* books, int64_t threads) {
  const Codebook signed_book{reinterpret_cast<const float*>(books[0]), reinterpret_cast<const int32_t*>(books[1])};
  const Codebook unsigned_book{reinterpret_cast<const float*>(books[2]), reinterpret_cast<const int32_t*>(books[3])};
  const int n_states = static_cast<int>((n_slots - 3) / 2);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && n_items > 1)
  for (int64_t k = 0; k < n_items; ++k) {
    const int64_t tensor = items[3 * k], first = items[3 * k + 1], count = items[3 * k + 2];
    const int64_t* row = pointers + tensor * n_slots;
    Item item{reinterpret_cast<float*>(row[0]), reinterpret_cast<const float*>(row[1]), row[2], {}, {}};
    for (int s = 0; s < n_states && s < 3; ++s) {
      item.codes[s] = reinterpret_cast<uint8_t*>(row[3 + 2 * s]);
      item.absmax[s] = reinterpret_cast<float*>(row[4 + 2 * s]);
    }
    const double* per = per_tensor + tensor * n_per;
    if (family == ADAM)
      adam_item(item, first, count, hp, per, flags, signed_book, unsigned_book);
    else
      sgd_item(item, first, count, hp, per, flags, signed_book);
  }
}

}  // extern "C"
