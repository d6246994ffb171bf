// Decode attention read in place from the paged KV cache: one query token per sequence, its keys and
// values found through the sequence's block table, with no gathered copy of them. Built on first use
// by recfm/serving/native.py (torch.utils.cpp_extension); the engine falls back to gather + SDPA
// when it cannot be built.
//
// q: (n, heads, d); k_cache, v_cache: (blocks, block_size, kv_heads, d), all fp32 or all bf16 (scores,
// softmax and the weighted sum are accumulated in fp32 either way); block_table:
// (n, max_blocks) int64; lengths: (n,) int64 context length per sequence (the new token included).
// Query head j reads kv head j / (heads / kv_heads), as transformers' repeat_kv does.
// Work is split over (sequence, kv head) pairs with ATen's thread pool; each pair goes through one of
// two pair functions.
//
// Head sizes that are a multiple of 16 (up to 128) with up to 8 query heads per kv head take the
// vector path: 16 floats at a time through GCC/Clang vector extensions (one AVX-512 register, two
// AVX2 ones, whatever -march=native has), each key and value row read once for the whole group of
// query heads, bf16 rows widened by a shift, and the softmax's exp as a polynomial over 16 scores at
// a time (Cephes' expf: a few ulp of fp32, far below the bf16 rounding of the output). Other shapes
// take the scalar loop.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline f32x16 load16(const at::BFloat16* p) {  // bf16 is the top half of an fp32: widen by a shift
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
static inline float hsum(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
// exp(x) for x <= 0 (scores minus their maximum): Cephes' expf, 16 lanes at a time
static inline f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.3f;
  x = x < lo ? lo : x;
  const i32x16 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x16);  // round(x / ln 2): x <= 0
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  f32x16 r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  f32x16 p = f32x16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3333652520e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32x16 bits = (n + 127) << 23;  // 2^n
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One (sequence, kv head) pair: qh its `group` query heads (d values each), kp / vp the cache at its kv
// head, table its block table, len its context; o gets the group's outputs. `scratch` holds at least
// group * len + 2 * group * d + d floats (the scores first).
template <typename T>
using PairFn = void (*)(const T* qh, const T* kp, const T* vp, const int64_t* table, int64_t len, int64_t bs,
                        int64_t row, int64_t group, int64_t d, float sc, float* scratch, T* o);

// the vector path: DV * 16 values per head, up to 8 query heads per kv head
template <typename T, int DV>
static void pair_vec(const T* qh, const T* kp, const T* vp, const int64_t* table, int64_t len, int64_t bs, int64_t row,
                     int64_t group, int64_t, float sc, float* scores, T* o) {
  constexpr int MAXG = 8;
  f32x16 q[MAXG][DV];
  for (int64_t g = 0; g < group; ++g)
    for (int c = 0; c < DV; ++c) q[g][c] = load16(qh + g * DV * 16 + c * 16) * sc;
  for (int64_t b = 0, t = 0; t < len; ++b) {  // block by block: no division per token
    const T* kr = kp + table[b] * bs * row;
    for (const int64_t stop = std::min(len, t + bs); t < stop; ++t, kr += row) {
      f32x16 k[DV];
      for (int c = 0; c < DV; ++c) k[c] = load16(kr + c * 16);
      for (int64_t g = 0; g < group; ++g) {
        f32x16 s = q[g][0] * k[0];
        for (int c = 1; c < DV; ++c) s += q[g][c] * k[c];
        scores[g * len + t] = hsum(s);
      }
    }
  }
  float inv[MAXG];
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
    float total = 0.f;
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
      const f32x16 e = exp_nonpositive(load16(sg + t) - m);
      std::memcpy(sg + t, &e, sizeof e);
      total += hsum(e);
    }
    for (; t < len; ++t) {
      sg[t] = std::exp(sg[t] - m);
      total += sg[t];
    }
    inv[g] = 1.f / total;
  }
  f32x16 acc[MAXG][DV] = {};
  for (int64_t b = 0, t = 0; t < len; ++b) {
    const T* vr = vp + table[b] * bs * row;
    for (const int64_t stop = std::min(len, t + bs); t < stop; ++t, vr += row) {
      f32x16 v[DV];
      for (int c = 0; c < DV; ++c) v[c] = load16(vr + c * 16);
      for (int64_t g = 0; g < group; ++g) {
        const float p = scores[g * len + t];
        for (int c = 0; c < DV; ++c) acc[g][c] += p * v[c];
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int c = 0; c < DV; ++c) {
      const f32x16 a = acc[g][c] * inv[g];
      for (int j = 0; j < 16; ++j) o[g * DV * 16 + c * 16 + j] = static_cast<T>(a[j]);
    }
}

// d values as fp32: the values themselves when they are fp32, else converted into `buf`.
static inline const float* as_float(const float* x, float*, int64_t) { return x; }
static inline const float* as_float(const at::BFloat16* x, float* buf, int64_t d) {
  for (int64_t j = 0; j < d; ++j) buf[j] = static_cast<float>(x[j]);
  return buf;
}

// the scalar loop, for every other shape
template <typename T>
static void pair_scalar(const T* qt, const T* kp, const T* vp, const int64_t* table, int64_t len, int64_t bs,
                        int64_t row, int64_t group, int64_t d, float sc, float* scratch, T* o) {
  float* scores = scratch;
  float* acc = scores + group * len;
  float* qf = acc + group * d;  // bf16 only: the queries and one key or value row in fp32
  float* rowf = qf + group * d;
  const float* qh = as_float(qt, qf, group * d);
  for (int64_t t = 0; t < len; ++t) {
    const float* kr = as_float(kp + (table[t / bs] * bs + t % bs) * row, rowf, d);
    for (int64_t g = 0; g < group; ++g) {
      const float* qr = qh + g * d;
      float s = 0.f;
      for (int64_t j = 0; j < d; ++j) s += qr[j] * kr[j];
      scores[g * len + t] = s * sc;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
    float total = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      sg[t] = std::exp(sg[t] - m);
      total += sg[t];
    }
    const float inv = 1.f / total;
    for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
  }
  std::fill(acc, acc + group * d, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const float* vr = as_float(vp + (table[t / bs] * bs + t % bs) * row, rowf, d);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * len + t];
      float* a = acc + g * d;
      for (int64_t j = 0; j < d; ++j) a[j] += p * vr[j];
    }
  }
  for (int64_t j = 0; j < group * d; ++j) o[j] = static_cast<T>(acc[j]);
}

