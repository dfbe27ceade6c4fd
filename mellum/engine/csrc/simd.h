// Shared pieces of Mellum's CPU decode kernels (few_rows.cpp: the single ops; decoder.cpp: the fused decode
// forward): AVX2 few-row products and one-query attention over a block of cached keys, on raw pointers.
//
// Built by mellum/engine/cpu_kernels.py with -mavx2 -mfma -mf16c; loaded only on CPUs that report AVX2 (every
// AVX2 CPU has FMA and F16C too).

#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace mellum::simd {

constexpr int kRows = 4;                  // weight rows per block: four independent FMA chains, four load streams
constexpr int64_t kGrainElems = 1 << 16;  // weights per thread at least (smaller products stay on one thread)

// Set for the duration of a fused decode call that the engine's kernel chooser runs on one thread (on a busy
// machine a parallel region can wait for a descheduled thread, 10x slower per step): `parallel` then runs its whole
// range inline on the calling thread. Each range is split the same way either way, so results are identical.
inline thread_local bool serial = false;

template <typename F>
inline void parallel(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (!serial) {
    at::parallel_for(begin, end, grain, f);
  } else if (begin < end) {
    f(begin, end);
  }
}

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

// R weight rows (from n) times T activation rows (from m): each weight vector is loaded once per T rows. With
// `prefetch`, the next block's R rows are requested at the same offsets: short rows (K = 640) end before the
// hardware prefetcher has caught up with each of the R streams (+15-20% read speed measured at K = 640).
template <int R, int T>
inline void tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n, int64_t m, bool prefetch) {
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (prefetch && k % 16 == 0)  // once per cache line of each row
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * K + k), _MM_HINT_T0);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + (n + r) * K + k);
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + (m + t) * K + k);
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_fmadd_ps(wv[r], xv, acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) {
      float sum = horizontal_sum(acc[t][r]);
      for (int64_t kk = k; kk < K; ++kk) sum += x[(m + t) * K + kk] * w[(n + r) * K + kk];
      y[(m + t) * N + n + r] = sum;
    }
  }
}

template <int R>
inline void row_block(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n) {
  const bool prefetch = n + 2 * R <= N;  // another block follows: fetch it while this one computes
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<R, 4>(x, w, y, K, N, n, m, prefetch && m == 0);
  for (; m + 2 <= M; m += 2) tile<R, 2>(x, w, y, K, N, n, m, prefetch && m == 0);
  for (; m < M; ++m) tile<R, 1>(x, w, y, K, N, n, m, prefetch && m == 0);
}

// y[M, N] = x[M, K] @ w[N, K]^T in fp32, row blocks on every core.
inline void product_into(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t blocks = N / kRows;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (kRows * std::max<int64_t>(K, 1)));
  parallel(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) row_block<kRows>(x, w, y, M, K, N, b * kRows);
  });
  for (int64_t n = blocks * kRows; n < N; ++n) row_block<1>(x, w, y, M, K, N, n);
}

// ---- int8 weights ------------------------------------------------------------------------------------------------
// Widening each int8 to fp32 (two conversions and an FMA per eight weights) bound the int8 product at ~6 G weights/s
// per core here, half what memory delivers. Instead each activation row is rounded to int16 with its own scale
// (max |x| / 32767: a relative error of at most 1.5e-5 of the row's largest value, far finer than bf16), and sixteen
// weights take one widening to int16 and one vpmaddwd (pairwise products summed into int32) per activation row.
// Integer sums have no latency chain to hide, so each thread streams one weight row at a time, in order: 12-13 GB/s
// of int8 per core against 7 with four interleaved rows (the fp32 layout), 16-24 GB/s on both cores.

// int32 lanes take at most 2 * 128 * 32767 per 16 features: flushed to float every 2048 features (128 steps, < 2^31).
constexpr int64_t kFlushK = 2048;

inline float horizontal_sum(__m256i v) { return horizontal_sum(_mm256_cvtepi32_ps(v)); }

// x[K] -> xq[K] int16 with x = xq * scale; returns the scale.
inline float quantize_row(const float* x, int16_t* xq, int64_t K) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 top8 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) top8 = _mm256_max_ps(top8, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  t = _mm_max_ss(t, _mm_shuffle_ps(t, t, 1));
  float top = _mm_cvtss_f32(t);
  for (; k < K; ++k) top = std::max(top, std::fabs(x[k]));
  const float scale = top > 0.f ? top / 32767.f : 1.f, inv = 1.f / scale;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (k = 0; k + 16 <= K; k += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
    // packs interleaves 128-bit lanes (a0-3 b0-3 a4-7 b4-7): put the 64-bit quarters back in order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k), packed);
  }
  for (; k < K; ++k) xq[k] = static_cast<int16_t>(std::lrint(std::clamp(x[k] * inv, -32767.f, 32767.f)));
  return scale;
}

template <int R, int T>
inline void tile_int8(const int16_t* xq, const float* xs, const int8_t* w, float* y, const float* scale, int64_t K,
                      int64_t N, int64_t n, int64_t m, int64_t prefetch) {
  __m256i acc[T][R];
  float sum[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_si256(), sum[t][r] = 0.f;
  const int64_t K16 = K - K % 16;
  int64_t k = 0;
  while (k < K16) {
    for (const int64_t stop = std::min(K16, k + kFlushK); k < stop; k += 16) {
      if (prefetch != 0 && k % 64 == 0)  // once per cache line of each row
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (prefetch + r) * K + k), _MM_HINT_T0);
      __m256i wv[R];
      for (int r = 0; r < R; ++r)
        wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + r) * K + k)));
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m + t) * K + k));
        for (int r = 0; r < R; ++r) acc[t][r] = _mm256_add_epi32(acc[t][r], _mm256_madd_epi16(wv[r], xv));
      }
    }
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) sum[t][r] += horizontal_sum(acc[t][r]), acc[t][r] = _mm256_setzero_si256();
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) {
      int32_t tail = 0;
      for (int64_t kk = K16; kk < K; ++kk) tail += int32_t{xq[(m + t) * K + kk]} * w[(n + r) * K + kk];
      y[(m + t) * N + n + r] = (sum[t][r] + static_cast<float>(tail)) * xs[m + t] * scale[n + r];
    }
  }
}

