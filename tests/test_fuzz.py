"""Argument fuzzing of every public op on every backend CI runs (hypothesis, derandomized).

Every example starts from a valid call (random small shapes, dtypes, layouts: contiguous,
views into a fused tensor, permuted, zero-stride ``expand``), then replaces some arguments
with arbitrary Python values: ``None``, bools, negative/zero/huge ints (``2**31``, ``2**63``),
floats incl. nan/inf, strings, tuples of the wrong length, tensors of the wrong rank, dtype
(int, bool, complex) or device (``meta``), empty tensors, expanded zero-stride tensors. The
call must then either

* raise ``TypeError``/``ValueError``/``RuntimeError``/``NotImplementedError`` whose message
  names one of the replaced arguments (a ``BackendUnavailableError`` for an explicitly
  requested backend may instead say why that backend cannot run), or
* succeed with a sane result: the documented shape and dtype, finite for finite input and
  moderate scalars, equal to the ``reference`` backend's result for the fused backends, and a
  backward that gives gradients of the inputs' shapes;

and in both cases no input tensor may change (compared bitwise). A segfault or abort kills
the test process (a failure); a hang is turned into one by a watchdog that dumps the
tracebacks and exits. No public op takes an ``out=`` tensor, so there are no overlapping
outputs to try. The Triton backend is fuzzed for its validation only: its kernel launchers
are replaced by a stub that raises a marker exception, so the interpreter never runs a kernel.
"""
from __future__ import annotations

import contextlib
import faulthandler
import math
import re

import pytest
import torch

import alterops as ao
import alterops._dispatch as dispatch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ALLOWED = (TypeError, ValueError, RuntimeError, NotImplementedError)
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
EXAMPLES = 60  # per op and backend; derandomized, so CI sees the same examples every run
# no shrinking: a failure message already shows the whole call, and shrinking takes minutes
SETTINGS = dict(max_examples=EXAMPLES, deadline=20000, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
WATCHDOG_S = 240  # one test (all its examples) longer than this is a hang


@contextlib.contextmanager
def watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class Launched(Exception):
    """Raised by the stubbed Triton launchers: validation passed and a kernel would run."""


@pytest.fixture
def no_triton_kernels(monkeypatch):
    from alterops import _na_nd_triton, blur, statistics, window_attention

    def stub(*args, **kwargs):
        raise Launched()

    monkeypatch.setattr(_na_nd_triton, "na_nd_triton_fwd", stub)
    monkeypatch.setattr(window_attention, "_triton_fwd_launch", stub)
    monkeypatch.setattr(statistics, "_delta_triton_launch", stub)
    monkeypatch.setattr(statistics, "_variance_triton_launch", stub)
    import alterops.kernels.blur as blur_kernels

    monkeypatch.setattr(blur_kernels, "launch_forward", stub)
    assert blur is not None


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------
HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**40 + 1, 2**62 + 1, 2**63 - 1, 2**63, 2**64 + 1, 10**30 + 1,
        -(2**63), -(2**31)]
WORDS = ["", "same", "clamp", "mask", "zero", "zeros", "reflect", "replicate", "cpu", "cuda",
         "meta", "triton", "reference", "auto", "float32", "delta_log_amplitude", "x" * 40]

ints = st.one_of(st.integers(-3, 12), st.sampled_from(HUGE))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [0.0, -0.0, 1e-320, 1e308, -1.0, float("nan"), float("inf"), -float("inf")]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.sampled_from(WORDS),
                    st.text(max_size=4), st.just(object()), st.just(b"3"), st.just(3 + 1j))
sequences = st.one_of(st.tuples(), st.tuples(ints), st.tuples(ints, ints), st.tuples(ints, ints, ints),
                      st.lists(st.one_of(ints, floats, st.none()), max_size=3),
                      st.tuples(floats, floats), st.tuples(st.booleans(), st.booleans()),
                      st.just(torch.Size([3, 3])), st.just({"a": 1}), st.just({3, 5}))


