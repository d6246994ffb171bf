// A few rows times a 4-bit weight matrix stored as bitsandbytes stores it (nf4 or fp4): two codes a
// byte, the first of each pair in the high nibble, row-major, one fp32 scale (absmax) per block of
// `block` weights, value = code[nibble] * absmax. Reads the packed bytes and never writes the fp32
// weights out, so one decoding sequence streams 1/8 of the fp32 bytes. Built on first use by
// recfm/serving/native.py; batches above a few rows go to bitsandbytes' own path. With AVX-512 one
// permute decodes 16 codes; with AVX2, two permutes and a blend decode 8.
//
// x: (m, k) fp32, packed: (n * k / 2,) uint8, absmax: (n * k / block,) fp32, code: (16,) fp32 -> (m, n).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "rows.h"

#include <algorithm>

#ifdef __AVX2__
#include <immintrin.h>
#endif

// The products of output rows [begin, end) with MM rows of x (MM a compile-time count, so that each
// row's accumulators stay in registers; with a run-time count they went to the stack and the loop ran
// ~10x slower). xe, xo: x's even and odd columns, (MM, k / 2).
#if defined(__AVX512F__)
template <int MM>
static void rows_avx512(const uint8_t* qp, const float* ap, const float* cp, const float* xe, const float* xo,
                        float* outp, int64_t n, int64_t half, int64_t blocks, int64_t hb, int64_t begin, int64_t end) {
  // One permute looks up 16 codes in the 16-entry table. Per block the products of the high and the low
  // nibbles collect in two accumulators per row (two independent chains of FMAs), then one FMA by the
  // block's scale adds them to the row's total; one horizontal sum per output.
  const __m512 tab = _mm512_loadu_ps(cp);
  const __m512i fifteen = _mm512_set1_epi32(15);
  for (int64_t row = begin; row < end; ++row) {
    const uint8_t* q = qp + row * half;
    __m512 tot[MM];
    for (int r = 0; r < MM; ++r) tot[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m512 a0[MM], a1[MM];
      for (int r = 0; r < MM; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
      for (int64_t j = b * hb, stop = j + hb; j < stop; j += 16) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
        const __m512 w_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
        const __m512 w_lo = _mm512_permutexvar_ps(_mm512_and_si512(v, fifteen), tab);
        for (int r = 0; r < MM; ++r) {
          a0[r] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xe + r * half + j), a0[r]);
          a1[r] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xo + r * half + j), a1[r]);
        }
      }
      const __m512 scale = _mm512_set1_ps(ap[row * blocks + b]);
      for (int r = 0; r < MM; ++r) tot[r] = _mm512_fmadd_ps(_mm512_add_ps(a0[r], a1[r]), scale, tot[r]);
    }
    for (int r = 0; r < MM; ++r) outp[r * n + row] = _mm512_reduce_add_ps(tot[r]);
  }
}
#endif

#ifdef __AVX2__
template <int MM>
static void rows_avx2(const uint8_t* qp, const float* ap, const float* cp, const float* xe, const float* xo,
                      float* outp, int64_t n, int64_t half, int64_t blocks, int64_t hb, int64_t begin, int64_t end) {
  // Two permutes and a blend look up 8 codes (the table is two registers of 8).
  const __m256 lo_tab = _mm256_loadu_ps(cp), hi_tab = _mm256_loadu_ps(cp + 8);
  const __m256i seven = _mm256_set1_epi32(7), fifteen = _mm256_set1_epi32(15);
  for (int64_t row = begin; row < end; ++row) {
    const uint8_t* q = qp + row * half;
    __m256 tot[MM];
    for (int r = 0; r < MM; ++r) tot[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m256 a0[MM], a1[MM];
      for (int r = 0; r < MM; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
      for (int64_t j = b * hb, stop = j + hb; j < stop; j += 8) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
        __m256i hi = _mm256_srli_epi32(v, 4), lo = _mm256_and_si256(v, fifteen);
        __m256 w_hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_tab, hi), _mm256_permutevar8x32_ps(hi_tab, hi),
                                       _mm256_castsi256_ps(_mm256_cmpgt_epi32(hi, seven)));
        __m256 w_lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_tab, lo), _mm256_permutevar8x32_ps(hi_tab, lo),
                                       _mm256_castsi256_ps(_mm256_cmpgt_epi32(lo, seven)));
        for (int r = 0; r < MM; ++r) {
          a0[r] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(xe + r * half + j), a0[r]);
          a1[r] = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(xo + r * half + j), a1[r]);
        }
      }
      const __m256 scale = _mm256_set1_ps(ap[row * blocks + b]);
      for (int r = 0; r < MM; ++r) tot[r] = _mm256_fmadd_ps(_mm256_add_ps(a0[r], a1[r]), scale, tot[r]);
    }
    for (int r = 0; r < MM; ++r) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(tot[r]), _mm256_extractf128_ps(tot[r], 1));
      s = _mm_hadd_ps(s, s);
      s = _mm_hadd_ps(s, s);
      outp[r * n + row] = _mm_cvtss_f32(s);
    }
  }
}
#endif

