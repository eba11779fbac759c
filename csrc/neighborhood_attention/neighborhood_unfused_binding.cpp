// Stable-ABI binding of the unfused neighbourhood attention CPU kernels (the gathers behind
// NATTEN's separate qk / av operations; alterops/_na_unfused.py documents the tables):
//
//   na_unfused_dot(x, y, nb, ok?, table?, cell?, fill) -> (B, heads, N, K)
//   na_unfused_sum(w, y, nb, ok?) -> (B, heads, N, D)
//   na_unfused_scatter(w, x, rowptr, entries, K) -> (B, heads, N, D)
//
// x, y: (B, heads, N, D); w: (B, heads, N, K); float32 or float64, one dtype, any strides.
// nb, cell: (K, N) int32; ok: (K, N) bool; table: (heads, cells) of x's dtype; rowptr: (N+1,),
// entries: (E,), both int32 or both int64, rows entries[rowptr[j]:rowptr[j+1]] (rowptr[N] <= E). Every index is checked against its range here (the
// tables are inputs like any other), so a bad table is an error, never a stray read. Outputs are
// contiguous.
#include <string>

#include "../common/binding.h"
#include "neighborhood_attention.h"

namespace alterops {
namespace neighborhood {
namespace {

using binding::Tensor;
using binding::ScalarType;
using binding::shape_str;

const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

// A 4-d float32/float64 CPU tensor; its dtype tag.
DType check_rows(const Tensor& t, const char* name, const char* op) {
  STD_TORCH_CHECK(t.is_cpu(), op, " (cpu): ", name, " must be on the CPU");
  STD_TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-d (B, heads, N, ...), got shape ", shape_str(t));
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Double, op, " (cpu): ", name,
                  " must be float32 or float64, got ", dtype_name(s));
  return s == ScalarType::Double ? DType::Float64 : DType::Float32;
}

void check_same(const Tensor& a, const char* an, const Tensor& b, const char* bn, int64_t dims, const char* op) {
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " is ", dtype_name(a.scalar_type()), " but ", bn,
                  " is ", dtype_name(b.scalar_type()));
  for (int64_t d = 0; d < dims; ++d)
    STD_TORCH_CHECK(a.size(d) == b.size(d), op, ": ", an, " has shape ", shape_str(a), " but ", bn, " has shape ",
                    shape_str(b), " (the first ", dims, " sizes must match)");
}

View4 view4(const Tensor& t) {
  View4 v;
  v.data = t.const_data_ptr();
  for (int d = 0; d < 4; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

// An integer index tensor of `sizes`, contiguous; every value in [lo, hi).
template <typename I>
Tensor index_table(const Tensor& t, const char* name, std::vector<int64_t> sizes, int64_t lo, int64_t hi,
                   const char* op) {
  STD_TORCH_CHECK(t.is_cpu(), op, " (cpu): ", name, " must be on the CPU");
  bool ok = t.dim() == (int64_t)sizes.size();
  for (size_t d = 0; ok && d < sizes.size(); ++d) ok = t.size(d) == sizes[d];
  std::string want = "(";
  for (size_t d = 0; d < sizes.size(); ++d) want += (d ? ", " : "") + std::to_string(sizes[d]);
  want += sizes.size() == 1 ? ",)" : ")";
  STD_TORCH_CHECK(ok, op, ": ", name, " must have shape ", want, ", got ", shape_str(t));
  Tensor c = binding::contiguous(t);
  const I* p = binding::cptr<I>(c);
  for (int64_t i = 0, n = c.numel(); i < n; ++i)
    STD_TORCH_CHECK(p[i] >= lo && p[i] < hi, op, ": ", name, " holds ", (int64_t)p[i], " at flat index ", i,
                    ", outside [", lo, ", ", hi, ")");
  return c;
}

Tensor int32_table(const Tensor& t, const char* name, std::vector<int64_t> sizes, int64_t lo, int64_t hi,
                   const char* op) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Int, op, ": ", name, " must be int32, got ",
                  dtype_name(t.scalar_type()));
  return index_table<int32_t>(t, name, std::move(sizes), lo, hi, op);
}

Tensor ok_table(const std::optional<Tensor>& ok, int64_t K, int64_t N, const char* op) {
  if (!ok.has_value()) return Tensor();
  const Tensor& t = *ok;
  STD_TORCH_CHECK(t.is_cpu(), op, " (cpu): ok must be on the CPU");
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Bool, op, ": ok must be bool, got ", dtype_name(t.scalar_type()));
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == N, op, ": ok must have shape (", K, ", ", N,
                  "), got ", shape_str(t));
  return binding::contiguous(t);
}

