// window_attention2d on the CPU: the stable-ABI ops alterops::window_attention2d_fwd / _bwd.
// Checks the arguments, makes the outputs (from the CPU output pool), widens bfloat16 and float16 to float32
// copies (the kernels run float32 arithmetic for it either way, and the float32 kernels are the
// fast ones), and calls the loaded level's kernels (window_attention.h).
#include "../common/binding.h"
#include "window_attention.h"
#include "window_attention_args_binding.h"

#include <tuple>

namespace alterops {
namespace window {
namespace {

using binding::Tensor;
using torch::headeronly::ScalarType;

// The accumulation type of q's dtype: float64 for float64, float32 otherwise.
ScalarType acc_scalar_type(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

Strided strided(const Tensor& t) {
  Strided s;
  s.data = t.const_data_ptr();
  for (int64_t i = 0; i < t.dim() && i < 5; ++i) s.stride[i] = t.stride(i);
  return s;
}

std::vector<int64_t> sizes_of(const Tensor& t) { return std::vector<int64_t>(t.sizes().begin(), t.sizes().end()); }

void check_cpu(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), "window_attention2d: ", name, " must be a CPU tensor");
}

// The checks both ops share; returns q's element type.
DType check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& bias,
                   const std::vector<int64_t>& window, const std::vector<int64_t>& shift) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  check_qkv(q, k, v);
  const ScalarType st = q.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::Double || st == ScalarType::BFloat16 ||
                      st == ScalarType::Half,
                  "window_attention2d: q must be float32, float64, bfloat16 or float16 on the CPU, got ",
                  dtype_name(st));
  check_window_shift(window, shift);
  if (bias.has_value()) {
    const Tensor& t = *bias;
    check_cpu(t, "rel_pos_bias");
    check_bias_shape(t, q, window);
    STD_TORCH_CHECK(t.scalar_type() == acc_scalar_type(st),
                    "window_attention2d: rel_pos_bias must be float32 (float64 for float64 q), got ",
                    dtype_name(t.scalar_type()));
  }
  return st == ScalarType::Double ? DType::Float64 : DType::Float32;  // 16-bit runs as float32
}

Problem problem(const Tensor& q, const std::vector<int64_t>& window, const std::vector<int64_t>& shift, double scale,
                DType dtype, const std::optional<Tensor>& table) {
  Problem p;
  p.dtype = dtype;
  p.batch = q.size(0);
  p.height = q.size(1);
  p.width = q.size(2);
  p.heads = q.size(3);
  p.head_dim = q.size(4);
  p.window_h = window[0];
  p.window_w = window[1];
  p.shift_h = shift[0];
  p.shift_w = shift[1];
  p.scale = scale;
  p.table = table.has_value() ? table->const_data_ptr() : nullptr;
  p.table_heads = table.has_value() ? table->size(0) : 0;
  return p;
}