[[maybe_unused]] static void rows_plain(const uint8_t* qp, const float* ap, const float* cp, const float* xe, const float* xo, float* outp,
                       int64_t mm, int64_t n, int64_t half, int64_t blocks, int64_t hb, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const uint8_t* q = qp + row * half;
    for (int64_t r = 0; r < mm; ++r) {
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        float s = 0.f;
        for (int64_t t = b * hb, stop = t + hb; t < stop; ++t)
          s += cp[q[t] >> 4] * xe[r * half + t] + cp[q[t] & 15] * xo[r * half + t];
        total += ap[row * blocks + b] * s;
      }
      outp[r * n + row] = total;
    }
  }
}

torch::Tensor gemv_4bit(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax, torch::Tensor code, int64_t n,
                        int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemv_4bit: x must be (m, k) fp32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && absmax.scalar_type() == at::kFloat &&
              code.scalar_type() == at::kFloat && code.numel() == 16, "gemv_4bit: bad weight tensors");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % block == 0 && block % 16 == 0, "gemv_4bit: k must be a multiple of the block, the block of 16");
  TORCH_CHECK(packed.numel() * 2 == n * k && absmax.numel() == n * k / block, "gemv_4bit: sizes do not match");
  packed = packed.contiguous();  // kept alive here: the pointers below read these tensors
  absmax = absmax.contiguous();
  code = code.contiguous();
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  const float* cp = code.data_ptr<float>();
  // x split into the weights it meets in the high nibbles (even columns) and the low ones (odd)
  auto xe = torch::empty({m, k / 2}, x.options()), xo = torch::empty({m, k / 2}, x.options());
  const float* xp = x.data_ptr<float>();
  float* ep = xe.data_ptr<float>();
  float* op_ = xo.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < k / 2; ++j) {
      ep[r * k / 2 + j] = xp[r * k + 2 * j];
      op_[r * k / 2 + j] = xp[r * k + 2 * j + 1];
    }
  auto out = torch::empty({m, n}, x.options());
  float* outp = out.data_ptr<float>();
  const int64_t half = k / 2, blocks = k / block, hb = block / 2;

  // Rows of x in groups of up to 8 (the caller sends at most 32): each group reads the weights once.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < m; r0 += 8) {
      const int64_t mm = std::min<int64_t>(8, m - r0);
      const float* xe_ = ep + r0 * half;
      const float* xo_ = op_ + r0 * half;
      float* o = outp + r0 * n;
#if defined(__AVX512F__)
      if (hb % 16 == 0) {
        RECFM_DISPATCH(rows_avx512, mm, qp, ap, cp, xe_, xo_, o, n, half, blocks, hb, begin, end)
        continue;
      }
#endif
#ifdef __AVX2__
      RECFM_DISPATCH(rows_avx2, mm, qp, ap, cp, xe_, xo_, o, n, half, blocks, hb, begin, end)
#else
      rows_plain(qp, ap, cp, xe_, xo_, o, mm, n, half, blocks, hb, begin, end);
#endif
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_4bit", &gemv_4bit, "a few rows times a bitsandbytes 4-bit matrix (CPU)");
}
