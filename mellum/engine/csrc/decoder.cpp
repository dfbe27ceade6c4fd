// Mellum's fused CPU decode forward: the whole transformer for a few new tokens in one call.
//
// A decode step of the bundled 23M model runs ~40 PyTorch operators per layer, and on this CPU their dispatch costs
// more than the arithmetic (0.55 ms per layer measured with near-zero weights: docs/engine.md). This class keeps
// pointers to the engine's weights and KV cache and runs every layer in C++: RMSNorm, the fused q/k/v product,
// QK-norm, RoPE, the cache write, attention over the cached keys, the output product, the SwiGLU MLP, the residuals
// and the output head, with the few-row products and one-query attention of simd.h (every core).
//
// Scope: dense SwiGLU or mixture-of-experts layers (fp32 router), full or sliding-window attention, fp32 activations
// (rounded to int16 inside int8 products), fp32 or int8 (per-row scale) weights, up to 16 tokens per call: T
// consecutive tokens in each of B cache rows (batched decode: T = 1; speculative verify and short prefill chunks:
// B = 1). Masking follows the stored key positions exactly as mellum.model.attention_mask does. The Python side
// (mellum/engine/fused.py) decides when it applies and falls back to the layer-by-layer forward otherwise.

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace mellum::simd;

constexpr int64_t kMaxTokens = 16;
constexpr int kPerLayer = 13;  // tensors per layer in the constructor's list (see Decoder::Decoder)

// A bias-free linear layer: fp32 weight [N, K], or int8 [N, K] with one fp32 scale per output row.
struct Linear {
  at::Tensor weight, scale;  // kept alive; the engine copies new weights into them in place
  const float* w32 = nullptr;
  const int8_t* w8 = nullptr;
  const float* s = nullptr;
  int64_t N = 0, K = 0;

  Linear() = default;
  Linear(const at::Tensor& w, const at::Tensor& sc, int64_t in_features, const char* name, int64_t layer)
      : weight(w), scale(sc) {
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() && w.size(1) == in_features,
                "mellum::Decoder: layer ", layer, " ", name, ": a contiguous CPU weight [N, ", in_features,
                "] expected, got ", w.sizes());
    N = w.size(0), K = w.size(1);
    if (sc.numel() == 0) {
      TORCH_CHECK(w.scalar_type() == at::kFloat, "mellum::Decoder: layer ", layer, " ", name,
                  ": float32 weight expected (or int8 with scales), got ", w.scalar_type());
      w32 = w.data_ptr<float>();
    } else {
      TORCH_CHECK(w.scalar_type() == at::kChar && sc.scalar_type() == at::kFloat && sc.dim() == 1 &&
                      sc.size(0) == N && sc.is_contiguous(),
                  "mellum::Decoder: layer ", layer, " ", name, ": int8 weight with ", N, " float32 scales expected");
      w8 = w.data_ptr<int8_t>();
      s = sc.data_ptr<float>();
    }
  }

  void operator()(const float* x, float* y, int64_t M) const {
    if (w8 != nullptr)
      product_into(x, w8, s, y, M, K, N);
    else
      product_into(x, w32, y, M, K, N);
  }
};

const float* tensor_of(const at::Tensor& t, std::vector<int64_t> shape, const char* name, int64_t layer) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.sizes() == at::IntArrayRef(shape) &&
                  t.is_contiguous(),
              "mellum::Decoder: layer ", layer, " ", name, ": a contiguous float32 tensor ", shape, " expected, got ",
              t.sizes(), " ", t.scalar_type());
  return t.data_ptr<float>();
}

// y = weight * x / rms(x) over n features (statistics in fp32, as mellum.model.RMSNorm).
inline void rms_norm(const float* x, const float* weight, float* y, int64_t n, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = weight[i] * (x[i] * r);
}

