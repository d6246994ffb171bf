// A few rows times an int8 weight matrix with one fp32 scale per output row: out[r, o] = scale[o] *
// sum_j x[r, j] * q[o, j], the activations in fp32 (weight-only int8: the only rounding is the
// weights'). Reads the int8 bytes and never writes fp32 weights out, so one decoding sequence streams
// 1/4 of the fp32 bytes. Built on first use by recfm/serving/native.py; batches above a few rows go to
// a dequantized matrix product in quantization.Int8Linear.
//
// x: (m, k) fp32, q: (n, k) int8, scale: (n,) fp32 -> (m, n).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "rows.h"

#include <algorithm>

#ifdef __AVX2__
#include <immintrin.h>
#endif

// Output rows [begin, end) for MM rows of x (MM a compile-time count, so that each row's accumulators
// stay in registers, as in gemv_4bit.cpp). Two accumulators per row: two independent chains of FMAs.
#if defined(__AVX512F__)
template <int MM>
static void rows_avx512(const int8_t* qp, const float* sp, const float* xp, float* outp, int64_t n, int64_t k,
                        int64_t begin, int64_t end) {
  const int64_t k32 = k / 32 * 32, k16 = k / 16 * 16;
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* q = qp + o * k;
    __m512 a0[MM], a1[MM];
    for (int r = 0; r < MM; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j < k32; j += 32) {
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j))));
      const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j + 16))));
      for (int r = 0; r < MM; ++r) {
        a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + r * k + j), a0[r]);
        a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + r * k + j + 16), a1[r]);
      }
    }
    for (; j < k16; j += 16) {
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j))));
      for (int r = 0; r < MM; ++r) a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + r * k + j), a0[r]);
    }
    for (int r = 0; r < MM; ++r) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
      for (int64_t t = j; t < k; ++t) s += xp[r * k + t] * q[t];
      outp[r * n + o] = s * sp[o];
    }
  }
}
#endif

#ifdef __AVX2__
template <int MM>
static void rows_avx2(const int8_t* qp, const float* sp, const float* xp, float* outp, int64_t n, int64_t k,
                      int64_t begin, int64_t end) {
  const int64_t k16 = k / 16 * 16, k8 = k / 8 * 8;
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* q = qp + o * k;
    __m256 a0[MM], a1[MM];
    for (int r = 0; r < MM; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j < k16; j += 16) {
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j))));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j + 8))));
      for (int r = 0; r < MM; ++r) {
        a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + r * k + j), a0[r]);
        a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + r * k + j + 8), a1[r]);
      }
    }
    for (; j < k8; j += 8) {
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j))));
      for (int r = 0; r < MM; ++r) a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + r * k + j), a0[r]);
    }
    for (int r = 0; r < MM; ++r) {
      const __m256 t = _mm256_add_ps(a0[r], a1[r]);
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      s4 = _mm_hadd_ps(s4, s4);
      s4 = _mm_hadd_ps(s4, s4);
      float s = _mm_cvtss_f32(s4);
      for (int64_t u = j; u < k; ++u) s += xp[r * k + u] * q[u];
      outp[r * n + o] = s * sp[o];
    }
  }
}
#endif

[[maybe_unused]] static void rows_plain(const int8_t* qp, const float* sp, const float* xp, float* outp, int64_t mm,
                                        int64_t n, int64_t k, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o)
    for (int64_t r = 0; r < mm; ++r) {
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += xp[r * k + j] * qp[o * k + j];
      outp[r * n + o] = s * sp[o];
    }
}

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemv_int8: x must be (m, k) fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "gemv_int8: q must be (n, k) int8 and scale fp32");
  TORCH_CHECK(q.size(1) == x.size(1) && scale.numel() == q.size(0), "gemv_int8: sizes do not match");
  x = x.contiguous();  // kept alive here: the pointers below read these tensors
  q = q.contiguous();
  scale = scale.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  auto out = torch::empty({m, n}, x.options());
  float* outp = out.data_ptr<float>();

  // Rows of x in groups of up to 8 (the caller sends at most 32): each group reads the weights once.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < m; r0 += 8) {
      const int64_t mm = std::min<int64_t>(8, m - r0);
      const float* x_ = xp + r0 * k;
      float* o = outp + r0 * n;
#if defined(__AVX512F__)
      RECFM_DISPATCH(rows_avx512, mm, qp, sp, x_, o, n, k, begin, end)
#elif defined(__AVX2__)
      RECFM_DISPATCH(rows_avx2, mm, qp, sp, x_, o, n, k, begin, end)
#else
      rows_plain(qp, sp, x_, o, mm, n, k, begin, end);
#endif
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_int8", &gemv_int8, "a few rows times an int8 matrix with per-row scales (CPU)");
}
