// Mellum's CPU decode products: y[M, N] = x[M, K] @ W[N, K]^T for a few activation rows (decode, speculative verify).
//
// A decode step reads every weight once for one to a few tokens, so these products are bound by memory bandwidth,
// not arithmetic. MKL's few-row sgemm runs on one core here and reads 12-17 GB/s; this kernel streams four weight
// rows at a time through AVX2 FMAs on every core (at::parallel_for over row blocks) and reads 20-25 GB/s on the
// same machine (docs/engine.md). Weights are fp32, or int8 with one fp32 scale per output row (weight-only
// quantization: activations stay fp32, each int8 is widened to fp32 in registers).
//
// Built by mellum/engine/cpu_kernels.py with -mavx2 -mfma; loaded only on CPUs that report AVX2.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRows = 4;                  // weight rows per block: four independent FMA chains, four load streams
constexpr int64_t kGrainElems = 1 << 16;  // weights per thread at least (smaller products stay on one thread)

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (softmax scores minus their maximum), eight at a time: x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its degree-6 Taylor polynomial (relative error < 3e-7 over that range), times 2^n built in the exponent
// bits. Inputs below -87 give 0 (as float exp underflows there anyway).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 floor_x = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, floor_x, _CMP_LT_OQ);
  x = _mm256_max_ps(x, floor_x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: exact first product
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.0f / 720);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 120));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 24));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f / 6));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// R weight rows (from n) times T activation rows (from m): each weight vector is loaded once per T rows. With
// `prefetch`, the next block's R rows are requested at the same offsets: short rows (K = 640) end before the
// hardware prefetcher has caught up with each of the R streams (+15-20% read speed measured at K = 640).
template <int R, int T, typename W>
inline void tile(const float* x, const W* w, float* y, const float* scale, int64_t K, int64_t N, int64_t n, int64_t m,
                 bool prefetch) {
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (prefetch)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * K + k), _MM_HINT_T0);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8(w + (n + r) * K + k);
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + (m + t) * K + k);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_fmadd_ps(wv[r], xv, acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) {
      float sum = horizontal_sum(acc[t][r]);
      for (int64_t kk = k; kk < K; ++kk) sum += x[(m + t) * K + kk] * static_cast<float>(w[(n + r) * K + kk]);
      y[(m + t) * N + n + r] = scale ? sum * scale[n + r] : sum;
    }
  }
}

template <int R, typename W>
inline void row_block(const float* x, const W* w, float* y, const float* scale, int64_t M, int64_t K, int64_t N,
                      int64_t n) {
  const bool prefetch = n + 2 * R <= N;  // another block follows: fetch it while this one computes
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<R, 4>(x, w, y, scale, K, N, n, m, prefetch && m == 0);
  for (; m + 2 <= M; m += 2) tile<R, 2>(x, w, y, scale, K, N, n, m, prefetch && m == 0);
  for (; m < M; ++m) tile<R, 1>(x, w, y, scale, K, N, n, m, prefetch && m == 0);
}

template <typename W>
at::Tensor product(const at::Tensor& x, const W* w, const float* scale, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / kRows;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (kRows * std::max<int64_t>(K, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) row_block<kRows>(xp, w, yp, scale, M, K, N, b * kRows);
  });
  for (int64_t n = blocks * kRows; n < N; ++n) row_block<1>(xp, w, yp, scale, M, K, N, n);
  return y;
}

void check_input(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, op, ": x [M, K] and weight [N, K] expected, got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x has ", x.size(1), " features, the weight ", w.size(1));
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), op, ": contiguous tensors expected");
}

at::Tensor few_rows(const at::Tensor& x, const at::Tensor& weight) {
  check_input(x, weight, "mellum::few_rows");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "mellum::few_rows: weight must be float32, got ",
              weight.scalar_type());
  return product(x, weight.data_ptr<float>(), nullptr, weight.size(0));
}

at::Tensor few_rows_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  check_input(x, qweight, "mellum::few_rows_int8");
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "mellum::few_rows_int8: qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == qweight.size(0) &&
                  scale.is_contiguous(),
              "mellum::few_rows_int8: scale must be a contiguous float32 vector of ", qweight.size(0), " values");
  return product(x, qweight.data_ptr<int8_t>(), scale.data_ptr<float>(), qweight.size(0));
}

