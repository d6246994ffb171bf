// A few rows times a 4-bit weight matrix stored as bitsandbytes stores it (nf4 or fp4): two codes a
// byte, the first of each pair in the high nibble, row-major, one fp32 scale (absmax) per block of
// `block` weights, value = code[nibble] * absmax. Reads the packed bytes and never writes the fp32
// weights out, so one decoding sequence streams 1/8 of the fp32 bytes. Built on first use by
// recfm/serving/native.py; batches above a few rows go to bitsandbytes' own path.
//
// x: (m, k) fp32, packed: (n * k / 2,) uint8, absmax: (n * k / block,) fp32, code: (16,) fp32 -> (m, n).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

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

  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> total(m);
#ifdef __AVX2__
    const __m256 lo_tab = _mm256_loadu_ps(cp), hi_tab = _mm256_loadu_ps(cp + 8);
    const __m256i seven = _mm256_set1_epi32(7), fifteen = _mm256_set1_epi32(15);
    std::vector<__m256> acc(m);
#endif
    for (int64_t row = begin; row < end; ++row) {
      const uint8_t* q = qp + row * half;
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t b = 0; b < blocks; ++b) {
        const float scale = ap[row * blocks + b];
        int64_t j = b * hb;
        const int64_t stop = j + hb;
#ifdef __AVX2__
        for (int64_t r = 0; r < m; ++r) acc[r] = _mm256_setzero_ps();
        for (; j < stop; j += 8) {
          __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
          __m256i hi = _mm256_srli_epi32(v, 4), lo = _mm256_and_si256(v, fifteen);
          __m256 w_hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_tab, hi), _mm256_permutevar8x32_ps(hi_tab, hi),
                                         _mm256_castsi256_ps(_mm256_cmpgt_epi32(hi, seven)));
          __m256 w_lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_tab, lo), _mm256_permutevar8x32_ps(hi_tab, lo),
                                         _mm256_castsi256_ps(_mm256_cmpgt_epi32(lo, seven)));
          for (int64_t r = 0; r < m; ++r) {
            acc[r] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(ep + r * half + j), acc[r]);
            acc[r] = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(op_ + r * half + j), acc[r]);
          }
        }
        for (int64_t r = 0; r < m; ++r) {
          __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
          s = _mm_hadd_ps(s, s);
          s = _mm_hadd_ps(s, s);
          total[r] += scale * _mm_cvtss_f32(s);
        }
#else
        for (int64_t r = 0; r < m; ++r) {
          float s = 0.f;
          for (int64_t t = j; t < stop; ++t)
            s += cp[q[t] >> 4] * ep[r * half + t] + cp[q[t] & 15] * op_[r * half + t];
          total[r] += scale * s;
        }
#endif
      }
      for (int64_t r = 0; r < m; ++r) outp[r * n + row] = total[r];
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_4bit", &gemv_4bit, "a few rows times a bitsandbytes 4-bit matrix (CPU)");
}
