"""Hostile inputs and unusual callers, one test per behaviour, on every backend this machine runs.

NaN in gives NaN out; a pixel whose leading channels are -inf is finite; ignored pixels count nowhere
(whatever they hold, and whatever the upstream gradient holds); the backward's strides are the fake
kernel's; torch.func / forward-mode AD / double backward work; the eager hot path makes no host sync
when its checks run on the device; option values are validated with errors that name them.

Backends: "reference" and "cpu" in this process; "triton" in a Triton-interpreter subprocess
(``test_interpreter_suite``).  The CUDA kernel's online softmax is the ``dice_math.h`` function the
CPU extension exposes as ``dicetorch::_softmax_normaliser`` (``test_shared_online_softmax``).
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import dicetorch as dt
from conftest import INTERPRETED, backends_under_test, interpreter_suite
from dicetorch import ops, reference

pytestmark = pytest.mark.filterwarnings("ignore:include_background=False is ignored")

BACKENDS = backends_under_test() if INTERPRETED else ["reference"] + backends_under_test()
LOSSES = (dt.dice_loss, dt.generalized_dice_loss, dt.tversky_loss)


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
def test_interpreter_suite():
    interpreter_suite(__file__)


def _case(seed=0, n=2, c=4, spatial=(5, 6), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(n, c, *spatial, generator=g, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, c, (n, *spatial), generator=g)
    return x, t


def _stats_and_grad(x, t, activation, power, ignore_index, backend, grad=None):
    xc, tc = ops.canonical(x, t)
    impl = ops._impl(backend)
    stats = impl.forward(xc, tc, activation, power, ignore_index)
    if grad is None:
        grad = torch.randn(stats.shape, dtype=stats.dtype, generator=torch.Generator().manual_seed(1))
    return stats, impl.backward(grad.contiguous(), xc, tc, activation, power, ignore_index).reshape(x.shape)


def _same_nan_and_close(a, b, rtol, atol):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN patterns differ"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# NaN in -> NaN out (the C++ kernel's fast exp clamps its argument; NaN must pass through)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_nan_propagates(backend, dtype, activation):
    x, t = _case(dtype=dtype)
    x[0, 1, 2, 3] = float("nan")
    for power in (1, 2):
        stats, gx = _stats_and_grad(x, t, activation, power, None, backend)
        ref, gref = _stats_and_grad(x, t, activation, power, None, "reference")
        assert torch.isnan(stats[0]).any() and not torch.isnan(stats[1]).any()
        _same_nan_and_close(stats, ref, 1e-5, 1e-5)
        _same_nan_and_close(gx.float(), gref.float(), 1e-2, 1e-2)
        assert torch.isnan(gx[0, :, 2, 3]).any() or (activation == "none" and power == 1)
    loss = dt.dice_loss(x, t, activation=activation, backend=backend)
    assert torch.isnan(loss)


def test_presets_see_nan():
    """The MONAI preset on the default (fused) path reports a diverged model as NaN, as MONAI does."""
    x, t = _case()
    x[0, 1, 2, 3] = float("nan")
    loss = dt.presets.monai_dice(sigmoid=True, to_onehot_y=True)(x, t.unsqueeze(1))
    assert torch.isnan(loss)


# ----------------------------------------------------------------------------------------------
# -inf: a pixel whose leading channels are -inf (masked_fill(-inf)) is finite
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [3, 130])  # 130: the chunked (online) softmax of the Triton kernels
def test_leading_neg_inf_channels(backend, C):
    x, t = _case(c=C, spatial=(4, 3))
    lead = torch.arange(C).view(1, C, 1, 1)
    depth = torch.randint(0, C, (2, 1, 4, 3), generator=torch.Generator().manual_seed(2))  # < C: one finite
    x = x.masked_fill(lead < depth, float("-inf"))
    x[0, :, 0, 0] = float("-inf")
    x[0, C - 1, 0, 0] = 0.5  # only the last channel finite
    t = torch.where(torch.rand(t.shape) < 0.5, t, torch.full_like(t, C - 1))
    for power in (1, 2):
        stats, gx = _stats_and_grad(x, t, "softmax", power, None, backend)
        ref, gref = _stats_and_grad(x, t, "softmax", power, None, "reference")
        assert torch.isfinite(stats).all() and torch.isfinite(gx).all()
        torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gref, rtol=1e-5, atol=1e-6)
    loss = dt.dice_loss(x.requires_grad_(), t, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.skipif(INTERPRETED or not ops.extension_info()["cpu"], reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_online_softmax(dtype):
    """dice_math.h's online softmax (the CUDA kernels' normaliser), run on the CPU: m = max, s = sum exp(x - m)."""
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor([[-inf, -inf, 1.0, 2.0], [-inf, 0.0, -inf, -3.0], [3.0, -inf, -inf, -inf],
                         [0.5, 0.25, -1.0, 8.0], [-inf, -inf, -inf, -inf], [1.0, nan, 0.0, 2.0],
                         [-inf, inf, 0.0, 1.0], [-inf, -inf, -inf, 40.0]], dtype=dtype)
    out = torch.ops.dicetorch._softmax_normaliser(rows)
    finite = [0, 1, 2, 3, 7]  # at least one finite channel, no NaN, no +inf: m = max, s = sum exp(x - m)
    m = rows[finite].amax(1)
    torch.testing.assert_close(out[finite, 0], m)
    torch.testing.assert_close(out[finite, 1], torch.exp(rows[finite] - m.unsqueeze(1)).sum(1), rtol=1e-6, atol=0)
    assert out[4, 0] == -inf and out[4, 1] == 0  # all -inf: s = 0, so p = NaN, as torch.softmax gives
    assert out[5, 0] == 2 and math.isnan(out[5, 1])  # NaN channel: s = NaN, so every p is NaN
    assert out[6, 0] == inf and out[6, 1] == 1  # +inf: p = exp(inf - inf) = NaN there, as in torch


# ----------------------------------------------------------------------------------------------
# Ignored pixels count nowhere: garbage there changes nothing; their gradient is exactly 0
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("ignore_index", [-1, 0])  # 0: a real class
def test_ignored_pixels_count_nowhere(backend, activation, ignore_index):
    x, t = _case(seed=3)
    t[torch.rand(t.shape, generator=torch.Generator().manual_seed(4)) < 0.3] = ignore_index
    t[1] = ignore_index  # an image with every pixel ignored
    ignored = (t == ignore_index).unsqueeze(1).expand_as(x)
    clean = x.masked_fill(ignored, 0.0)
    dirty = clean.clone()
    garbage = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30])
    dirty[ignored] = garbage[torch.arange(int(ignored.sum())) % 4]
    for power in (1, 2):
        s_clean, g_clean = _stats_and_grad(clean, t, activation, power, ignore_index, backend)
        s_dirty, g_dirty = _stats_and_grad(dirty, t, activation, power, ignore_index, backend)
        assert torch.equal(s_clean, s_dirty)  # bitwise: the garbage never entered a sum
        assert torch.equal(g_clean, g_dirty)
        assert torch.all(g_dirty[ignored] == 0)
        assert torch.all(s_dirty[1] == 0)  # nothing counted in the all-ignored image
        # a non-finite upstream gradient (a NaN loss) leaves the ignored pixels at exactly 0
        nan_grad = torch.full_like(s_dirty, float("nan"))
        _, g_nan = _stats_and_grad(dirty, t, activation, power, ignore_index, backend, grad=nan_grad)
        assert torch.all(g_nan[ignored] == 0) and torch.isnan(g_nan[~ignored]).all()
    xr = dirty.clone().requires_grad_()
    loss = dt.dice_loss(xr, t, activation=activation, ignore_index=ignore_index, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xr.grad).all() and torch.all(xr.grad[ignored] == 0)


# ----------------------------------------------------------------------------------------------
# Strides: the backward returns exactly the fake kernel's strides (torch.compile relies on them)
# ----------------------------------------------------------------------------------------------
def _odd_layouts(x):
    return {
        "transposed": x.transpose(2, 3),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "nhcw": x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3),
        "sliced": torch.cat([x, x], dim=3)[..., ::2],
        "expanded": x[:1].expand(x.shape),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "nhcw", "sliced", "expanded"])
def test_backward_strides_match_fake(backend, layout):
    x, t = _case(c=3, spatial=(4, 5))
    x = _odd_layouts(x)[layout]
    t = torch.randint(0, 3, (x.shape[0], *x.shape[2:]))
    grad = torch.randn(2, 3, 3)
    real = ops.dice_stats_backward(grad, x, t, "softmax", 1, None, backend)
    assert real.stride() == torch.empty_like(x).stride()
    xc, tc = ops.canonical(x, t)
    expect = reference.dice_stats_backward_reference(grad, xc, tc, "softmax", 1, None).reshape(x.shape)
    torch.testing.assert_close(real, expect, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(ops.dice_stats_backward, (grad, x, t, "softmax", 1, None, backend),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(INTERPRETED, reason="one inductor compilation suffices")
def test_compiled_backward_transposed_input():
    """torch.compile (inductor) asserts the custom op's output strides: a transposed input used to crash."""
    torch._dynamo.reset()
    x, t = _case(c=3, spatial=(4, 5))
    x = x.transpose(2, 3).requires_grad_()
    t = torch.randint(0, 3, (2, 5, 4))
    loss = torch.compile(lambda a, b: dt.dice_loss(a, b) * 1.0, fullgraph=True)(x, t)
    loss.backward()
    xe = x.detach().clone().requires_grad_()
    dt.dice_loss(xe, t).backward()
    torch.testing.assert_close(x.grad, xe.grad, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# torch.func, forward-mode AD, double backward
# ----------------------------------------------------------------------------------------------
def _f64(seed=5, c=3):
    x, t = _case(seed=seed, c=c, dtype=torch.float64)
    return x, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: f.__name__)