// Attention of one query token over S cached keys: out[b, h] = softmax(q[b, h] . k[b, g]^T * scale) v[b, g] with
// g = h / (H / Hkv) (grouped heads). Keys and values may be views into a larger cache (each head's S x D block
// contiguous, any stride between heads and rows). Two passes per head, each reading its S x D block once: the S
// scores (eight keys at a time, their sums reduced together) with a vector exp, then the weighted sum of the values
// (64 features at a time in registers). 1.3-1.4x PyTorch's CPU flash attention for one query (docs/engine.md).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "mellum::decode_attention: CPU only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "mellum::decode_attention: q [B, H, 1, D], k and v [B, Hkv, S, D] expected, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "mellum::decode_attention: float32 tensors expected");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0 && S > 0,
              "mellum::decode_attention: shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == D,
              "mellum::decode_attention: each head's keys and values must be one contiguous S x D block");
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t groups = H / Hkv;
  const float fscale = static_cast<float>(scale);
  // Heads per thread at least: small caches stay on one thread (waking the other costs more than it saves).
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (S * D));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S), acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / groups;
      const float* qh = qp + bh * D;
      const float* kh = kp + b * k.stride(0) + g * k.stride(1);
      const float* vh = vp + b * v.stride(0) + g * v.stride(1);
      // Scores, eight keys at a time: eight dot-product accumulators reduced together by a transpose of sums.
      float top = -INFINITY;
      int64_t s = 0;
      const int64_t D8 = D - D % 8;
      for (; s + 8 <= S; s += 8) {
        __m256 a[8];
        for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D8; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qh + d);
          for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kh + (s + j) * D + d), a[j]);
        }
        const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
        const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
        const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
        // lanes: [k0 k1 k2 k3 | k0 k1 k2 k3] halves of h0123, same for k4..k7: add the 128-bit halves across.
        const __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20), hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
        _mm256_storeu_ps(p.data() + s, _mm256_add_ps(lo, hi));
        for (int j = 0; j < 8; ++j) {
          float& score = p[s + j];
          for (int64_t d = D8; d < D; ++d) score += qh[d] * kh[(s + j) * D + d];
          score *= fscale;
          top = std::max(top, score);
        }
      }
      for (; s < S; ++s) {
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qh[d] * kh[s * D + d];
        p[s] = dot * fscale;
        top = std::max(top, p[s]);
      }
      float total = 0.f;
      s = 0;
      __m256 sum8 = _mm256_setzero_ps();
      for (; s + 8 <= S; s += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p.data() + s), _mm256_set1_ps(top)));
        _mm256_storeu_ps(p.data() + s, e);
        sum8 = _mm256_add_ps(sum8, e);
      }
      total = horizontal_sum(sum8);
      for (; s < S; ++s) total += (p[s] = std::exp(p[s] - top));
      // Weighted values, 64 features at a time held in registers across all keys.
      for (int64_t d0 = 0; d0 < D8; d0 += 64) {
        const int64_t n8 = std::min<int64_t>(8, (D8 - d0) / 8);
        __m256 o[8];
        for (int j = 0; j < 8; ++j) o[j] = _mm256_setzero_ps();
        for (int64_t t = 0; t < S; ++t) {
          const __m256 w = _mm256_set1_ps(p[t]);
          const float* vt = vh + t * D + d0;
          for (int j = 0; j < n8; ++j) o[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * j), o[j]);
        }
        for (int j = 0; j < n8; ++j) _mm256_storeu_ps(acc.data() + d0 + 8 * j, o[j]);
      }
      for (int64_t d = D8; d < D; ++d) {
        float sum = 0.f;
        for (int64_t t = 0; t < S; ++t) sum += p[t] * vh[t * D + d];
        acc[d] = sum;
      }
      float* oh = op + bh * D;
      for (int64_t d = 0; d < D; ++d) oh[d] = acc[d] / total;
    }
  });
  return out;
}

}  // namespace

// Schemas, then the CPU implementations (not composite: torch.compile traces them with the fake kernels
// registered in cpu_kernels.py).
TORCH_LIBRARY(mellum, m) {
  m.def("few_rows(Tensor x, Tensor weight) -> Tensor");
  m.def("few_rows_int8(Tensor x, Tensor qweight, Tensor scale) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mellum, CPU, m) {
  m.impl("few_rows", few_rows);
  m.impl("few_rows_int8", few_rows_int8);
  m.impl("decode_attention", decode_attention);
}