Tensor na_unfused_dot(const Tensor& x, const Tensor& y, const Tensor& nb_in, const std::optional<Tensor>& ok_in,
                      const std::optional<Tensor>& table_in, const std::optional<Tensor>& cell_in, double fill) {
  const char* op = "na_unfused_dot";
  const DType dt = check_rows(x, "x", op);
  check_rows(y, "y", op);
  check_same(x, "x", y, "y", 4, op);
  const int64_t B = x.size(0), heads = x.size(1), N = x.size(2);
  STD_TORCH_CHECK(nb_in.dim() == 2, op, ": nb must be (K, N), got shape ", shape_str(nb_in));
  const int64_t K = nb_in.size(0);
  const Tensor nb = int32_table(nb_in, "nb", {K, N}, 0, std::max<int64_t>(N, 1), op);
  const Tensor ok = ok_table(ok_in, K, N, op);
  Tensor table, cell;
  if (table_in.has_value()) {
    table = *table_in;
    STD_TORCH_CHECK(table.is_cpu(), op, " (cpu): table must be on the CPU");
    STD_TORCH_CHECK(table.dim() == 2 && table.size(0) == heads && table.size(1) >= 1, op,
                    ": table must be (heads, cells) = (", heads, ", cells), got ", shape_str(table));
    STD_TORCH_CHECK(table.scalar_type() == x.scalar_type(), op, ": table is ", dtype_name(table.scalar_type()),
                    " but x is ", dtype_name(x.scalar_type()));
    table = binding::contiguous(table);
    STD_TORCH_CHECK(cell_in.has_value(), op, ": a table needs cell");
    cell = int32_table(*cell_in, "cell", {K, N}, 0, table.size(1), op);
  }
  Tensor out = binding::new_output({B, heads, N, K}, x.scalar_type());
  if (out.numel() == 0) return out;
  UnfusedDotArgs a{};
  a.dtype = dt;
  a.x = view4(x);
  a.y = view4(y);
  a.nb = binding::cptr<int32_t>(nb);
  a.ok = ok.defined() ? static_cast<const uint8_t*>(ok.const_data_ptr()) : nullptr;
  a.table = table.defined() ? table.const_data_ptr() : nullptr;
  a.table_cells = table.defined() ? table.size(1) : 0;
  a.cell = cell.defined() ? binding::cptr<int32_t>(cell) : nullptr;
  a.K = K;
  a.fill = fill;
  a.out = out.mutable_data_ptr();
  binding::cpu_kernels().neighborhood->unfused_dot(a, binding::cpu_parallel());
  return out;
}

Tensor na_unfused_sum(const Tensor& w, const Tensor& y, const Tensor& nb_in, const std::optional<Tensor>& ok_in) {
  const char* op = "na_unfused_sum";
  check_rows(w, "w", op);
  const DType dt = check_rows(y, "y", op);
  check_same(w, "w", y, "y", 3, op);
  const int64_t N = y.size(2), K = w.size(3);
  const Tensor nb = int32_table(nb_in, "nb", {K, N}, 0, std::max<int64_t>(N, 1), op);
  const Tensor ok = ok_table(ok_in, K, N, op);
  Tensor out = binding::new_output({y.size(0), y.size(1), N, y.size(3)}, y.scalar_type());
  if (out.numel() == 0) return out;
  UnfusedSumArgs a{};
  a.dtype = dt;
  a.w = view4(w);
  a.y = view4(y);
  a.nb = binding::cptr<int32_t>(nb);
  a.ok = ok.defined() ? static_cast<const uint8_t*>(ok.const_data_ptr()) : nullptr;
  a.out = out.mutable_data_ptr();
  binding::cpu_kernels().neighborhood->unfused_sum(a, binding::cpu_parallel());
  return out;
}

