"""The ``dicetorch::dice_stats`` operator: opcheck, torch.compile, layouts and dtypes."""
from __future__ import annotations

import pytest
import torch

import dicetorch as dt
from dicetorch import reference
from test_losses import make_case

pytestmark = pytest.mark.filterwarnings("ignore:include_background=False is ignored")

LOSSES = (dt.DiceLoss, dt.GeneralizedDiceLoss, dt.TverskyLoss)


# ------------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) kernel, autograd registration, dynamic shapes
# ------------------------------------------------------------------------------------------------
OPCHECK_CASES = [
    # (target kind, activation, power, ignore_index)
    ("labels", "softmax", 1, None),
    ("labels", "sigmoid", 2, -1),
    ("labels", "none", 1, 0),
    ("labels_u8", "softmax", 2, 255),
    ("labels_i32", "sigmoid", 1, None),
    ("onehot", "softmax", 2, None),
    ("soft", "sigmoid", 1, None),
    ("soft", "none", 2, None),
]


@pytest.mark.parametrize("kind,activation,power,ignore_index", OPCHECK_CASES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_dice_stats(kind, activation, power, ignore_index, requires_grad):
    x, t = make_case(1, c=3, spatial=(3, 4), kind=kind, activation=activation, dtype=torch.float32,
                     ignore_index=ignore_index)
    x.requires_grad_(requires_grad)
    torch.library.opcheck(dt.ops.dice_stats_op, (x, t, activation, power, ignore_index, "reference"))


@pytest.mark.parametrize("kind,activation,power,ignore_index",
                         [("labels", "softmax", 2, -1), ("soft", "sigmoid", 1, None)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_dice_stats_backward(kind, activation, power, ignore_index, channels_last):
    x, t = make_case(2, c=3, spatial=(3, 4), kind=kind, activation=activation, dtype=torch.float32,
                     ignore_index=ignore_index)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 3)
    torch.library.opcheck(dt.ops.dice_stats_backward, (grad, x, t, activation, power, ignore_index, "reference"))


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------
def _eager_and_compiled(fn, x, t, compile_backend):
    xe = x.clone().requires_grad_()
    le = fn(xe, t)
    le.backward()
    xc = x.clone().requires_grad_()
    lc = torch.compile(fn, fullgraph=True, backend=compile_backend)(xc, t)
    lc.backward()
    return (le, xe.grad), (lc, xc.grad)


def test_compile_inductor_all_losses():
    """One inductor compilation (slow on CPU: it builds C++) covering the three modules together."""
    x, t = make_case(3, n=2, c=3, spatial=(4, 5), dtype=torch.float32, ignore_index=-1)
    mods = [dt.DiceLoss(squared=True, ignore_index=-1, backend="reference"),
            dt.GeneralizedDiceLoss(ignore_index=-1, backend="reference"),
            dt.TverskyLoss(alpha=0.3, beta=0.7, gamma=1.5, ignore_index=-1, backend="reference")]

    def fn(z, tt):
        return torch.stack([m(z, tt) for m in mods])

    xe = x.clone().requires_grad_()
    le = fn(xe, t)
    ge = [torch.autograd.grad(le[i], xe, retain_graph=True)[0] for i in range(3)]
    xc = x.clone().requires_grad_()
    lc = torch.compile(fn, fullgraph=True)(xc, t)
    gc = [torch.autograd.grad(lc[i], xc, retain_graph=True)[0] for i in range(3)]
    # float32 epilogue fused differently by inductor: a few ulps of the O(1) losses and gradients
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", LOSSES)
@pytest.mark.parametrize("config", [
    dict(),
    dict(activation="sigmoid", batch=True, include_background=False, class_weights=[1.0, 2.0, 0.5]),
    dict(activation="none", log_loss=True, ignore_index=255),
])
def test_compile_modules(cls, config):
    """Dynamo + AOTAutograd trace the custom op through its fake kernel (aot_eager: no C++ build)."""
    kind = "soft" if config.get("activation") == "sigmoid" else "labels"
    x, t = make_case(4, c=3, spatial=(4, 5), kind=kind, activation=config.get("activation", "softmax"),
                     dtype=torch.float32, ignore_index=config.get("ignore_index"))
    torch._dynamo.reset()
    (le, ge), (lc, gc) = _eager_and_compiled(cls(**config, backend="reference"), x, t, "aot_eager")
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cls", LOSSES)
def test_compile_dynamic_shapes(cls):
    """Other batch and spatial sizes reuse the compiled graph (dynamic=True) and stay correct."""
    torch._dynamo.reset()
    mod = cls(smooth_nr=0.1, backend="reference")
    fn = torch.compile(mod, fullgraph=True, backend="aot_eager", dynamic=True)
    for n, spatial in ((2, (4, 5)), (3, (6, 3)), (1, (2, 7))):
        x, t = make_case(5, n=n, c=3, spatial=spatial, dtype=torch.float32)
        torch.testing.assert_close(fn(x, t), mod(x, t), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# layouts and dtypes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_channels_last(ndim, kind, backend):
    spatial = (4, 5) if ndim == 2 else (3, 4, 2)
    fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
    x, t = make_case(6, c=3, spatial=spatial, kind=kind, activation="softmax", dtype=torch.float32)
    xl = x.contiguous(memory_format=fmt)
    tl = t.contiguous(memory_format=fmt) if t.is_floating_point() else t
    for fn in (dt.dice_loss, dt.generalized_dice_loss, dt.tversky_loss):
        a = x.clone().requires_grad_()
        b = xl.clone().requires_grad_()
        la, lb = fn(a, t, backend=backend), fn(b, tl, backend=backend)
        la.backward()
        lb.backward()
        # same values in a different memory order: only the summation order may differ
        torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-8)
        assert b.grad.is_contiguous(memory_format=fmt)


def test_channels_last_stats_are_a_view_not_a_copy():
    """The canonical (N, C, M) input handed to the backend keeps channels-last strides."""
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    xc, _ = dt.ops.canonical(x, torch.zeros(2, 4, 5, dtype=torch.long))
    assert xc.data_ptr() == x.data_ptr() and xc.stride() == (60, 1, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_output_dtype(dtype, backend):
    x, t = make_case(7, c=3, spatial=(4, 4), dtype=dtype)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert dt.ops.dice_stats(x, t, "softmax", 1, None, backend).dtype == want
    for fn in (dt.dice_loss, dt.generalized_dice_loss, dt.tversky_loss):
        assert fn(x, t, backend=backend).dtype == want
    # the gradient has the input's dtype
    xg = x.clone().requires_grad_()
    dt.dice_loss(xg, t, backend=backend).backward()
    assert xg.grad.dtype == dtype


# unit roundoff u of the input format (round to nearest): fp16 2^-11, bf16 2^-8 / 2 = 2^-9
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-9}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_half_precision_stats(dtype, activation, kind):
    x, t = make_case(8, n=2, c=4, spatial=(8, 8), kind=kind, activation=activation, dtype=torch.float32)
    if activation != "none":
        x = x.clamp(-3, 3)
    xh = x.to(dtype)
    th = t.to(dtype) if t.is_floating_point() else t
    for power in (1, 2):
        sh = dt.ops.dice_stats(xh, th, activation, power, None, "reference")
        assert sh.dtype == torch.float32
        # 1) same (rounded) values computed in fp32: only fp32 accumulation differs (64-term sums)
        s_up = dt.ops.dice_stats(xh.float(), th.float() if th.is_floating_point() else th, activation, power,
                                 None, "reference")
        torch.testing.assert_close(sh, s_up, rtol=1e-6, atol=1e-6)
        # 2) against the unrounded fp32 input: the input rounding dominates.  |dx| <= u |x| with
        #    |x| <= 3 changes softmax/sigmoid probabilities by at most a relative 2 * 3u (|d log p| <=
        #    2 max|dx|), and p itself by u for "none"; a soft target's rounding adds u.  Each sum is a
        #    sum of positive terms, so the same relative bound holds for it, doubled for p^2 and p*t.
        s32 = dt.ops.dice_stats(x, t, activation, power, None, "reference")
        u = UNIT_ROUNDOFF[dtype]
        rel = 2 * (2 * 3 * u + u) + 1e-6
        torch.testing.assert_close(sh, s32, rtol=rel, atol=1e-6)


def test_float64_stats_are_float64_exact():
    x, t = make_case(9, c=3, spatial=(5, 5))
    s = dt.ops.dice_stats(x, t, "softmax", 2, None, "reference")
    assert s.dtype == torch.float64
    p = torch.softmax(x, 1)
    oh = torch.nn.functional.one_hot(t, 3).movedim(-1, 1).double()
    want = torch.stack([(p * oh).sum((2, 3)), (p * p).sum((2, 3)), oh.sum((2, 3))], dim=1)
    torch.testing.assert_close(s, want, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# autograd contract
# ------------------------------------------------------------------------------------------------
def test_target_requiring_grad_raises():
    x, t = make_case(10, c=3, spatial=(3, 3), kind="soft", dtype=torch.float32)
    t.requires_grad_()
    with pytest.raises(ValueError, match="target"):
        dt.ops.dice_stats(x.requires_grad_(), t, "softmax", 1, None, "reference")
    with pytest.raises(ValueError, match="target"):
        dt.dice_loss(x.detach(), t, backend="reference")
    # detached targets are fine
    dt.dice_loss(x, t.detach(), backend="reference").backward()


def test_no_grad_input_gives_no_graph():
    x, t = make_case(11, c=3, spatial=(3, 3), dtype=torch.float32)
    assert not dt.ops.dice_stats(x, t, "softmax", 1, None, "reference").requires_grad
    assert dt.ops.dice_stats(x.requires_grad_(), t, "softmax", 1, None, "reference").requires_grad


def test_deterministic():
    x, t = make_case(12, c=3, spatial=(16, 16), dtype=torch.float32)
    a = dt.ops.dice_stats(x, t, "softmax", 1, None, "auto")
    b = dt.ops.dice_stats(x, t, "softmax", 1, None, "auto")
    assert torch.equal(a, b)


class _LogOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators dispatched (a dispatch mode: the registered operator must serve it)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _profiled_ops(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind,activation,pixel_loss", [("labels", "softmax", "none"), ("labels", "softmax", "ce"),
                                                        ("soft", "sigmoid", "focal"), ("labels_u8", "none", "none")])
def test_eager_path_is_the_operator(backend, kind, activation, pixel_loss):
    """In plain eager mode dice_stats runs the operator's implementation and backward through a plain
    autograd.Function (without the dispatcher's Python layers); stats and gradient are bit for bit
    those of the registered operator, which a dispatch mode still sees."""
    if backend not in dt.ops.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not built")
    x, t = make_case(14, c=4, spatial=(5, 6), kind=kind, activation=activation, dtype=torch.float32,
                     ignore_index=None)
    args = (activation, 2 if kind == "soft" else 1, None, backend, pixel_loss, 1.5)
    grad = torch.randn(2, 5 if pixel_loss != "none" else 3, 4)

    def run(via_op):
        xr = x.detach().clone().requires_grad_()
        s = dt.ops.dice_stats_op(xr, t, *args)[0] if via_op else dt.ops.dice_stats(xr, t, *args)
        s.backward(grad)
        return s.detach(), xr.grad

    assert dt.ops._plain_eager(x, t)
    eager, op = run(False), run(True)
    assert torch.equal(eager[0], op[0]) and torch.equal(eager[1], op[1])
    names = _profiled_ops(lambda: run(False))
    assert "dicetorch::dice_stats" not in names and "dicetorch::dice_stats_backward" not in names, names
    assert "dicetorch::dice_stats" in _profiled_ops(lambda: run(True))

    mode = _LogOps()
    with mode:
        under_mode = run(False)
    assert "dicetorch.dice_stats.default" in mode.names and "dicetorch.dice_stats_backward.default" in mode.names
    assert torch.equal(under_mode[0], op[0]) and torch.equal(under_mode[1], op[1])


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_eager_path_only_in_plain_eager():
    x, t = make_case(15, c=3, spatial=(4, 4), dtype=torch.float32)
    assert dt.ops._plain_eager(x, t) and dt.ops._plain_eager(torch.nn.Parameter(x), t)
    with torch.device("cpu"):  # a function mode
        assert not dt.ops._plain_eager(x, t)
    with _LogOps():
        assert not dt.ops._plain_eager(x, t)

    class Sub(torch.Tensor):
        pass

    assert not dt.ops._plain_eager(x.as_subclass(Sub), t)
    seen = []
    torch.jit.trace(lambda a: seen.append(dt.ops._plain_eager(a, t)) or a * 1, (x,), check_trace=False)
    assert seen == [False]


def test_reference_module_matches_operator():
    """The operator on the reference backend is exactly reference.dice_stats_reference on (N, C, M)."""
    x, t = make_case(13, c=3, spatial=(4, 4), ignore_index=-1)
    a = dt.ops.dice_stats(x, t, "sigmoid", 2, -1, "reference")
    b = reference.dice_stats_reference(x.reshape(2, 3, -1), t.reshape(2, -1), "sigmoid", 2, -1)
    assert torch.equal(a, b)