def test_functorch_grad_jvp_vmap(backend, loss_fn):
    x, t = _f64()
    f = lambda z: loss_fn(z, t, squared=True, backend=backend) if loss_fn is not dt.tversky_loss \
        else loss_fn(z, t, gamma=1.5, backend=backend)  # noqa: E731
    xr = x.clone().requires_grad_()
    expect = torch.autograd.grad(f(xr), xr)[0]
    torch.testing.assert_close(torch.func.grad(f)(x), expect, rtol=1e-10, atol=1e-13)
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(tangent, (expect * v).sum(), rtol=1e-9, atol=1e-12)
    eps = 1e-6  # and against central finite differences
    fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-8)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = f(fwAD.make_dual(x, v))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, tangent, rtol=1e-10, atol=1e-13)
    xs = torch.stack([x, 0.5 * x, -x])
    torch.testing.assert_close(torch.vmap(f)(xs), torch.stack([f(z) for z in xs]), rtol=1e-12, atol=1e-14)
    ts = torch.stack([t, t.flip(1), (t + 1) % 3])  # batched integer labels
    g = lambda z, y: loss_fn(z, y, backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.vmap(g)(xs, ts), torch.stack([g(z, y) for z, y in zip(xs, ts)]),
                               rtol=1e-12, atol=1e-14)
    jac = torch.func.jacrev(lambda z: dt.dice_loss(z, t, reduction="none", backend=backend))(x)
    rows = [torch.autograd.grad(dt.dice_loss(xr, t, reduction="none", backend=backend)[i, k], xr)[0]
            for i in range(2) for k in range(3)]
    torch.testing.assert_close(jac.reshape(6, *x.shape), torch.stack(rows), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_operator_under_functorch(backend):
    x, t = _f64()
    f = lambda z: dt.ops.dice_stats(z, t, "softmax", 2, None, backend).square().sum()  # noqa: E731
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(torch.func.grad(f)(x), torch.autograd.grad(f(xr), xr)[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_double_backward(backend, activation):
    x, t = _f64(c=3)
    t[0, 0] = -1
    x = x[:, :, :3, :3].contiguous().requires_grad_()
    t = t[:, :3, :3]
    f = lambda z: dt.generalized_dice_loss(z, t, activation=activation, squared=True, ignore_index=-1,  # noqa: E731
                                           backend=backend)
    assert torch.autograd.gradgradcheck(f, (x,))
    # a gradient penalty: d/dx |dL/dx|^2 matches the same through the reference backend
    out = []
    for b in (backend, "reference"):
        z = x.detach().clone().requires_grad_()
        loss = dt.dice_loss(z, t, activation=activation, ignore_index=-1, backend=b)
        (g,) = torch.autograd.grad(loss, z, create_graph=True)
        out.append(torch.autograd.grad(g.square().sum(), z)[0])
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# No host synchronization in the eager hot path when checks run on the device
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETED, reason="backend independent")
def test_device_checks_never_sync(monkeypatch):
    """With checks on the device (as for CUDA tensors), forward + backward never read a tensor on the
    host: Tensor.item / __bool__ / __int__ / __float__ / tolist raise if called."""
    x, t = _case()
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    modules = [dt.DiceLoss(class_weights=w, ignore_index=255), dt.GeneralizedDiceLoss(ignore_index=255),
               dt.TverskyLoss(class_weights=w, gamma=1.5)]
    monkeypatch.setattr(ops, "_checks_on_host", lambda device: False)

    def forbidden(*a, **k):
        raise AssertionError("host synchronization in the hot path")

    xr = x.clone().requires_grad_()
    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__int__", "__float__", "tolist", "__index__"):
            m.setattr(torch.Tensor, name, forbidden)
        for mod in modules:
            mod(xr, t).backward()
        dt.dice_loss(xr, torch.rand_like(x), class_weights=w).backward()
        dt.tversky_loss(xr, t, class_weights=[1, 2, 3, 4]).backward()
    # the checks still run, on the device (on CPU tensors _assert_async raises at once)
    bad = t.clone()
    bad[0, 0, 0] = 9
    with pytest.raises(RuntimeError, match=r"dicetorch: target labels must lie in \[0, 3\]"):
        dt.dice_loss(x, bad)
    with pytest.raises(RuntimeError, match="dicetorch: class_weights must be finite and >= 0"):
        dt.dice_loss(x, t, class_weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(RuntimeError, match=r"dicetorch: a float or one-hot target must lie in \[0, 1\]"):
        dt.dice_loss(x, 2 * torch.rand_like(x) + 1)


# ----------------------------------------------------------------------------------------------
# Option values
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETED, reason="backend independent")
class TestOptions:
    def test_numbers_as_numpy_and_tensors(self):
        x, t = _case()
        expect = dt.tversky_loss(x, t, alpha=0.25, beta=0.75, gamma=1.5, smooth_nr=1e-3, smooth_dr=2e-3)
        for conv in (np.float32, np.float64, torch.tensor, lambda v: torch.tensor(v, dtype=torch.float64)):
            got = dt.tversky_loss(x, t, alpha=conv(0.25), beta=conv(0.75), gamma=conv(1.5), smooth_nr=conv(1e-3),
                                  smooth_dr=conv(2e-3))
            torch.testing.assert_close(got, expect)
            mod = dt.TverskyLoss(alpha=conv(0.25), beta=conv(0.75), gamma=conv(1.5), smooth_nr=conv(1e-3),
                                 smooth_dr=conv(2e-3))
            torch.testing.assert_close(mod(x, t), expect)
        d = dt.dice_loss(x, t, smooth_nr=np.int64(1), smooth_dr=torch.tensor(1))
        torch.testing.assert_close(d, dt.dice_loss(x, t, smooth_nr=1.0, smooth_dr=1.0))

    @pytest.mark.parametrize("value", ["255", 255.0, True, torch.tensor(2.0), torch.tensor([1, 2]), [255]])
    def test_ignore_index_must_be_integer(self, value):
        x, t = _case()
        with pytest.raises(TypeError, match="ignore_index must be an integer"):
            dt.dice_loss(x, t, ignore_index=value)
        with pytest.raises(TypeError, match="ignore_index must be an integer"):
            dt.DiceLoss(ignore_index=value)
        with pytest.raises(TypeError, match="ignore_index must be an integer"):
            dt.ops.dice_stats(x, t, "softmax", 1, value)

    def test_ignore_index_integer_kinds(self):
        x, t = _case()
        t[0, 0] = 255
        expect = dt.dice_loss(x, t, ignore_index=255)
        for v in (np.int64(255), np.uint8(255), torch.tensor(255)):
            torch.testing.assert_close(dt.dice_loss(x, t, ignore_index=v), expect)
            torch.testing.assert_close(dt.DiceLoss(ignore_index=v)(x, t), expect)

    @pytest.mark.parametrize("weights", [[1.0, float("nan"), 1.0, 1.0], [1.0, float("inf"), 1.0, 1.0],
                                         [1.0, -0.5, 1.0, 1.0]])
    def test_class_weights_finite_nonnegative(self, weights):
        x, t = _case()
        for fn in LOSSES:
            with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
                fn(x, t, class_weights=weights)
            with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
                fn(x, t, class_weights=torch.tensor(weights))
        for cls in (dt.DiceLoss, dt.GeneralizedDiceLoss, dt.TverskyLoss):
            with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
                cls(class_weights=np.array(weights))

    def test_constant_tversky_refused(self):
        x, t = _case()
        with pytest.raises(ValueError, match="alpha and beta must not both be 0"):
            dt.tversky_loss(x, t, alpha=0, beta=0)
        with pytest.raises(ValueError, match="alpha and beta must not both be 0"):
            dt.TverskyLoss(alpha=0.0, beta=np.float64(0))(x, t)
        dt.tversky_loss(x, t, alpha=0, beta=1)  # one of them zero is a real (recall) index

    @pytest.mark.parametrize("fn", LOSSES)
    @pytest.mark.parametrize("kind", ["soft_high", "soft_negative", "onehot_int_2", "mask_255"])
    def test_targets_outside_unit_interval_refused(self, fn, kind):
        x, t = _case()
        target = {
            "soft_high": torch.rand_like(x) * 1.5 + 0.01,
            "soft_negative": torch.rand_like(x) - 0.2,
            "onehot_int_2": 2 * torch.nn.functional.one_hot(t, 4).movedim(-1, 1),
            "mask_255": 255.0 * torch.nn.functional.one_hot(t, 4).movedim(-1, 1).float(),
        }[kind]
        with pytest.raises(ValueError, match=r"target must lie in \[0, 1\]"):
            fn(x, target)

    def test_class_weights_buffer(self):
        w = [1.0, 2.0000000001, 3.0]
        m = dt.DiceLoss(class_weights=w)
        assert "class_weights=[1.0, 2.0000000001, 3.0]" in repr(m)
        assert torch.equal(m.state_dict()["class_weights"], torch.tensor(w, dtype=torch.float64))
        m.half()
        assert m.class_weights.dtype == torch.float64 and m.class_weights[1].item() == w[1]
        m2 = dt.DiceLoss(class_weights=[0.0, 0.0, 0.0])
        m2.load_state_dict(m.state_dict())
        assert torch.equal(m2.class_weights, m.class_weights)
        x, t = _case(c=3)
        torch.testing.assert_close(m(x, t), dt.dice_loss(x, t, class_weights=w))

    def test_torchscript_refused_clearly_trace_works(self):
        with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.compile"):
            torch.jit.script(dt.DiceLoss())
        x, t = _case()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(dt.DiceLoss(squared=True), (x, t))
        x2, t2 = _case(seed=9)
        torch.testing.assert_close(traced(x2, t2), dt.DiceLoss(squared=True)(x2, t2))