template <typename I>
void check_csr(const Tensor& rowptr, int64_t N, const char* op) {
  const I* r = binding::cptr<I>(rowptr);
  STD_TORCH_CHECK(r[0] == 0, op, ": rowptr must start at 0, got ", (int64_t)r[0]);
  for (int64_t j = 0; j < N; ++j)
    STD_TORCH_CHECK(r[j + 1] >= r[j], op, ": rowptr must not decrease; row ", j, " runs ", (int64_t)r[j], " .. ",
                    (int64_t)r[j + 1]);
}

Tensor na_unfused_scatter(const Tensor& w, const Tensor& x, const Tensor& rowptr_in, const Tensor& entries_in,
                          int64_t K) {
  const char* op = "na_unfused_scatter";
  check_rows(w, "w", op);
  const DType dt = check_rows(x, "x", op);
  check_same(w, "w", x, "x", 3, op);
  const int64_t N = x.size(2);
  STD_TORCH_CHECK(K >= 1 && w.size(3) == K, op, ": K must be w's last size (", w.size(3), "), got ", K);
  const ScalarType it = rowptr_in.scalar_type();
  STD_TORCH_CHECK((it == ScalarType::Int || it == ScalarType::Long) && entries_in.scalar_type() == it, op,
                  ": rowptr and entries must both be int32 or both int64, got ", dtype_name(it), " and ",
                  dtype_name(entries_in.scalar_type()));
  STD_TORCH_CHECK(entries_in.dim() == 1, op, ": entries must be 1-d, got shape ", shape_str(entries_in));
  const int64_t E = entries_in.size(0);
  Tensor rowptr, entries;
  if (it == ScalarType::Int) {
    rowptr = index_table<int32_t>(rowptr_in, "rowptr", {N + 1}, 0, E + 1, op);
    entries = index_table<int32_t>(entries_in, "entries", {E}, 0, std::max<int64_t>(N * K, 1), op);
    check_csr<int32_t>(rowptr, N, op);
  } else {
    rowptr = index_table<int64_t>(rowptr_in, "rowptr", {N + 1}, 0, E + 1, op);
    entries = index_table<int64_t>(entries_in, "entries", {E}, 0, std::max<int64_t>(N * K, 1), op);
    check_csr<int64_t>(rowptr, N, op);
  }
  Tensor out = binding::new_output({x.size(0), x.size(1), N, x.size(3)}, x.scalar_type());
  if (out.numel() == 0) return out;
  UnfusedScatterArgs a{};
  a.dtype = dt;
  a.w = view4(w);
  a.x = view4(x);
  a.rowptr = rowptr.const_data_ptr();
  a.entries = entries.const_data_ptr();
  a.index64 = it == ScalarType::Long;
  a.K = K;
  a.out = out.mutable_data_ptr();
  binding::cpu_kernels().neighborhood->unfused_scatter(a, binding::cpu_parallel());
  return out;
}

}  // namespace
}  // namespace neighborhood
}  // namespace alterops

STABLE_TORCH_LIBRARY_FRAGMENT(alterops, m) {
  m.def("na_unfused_dot(Tensor x, Tensor y, Tensor nb, Tensor? ok, Tensor? table, Tensor? cell, float fill) -> Tensor");
  m.def("na_unfused_sum(Tensor w, Tensor y, Tensor nb, Tensor? ok) -> Tensor");
  m.def("na_unfused_scatter(Tensor w, Tensor x, Tensor rowptr, Tensor entries, int K) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(alterops, CPU, m) {
  m.impl("na_unfused_dot", TORCH_BOX(&alterops::neighborhood::na_unfused_dot));
  m.impl("na_unfused_sum", TORCH_BOX(&alterops::neighborhood::na_unfused_sum));
  m.impl("na_unfused_scatter", TORCH_BOX(&alterops::neighborhood::na_unfused_scatter));
}