// every (sequence, kv head) pair through one pair function (a template argument, so it is inlined),
// split over ATen's thread pool
template <typename T, PairFn<T> pair>
static void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& block_table, const torch::Tensor& lengths, double scale, torch::Tensor& out) {
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), kvh = k_cache.size(2);
  const int64_t group = heads / kvh, max_blocks = block_table.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t row = kvh * d;  // elements per cache slot
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) longest = std::max(longest, lens[i]);
  at::parallel_for(0, n * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(group * longest + 2 * group * d + d);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / kvh, h = w % kvh;
      pair(qp + (i * heads + h * group) * d, kp + h * d, vp + h * d, bt + i * max_blocks, lens[i], bs, row, group, d,
           static_cast<float>(scale), scratch.data(), op + (i * heads + h * group) * d);
    }
  });
}

// the vector path for this shape (query heads per kv head, head size), else the scalar loop
template <typename T>
static void dispatch(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const torch::Tensor& block_table, const torch::Tensor& lengths, double scale, torch::Tensor& out) {
  if (q.size(1) / k_cache.size(2) <= 8) {
    switch (q.size(2)) {
      case 16: return decode<T, pair_vec<T, 1>>(q, k_cache, v_cache, block_table, lengths, scale, out);
      case 32: return decode<T, pair_vec<T, 2>>(q, k_cache, v_cache, block_table, lengths, scale, out);
      case 64: return decode<T, pair_vec<T, 4>>(q, k_cache, v_cache, block_table, lengths, scale, out);
      case 128: return decode<T, pair_vec<T, 8>>(q, k_cache, v_cache, block_table, lengths, scale, out);
    }
  }
  decode<T, pair_scalar<T>>(q, k_cache, v_cache, block_table, lengths, scale, out);
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_table,
                           torch::Tensor lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_decode: bad shapes");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && k_cache.scalar_type() == dt && v_cache.scalar_type() == dt,
              "paged_decode: q and the cache must all be fp32 or all bf16");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong, "paged_decode: int64 tables");
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the cache must be contiguous");
  block_table = block_table.contiguous();
  lengths = lengths.contiguous();
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), kvh = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && heads % kvh == 0, "paged_decode: head sizes do not match");
  const int64_t max_blocks = block_table.size(1);
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  const int64_t num_blocks = k_cache.size(0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_blocks * bs, "paged_decode: a length outside its block table");
    for (int64_t b = 0; b < (lens[i] + bs - 1) / bs; ++b)
      TORCH_CHECK(bt[i * max_blocks + b] >= 0 && bt[i * max_blocks + b] < num_blocks, "paged_decode: a block outside the cache");
  }
  auto out = torch::empty_like(q);
  if (dt == at::kFloat)
    dispatch<float>(q, k_cache, v_cache, block_table, lengths, scale, out);
  else
    dispatch<at::BFloat16>(q, k_cache, v_cache, block_table, lengths, scale, out);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (fp32 or bf16, CPU)");
}