// Rotate-half RoPE of one head in place (dims i and i + D/2), cos/sin of its position already scaled.
inline void rotate(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

// One rotary table (frequencies [D / 2] and scale), shared by every layer of its attention type.
struct RopeTable {
  at::Tensor inv_freq;
  const float* freqs;
  float factor;
};

// A mixture-of-experts MLP (Qwen3-MoE / Mellum 2 routing, as mellum.model.moe): softmax over E router scores, the
// top K experts (renormalised to sum to one when `renormalise`), each a SwiGLU MLP of width I. Expert weights are
// fp32, or int8 with one fp32 scale per row (mellum.engine.quant.Int8Experts); the router is fp32.
struct Experts {
  const float* router = nullptr;  // [E, C]
  Linear gate_up, down;  // all experts as one [E * 2I, C] and one [E * C, I] matrix: expert e's N rows start at e * N
  int64_t E = 0, K = 0, I = 0;
  bool renormalise = true;

  // y[M, N] = x[M, K] @ expert e's rows of `w` (N of them)^T.
  static void product(const Linear& w, int64_t e, int64_t N, const float* x, float* y, int64_t M) {
    if (w.w8 != nullptr)
      product_into(x, w.w8 + e * N * w.K, w.s + e * N, y, M, w.K, N);
    else
      product_into(x, w.w32 + e * N * w.K, y, M, w.K, N);
  }
};

// Stacked expert weights [E, N, K] (and scales [E, N] for int8) viewed as one [E * N, K] linear layer.
Linear experts_linear(const at::Tensor& w, const at::Tensor& scale, std::vector<int64_t> shape, const char* name,
                      int64_t layer) {
  TORCH_CHECK(w.dim() == 3 && w.sizes() == at::IntArrayRef(shape) && w.is_contiguous(), "mellum::Decoder: layer ",
              layer, " ", name, ": contiguous weights ", shape, " expected, got ", w.sizes());
  TORCH_CHECK(scale.numel() == 0 || (scale.dim() == 2 && scale.size(0) == shape[0] && scale.size(1) == shape[1]),
              "mellum::Decoder: layer ", layer, " ", name, ": scales [", shape[0], ", ", shape[1], "] expected");
  return Linear(w.view({shape[0] * shape[1], shape[2]}), scale.numel() == 0 ? scale : scale.reshape({-1}), shape[2],
                name, layer);
}

inline void silu_times(const float* gate, const float* up, float* out, int64_t n) {  // SiLU(gate) * up
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// out[M, C] = the experts' weighted sum for rows h[M, C]. Each used expert multiplies the rows routed to it, in
// ascending expert order, so every token sums its experts in the order mellum.model.moe's index_add_ does.
void mixture(const Experts& ex, const float* h, float* out, int64_t M, int64_t C) {
  const int64_t E = ex.E, K = ex.K, I = ex.I;
  std::vector<float> probs(M * E), weight(M * K);
  std::vector<int64_t> chosen(M * K);
  product_into(h, ex.router, probs.data(), M, C, E);
  for (int64_t m = 0; m < M; ++m) {
    float* p = probs.data() + m * E;
    const float top = *std::max_element(p, p + E);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(p[e] - top));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [p](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float picked = 0.f;
    for (int64_t k = 0; k < K; ++k) picked += p[order[k]];
    for (int64_t k = 0; k < K; ++k) {
      chosen[m * K + k] = order[k];
      weight[m * K + k] = ex.renormalise ? p[order[k]] / picked : p[order[k]];
    }
  }
  std::fill(out, out + M * C, 0.f);
  std::vector<float> rows(M * C), gu(M * 2 * I), act(M * I), y(M * C), w(M);
  std::vector<int64_t> token(M);
  for (int64_t e = 0; e < E; ++e) {
    int64_t n = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        if (chosen[m * K + k] == e) {
          token[n] = m, w[n] = weight[m * K + k];
          std::copy(h + m * C, h + (m + 1) * C, rows.data() + n * C);
          ++n;
        }
    if (n == 0) continue;
    Experts::product(ex.gate_up, e, 2 * I, rows.data(), gu.data(), n);
    for (int64_t j = 0; j < n; ++j) silu_times(gu.data() + j * 2 * I, gu.data() + j * 2 * I + I, act.data() + j * I, I);
    Experts::product(ex.down, e, C, act.data(), y.data(), n);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < C; ++c) out[token[j] * C + c] += w[j] * y[j * C + c];
  }
}

struct Layer {
  const float *in_norm, *post_norm, *q_norm = nullptr, *k_norm = nullptr;
  Linear qkv, o, gate_up, down;  // gate_up, down: dense layers only
  Experts experts;  // sparse layers only (experts.E > 0)
  at::Tensor k_cache, v_cache, pos_cache;  // [R, Hkv, S, D] x2 (fp32 or fp16), [R, S] int64
  float *k = nullptr, *v = nullptr;  // fp32 caches
  uint16_t *k16 = nullptr, *v16 = nullptr;  // fp16 caches
  int64_t* pos;
  int64_t slots, window;  // window 0: full attention
  size_t table;  // index into Decoder::tables
};

struct Decoder : torch::CustomClassHolder {
  int64_t C, H, Hkv, D, I, V, rows, E, K, EI;
  bool renormalise;
  float eps;
  at::Tensor embed_t, final_norm_t;
  const float *embed, *final_norm;
  Linear lm_head;
  std::vector<at::Tensor> layer_tensors_;  // kept alive (Layer holds raw pointers into the norms)
  std::vector<RopeTable> tables;
  std::vector<Layer> layers;

  // dims: [hidden C, heads H, kv heads Hkv, head dim D, MLP width I, vocabulary V, experts E, experts per token K,
  // expert width EI, renormalise top-K weights 0/1] (E = 0 without experts). `layer_tensors`: per layer, in order,
  // input norm [C], qkv weight, qkv scale, o weight, o scale, post-attention norm [C], gate/up weight, gate/up scale,
  // down weight, down scale, q norm [D], k norm [D], router [E, C]; scales are empty tensors for fp32 weights, the
  // QK norms empty without QK-norm, the router empty on dense layers. A layer with a router is a mixture of experts:
  // its gate/up weight is the experts' [E, 2 EI, C] and its down weight [E, C, EI], fp32 with empty scales or int8
  // with scales [E, 2 EI] and [E, C]. `caches`: per layer k, v [R, Hkv, S, D] and positions [R, S] (the engine's
  // KVCache). `windows`: per layer, 0 for full attention. `inv_freqs` / `attention_factors`: each layer's rotary
  // frequencies [D / 2] and scale.
  Decoder(std::vector<int64_t> dims, double eps_, at::Tensor embed_weight, at::Tensor final_norm_weight,
          at::Tensor lm_weight, at::Tensor lm_scale, std::vector<at::Tensor> layer_tensors,
          std::vector<at::Tensor> caches, std::vector<int64_t> windows, std::vector<at::Tensor> inv_freqs,
          std::vector<double> attention_factors)
      : eps(static_cast<float>(eps_)) {
    TORCH_CHECK(dims.size() == 10, "mellum::Decoder: dims [C, H, Hkv, D, I, V, E, K, EI, renormalise] expected");
    C = dims[0], H = dims[1], Hkv = dims[2], D = dims[3], I = dims[4], V = dims[5];
    E = dims[6], K = dims[7], EI = dims[8], renormalise = dims[9] != 0;
    TORCH_CHECK(C > 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0 && D % 2 == 0 && I > 0 && V > 0,
                "mellum::Decoder: bad dims");
    TORCH_CHECK(E == 0 || (K >= 1 && K <= E && EI > 0), "mellum::Decoder: bad expert dims");
    const size_t L = windows.size();
    TORCH_CHECK(L > 0 && layer_tensors.size() == L * kPerLayer && caches.size() == L * 3 && inv_freqs.size() == L &&
                    attention_factors.size() == L,
                "mellum::Decoder: ", L, " layers need ", L * kPerLayer, " layer tensors, ", L * 3,
                " cache tensors and ", L, " rotary tables");
    TORCH_CHECK(embed_weight.scalar_type() == at::kFloat && embed_weight.is_contiguous() && embed_weight.dim() == 2 &&
                    embed_weight.size(0) == V && embed_weight.size(1) == C,
                "mellum::Decoder: float32 embedding [V, C] expected");
    embed_t = embed_weight, final_norm_t = final_norm_weight;
    embed = embed_weight.data_ptr<float>();
    final_norm = tensor_of(final_norm_weight, {C}, "final norm", -1);
    lm_head = Linear(lm_weight, lm_scale, C, "lm_head", -1);
    TORCH_CHECK(lm_head.N == V, "mellum::Decoder: lm_head has ", lm_head.N, " outputs, vocabulary ", V);
    layer_tensors_ = layer_tensors;
    for (size_t i = 0; i < L; ++i) {
      const at::Tensor* t = layer_tensors.data() + i * kPerLayer;
      const int64_t li = static_cast<int64_t>(i);
      Layer layer;
      layer.in_norm = tensor_of(t[0], {C}, "input norm", li);
      layer.qkv = Linear(t[1], t[2], C, "qkv_proj", li);
      TORCH_CHECK(layer.qkv.N == (H + 2 * Hkv) * D, "mellum::Decoder: layer ", li, " qkv_proj has ", layer.qkv.N,
                  " outputs, expected ", (H + 2 * Hkv) * D);
      layer.o = Linear(t[3], t[4], H * D, "o_proj", li);
      TORCH_CHECK(layer.o.N == C, "mellum::Decoder: layer ", li, " o_proj has ", layer.o.N, " outputs");
      layer.post_norm = tensor_of(t[5], {C}, "post-attention norm", li);
      if (t[12].numel() != 0) {
        TORCH_CHECK(E > 0, "mellum::Decoder: layer ", li, " has a router but dims declare no experts");
        Experts& ex = layer.experts;
        ex.router = tensor_of(t[12], {E, C}, "router", li);
        ex.gate_up = experts_linear(t[6], t[7], {E, 2 * EI, C}, "experts gate_up_proj", li);
        ex.down = experts_linear(t[8], t[9], {E, C, EI}, "experts down_proj", li);
        ex.E = E, ex.K = K, ex.I = EI, ex.renormalise = renormalise;
      } else {
        layer.gate_up = Linear(t[6], t[7], C, "gate_up_proj", li);
        TORCH_CHECK(layer.gate_up.N == 2 * I, "mellum::Decoder: layer ", li, " gate_up_proj has ", layer.gate_up.N,
                    " outputs, expected ", 2 * I);
        layer.down = Linear(t[8], t[9], I, "down_proj", li);
        TORCH_CHECK(layer.down.N == C, "mellum::Decoder: layer ", li, " down_proj has ", layer.down.N, " outputs");
      }
      TORCH_CHECK((t[10].numel() == 0) == (t[11].numel() == 0), "mellum::Decoder: layer ", li,
                  ": both QK norms or neither");
      if (t[10].numel() != 0) {
        layer.q_norm = tensor_of(t[10], {D}, "q norm", li);
        layer.k_norm = tensor_of(t[11], {D}, "k norm", li);
      }
      layer.k_cache = caches[3 * i], layer.v_cache = caches[3 * i + 1], layer.pos_cache = caches[3 * i + 2];
      const at::Tensor &kc = layer.k_cache, &vc = layer.v_cache, &pc = layer.pos_cache;
      TORCH_CHECK((kc.scalar_type() == at::kFloat || kc.scalar_type() == at::kHalf) && kc.dim() == 4 &&
                      kc.size(1) == Hkv && kc.size(3) == D && kc.is_contiguous() && vc.sizes() == kc.sizes() &&
                      vc.scalar_type() == kc.scalar_type() && vc.is_contiguous(),
                  "mellum::Decoder: layer ", li, ": contiguous float32 or float16 k and v caches [R, ", Hkv, ", S, ",
                  D, "] expected, got ", kc.sizes(), " and ", vc.sizes());
      TORCH_CHECK(pc.scalar_type() == at::kLong && pc.dim() == 2 && pc.size(0) == kc.size(0) &&
                      pc.size(1) == kc.size(2) && pc.is_contiguous(),
                  "mellum::Decoder: layer ", li, ": int64 positions [R, S] expected");
      if (i == 0) rows = kc.size(0);
      TORCH_CHECK(kc.size(0) == rows, "mellum::Decoder: every layer's cache needs the same rows");
      if (kc.scalar_type() == at::kHalf) {
        layer.k16 = reinterpret_cast<uint16_t*>(kc.data_ptr<at::Half>());
        layer.v16 = reinterpret_cast<uint16_t*>(vc.data_ptr<at::Half>());
      } else {
        layer.k = kc.data_ptr<float>(), layer.v = vc.data_ptr<float>();
      }
      layer.pos = pc.data_ptr<int64_t>();
      layer.slots = kc.size(2);
      layer.window = windows[i];
      TORCH_CHECK(layer.window >= 0, "mellum::Decoder: windows must be >= 0 (0: full attention)");
      const float* freqs = tensor_of(inv_freqs[i], {D / 2}, "rotary frequencies", li);
      const float factor = static_cast<float>(attention_factors[i]);
      layer.table = 0;
      while (layer.table < tables.size() &&
             (tables[layer.table].freqs != freqs || tables[layer.table].factor != factor))
        ++layer.table;
      if (layer.table == tables.size()) tables.push_back({inv_freqs[i], freqs, factor});
      layers.push_back(std::move(layer));
    }
  }

  // ids [B, T] (int64, 1 <= B * T <= 16): row b's tokens at positions starts[b]..starts[b]+T-1 of cache row
  // rows[b]. Writes their keys and values; returns (logits [B, T, V], or [B, 1, V] with last_only; hidden [B, T, C]
  // before the final norm). `one_thread`: every loop on the calling thread (the same results; see simd.h `serial`).
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& ids, std::vector<int64_t> cache_rows,
                                             std::vector<int64_t> starts, bool last_only, bool one_thread) {
    TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.is_contiguous(),
                "mellum::Decoder: ids must be a contiguous int64 [B, T] tensor");
    const int64_t B = ids.size(0), T = ids.size(1);
    check_call(B, T, cache_rows, starts);
    const int64_t* id = ids.data_ptr<int64_t>();
    at::Tensor hidden = at::empty({B, T, C}, at::kFloat);
    float* x = hidden.data_ptr<float>();
    for (int64_t m = 0; m < B * T; ++m) {
      TORCH_CHECK(id[m] >= 0 && id[m] < V, "mellum::Decoder: token id ", id[m], " outside [0, ", V, ")");
      std::copy(embed + id[m] * C, embed + (id[m] + 1) * C, x + m * C);
    }
    return run(hidden, cache_rows, starts, last_only, one_thread);
  }

  // The same with the first layer's input given, x [B, T, C] (float32), instead of token embeddings: the MTP
  // layer's combined embedding and hidden state (mellum.model.mtp), run by a decoder holding only that layer.
  std::tuple<at::Tensor, at::Tensor> forward_hidden(const at::Tensor& x, std::vector<int64_t> cache_rows,
                                                    std::vector<int64_t> starts, bool last_only, bool one_thread) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(2) == C,
                "mellum::Decoder: inputs must be a float32 [B, T, ", C, "] tensor");
    check_call(x.size(0), x.size(1), cache_rows, starts);
    return run(x.contiguous().clone(), cache_rows, starts, last_only, one_thread);
  }

 private:
  void check_call(int64_t B, int64_t T, const std::vector<int64_t>& cache_rows, const std::vector<int64_t>& starts) {
    const int64_t M = B * T;
    TORCH_CHECK(M >= 1 && M <= kMaxTokens, "mellum::Decoder: 1 to ", kMaxTokens, " tokens per call, got ", M);
    TORCH_CHECK(static_cast<int64_t>(cache_rows.size()) == B && static_cast<int64_t>(starts.size()) == B,
                "mellum::Decoder: one cache row and one start position per batch row");
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(cache_rows[b] >= 0 && cache_rows[b] < rows, "mellum::Decoder: row ", cache_rows[b],
                  " outside the cache's ", rows, " rows");
      TORCH_CHECK(starts[b] >= 0, "mellum::Decoder: negative start position");
      for (int64_t c = 0; c < b; ++c)
        TORCH_CHECK(cache_rows[c] != cache_rows[b], "mellum::Decoder: cache row ", cache_rows[b], " given twice");
      for (const Layer& layer : layers) {
        if (layer.window == 0) {
          TORCH_CHECK(starts[b] + T <= layer.slots, "mellum::Decoder: positions up to ", starts[b] + T,
                      " exceed the cache's ", layer.slots);
        } else {  // the T new entries must not overwrite a key an earlier one of them still sees
          TORCH_CHECK(T <= layer.slots - layer.window + 1, "mellum::Decoder: ", T,
                      " tokens overrun a sliding ring of ", layer.slots, " slots for window ", layer.window);
        }
      }
    }
  }

  // Every layer, the final norm and the output head over hidden [B, T, C] (the first layer's input, updated in
  // place into the last layer's output).
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor hidden, const std::vector<int64_t>& cache_rows,
                                         const std::vector<int64_t>& starts, bool last_only, bool one_thread) {
    struct SerialScope {  // simd.h's `serial` for this call, restored however it ends
      bool before = serial;
      explicit SerialScope(bool on) { serial = on; }
      ~SerialScope() { serial = before; }
    } scope(one_thread);
    const int64_t B = hidden.size(0), T = hidden.size(1), M = B * T;
    const int64_t Q = H * D, KV = Hkv * D, W = Q + 2 * KV, groups = H / Hkv, half = D / 2;
    float* x = hidden.data_ptr<float>();
    std::vector<int64_t> position(M);  // of each of the M = B * T tokens (row-major over [B, T])
    for (int64_t m = 0; m < M; ++m) position[m] = starts[m / T] + m % T;
    std::vector<float> h(M * C), qkv(M * W), attn(M * Q), tmp(M * C), gu(M * 2 * I), act(M * I);
    // cos | sin of every token's position, once per rotary table: rope[(table * M + m) * D + ...].
    std::vector<float> rope(tables.size() * M * D);
    for (size_t j = 0; j < tables.size(); ++j) {
      for (int64_t m = 0; m < M; ++m) {
        const float p = static_cast<float>(position[m]);
        float* out = rope.data() + (j * M + m) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float f = p * tables[j].freqs[i];
          out[i] = std::cos(f) * tables[j].factor;
          out[half + i] = std::sin(f) * tables[j].factor;
        }
      }
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    for (const Layer& L : layers) {
      for (int64_t m = 0; m < M; ++m) rms_norm(x + m * C, L.in_norm, h.data() + m * C, C, eps);
      L.qkv(h.data(), qkv.data(), M);
      const int64_t S = L.slots;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t r = cache_rows[m / T], slot = position[m] % S;
        float* q = qkv.data() + m * W;
        float* k = q + Q;
        const float* v = k + KV;
        const float* cos = rope.data() + (L.table * M + m) * D;
        for (int64_t head = 0; head < H; ++head) {
          if (L.q_norm != nullptr) rms_norm(q + head * D, L.q_norm, q + head * D, D, eps);
          rotate(q + head * D, cos, cos + half, half);
        }
        for (int64_t g = 0; g < Hkv; ++g) {
          if (L.k_norm != nullptr) rms_norm(k + g * D, L.k_norm, k + g * D, D, eps);
          rotate(k + g * D, cos, cos + half, half);
          const int64_t at = ((r * Hkv + g) * S + slot) * D;
          if (L.k16 != nullptr) {
            store_half(k + g * D, L.k16 + at, D);
            store_half(v + g * D, L.v16 + at, D);
          } else {
            std::copy(k + g * D, k + (g + 1) * D, L.k + at);
            std::copy(v + g * D, v + (g + 1) * D, L.v + at);
          }
        }
        L.pos[r * S + slot] = position[m];
      }
      // A token at position p sees keys at positions <= p: on a full layer slots [0, p] (slot = position), on a
      // ring every slot, each checked against its stored position.
      int64_t keys = S;
      if (L.window == 0) keys = *std::max_element(position.begin(), position.end()) + 1;
      const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, keys * D));
      parallel(0, M * H, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> p(keys);
        for (int64_t mh = begin; mh < end; ++mh) {
          const int64_t m = mh / H, head = mh % H, g = head / groups, r = cache_rows[m / T];
          const int64_t n = L.window == 0 ? position[m] + 1 : S;
          const int64_t block = (r * Hkv + g) * S * D;
          if (L.k16 != nullptr)
            attend_head(qkv.data() + m * W + head * D, L.k16 + block, L.v16 + block, n, D, scale, L.pos + r * S,
                        position[m], L.window, p.data(), attn.data() + m * Q + head * D);
          else
            attend_head(qkv.data() + m * W + head * D, L.k + block, L.v + block, n, D, scale, L.pos + r * S,
                        position[m], L.window, p.data(), attn.data() + m * Q + head * D);
        }
      });
      L.o(attn.data(), tmp.data(), M);
      for (int64_t i = 0; i < M * C; ++i) x[i] += tmp[i];
      for (int64_t m = 0; m < M; ++m) rms_norm(x + m * C, L.post_norm, h.data() + m * C, C, eps);
      if (L.experts.E > 0) {
        mixture(L.experts, h.data(), tmp.data(), M, C);
      } else {
        L.gate_up(h.data(), gu.data(), M);
        for (int64_t m = 0; m < M; ++m) silu_times(gu.data() + m * 2 * I, gu.data() + m * 2 * I + I, act.data() + m * I, I);
        L.down(act.data(), tmp.data(), M);
      }
      for (int64_t i = 0; i < M * C; ++i) x[i] += tmp[i];
    }
    const int64_t out_t = last_only ? 1 : T;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < out_t; ++t)
        rms_norm(x + (b * T + T - out_t + t) * C, final_norm, h.data() + (b * out_t + t) * C, C, eps);
    at::Tensor logits = at::empty({B, out_t, V}, at::kFloat);
    lm_head(h.data(), logits.data_ptr<float>(), B * out_t);
    return {logits, hidden};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(mellum, m) {
  m.class_<Decoder>("Decoder")
      .def(torch::init<std::vector<int64_t>, double, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<at::Tensor>, std::vector<double>>())
      .def("forward", &Decoder::forward)
      .def("forward_hidden", &Decoder::forward_hidden);
}
