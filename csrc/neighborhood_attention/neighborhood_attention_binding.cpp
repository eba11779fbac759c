// Stable-ABI binding of the neighborhood attention 2D CPU kernels:
//
//   neighborhood_attention2d_fwd(q, k, v, kh, kw, dh, dw, border, bias?, scale) -> (out, lse)
//   neighborhood_attention2d_bwd(dout, q, k, v, out, lse, kh, kw, dh, dw, border, bias?, scale,
//                                bias_grad) -> (dq, dk, dv, dbias)
//
// q, k, v: (B, H, W, heads, D), any strides (passed to the kernels as they are); out contiguous;
// lse (B, heads, H, W) per query (natural log, float32; float64 for float64 inputs). bias:
// (heads|1, 2kh-1, 2kw-1), used in the accumulation dtype. border: "clamp" | "mask" | "zero"
// (see alterops/neighborhood_attention.py). dbias is (0,) unless bias_grad and a bias is given.
#include <string>
#include <tuple>

#include "../common/binding.h"
#include "neighborhood_attention.h"

namespace alterops {
namespace neighborhood {
namespace {

using binding::Tensor;
using binding::ScalarType;
using binding::shape_str;

int32_t border_code(const std::string& b) {
  if (b == "clamp") return kClamp;
  if (b == "mask") return kMask;
  if (b == "zero") return kZero;
  STD_TORCH_CHECK(false, "neighborhood_attention2d: border must be 'clamp', 'mask' or 'zero', got '", b, "'");
  return kClamp;
}

const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

// The kernels' element type of q (float32, float64 or bfloat16).
DType attention_dtype(const Tensor& q) {
  const ScalarType t = q.scalar_type();
  STD_TORCH_CHECK(t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16,
                  "neighborhood_attention2d (cpu): q must be float32, float64 or bfloat16, got ", dtype_name(t));
  return binding::dtype_of(t, "neighborhood_attention2d (cpu): q");
}

ScalarType acc_scalar_type(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// A tensor shaped like q, on the CPU, of q's dtype.
void check_like_q(const Tensor& t, const Tensor& q, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), "neighborhood_attention2d (cpu): ", name, " must be on the CPU");
  STD_TORCH_CHECK(binding::same_sizes(t, q), "neighborhood_attention2d: ", name, " has shape ", shape_str(t),
                  " but q has shape ", shape_str(q));
  STD_TORCH_CHECK(t.scalar_type() == q.scalar_type(), "neighborhood_attention2d: ", name, " has dtype ",
                  dtype_name(t.scalar_type()), " but q has dtype ", dtype_name(q.scalar_type()));
}

DType check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kh, int64_t kw, int64_t dh, int64_t dw,
                   int32_t border, const std::optional<Tensor>& bias) {
  STD_TORCH_CHECK(q.dim() == 5, "neighborhood_attention2d: q must be (B, H, W, heads, head_dim), got shape ",
                  shape_str(q));
  STD_TORCH_CHECK(q.is_cpu(), "neighborhood_attention2d (cpu): q must be on the CPU");
  const DType dt = attention_dtype(q);
  check_like_q(k, q, "k");
  check_like_q(v, q, "v");
  STD_TORCH_CHECK(kh >= 1 && kw >= 1 && kh % 2 == 1 && kw % 2 == 1,
                  "neighborhood_attention2d: kernel sizes must be odd and >= 1, got (", kh, ", ", kw, ")");
  STD_TORCH_CHECK(dh >= 1 && dw >= 1, "neighborhood_attention2d: dilation must be >= 1, got (", dh, ", ", dw, ")");
  if (border == kClamp)
    STD_TORCH_CHECK(kh * dh <= q.size(1) && kw * dw <= q.size(2),
                    "neighborhood_attention2d: border 'clamp' needs kernel_size * dilation <= map size, got kernel (",
                    kh, ", ", kw, "), dilation (", dh, ", ", dw, ") on a ", q.size(1), "x", q.size(2), " map");
  if (bias.has_value()) {
    const Tensor& t = *bias;
    STD_TORCH_CHECK(t.is_cpu(), "neighborhood_attention2d (cpu): bias must be on the CPU");
    STD_TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == q.size(3)) && t.size(1) == 2 * kh - 1 &&
                        t.size(2) == 2 * kw - 1,
                    "neighborhood_attention2d: bias must be (heads|1, 2kh-1, 2kw-1) = (", q.size(3), "|1, ", 2 * kh - 1,
                    ", ", 2 * kw - 1, "), got ", shape_str(t));
    binding::dtype_of(t.scalar_type(), "neighborhood_attention2d: bias");
  }
  return dt;
}

// The bias table in the accumulation dtype, contiguous (an undefined tensor without a bias).
Tensor bias_table(const std::optional<Tensor>& bias, ScalarType acc) {
  if (!bias.has_value()) return Tensor();
  Tensor t = *bias;
  if (t.scalar_type() != acc) t = torch::stable::to(t, acc);
  return binding::contiguous(t);
}

