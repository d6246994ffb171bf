// Decode attention read in place from the paged KV cache: one query token per sequence, its keys and
// values found through the sequence's block table, with no gathered copy of them. Built on first use
// by recfm/serving/native.py (torch.utils.cpp_extension); the engine falls back to gather + SDPA
// when it cannot be built.
//
// q: (n, heads, d); k_cache, v_cache: (blocks, block_size, kv_heads, d), all fp32 or all bf16 (scores,
// softmax and the weighted sum are accumulated in fp32 either way); block_table:
// (n, max_blocks) int64; lengths: (n,) int64 context length per sequence (the new token included).
// Query head j reads kv head j / (heads / kv_heads), as transformers' repeat_kv does.
// Work is split over (sequence, kv head) pairs with ATen's thread pool.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// d values as fp32: the values themselves when they are fp32, else converted into `buf`.
static inline const float* as_float(const float* x, float*, int64_t) { return x; }
static inline const float* as_float(const at::BFloat16* x, float* buf, int64_t d) {
  for (int64_t j = 0; j < d; ++j) buf[j] = static_cast<float>(x[j]);
  return buf;
}

template <typename T>
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
  const float sc = static_cast<float>(scale);
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) longest = std::max(longest, lens[i]);

  at::parallel_for(0, n * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * longest);
    std::vector<float> acc(group * d);
    std::vector<float> qf(group * d), rowf(d);  // bf16 only: this pair's queries and one key or value row in fp32
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / kvh, h = w % kvh, len = lens[i];
      const int64_t* table = bt + i * max_blocks;
      const float* qh = as_float(qp + (i * heads + h * group) * d, qf.data(), group * d);
      for (int64_t t = 0; t < len; ++t) {
        const float* kr = as_float(kp + (table[t / bs] * bs + t % bs) * row + h * d, rowf.data(), d);
        for (int64_t g = 0; g < group; ++g) {
          const float* qr = qh + g * d;
          float s = 0.f;
          for (int64_t j = 0; j < d; ++j) s += qr[j] * kr[j];
          scores[g * len + t] = s * sc;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
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
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const float* vr = as_float(vp + (table[t / bs] * bs + t % bs) * row + h * d, rowf.data(), d);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* a = acc.data() + g * d;
          for (int64_t j = 0; j < d; ++j) a[j] += p * vr[j];
        }
      }
      T* o = op + (i * heads + h * group) * d;
      for (int64_t j = 0; j < group * d; ++j) o[j] = static_cast<T>(acc[j]);
    }
  });
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
    decode<float>(q, k_cache, v_cache, block_table, lengths, scale, out);
  else
    decode<at::BFloat16>(q, k_cache, v_cache, block_table, lengths, scale, out);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (fp32 or bf16, CPU)");
}
