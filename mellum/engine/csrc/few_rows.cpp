// Mellum's CPU decode products: y[M, N] = x[M, K] @ W[N, K]^T for a few activation rows (decode, speculative verify).
//
// A decode step reads every weight once for one to a few tokens, so these products are bound by memory bandwidth,
// not arithmetic. MKL's few-row sgemm runs on one core here and reads 12-17 GB/s; this kernel streams four weight
// rows at a time through AVX2 FMAs on every core (at::parallel_for over row blocks) and reads 20-25 GB/s on the
// same machine (docs/engine.md). Weights are fp32, or int8 with one fp32 scale per output row (weight-only
// quantization: each activation row is rounded to int16 with its own scale, see simd.h).
//
// Built by mellum/engine/cpu_kernels.py with -mavx2 -mfma; loaded only on CPUs that report AVX2.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace mellum::simd;


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
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  product_into(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1),
               weight.size(0));
  return y;
}

at::Tensor few_rows_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  check_input(x, qweight, "mellum::few_rows_int8");
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "mellum::few_rows_int8: qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == qweight.size(0) &&
                  scale.is_contiguous(),
              "mellum::few_rows_int8: scale must be a contiguous float32 vector of ", qweight.size(0), " values");
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  product_into(x.data_ptr<float>(), qweight.data_ptr<int8_t>(), scale.data_ptr<float>(), y.data_ptr<float>(),
               x.size(0), x.size(1), qweight.size(0));
  return y;
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
  // Heads per thread at least: small caches stay on one thread (waking the other costs more than it saves).
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (S * D));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, g = bh % H / groups;
      attend_head(qp + bh * D, kp + b * k.stride(0) + g * k.stride(1), vp + b * v.stride(0) + g * v.stride(1), S, D,
                  static_cast<float>(scale), nullptr, 0, 0, p.data(), op + bh * D);
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