View5 view5(const Tensor& t) {
  View5 v;
  v.data = t.const_data_ptr();
  for (int d = 0; d < 5; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

std::vector<int64_t> sizes_of(const Tensor& t) { return std::vector<int64_t>(t.sizes().begin(), t.sizes().end()); }

std::tuple<Tensor, Tensor> na2d_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kh, int64_t kw,
                                    int64_t dh, int64_t dw, const std::string& border_s,
                                    const std::optional<Tensor>& bias, double scale) {
  const int32_t border = border_code(border_s);
  const DType dt = check_inputs(q, k, v, kh, kw, dh, dw, border, bias);
  const int64_t B = q.size(0), H = q.size(1), W = q.size(2), NH = q.size(3), D = q.size(4);
  const ScalarType acc = acc_scalar_type(q.scalar_type());
  Tensor out = binding::new_output({B, H, W, NH, D}, q.scalar_type());
  Tensor lse = binding::new_output({B, NH, H, W}, acc);
  if (out.numel() == 0) return {out, lse};
  const Tensor table = bias_table(bias, acc);

  ForwardArgs a{};
  a.dtype = dt;
  a.q = view5(q);
  a.k = view5(k);
  a.v = view5(v);
  a.out = out.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr();
  a.bias = table.defined() ? table.const_data_ptr() : nullptr;
  a.bias_heads = table.defined() ? table.size(0) : 1;
  a.kh = kh;
  a.kw = kw;
  a.dh = dh;
  a.dw = dw;
  a.border = border;
  a.scale = scale;
  const Kernels& kern = *binding::cpu_kernels().neighborhood;

  if (dt == DType::BFloat16 && float_fast_width(D)) {
    // The float32 forward on float32 copies (the same float32 arithmetic as the bfloat16 path,
    // 2x faster).
    const Tensor qf = binding::float_copy(q), kf = binding::float_copy(k), vf = binding::float_copy(v);
    Tensor outf = binding::new_output(sizes_of(out), ScalarType::Float);
    a.dtype = DType::Float32;
    a.q = view5(qf);
    a.k = view5(kf);
    a.v = view5(vf);
    a.out = outf.mutable_data_ptr();
    kern.forward(a, binding::cpu_parallel());
    binding::copy_into(out, outf);
    return {out, lse};
  }
  kern.forward(a, binding::cpu_parallel());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> na2d_bwd(const Tensor& dout_in, const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& out, const Tensor& lse_in,
                                                    int64_t kh, int64_t kw, int64_t dh, int64_t dw,
                                                    const std::string& border_s, const std::optional<Tensor>& bias,
                                                    double scale, bool bias_grad) {
  const int32_t border = border_code(border_s);
  const DType dt = check_inputs(q, k, v, kh, kw, dh, dw, border, bias);
  const int64_t B = q.size(0), H = q.size(1), W = q.size(2), NH = q.size(3), D = q.size(4);
  const ScalarType acc = acc_scalar_type(q.scalar_type());
  STD_TORCH_CHECK(dout_in.is_cpu(), "neighborhood_attention2d (cpu): dout must be on the CPU");
  STD_TORCH_CHECK(binding::same_sizes(dout_in, q), "neighborhood_attention2d: dout has shape ", shape_str(dout_in),
                  " but q has shape ", shape_str(q));
  binding::dtype_of(dout_in.scalar_type(), "neighborhood_attention2d: dout");
  check_like_q(out, q, "out");
  STD_TORCH_CHECK(lse_in.is_cpu(), "neighborhood_attention2d (cpu): lse must be on the CPU");
  STD_TORCH_CHECK(lse_in.dim() == 4 && lse_in.size(0) == B && lse_in.size(1) == NH && lse_in.size(2) == H &&
                      lse_in.size(3) == W,
                  "neighborhood_attention2d: lse must be (B, heads, H, W) = (", B, ", ", NH, ", ", H, ", ", W,
                  "), got ", shape_str(lse_in));
  binding::dtype_of(lse_in.scalar_type(), "neighborhood_attention2d: lse");
  const Tensor dout = dout_in.scalar_type() == q.scalar_type() ? dout_in : torch::stable::to(dout_in, q.scalar_type());
  const Tensor lse = binding::contiguous(lse_in.scalar_type() == acc ? lse_in : torch::stable::to(lse_in, acc));

  Tensor dq = binding::new_output({B, H, W, NH, D}, q.scalar_type());
  Tensor dk = binding::new_output({B, H, W, NH, D}, q.scalar_type());
  Tensor dv = binding::new_output({B, H, W, NH, D}, q.scalar_type());
  const bool want_db = bias_grad && bias.has_value();
  const Tensor table = bias_table(bias, acc);
  Tensor dbias = want_db ? binding::zeros(sizes_of(table), acc) : binding::zeros({0}, acc);
  if (q.numel() == 0) {
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    return {dq, dk, dv, dbias};
  }

  BackwardArgs a{};
  a.dtype = dt;
  a.dout = view5(dout);
  a.q = view5(q);
  a.k = view5(k);
  a.v = view5(v);
  a.out = view5(out);
  a.lse = lse.const_data_ptr();
  a.bias = table.defined() ? table.const_data_ptr() : nullptr;
  a.bias_heads = table.defined() ? table.size(0) : 1;
  a.dq = dq.mutable_data_ptr();
  a.dk = dk.mutable_data_ptr();
  a.dv = dv.mutable_data_ptr();
  a.dbias = want_db ? dbias.mutable_data_ptr() : nullptr;
  a.kh = kh;
  a.kw = kw;
  a.dh = dh;
  a.dw = dw;
  a.border = border;
  a.scale = scale;
  binding::cpu_kernels().neighborhood->backward(a, binding::cpu_parallel());
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace neighborhood
}  // namespace alterops

STABLE_TORCH_LIBRARY_FRAGMENT(alterops, m) {
  m.def(
      "neighborhood_attention2d_fwd(Tensor q, Tensor k, Tensor v, int kh, int kw, int dh, int dw, str border, "
      "Tensor? bias, float scale) -> (Tensor, Tensor)");
  m.def(
      "neighborhood_attention2d_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int kh, "
      "int kw, int dh, int dw, str border, Tensor? bias, float scale, bool bias_grad) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(alterops, CPU, m) {
  m.impl("neighborhood_attention2d_fwd", TORCH_BOX(&alterops::neighborhood::na2d_fwd));
  m.impl("neighborhood_attention2d_bwd", TORCH_BOX(&alterops::neighborhood::na2d_bwd));
}