@st.composite
def odd_tensors(draw):
    """Tensors of arbitrary rank, dtype, device, layout and content."""
    ndim = draw(st.integers(0, 6))
    shape = tuple(draw(st.integers(0, 4)) for _ in range(ndim))
    dtype = draw(st.sampled_from(FLOATS + (torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8)))
    t = torch.zeros(shape, dtype=torch.float64).uniform_(-2, 2) if dtype != torch.bool else torch.zeros(shape)
    t = t.to(dtype)
    kind = draw(st.sampled_from(["plain", "meta", "expand", "nonfinite", "transposed"]))
    if kind == "meta":
        t = t.to("meta")
    elif kind == "expand" and ndim:
        t = t[(slice(0, 1),) * ndim].expand(shape)
    elif kind == "nonfinite" and dtype.is_floating_point and t.numel():
        t = t.clone()
        t.view(-1)[0] = float(draw(st.sampled_from(["nan", "inf", "-inf"])))
    elif kind == "transposed" and ndim >= 2:
        t = t.transpose(0, -1)
    return t


def garbage_for(valid):
    """Arbitrary values, plus values near a valid tensor argument (wrong shape/dtype/device) or
    a list of tensors with one entry replaced."""
    base = st.one_of(scalars, sequences, odd_tensors())
    numeric = st.one_of(ints, st.tuples(ints, ints), floats)  # near misses of size arguments
    if not isinstance(valid, (torch.Tensor, list)):
        return st.one_of(base, numeric, numeric)
    if isinstance(valid, torch.Tensor):
        return st.one_of(base, near_tensors(valid))
    if isinstance(valid, list) and valid:
        return st.one_of(base, st.builds(
            lambda i, value: valid[:i] + [value] + valid[i + 1:],
            st.integers(0, len(valid) - 1), st.one_of(base, near_tensors(valid[0]))))
    return base


@st.composite
def near_tensors(draw, t):
    """Like ``t`` but with one thing wrong (or, sometimes, nothing)."""
    what = draw(st.sampled_from(["dtype", "meta", "rank+", "rank-", "size", "empty", "expand", "nan"]))
    if what == "dtype":
        return t.detach().to(draw(st.sampled_from(FLOATS + (torch.int64, torch.bool, torch.complex64))))
    if what == "meta":
        return t.detach().to("meta")
    if what == "rank+":
        return t.detach().unsqueeze(0)
    if what == "rank-":
        return t.detach()[0] if t.dim() and t.shape[0] else t.detach().reshape(-1)
    if what == "size" and t.dim():
        dim = draw(st.integers(0, t.dim() - 1))
        shape = list(t.shape)
        shape[dim] = draw(st.integers(0, 9))
        return torch.randn(shape, dtype=torch.float64).to(t.dtype)
    if what == "empty" and t.dim():
        return t.detach()[:0]
    if what == "expand" and t.dim():
        return t.detach()[(slice(0, 1),) * t.dim()].expand(t.shape)
    if what == "nan" and t.numel():
        u = t.detach().clone(memory_format=torch.contiguous_format)
        u.view(-1)[-1] = float("nan")
        return u
    return t.detach().clone()


def layout(draw, shape, dtype, kind):
    """A tensor of ``shape`` in one of several memory layouts (always a leaf-derived view)."""
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    if kind == "contiguous":
        return g
    if kind == "strided":  # every other element of a bigger buffer
        big = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        big[..., ::2] = g
        return big[..., ::2]
    if kind == "permuted":  # memory order reversed (channels-last-like for 4-d maps)
        return g.permute(*reversed(range(g.dim()))).contiguous().permute(*reversed(range(g.dim())))
    # zero strides from expand
    return g[(slice(0, 1),) + (slice(None),) * (len(shape) - 1)].expand(shape)


LAYOUTS = ("contiguous", "strided", "permuted", "expand")


def backend_dtypes(op, backend):
    backend = backend or "reference"
    return tuple(d for d in FLOATS if dispatch.registry()[op].why_not(backend, torch.device("cpu"), d) is None)


# ---------------------------------------------------------------------------------------
# Valid calls, per op
# ---------------------------------------------------------------------------------------
def int_or_pair(draw, a, b):
    return a if a == b and draw(st.booleans()) else (a, b)


