// RMSNorm (optionally after a residual add) and the rotary embedding, each one pass over its rows,
// for the engine's bf16 decoder pass. Built on first use by recfm/serving/native.py; the engine uses
// transformers' modules and plain tensor code when it cannot be built, or for fp32.
//
// The arithmetic is transformers' Llama arithmetic in bf16, rounding where it rounds:
//   RMSNorm:  h = bf16(x * rsqrt(mean(x^2) + eps)) in fp32, out = bf16(w * h)
//   residual: x = bf16(x + delta) before the norm (`x = x + delta` in bf16)
//   rotary:   q = bf16(bf16(q * cos) + bf16(rotate_half(q) * sin)), with cos and sin already bf16
// Only the sum of squares is accumulated in a different order than torch's mean, so a value can
// differ from the module's in its last bit, rarely.
//
// rms_norm(x (n, d), w (d,), eps) -> out (n, d)
// add_rms_norm_(x (n, d), delta (n, d), w (d,), eps) -> out (n, d); x becomes x + delta in place
// rope_(q (n, hq, hd), k (n, hk, hd), cos (n, hd), sin (n, hd)): q and k rotated in place (their rows
//   may be slices of a wider matrix, as views of the fused q/k/v product are)

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

using bf16 = at::BFloat16;

static inline float f(bf16 x) { return static_cast<float>(x); }

static void check(const torch::Tensor& t, const char* name, bool rows = false) {
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  if (rows) {  // (n, heads, hd) whose rows may be slices of a wider matrix (the fused q/k/v product)
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2), name, " must be (n, heads, head_dim) "
                "with contiguous heads");
  } else {
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  }
}

static void norm_rows(const bf16* x, const bf16* w, bf16* out, int64_t n, int64_t d, float eps) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bf16* xi = x + i * d;
      bf16* oi = out + i * d;
      float ss = 0.f;
      for (int64_t j = 0; j < d; ++j) ss += f(xi[j]) * f(xi[j]);
      const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
      for (int64_t j = 0; j < d; ++j) {
        const bf16 h = bf16(f(xi[j]) * r);
        oi[j] = bf16(f(w[j]) * f(h));
      }
    }
  });
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check(x, "x");
  check(w, "weight");
  const int64_t d = x.size(-1), n = x.numel() / d;
  TORCH_CHECK(w.numel() == d, "weight has ", w.numel(), " values for rows of ", d);
  auto out = torch::empty_like(x);
  norm_rows(x.data_ptr<bf16>(), w.data_ptr<bf16>(), out.data_ptr<bf16>(), n, d, static_cast<float>(eps));
  return out;
}

torch::Tensor add_rms_norm_(torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& w, double eps) {
  check(x, "x");
  check(delta, "delta");
  check(w, "weight");
  TORCH_CHECK(x.sizes() == delta.sizes(), "x ", x.sizes(), " and delta ", delta.sizes(), " differ");
  const int64_t d = x.size(-1), n = x.numel() / d;
  TORCH_CHECK(w.numel() == d, "weight has ", w.numel(), " values for rows of ", d);
  bf16* xp = x.data_ptr<bf16>();
  const bf16* dp = delta.data_ptr<bf16>();
  at::parallel_for(0, n * d, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) xp[i] = bf16(f(xp[i]) + f(dp[i]));
  });
  auto out = torch::empty_like(x);
  norm_rows(xp, w.data_ptr<bf16>(), out.data_ptr<bf16>(), n, d, static_cast<float>(eps));
  return out;
}

static void rotate(bf16* t, int64_t heads, int64_t hd, const bf16* c, const bf16* s) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    bf16* v = t + h * hd;
    for (int64_t j = 0; j < half; ++j) {
      const float a = f(v[j]), b = f(v[j + half]);
      // rotate_half(v) = (-v[half:], v[:half])
      const bf16 lo = bf16(f(bf16(a * f(c[j]))) + f(bf16(-b * f(s[j]))));
      const bf16 hi = bf16(f(bf16(b * f(c[j + half]))) + f(bf16(a * f(s[j + half]))));
      v[j] = lo;
      v[j + half] = hi;
    }
  }
}

void rope_(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& cos, const torch::Tensor& sin) {
  check(q, "q", true);
  check(k, "k", true);
  check(cos, "cos");
  check(sin, "sin");
  const int64_t n = q.size(0), hq = q.size(1), hd = q.size(2), hk = k.size(1);
  TORCH_CHECK(k.size(0) == n && k.size(2) == hd, "q ", q.sizes(), " and k ", k.sizes(), " do not match");
  TORCH_CHECK(cos.numel() == n * hd && sin.numel() == n * hd, "cos and sin must be (", n, ", ", hd, ")");
  TORCH_CHECK(hd % 2 == 0, "the head size must be even, got ", hd);
  bf16* qp = q.data_ptr<bf16>();
  bf16* kp = k.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* sp = sin.data_ptr<bf16>();
  const int64_t qs = q.stride(0), ks = k.stride(0);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      rotate(qp + i * qs, hq, hd, cp + i * hd, sp + i * hd);
      rotate(kp + i * ks, hk, hd, cp + i * hd, sp + i * hd);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows (transformers' Llama arithmetic)");
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta in place, then RMSNorm of x");
  m.def("rope_", &rope_, "the rotary embedding applied to q and k in place");
}
