// C ABI over the raw-pointer launchers of csrc/neighborhood_attention/neighborhood_attention_cuda.cu,
// for ctypes. A tensor is its data pointer and 12 integers (6 sizes, then 6 element strides); the
// window is 13 integers: kernel[3], dilation[3], stride[3], causal[3], border. The caller passes a
// guarded workspace of the size emu_na_*_workspace returned for the same arguments.
#include "neighborhood_attention/neighborhood_attention_cuda.h"

namespace nc = alterops::neighborhood_cuda;

namespace {
nc::Tensor6 tensor(const void* data, const long long* d) {
  nc::Tensor6 t;
  t.data = data;
  for (int i = 0; i < 6; ++i) {
    t.size[i] = d[i];
    t.stride[i] = d[6 + i];
  }
  return t;
}

nc::Window window(const long long* w) {
  nc::Window x;
  for (int a = 0; a < 3; ++a) {
    x.kernel[a] = w[a];
    x.dilation[a] = w[3 + a];
    x.stride[a] = w[6 + a];
    x.causal[a] = static_cast<int32_t>(w[9 + a]);
  }
  x.border = static_cast<int32_t>(w[12]);
  return x;
}

nc::ForwardArgs forward_args(int dtype, const void* q, const long long* q6, const void* k, const long long* k6,
                             const void* v, const long long* v6, void* out, float* lse, const float* bias,
                             long long bias_heads, const long long* win, double scale) {
  nc::ForwardArgs a;
  a.dtype = static_cast<nc::DType>(dtype);
  a.q = tensor(q, q6);
  a.k = tensor(k, k6);
  a.v = tensor(v, v6);
  a.out = out;
  a.lse = lse;
  a.bias = bias;
  a.bias_heads = bias_heads;
  a.win = window(win);
  a.scale = scale;
  return a;
}

nc::BackwardArgs backward_args(int dtype, const void* dout, const long long* do6, const void* q, const long long* q6,
                               const void* k, const long long* k6, const void* v, const long long* v6,
                               const void* out, const long long* o6, const float* lse, const float* dlse,
                               const float* bias, long long bias_heads, void* dq, void* dk, void* dv, float* dbias,
                               const long long* win, double scale) {
  nc::BackwardArgs a;
  a.dtype = static_cast<nc::DType>(dtype);
  a.dout = tensor(dout, do6);
  a.q = tensor(q, q6);
  a.k = tensor(k, k6);
  a.v = tensor(v, v6);
  a.out = tensor(out, o6);
  a.lse = lse;
  a.dlse = dlse;
  a.bias = bias;
  a.bias_heads = bias_heads;
  a.dq = dq;
  a.dk = dk;
  a.dv = dv;
  a.dbias = dbias;
  a.win = window(win);
  a.scale = scale;
  return a;
}
}  // namespace

extern "C" {

long long emu_na_forward_workspace(int dtype, const long long* q6, const long long* k6, const long long* win) {
  return static_cast<long long>(nc::forward_workspace_bytes(
      forward_args(dtype, nullptr, q6, nullptr, k6, nullptr, k6, nullptr, nullptr, nullptr, 1, win, 1.0)));
}

int emu_na_forward(int dtype, const void* q, const long long* q6, const void* k, const long long* k6, const void* v,
                   const long long* v6, void* out, float* lse, const float* bias, long long bias_heads,
                   const long long* win, double scale, void* workspace) {
  return static_cast<int>(nc::forward(
      forward_args(dtype, q, q6, k, k6, v, v6, out, lse, bias, bias_heads, win, scale), workspace, nullptr));
}

long long emu_na_backward_workspace(int dtype, const long long* q6, const long long* k6, const long long* win,
                                    int want_dbias) {
  static float dummy;
  return static_cast<long long>(nc::backward_workspace_bytes(
      backward_args(dtype, nullptr, q6, nullptr, q6, nullptr, k6, nullptr, k6, nullptr, q6, nullptr, nullptr,
                    want_dbias ? &dummy : nullptr, 1, nullptr, nullptr, nullptr, want_dbias ? &dummy : nullptr, win,
                    1.0)));
}

int emu_na_backward(int dtype, const void* dout, const long long* do6, const void* q, const long long* q6,
                    const void* k, const long long* k6, const void* v, const long long* v6, const void* out,
                    const long long* o6, const float* lse, const float* dlse, const float* bias, long long bias_heads,
                    void* dq, void* dk, void* dv, float* dbias, const long long* win, double scale, void* workspace) {
  return static_cast<int>(nc::backward(backward_args(dtype, dout, do6, q, q6, k, k6, v, v6, out, o6, lse, dlse, bias,
                                                     bias_heads, dq, dk, dv, dbias, win, scale),
                                       workspace, nullptr));
}

}  // extern "C"