def valid_na(draw, backend):
    B, H, W = draw(st.integers(0, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    heads, d = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(backend_dtypes("neighborhood_attention2d", backend)))
    border = draw(st.sampled_from(["clamp", "mask", "zero"]))
    kh = draw(st.sampled_from([1, 3, 5]))
    kw = kh if draw(st.booleans()) else draw(st.sampled_from([1, 3, 5]))
    dh = draw(st.integers(1, 3))
    dw = dh if draw(st.booleans()) else draw(st.integers(1, 3))
    if border == "clamp":  # kernel * dilation <= map size
        kh, kw = min(kh, H - (H + 1) % 2), min(kw, W - (W + 1) % 2)
        dh, dw = max(1, min(dh, H // kh)), max(1, min(dw, W // kw))
    q, k, v = (layout(draw, (B, H, W, heads, d), dtype, draw(st.sampled_from(LAYOUTS))) for _ in range(3))
    bias = draw(st.sampled_from([None, 1, heads]))
    table = None if bias is None else torch.randn(bias, 2 * kh - 1, 2 * kw - 1).to(draw(st.sampled_from(FLOATS)))
    return dict(q=q, k=k, v=v, kernel_size=int_or_pair(draw, kh, kw), dilation=int_or_pair(draw, dh, dw),
                border=border, rel_pos_bias=table, scale=draw(st.sampled_from([None, 0.3, -1.5, 2])))


def call_na(a, backend):
    return ao.neighborhood_attention2d(a["q"], a["k"], a["v"], a["kernel_size"], a["dilation"],
                                       border=a["border"], rel_pos_bias=a["rel_pos_bias"],
                                       scale=a["scale"], backend=backend)


def valid_wa(draw, backend):
    B, H, W = draw(st.integers(0, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    heads, d = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(backend_dtypes("window_attention2d", backend)))
    wh, ww = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(0, wh - 1)), draw(st.integers(0, ww - 1))
    q, k, v = (layout(draw, (B, H, W, heads, d), dtype, draw(st.sampled_from(LAYOUTS))) for _ in range(3))
    bias = draw(st.sampled_from([None, 1, heads]))
    table = None if bias is None else torch.randn(bias, 2 * wh - 1, 2 * ww - 1).to(draw(st.sampled_from(FLOATS)))
    return dict(q=q, k=k, v=v, window_size=(wh, ww), shift=(sh, sw), rel_pos_bias=table,
                scale=draw(st.sampled_from([None, 0.5, -2.0, 1])))


def call_wa(a, backend):
    return ao.window_attention2d(a["q"], a["k"], a["v"], a["window_size"], shift=a["shift"],
                                 rel_pos_bias=a["rel_pos_bias"], scale=a["scale"], backend=backend)


def valid_blur(draw, backend, tanh):
    op = "tanh_blur2d" if tanh else "box_blur2d"
    B, C, H, W = draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dtype = draw(st.sampled_from(backend_dtypes(op, backend)))
    x = layout(draw, (B, C, H, W), dtype, draw(st.sampled_from(LAYOUTS)))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["zeros", "replicate", "reflect"]))
    padding = draw(st.sampled_from(["same", "int", "pair"]))
    if padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "pair":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pads = _pads(padding, (kh, kw))
    if mode == "reflect" and (max(pads[:2]) >= H or max(pads[2:]) >= W):
        mode = "zeros"
    kh, kw = min(kh, H + pads[0] + pads[1]), min(kw, W + pads[2] + pads[3])
    if padding == "same":  # "same" pads depend on the kernel, which was just clamped
        pads = _pads("same", (kh, kw))
        if mode == "reflect" and (max(pads[:2]) >= H or max(pads[2:]) >= W):
            mode = "zeros"
    args = dict(x=x, kernel_size=int_or_pair(draw, kh, kw),
                stride=int_or_pair(draw, draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                padding=padding, pad_mode=mode)
    if tanh:
        args["tau"] = draw(st.sampled_from([10.0, 0.5, 3, 1e3]))
        args["relu"] = draw(st.booleans())
    return args


def call_box(a, backend):
    return ao.box_blur2d(a["x"], a["kernel_size"], a["stride"], a["padding"], pad_mode=a["pad_mode"], backend=backend)


def call_tanh(a, backend):
    return ao.tanh_blur2d(a["x"], a["tau"], a["kernel_size"], a["stride"], a["padding"], relu=a["relu"],
                          pad_mode=a["pad_mode"], backend=backend)


def _pads(padding, kernel):
    """(top, bottom, left, right), written from the docs: int, pair, or "same"."""
    if padding == "same":
        return ((kernel[0] - 1) // 2, kernel[0] // 2, (kernel[1] - 1) // 2, kernel[1] // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph, pw, pw)


def valid_stat(draw, backend, op):
    B, C = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    H = draw(st.integers(1, 7))
    W = H if op == "delta_log_amplitude" else draw(st.integers(1, 7))
    if op == "feature_variance" and H * W < 2:
        W = 2
    dtype = draw(st.sampled_from(backend_dtypes(op, backend)))
    args = dict(x=layout(draw, (B, C, H, W), dtype, draw(st.sampled_from(LAYOUTS))))
    if op != "feature_variance":
        args["eps"] = draw(st.sampled_from([1e-6, 0.1, 1, 0.0]))
    if op == "radial_log_amplitude":
        args["bins"] = draw(st.sampled_from([None, 1, 2, 5]))
    return args


def call_stat(op):
    def call(a, backend):
        rest = {k: v for k, v in a.items() if k != "x"}
        return getattr(ao, op)(a["x"], **rest, backend=backend)
    return call


def valid_noise(draw, backend):
    nd = draw(st.integers(2, 4))
    return dict(shape=tuple(draw(st.integers(1, 5)) for _ in range(nd)), freq=draw(st.floats(0, 3.5)),
                width=draw(st.floats(0.05, 2)), eps=draw(st.sampled_from([1.0, 0.5, 2])),
                generator=draw(st.sampled_from([None, "gen"])), dtype=draw(st.sampled_from([None, *FLOATS])),
                device=draw(st.sampled_from([None, "cpu", torch.device("cpu")])))


def call_noise(a, backend):
    shape = a["shape"]
    if isinstance(shape, (tuple, list)) and all(isinstance(n, int) and n > 0 for n in shape) and (
            2**24 <= math.prod(shape) < 2**42):
        # noise that fits in memory but fills gigabytes is a legitimate request, not a bad argument
        raise Launched()
    gen = a["generator"]
    if gen == "gen":
        gen = torch.Generator().manual_seed(0)
    return ao.frequency_noise(a["shape"], a["freq"], a["width"], a["eps"], generator=gen, dtype=a["dtype"],
                              device=a["device"])


def valid_fstats(draw, backend):
    stats = tuple(draw(st.lists(st.sampled_from(
        ["delta_log_amplitude", "feature_variance", "log_amplitude_spectrum", "radial_log_amplitude"]),
        min_size=1, max_size=4, unique=True)))
    maps = []
    for _ in range(draw(st.integers(0, 3))):
        H = draw(st.integers(2, 6))
        dtype = draw(st.sampled_from(backend_dtypes("feature_variance", backend)))
        maps.append(layout(draw, (draw(st.integers(0, 2)), draw(st.integers(1, 3)), H, H), dtype,
                           draw(st.sampled_from(LAYOUTS))))
    return dict(maps=maps, stats=stats, eps=draw(st.sampled_from([1e-6, 0.5])),
                bins=draw(st.sampled_from([None, 3])))


def call_fstats(a, backend):
    return ao.feature_statistics(a["maps"], a["stats"], a["eps"], bins=a["bins"], backend=backend)


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------
def tensors_in(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def snapshot(args):
    return [(t, t.detach().clone()) for v in args.values() for t in tensors_in(v) if t.device.type != "meta"]


def assert_unchanged(snap, cfg):
    for t, before in snap:
        same = torch.equal(t.detach(), before) or (
            t.dtype.is_floating_point and torch.equal(torch.isnan(t.detach()), torch.isnan(before))
            and torch.equal(t.detach().nan_to_num(), before.nan_to_num()))
        assert same, f"{cfg}: an input tensor was modified"


def names_argument(message, names):
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", message) for n in names)


def describe(args):
    def d(v):
        if isinstance(v, torch.Tensor):
            return f"Tensor(shape={tuple(v.shape)}, stride={v.stride()}, dtype={v.dtype}, device={v.device})"
        if isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v):
            return type(v)(d(t) for t in v)
        return repr(v)
    return "{" + ", ".join(f"{k}={d(v)}" for k, v in args.items()) + "}"


def finite_inputs(args):
    return all(torch.isfinite(t).all() for v in args.values() for t in tensors_in(v)
               if t.device.type != "meta" and t.dtype.is_floating_point)


def expected_shape(op, a):
    if op in ("neighborhood_attention2d", "window_attention2d"):
        return tuple(a["q"].shape)
    if op in ("box_blur2d", "tanh_blur2d"):
        B, C, H, W = a["x"].shape
        k = (a["kernel_size"],) * 2 if isinstance(a["kernel_size"], int) else tuple(a["kernel_size"])
        s = (a["stride"],) * 2 if isinstance(a["stride"], int) else tuple(a["stride"])
        p = _pads(a["padding"], k)
        return (B, C, (H + p[0] + p[1] - k[0]) // s[0] + 1, (W + p[2] + p[3] - k[1]) // s[1] + 1)
    if op == "delta_log_amplitude":
        H = a["x"].shape[2]
        return (H - H // 2,)
    if op == "feature_variance":
        return ()
    if op == "log_amplitude_spectrum":
        return tuple(a["x"].shape[2:])
    if op == "radial_log_amplitude":
        bins = a["bins"] if a["bins"] is not None else min(a["x"].shape[2:]) // 2 + 1
        return (bins,)
    if op == "frequency_noise":
        return tuple(a["shape"])
    return None


def moderate(op, a):
    """Scalars in a range where a finite input must give a finite output."""
    def ok(v, lo, hi):
        return v is None or (isinstance(v, (int, float)) and lo <= abs(v) <= hi)
    if op in ("neighborhood_attention2d", "window_attention2d"):
        return ok(a.get("scale"), 0, 100)
    if op == "tanh_blur2d":
        return ok(a.get("tau"), 1e-3, 1e6)
    if "eps" in a:
        return ok(a["eps"], 1e-12, 1e6)
    return True


def check_result(op, out, a, backend, cfg):
    if op == "feature_statistics":
        assert isinstance(out, list), cfg
        if isinstance(a["maps"], (list, tuple)):
            assert len(out) == len(a["maps"]), cfg
        return
    assert isinstance(out, torch.Tensor), cfg
    shape = expected_shape(op, a)
    assert tuple(out.shape) == shape, f"{cfg}: output shape {tuple(out.shape)}, expected {shape}"
    if out.device.type == "meta":
        return
    sums_empty = op in ("delta_log_amplitude", "feature_variance", "log_amplitude_spectrum",
                        "radial_log_amplitude") and a["x"].shape[0] * a["x"].shape[1] == 0
    if op != "radial_log_amplitude" and not sums_empty and finite_inputs(a) and moderate(op, a):
        assert torch.isfinite(out).all(), f"{cfg}: non-finite output for finite input"


def compare_with_reference(op, call, out, a, cfg):
    """A fused backend's successful result equals the reference backend's."""
    if op in ("frequency_noise", "feature_statistics") or out.device.type == "meta" or not out.numel():
        return
    if not finite_inputs(a) or not moderate(op, a):  # how inf/nan arise and propagate may differ
        return
    ref = call(a, "reference")
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(out.dtype, 5e-2)
    o, r = out.detach().double(), ref.detach().double()
    both_nan = torch.isnan(o) & torch.isnan(r)
    err = (o - r).abs().masked_fill(both_nan, 0)
    scale = r.abs().masked_fill(both_nan, 0).max().item() if r.numel() else 0.0
    assert not (err.isnan().any() or err.max().item() > tol * (1 + scale)), (
        f"{cfg}: differs from the reference backend by {err.max().item():.3e}")


def check_backward(op, out, a, cfg):
    leaves = [t for v in a.values() for t in tensors_in(v) if t.requires_grad]
    if not leaves or not out.requires_grad or out.device.type == "meta":
        return
    grads = torch.autograd.grad(out.double().nan_to_num().sum(), leaves, allow_unused=True)
    for t, g in zip(leaves, grads):
        assert g is None or g.shape == t.shape, f"{cfg}: gradient shape {tuple(g.shape)} for {tuple(t.shape)}"


def with_grads(args):
    """Float tensors become leaves that need a gradient (``clone`` keeps dense layouts)."""
    return {k: v.detach().clone().requires_grad_()
            if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.device.type != "meta" else v
            for k, v in args.items()}


# A replaced argument can make another one inconsistent; an error may then name that one.
RELATED = {
    "neighborhood_attention2d": {"q": "k v kernel_size dilation rel_pos_bias", "k": "q", "v": "q",
                                 "kernel_size": "dilation rel_pos_bias", "dilation": "kernel_size",
                                 "border": "kernel_size dilation"},
    "window_attention2d": {"q": "k v rel_pos_bias", "k": "q", "v": "q", "window_size": "shift rel_pos_bias",
                           "shift": "window_size"},
    "box_blur2d": {"x": "kernel_size padding pad_mode", "kernel_size": "padding", "padding": "kernel_size pad_mode",
                   "pad_mode": "padding"},
    "radial_log_amplitude": {"x": "bins"},
    "feature_statistics": {"maps": "stats", "stats": "maps"},
    "frequency_noise": {"device": "generator", "generator": "device"},
}
RELATED["tanh_blur2d"] = RELATED["box_blur2d"]


def blamed(op, bad):
    return sorted(set(bad).union(*(RELATED.get(op, {}).get(b, "").split() for b in bad)))


def fuzz_one(data, op, valid, call, backend):
    args = valid(data.draw, backend)
    names = list(args)
    n_bad = min(len(names), data.draw(st.sampled_from([0, 1, 1, 1, 1, 2])))
    bad = data.draw(st.lists(st.sampled_from(names), min_size=n_bad, max_size=n_bad, unique=True)) if n_bad else []
    for name in bad:
        args[name] = data.draw(garbage_for(args[name]))
    if not bad and data.draw(st.booleans()):
        args = with_grads(args)
    check_call(op, call, backend, args, bad)


def check_call(op, call, backend, args, bad):
    cfg = f"{op}(backend={backend!r}) replaced {bad} in {describe(args)}"
    snap = snapshot(args)
    try:
        out = call(args, backend)
    except Launched:
        assert_unchanged(snap, cfg)
        return
    except dispatch.BackendUnavailableError as exc:
        assert_unchanged(snap, cfg)
        assert backend is not None and "backend" in str(exc), f"{cfg}: {exc}"
        return
    except ALLOWED as exc:
        assert_unchanged(snap, cfg)
        assert bad, f"{cfg}: a valid call raised {type(exc).__name__}: {exc}"
        assert names_argument(str(exc), blamed(op, bad)), (
            f"{cfg}: {type(exc).__name__} does not name the argument: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - anything else is a bug; report it with the call
        raise AssertionError(f"{cfg}: raised {type(exc).__name__}: {exc}") from exc
    assert_unchanged(snap, cfg)
    check_result(op, out, args, backend, cfg)
    if backend is not None and backend != "reference" and isinstance(out, torch.Tensor):
        compare_with_reference(op, call, out, args, cfg)
    if isinstance(out, torch.Tensor):
        check_backward(op, out, args, cfg)
        assert_unchanged(snap, cfg)


# Every one of these replaces every argument in turn (deterministic; complements the random mix).
EDGE_VALUES = [None, True, False, -1, 0, 2, 2**31 - 1, 2**31, 2**32 + 1, 2**62 + 1, 2**63 - 1, 2**63, -(2**63),
               2**64 + 1, 10**30 + 1, 1.5, 0.0, math.nan, math.inf, -math.inf, 1e308, 1e-320, "", "x", "same",
               (), (3,), (3, 3, 3), (2**31 - 1, 1), (1, 2**63 - 1), (2**62 + 1, 2**62 + 1), (-1, 3), [3, 3],
               (3.0, 3.0), (True, True), (None, None), object(), 3 + 0j]


def edge_tensors(valid):
    t = valid.detach()
    out = [t.to(torch.int64), t.to(torch.bool), t.to(torch.complex64), t.to("meta"), t.unsqueeze(0),
           t.reshape(-1), torch.zeros(()), t.new_zeros((0,) * t.dim())]
    if t.dim():
        out += [t[:0], t[(slice(0, 1),) * t.dim()].expand(t.shape), t.transpose(0, -1)]
    for dtype in FLOATS:
        out.append(t.to(dtype))
    if t.numel():
        u = t.clone(memory_format=torch.contiguous_format)
        u.view(-1)[0] = math.inf
        out.append(u)
    return out


def edge_values(valid):
    values = list(EDGE_VALUES)
    if isinstance(valid, torch.Tensor):
        values += edge_tensors(valid)
    elif isinstance(valid, list) and valid and isinstance(valid[0], torch.Tensor):
        values += [valid[:1] + [v] for v in edge_tensors(valid[0])] + [tuple(valid), iter(valid)]
    elif valid is None or isinstance(valid, (int, float)):
        values += [torch.tensor(3), torch.tensor(0.5), torch.ones(2)]
    return values


OPS = {
    "neighborhood_attention2d": (valid_na, call_na),
    "window_attention2d": (valid_wa, call_wa),
    "box_blur2d": (lambda draw, b: valid_blur(draw, b, False), call_box),
    "tanh_blur2d": (lambda draw, b: valid_blur(draw, b, True), call_tanh),
    "delta_log_amplitude": (lambda draw, b: valid_stat(draw, b, "delta_log_amplitude"), call_stat("delta_log_amplitude")),
    "feature_variance": (lambda draw, b: valid_stat(draw, b, "feature_variance"), call_stat("feature_variance")),
    "log_amplitude_spectrum": (lambda draw, b: valid_stat(draw, b, "log_amplitude_spectrum"),
                               call_stat("log_amplitude_spectrum")),
    "radial_log_amplitude": (lambda draw, b: valid_stat(draw, b, "radial_log_amplitude"),
                             call_stat("radial_log_amplitude")),
    "feature_statistics": (valid_fstats, call_fstats),
}
TRITON_OPS = ("neighborhood_attention2d", "window_attention2d", "box_blur2d", "tanh_blur2d",
              "delta_log_amplitude", "feature_variance", "feature_statistics")
# reference-only ops are fuzzed once (backend=None is the reference there)
CASES = [(op, b) for op in OPS for b in ((None,) if op in ("log_amplitude_spectrum", "radial_log_amplitude")
                                         else ("reference", "cpu"))]
CASES.append(("frequency_noise", None))
OPS["frequency_noise"] = (valid_noise, call_noise)


@pytest.mark.parametrize("op,backend", CASES, ids=[f"{o}-{b}" for o, b in CASES])
def test_fuzz_arguments(op, backend):
    if backend == "cpu":
        from helpers import skip_unless

        skip_unless(op if op != "feature_statistics" else "feature_variance", "cpu", torch.float32)
    valid, call = OPS[op]

    @settings(**SETTINGS)
    @given(st.data())
    def run(data):
        fuzz_one(data, op, valid, call, backend)

    with watchdog():
        run()


@pytest.mark.parametrize("op,backend", CASES, ids=[f"{o}-{b}" for o, b in CASES])
def test_every_argument_edge_values(op, backend):
    if backend == "cpu":
        from helpers import skip_unless

        skip_unless(op if op != "feature_statistics" else "feature_variance", "cpu", torch.float32)
    valid, call = OPS[op]

    @settings(**{**SETTINGS, "max_examples": 2})
    @given(st.data())
    def run(data):
        base = valid(data.draw, backend)
        for name in base:
            for value in edge_values(base[name]):
                check_call(op, call, backend, {**base, name: value}, [name])

    with watchdog():
        run()


@pytest.mark.parametrize("op", TRITON_OPS)
def test_fuzz_arguments_triton_validation(op, no_triton_kernels):
    from helpers import skip_unless

    if skip_unless(op if op != "feature_statistics" else "feature_variance", "triton", torch.float32).type != "cpu":
        # the generators build CPU tensors: this runs where Triton runs on the CPU (its
        # interpreter, as in CI); on a GPU the fused Triton tests cover the CUDA tensors
        pytest.skip("argument fuzzing of the Triton backend builds CPU tensors (interpreter only)")
    valid, call = OPS[op]

    @settings(**{**SETTINGS, "max_examples": EXAMPLES // 2})
    @given(st.data())
    def run(data):
        fuzz_one(data, op, valid, call, "triton")

    with watchdog():
        run()


def test_fuzz_checks_can_fail():
    """The checks above catch what they are for (a test that cannot fail is a defect)."""
    assert not names_argument("q must be a torch.Tensor", ["k"])
    assert names_argument("k has shape (1,) but q has shape (2,)", ["k"])
    assert names_argument("maps[1] must be square", ["maps[1]"])
    x = torch.ones(3)
    snap = [(x, x.clone())]
    x.add_(1)
    with pytest.raises(AssertionError, match="modified"):
        assert_unchanged(snap, "cfg")
    a = dict(x=torch.ones(1, 1, 4, 4), kernel_size=2, stride=1, padding=1, pad_mode="zeros")
    with pytest.raises(AssertionError, match="shape"):
        check_result("box_blur2d", torch.ones(1, 1, 4, 4), a, "cpu", "cfg")
    with pytest.raises(AssertionError, match="non-finite"):
        check_result("box_blur2d", torch.full((1, 1, 5, 5), math.nan), a, "cpu", "cfg")
