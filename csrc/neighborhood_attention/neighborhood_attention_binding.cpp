// Stable-ABI binding of the neighborhood attention CPU kernels (1-D, 2-D and 3-D calls all reach
// them with three spatial axes; alterops/neighborhood_attention_nd.py adds the leading size-1 axes):
//
//   neighborhood_attention_nd_fwd(q, k, v, kernel_size[3], dilation[3], stride[3], causal[3],
//                                 border, bias?, scale) -> (out, lse)
//   neighborhood_attention_nd_bwd(dout, q, k, v, out, lse, dlse?, kernel_size[3], dilation[3],
//                                 stride[3], causal[3], border, bias?, scale, bias_grad)
//                                 -> (dq, dk, dv, dbias)
//
// q (B, T, H, W, heads, D), k and v (B, T, H, W, heads_kv, D) with heads % heads_kv == 0;
// lse (B, heads, T, H, W); bias (heads|1, 2kt-1, 2kh-1, 2kw-1). Any strides for q, k, v (passed to the kernels as they are); out, dq, dk, dv contiguous; lse in
// float32 (float64 for float64 inputs), natural log. bias and dlse are used in that
// accumulation dtype. border: "clamp" | "mask" | "zero" ("mask"/"zero" with stride 1 and no
// causal axis; see alterops/neighborhood_attention_nd.py). dbias is (0,) unless bias_grad and a
// bias is given.
#include <string>
#include <tuple>

#include "../common/binding.h"
#include "neighborhood_attention.h"
#include "neighborhood_window_binding.h"