// One weight row n against every activation row; the row prefetched lies ~8 KB ahead.
inline void row_int8(const int16_t* xq, const float* xs, const int8_t* w, float* y, const float* scale, int64_t M,
                     int64_t K, int64_t N, int64_t n) {
  const int64_t ahead = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
  const int64_t prefetch = n + ahead < N ? n + ahead : 0;  // 0: none (row 0 never lies ahead)
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_int8<1, 4>(xq, xs, w, y, scale, K, N, n, m, m == 0 ? prefetch : 0);
  for (; m + 2 <= M; m += 2) tile_int8<1, 2>(xq, xs, w, y, scale, K, N, n, m, m == 0 ? prefetch : 0);
  for (; m < M; ++m) tile_int8<1, 1>(xq, xs, w, y, scale, K, N, n, m, m == 0 ? prefetch : 0);
}

// y[M, N] = x[M, K] @ (w[N, K] * scale[N])^T for int8 weights with one scale per output row.
inline void product_into(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t K,
                         int64_t N) {
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M);
  for (int64_t m = 0; m < M; ++m) xs[m] = quantize_row(x + m * K, xq.data() + m * K, K);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(K, 1));
  parallel(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) row_int8(xq.data(), xs.data(), w, y, scale, M, K, N, n);
  });
}

// Cached keys and values are fp32, or IEEE fp16 held as uint16_t (the engine's kv_dtype=float16: half the bytes
// attention reads per step, as llama.cpp's default cache); F16C converts eight at a time, exactly.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return _cvtsh_ss(*p); }

// dst[0, n) = src rounded to fp16 (to nearest, ties to even: the rounding of torch's .to(torch.float16)).
inline void store_half(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

// One query head over S cached keys and values (each an S x D block, row-major): out[D] = softmax(q . k * scale) v.
// With `pos` (the slots' stored positions), only slots with 0 <= pos <= qpos and, for window > 0, qpos - pos < window
// count (the engine's masking rule, mellum.model.attention_mask); without, every slot does. `p`: S floats of scratch.
// Two passes, each reading the block once: the scores eight keys at a time (eight sums reduced together) with a
// vector exp, then the weighted values, 64 features at a time held in registers across all keys.
template <typename KV>
inline void attend_head(const float* qh, const KV* kh, const KV* vh, int64_t S, int64_t D, float scale,
                        const int64_t* pos, int64_t qpos, int64_t window, float* p, float* out) {
  const int64_t D8 = D - D % 8;
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 qv = _mm256_loadu_ps(qh + d);
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8(kh + (s + j) * D + d), a[j]);
    }
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    // lanes: [k0 k1 k2 k3 | k0 k1 k2 k3] halves of h0123, same for k4..k7: add the 128-bit halves across.
    const __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20), hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
    _mm256_storeu_ps(p + s, _mm256_add_ps(lo, hi));
    for (int j = 0; j < 8; ++j)
      for (int64_t d = D8; d < D; ++d) p[s + j] += qh[d] * load1(kh + (s + j) * D + d);
  }
  for (; s < S; ++s) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += qh[d] * load1(kh + s * D + d);
    p[s] = dot;
  }
  float top = -INFINITY;
  for (s = 0; s < S; ++s) {
    const bool visible = pos == nullptr || (pos[s] >= 0 && pos[s] <= qpos && (window <= 0 || qpos - pos[s] < window));
    p[s] = visible ? p[s] * scale : -INFINITY;
    top = std::max(top, p[s]);
  }
  if (top == -INFINITY) {  // no visible key (the engine never asks for this): a zero output, not NaNs
    std::fill(out, out + D, 0.f);
    return;
  }
  s = 0;
  __m256 sum8 = _mm256_setzero_ps();
  for (; s + 8 <= S; s += 8) {  // masked scores (-inf) give exp 0
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + s), _mm256_set1_ps(top)));
    _mm256_storeu_ps(p + s, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float total = horizontal_sum(sum8);
  for (; s < S; ++s) total += (p[s] = std::exp(p[s] - top));
  const float inv = 1.f / total;
  for (int64_t d0 = 0; d0 < D8; d0 += 64) {
    const int64_t n8 = std::min<int64_t>(8, (D8 - d0) / 8);
    __m256 o[8];
    for (int j = 0; j < 8; ++j) o[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < S; ++t) {
      const __m256 w = _mm256_set1_ps(p[t]);
      const KV* vt = vh + t * D + d0;
      for (int j = 0; j < n8; ++j) o[j] = _mm256_fmadd_ps(w, load8(vt + 8 * j), o[j]);
    }
    for (int j = 0; j < n8; ++j) _mm256_storeu_ps(out + d0 + 8 * j, _mm256_mul_ps(o[j], _mm256_set1_ps(inv)));
  }
  for (int64_t d = D8; d < D; ++d) {
    float sum = 0.f;
    for (int64_t t = 0; t < S; ++t) sum += p[t] * load1(vh + t * D + d);
    out[d] = sum * inv;
  }
}

}  // namespace mellum::simd
