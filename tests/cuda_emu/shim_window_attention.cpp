// C ABI over the raw-pointer launchers of csrc/window_attention/window_attention_cuda.cu, for
// ctypes. A problem travels as 11 integers (dtype, B, H, W, heads, head_dim, wh, ww, sh, sw,
// table_heads), the scale and the table pointer; a tensor as its data pointer and 5 (or 4)
// element strides.
#include "window_attention/window_attention_cuda.h"

namespace wc = alterops::window_cuda;

namespace {
wc::Problem make(const long long* pi, double scale, const float* table) {
  wc::Problem p;
  p.dtype = static_cast<wc::DType>(pi[0]);
  p.batch = pi[1];
  p.height = pi[2];
  p.width = pi[3];
  p.heads = pi[4];
  p.head_dim = pi[5];
  p.window_h = pi[6];
  p.window_w = pi[7];
  p.shift_h = pi[8];
  p.shift_w = pi[9];
  p.table_heads = pi[10];
  p.scale = scale;
  p.table = table;
  return p;
}

wc::Tensor5 t5(const void* data, const long long* s) {
  wc::Tensor5 t;
  t.data = data;
  for (int i = 0; i < 5; ++i) t.stride[i] = s[i];
  return t;
}

wc::Tensor4 t4(const float* data, const long long* s) {
  wc::Tensor4 t;
  t.data = data;
  for (int i = 0; i < 4; ++i) t.stride[i] = s[i];
  return t;
}
}  // namespace

extern "C" {

// The path `path` resolves to (0 auto, 1 SIMT, 2 tensor cores), or -1 when the launchers refuse
// the problem on it (emu_wa_unsupported says why).
int emu_wa_resolve_path(const long long* prob, double scale, const float* table, int path) {
  const wc::Problem p = make(prob, scale, table);
  const wc::Path r = wc::resolve_path(p, static_cast<wc::Path>(path));
  return wc::unsupported(p, r) ? -1 : static_cast<int>(r);
}

const char* emu_wa_unsupported(const long long* prob, double scale, const float* table, int path) {
  const wc::Problem p = make(prob, scale, table);
  const char* why = wc::unsupported(p, wc::resolve_path(p, static_cast<wc::Path>(path)));
  return why ? why : "";
}

long long emu_wa_forward_workspace(const long long* prob, double scale, const float* table, int path) {
  return static_cast<long long>(wc::forward_workspace_bytes(make(prob, scale, table), static_cast<wc::Path>(path)));
}

long long emu_wa_backward_workspace(const long long* prob, double scale, const float* table, int bias_grad, int path) {
  return static_cast<long long>(
      wc::backward_workspace_bytes(make(prob, scale, table), bias_grad != 0, static_cast<wc::Path>(path)));
}

int emu_wa_forward(const long long* prob, double scale, const float* table, const void* q, const long long* sq,
                   const void* k, const long long* sk, const void* v, const long long* sv, void* out, float* lse,
                   void* workspace, int path) {
  return static_cast<int>(wc::forward(make(prob, scale, table), t5(q, sq), t5(k, sk), t5(v, sv), out, lse, workspace,
                                      static_cast<wc::Path>(path), nullptr));
}

int emu_wa_backward(const long long* prob, double scale, const float* table, const void* go, const long long* sgo,
                    const void* q, const long long* sq, const void* k, const long long* sk, const void* v,
                    const long long* sv, const void* o, const long long* so, const float* lse, const long long* sl,
                    void* dq, void* dk, void* dv, float* dtable, void* workspace, int path) {
  return static_cast<int>(wc::backward(make(prob, scale, table), t5(go, sgo), t5(q, sq), t5(k, sk), t5(v, sv),
                                       t5(o, so), t4(lse, sl), dq, dk, dv, dtable, workspace,
                                       static_cast<wc::Path>(path), nullptr));
}

}  // extern "C"