namespace alterops {
namespace neighborhood {
namespace {

using binding::Tensor;
using binding::ScalarType;
using binding::shape_str;

constexpr const char* kNd = "neighborhood_attention_nd";

const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

ScalarType acc_scalar_type(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// A tensor of q's dtype on the CPU, shaped like q except (for k and v) the heads.
void check_like_q(const Tensor& t, const Tensor& q, const char* name, bool any_heads, const char* op) {
  STD_TORCH_CHECK(t.is_cpu(), op, " (cpu): ", name, " must be on the CPU");
  bool same = t.dim() == q.dim();
  const int64_t head_axis = q.dim() - 2;
  for (int64_t d = 0; same && d < q.dim(); ++d) same = t.size(d) == q.size(d) || (any_heads && d == head_axis);
  STD_TORCH_CHECK(same, op, ": ", name, " has shape ", shape_str(t), " but q has shape ", shape_str(q),
                  any_heads ? " (only the heads may differ)" : "");
  STD_TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", dtype_name(t.scalar_type()),
                  " but q has dtype ", dtype_name(q.scalar_type()));
}

// Checks q, k, v, the window and the bias; the kernels' element type of q.
DType check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Window& w, const std::optional<Tensor>& bias,
                   const char* op) {
  const int ns = 3;
  STD_TORCH_CHECK(q.dim() == ns + 3, op, ": q must be (B, T, H, W, heads, head_dim), got shape ", shape_str(q));
  STD_TORCH_CHECK(q.is_cpu(), op, " (cpu): q must be on the CPU");
  const ScalarType t = q.scalar_type();
  STD_TORCH_CHECK(t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 ||
                      t == ScalarType::Half,
                  op, " (cpu): q must be float32, float64, bfloat16 or float16, got ", dtype_name(t));
  const DType dt = binding::dtype_of(t, op);
  check_like_q(k, q, "k", true, op);
  check_like_q(v, q, "v", true, op);
  check_heads(q, k, v, op);
  check_window(q, w, op);
  if (bias.has_value()) {
    STD_TORCH_CHECK(bias->is_cpu(), op, " (cpu): bias must be on the CPU");
    check_bias_shape(*bias, q, w, op);
    binding::dtype_of(bias->scalar_type(), op);
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

// The (B, T, H, W, heads, D) sizes and element strides of a checked 6-d tensor.
View6 view6(const Tensor& t) {
  View6 v;
  v.data = t.const_data_ptr();
  for (int d = 0; d < 6; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

std::vector<int64_t> sizes_of(const Tensor& t) { return std::vector<int64_t>(t.sizes().begin(), t.sizes().end()); }

// lse's shape for q: (B, heads, spatial...).
std::vector<int64_t> lse_sizes(const Tensor& q) {
  std::vector<int64_t> s{q.size(0), q.size(q.dim() - 2)};
  for (int64_t d = 1; d < q.dim() - 2; ++d) s.push_back(q.size(d));
  return s;
}

// The channel width at which a head of D channels in dtype dt runs through the float32 kernels on
// float32 copies: 16-bit heads of a fast width (where they do not take the kernels on themselves:
// half_direct below), float32 and 16-bit heads padded with zero channels to one
// (padded_fast_width). 0: dt's kernels run on the inputs themselves.
int64_t float32_copy_width(DType dt, int64_t D) {
  const int64_t width = float_fast_width(D) ? D : padded_fast_width(D);
  return dt != DType::Float64 && width > 0 && (dt != DType::Float32 || width != D) ? width : 0;
}

std::tuple<Tensor, Tensor> run_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Window& win,
                                       const std::optional<Tensor>& bias, double scale, const char* op) {
  const DType dt = check_inputs(q, k, v, win, bias, op);
  const ScalarType acc = acc_scalar_type(q.scalar_type());
  Tensor out = binding::new_output(sizes_of(q), q.scalar_type());
  Tensor lse = binding::new_output(lse_sizes(q), acc);
  if (out.numel() == 0) return {out, lse};
  const Tensor table = bias_table(bias, acc);

  ForwardArgs a{};
  a.dtype = dt;
  a.q = view6(q);
  a.k = view6(k);
  a.v = view6(v);
  a.out = out.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr();
  a.bias = table.defined() ? table.const_data_ptr() : nullptr;
  a.bias_heads = table.defined() ? table.size(0) : 1;
  a.win = win;
  a.scale = scale;
  const Kernels& kern = *binding::cpu_kernels().neighborhood;

  const int64_t width = float32_copy_width(dt, q.size(q.dim() - 1));
  // bfloat16 and float16 heads of a fast width with unit channel strides take the float32 forward on the
  // tensors themselves (tokens widened as it packs them, the output narrowed as it is stored),
  // except maps of whole-window cells, whose dense route is float32's alone. Against the copies:
  // 1-D (B = 4, L = 4096, 8 heads, d = 64, k = 65) 26.5 -> 17.0 ms, 2-D (56 x 56, k = 7) 4.59 ->
  // 3.14, 3-D 5.55 -> 4.33 (Xeon, AVX-512, bf16-forward-in-place-ab.json): as fast as float32.
  const bool half_direct = dt != DType::Float32 && width == q.size(q.dim() - 1) && a.q.stride[5] == 1 &&
                           a.k.stride[5] == 1 && a.v.stride[5] == 1 && !whole_window_cells(a.q.size + 1, win);
  if (width > 0 && !half_direct) {
    // The float32 forward on float32 copies (16-bit: the same float32 arithmetic as the 16-bit
    // kernels, 2x faster), heads of other widths padded with zero channels to a fast width
    // (padded_fast_width: 1-D, B = 4, L = 4096, k = 65, 6 heads of 80, 59 -> 35 ms, of which the
    // copies take about 12; 2-D 56 x 56, k = 7, 2 heads of 80, 11.7 -> 8.9 ms; 3-D 8 x 32 x 32,
    // k = (3, 7, 7), 2 heads of 72, 21.4 -> 14.8 ms; Zen 4, padded-head-widths-ab.json).
    const Tensor qf = binding::float_copy_padded(q, width), kf = binding::float_copy_padded(k, width),
                 vf = binding::float_copy_padded(v, width);
    std::vector<int64_t> osz = sizes_of(out);
    osz.back() = width;
    Tensor outf = binding::new_output(osz, ScalarType::Float);
    a.dtype = DType::Float32;
    a.q = view6(qf);
    a.k = view6(kf);
    a.v = view6(vf);
    a.out = outf.mutable_data_ptr();
    kern.forward(a, binding::cpu_parallel());
    binding::copy_narrowed(out, outf);
    return {out, lse};
  }
  kern.forward(a, binding::cpu_parallel());
  return {out, lse};
}

// A (B, heads, spatial...) tensor like lse, checked, in the accumulation dtype, contiguous.
Tensor lse_like(const Tensor& t, const Tensor& q, ScalarType acc, const char* name, const char* op) {
  STD_TORCH_CHECK(t.is_cpu(), op, " (cpu): ", name, " must be on the CPU");
  const std::vector<int64_t> want = lse_sizes(q);
  STD_TORCH_CHECK(sizes_of(t) == want, op, ": ", name, " must be (B, heads, T, H, W), got ", shape_str(t),
                  " for q of shape ", shape_str(q));
  binding::dtype_of(t.scalar_type(), op);
  return binding::contiguous(t.scalar_type() == acc ? t : torch::stable::to(t, acc));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> run_backward(const Tensor& dout_in, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& out, const Tensor& lse_in,
                                                        const std::optional<Tensor>& dlse_in, const Window& win,
                                                        const std::optional<Tensor>& bias, double scale,
                                                        bool bias_grad, const char* op) {
  const DType dt = check_inputs(q, k, v, win, bias, op);
  const ScalarType acc = acc_scalar_type(q.scalar_type());
  STD_TORCH_CHECK(dout_in.is_cpu(), op, " (cpu): dout must be on the CPU");
  STD_TORCH_CHECK(binding::same_sizes(dout_in, q), op, ": dout has shape ", shape_str(dout_in), " but q has shape ",
                  shape_str(q));
  binding::dtype_of(dout_in.scalar_type(), op);
  check_like_q(out, q, "out", false, op);
  const Tensor dout = dout_in.scalar_type() == q.scalar_type() ? dout_in : torch::stable::to(dout_in, q.scalar_type());
  const Tensor lse = lse_like(lse_in, q, acc, "lse", op);
  const Tensor dlse = dlse_in.has_value() ? lse_like(*dlse_in, q, acc, "dlse", op) : Tensor();

  Tensor dq = binding::new_output(sizes_of(q), q.scalar_type());
  Tensor dk = binding::new_output(sizes_of(k), q.scalar_type());
  Tensor dv = binding::new_output(sizes_of(v), q.scalar_type());
  const bool want_db = bias_grad && bias.has_value();
  const Tensor table = bias_table(bias, acc);
  Tensor dbias = want_db ? binding::zeros(sizes_of(table), acc) : binding::zeros({0}, acc);
  if (q.numel() == 0) {
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    return {dq, dk, dv, dbias};
  }

  // bfloat16 windows along W alone wider than 16 keys (the 1-D ops' long windows) at the fast
  // widths take the band backward (and the dilation sub-grids that lead to it), which reads and
  // writes bfloat16 (and float16) itself (half_direct below). It had run on float32 copies from the output pool,
  // its gradients rounded back (1-D forward+backward, B = 4, L = 4096, 8 heads, d = 64, k = 65:
  // 173-177 -> 87-98 ms on Zen 4 against the bfloat16 general backward, bf16-backward-widen-ab.json
  // under bench/results/cpu-amd-epyc-avx512-2core/neighborhood); in place, 88.4 -> 70.9 ms on the
  // Xeon (float32 66-67; bf16-band-backward-in-place-ab.json). Elsewhere the bfloat16 kernels run
  // (widening every bfloat16 backward: 2-D 56x56, d = 32, k = 7, 19.8 -> 23.1 ms; 3-D level).
  // Likewise maps of whole-window cells (whole_window_cells), which only float32 runs as dense
  // attention per cell. float32 and bfloat16 heads of other widths take these routes padded with
  // zero channels to a fast width (padded_fast_width: 1-D, B = 4, L = 4096, k = 65, 6 heads of 80,
  // forward+backward 175 -> 117 ms on Zen 4); elsewhere the padding's FLOPs cost more than the
  // general backward loses (2-D 56 x 56, k = 7, 2 heads of 80, backward 31 ms; of 96, 38 ms).
  const View6 qv = view6(q);
  const int64_t width = float32_copy_width(dt, q.size(q.dim() - 1));
  // bfloat16 and float16 heads of a fast width with unit channel strides (dout: any) take the band
  // backward on the tensors themselves, as the forward (rows widened and narrowed by its tasks).
  const bool half_direct = dt != DType::Float32 && width == q.size(q.dim() - 1) && qv.stride[5] == 1 &&
                           k.stride(k.dim() - 1) == 1 && v.stride(v.dim() - 1) == 1 &&
                           !whole_window_cells(qv.size + 1, win);
  const bool widen = width > 0 && !half_direct &&
                     ((win.kernel[0] == 1 && win.kernel[1] == 1 && win.kernel[2] > 16) ||
                      whole_window_cells(qv.size + 1, win));
  Tensor doutf = dout, qf = q, kf = k, vf = v, dqf = dq, dkf = dk, dvf = dv;
  if (widen) {
    doutf = binding::float_copy_padded(dout, width);
    qf = binding::float_copy_padded(q, width);
    kf = binding::float_copy_padded(k, width);
    vf = binding::float_copy_padded(v, width);
    std::vector<int64_t> qsz = sizes_of(q), ksz = sizes_of(k);
    qsz.back() = ksz.back() = width;
    dqf = binding::new_output(qsz, ScalarType::Float);
    dkf = binding::new_output(ksz, ScalarType::Float);
    dvf = binding::new_output(ksz, ScalarType::Float);
  }

  BackwardArgs a{};
  a.dtype = widen ? DType::Float32 : dt;
  a.dout = view6(doutf);
  a.q = view6(qf);
  a.k = view6(kf);
  a.v = view6(vf);
  a.lse = lse.const_data_ptr();
  a.dlse = dlse.defined() ? dlse.const_data_ptr() : nullptr;
  a.bias = table.defined() ? table.const_data_ptr() : nullptr;
  a.bias_heads = table.defined() ? table.size(0) : 1;
  a.dq = dqf.mutable_data_ptr();
  a.dk = dkf.mutable_data_ptr();
  a.dv = dvf.mutable_data_ptr();
  a.dbias = want_db ? dbias.mutable_data_ptr() : nullptr;
  a.win = win;
  a.scale = scale;
  binding::cpu_kernels().neighborhood->backward(a, binding::cpu_parallel());
  if (widen) {
    binding::copy_narrowed(dq, dqf);
    binding::copy_narrowed(dk, dkf);
    binding::copy_narrowed(dv, dvf);
  }
  return {dq, dk, dv, dbias};
}

std::tuple<Tensor, Tensor> na_nd_fwd(const Tensor& q, const Tensor& k, const Tensor& v, std::vector<int64_t> kernel,
                                     std::vector<int64_t> dilation, std::vector<int64_t> stride,
                                     std::vector<int64_t> causal, const std::string& border,
                                     const std::optional<Tensor>& bias, double scale) {
  return run_forward(q, k, v, window_nd(kernel, dilation, stride, causal, border, kNd), bias, scale, kNd);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> na_nd_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                     const Tensor& v, const Tensor& out, const Tensor& lse,
                                                     const std::optional<Tensor>& dlse, std::vector<int64_t> kernel,
                                                     std::vector<int64_t> dilation, std::vector<int64_t> stride,
                                                     std::vector<int64_t> causal, const std::string& border,
                                                     const std::optional<Tensor>& bias, double scale, bool bias_grad) {
  return run_backward(dout, q, k, v, out, lse, dlse, window_nd(kernel, dilation, stride, causal, border, kNd), bias, scale,
                      bias_grad, kNd);
}

}  // namespace
}  // namespace neighborhood
}  // namespace alterops

STABLE_TORCH_LIBRARY_FRAGMENT(alterops, m) {
  m.def(
      "neighborhood_attention_nd_fwd(Tensor q, Tensor k, Tensor v, int[3] kernel_size, int[3] dilation, "
      "int[3] stride, int[3] causal, str border, Tensor? bias, float scale) -> (Tensor, Tensor)");
  m.def(
      "neighborhood_attention_nd_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse, int[3] kernel_size, int[3] dilation, int[3] stride, int[3] causal, str border, Tensor? bias, "
      "float scale, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(alterops, CPU, m) {
  m.impl("neighborhood_attention_nd_fwd", TORCH_BOX(&alterops::neighborhood::na_nd_fwd));
  m.impl("neighborhood_attention_nd_bwd", TORCH_BOX(&alterops::neighborhood::na_nd_bwd));
}