std::tuple<Tensor, Tensor> fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> rel_pos_bias,
                               std::vector<int64_t> window_size, std::vector<int64_t> shift, double scale) {
  const DType dt = check_inputs(q, k, v, rel_pos_bias, window_size, shift);
  const ScalarType st = q.scalar_type();
  const std::vector<int64_t> sizes = sizes_of(q);
  // From the CPU output pool: a large fresh output would otherwise take a page fault per 4 KiB
  // page on first touch inside the kernel (~40% of the AlterNet CIFAR forward's time).
  Tensor out = binding::new_output(sizes, st);
  Tensor lse = binding::new_output({sizes[0], sizes[1], sizes[2], sizes[3]}, acc_scalar_type(st));
  if (q.numel() == 0) return {out, lse};
  std::optional<Tensor> table;
  if (rel_pos_bias.has_value()) table = binding::contiguous(*rel_pos_bias);
  // bfloat16 and float16: the kernels run on float32 copies (the same float32 arithmetic as reading
  // and widening them element by element, 2-3x faster through the float32 fast paths).
  const bool widen = st == ScalarType::BFloat16 || st == ScalarType::Half;
  const Tensor qf = widen ? binding::float_copy(q) : q;
  const Tensor kf = widen ? binding::float_copy(k) : k;
  const Tensor vf = widen ? binding::float_copy(v) : v;
  Tensor outf = widen ? binding::new_output(sizes, ScalarType::Float) : out;
  ForwardArgs a;
  a.p = problem(q, window_size, shift, scale, dt, table);
  a.q = strided(qf);
  a.k = strided(kf);
  a.v = strided(vf);
  a.out = outf.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr();
  binding::cpu_kernels().window->forward(a, binding::cpu_parallel());
  if (widen) binding::copy_into(out, outf);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                               std::optional<Tensor> rel_pos_bias, std::vector<int64_t> window_size,
                                               std::vector<int64_t> shift, double scale, bool bias_grad) {
  const DType dt = check_inputs(q, k, v, rel_pos_bias, window_size, shift);
  const ScalarType st = q.scalar_type();
  check_cpu(grad_out, "grad_out");
  check_cpu(out, "out");
  check_cpu(lse, "lse");
  STD_TORCH_CHECK(binding::same_sizes(grad_out, q) && binding::same_sizes(out, q),
                  "window_attention2d: grad_out and out must have q's shape ", binding::shape_str(q), ", got ",
                  binding::shape_str(grad_out), " and ", binding::shape_str(out));
  STD_TORCH_CHECK(grad_out.scalar_type() == st && out.scalar_type() == st,
                  "window_attention2d: grad_out and out must have q's dtype ", dtype_name(st), ", got ",
                  dtype_name(grad_out.scalar_type()), " and ", dtype_name(out.scalar_type()));
  const ScalarType acc = acc_scalar_type(st);
  STD_TORCH_CHECK(lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                      lse.size(3) == q.size(3),
                  "window_attention2d: lse must be (B, H, W, heads) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
                  ", ", q.size(3), "), got shape ", binding::shape_str(lse));
  STD_TORCH_CHECK(lse.scalar_type() == acc, "window_attention2d: lse must be ", dtype_name(acc), ", got ",
                  dtype_name(lse.scalar_type()));
  const std::vector<int64_t> sizes = sizes_of(q);
  Tensor dq = binding::new_output(sizes, st);
  Tensor dk = binding::new_output(sizes, st);
  Tensor dv = binding::new_output(sizes, st);
  const bool want_db = bias_grad && rel_pos_bias.has_value();
  Tensor db = want_db ? binding::zeros(sizes_of(*rel_pos_bias), rel_pos_bias->scalar_type())
                      : binding::new_output({0}, acc);
  if (q.numel() == 0) return {dq, dk, dv, db};
  std::optional<Tensor> table;
  if (rel_pos_bias.has_value()) table = binding::contiguous(*rel_pos_bias);
  const bool widen = st == ScalarType::BFloat16 || st == ScalarType::Half;  // as in the forward
  const Tensor gf = binding::float_copy_if(widen, grad_out), qf = binding::float_copy_if(widen, q),
               kf = binding::float_copy_if(widen, k), vf = binding::float_copy_if(widen, v),
               of = binding::float_copy_if(widen, out);
  Tensor dqf = binding::float_output_if(widen, dq), dkf = binding::float_output_if(widen, dk),
         dvf = binding::float_output_if(widen, dv);
  BackwardArgs a;
  a.p = problem(q, window_size, shift, scale, dt, table);
  a.grad_out = strided(gf);
  a.q = strided(qf);
  a.k = strided(kf);
  a.v = strided(vf);
  a.out = strided(of);
  a.lse = strided(lse);
  a.dq = dqf.mutable_data_ptr();
  a.dk = dkf.mutable_data_ptr();
  a.dv = dvf.mutable_data_ptr();
  a.dtable = want_db ? db.mutable_data_ptr() : nullptr;
  binding::cpu_kernels().window->backward(a, binding::cpu_parallel());
  if (widen) {
    binding::copy_into(dq, dqf);
    binding::copy_into(dk, dkf);
    binding::copy_into(dv, dvf);
  }
  return {dq, dk, dv, db};
}

}  // namespace
}  // namespace window
}  // namespace alterops

STABLE_TORCH_LIBRARY_FRAGMENT(alterops, m) {
  m.def(
      "window_attention2d_fwd(Tensor q, Tensor k, Tensor v, Tensor? rel_pos_bias, int[2] window_size, "
      "int[2] shift, float scale) -> (Tensor, Tensor)");
  m.def(
      "window_attention2d_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? rel_pos_bias, int[2] window_size, int[2] shift, float scale, bool bias_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(alterops, CPU, m) {
  m.impl("window_attention2d_fwd", TORCH_BOX(&alterops::window::fwd));
  m.impl("window_attention2d_bwd", TORCH_BOX(&alterops::window::bwd));
}
