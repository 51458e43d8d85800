"""Compound losses (Dice + cross-entropy / focal from one fused operator call) against PyTorch and MONAI.

The pixel losses must equal the functions users know: ``F.cross_entropy`` (class weights,
``ignore_index``, label smoothing; label and probability targets), ``F.binary_cross_entropy_with_logits``
and MONAI's ``FocalLoss``.  Inputs are float64 so the comparison with PyTorch is to rounding
(rtol 1e-12); MONAI's ``FocalLoss`` computes in float32 whatever the input dtype, so it is compared
at float32 precision.  The kernel backends are compared with the reference in
``tests/test_compound_kernels.py``; here the losses run on the default backend and on the reference.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn

import dicetorch as dt
from dicetorch import ops

BACKENDS = ["reference"] + [b for b in ops.available_backends("cpu") if b != "reference"
                            and ops.supports_pixel_loss(b, "ce")]


def _case(seed=0, n=2, c=4, spatial=(6, 7), ignore=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(n, c, *spatial, generator=g, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, c, (n, *spatial), generator=g)
    if ignore is not None:
        t[torch.rand(t.shape, generator=g) < 0.25] = ignore
    return x, t


def _grads(fn, x):
    xr = x.detach().clone().requires_grad_()
    loss = fn(xr)
    (g,) = torch.autograd.grad(loss, xr)
    return loss.detach(), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore", [None, 255, 0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_softmax_ce_equals_cross_entropy(backend, ignore, weighted, smoothing):
    x, t = _case(1, ignore=ignore)
    w = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64) if weighted else None
    ours = _grads(lambda z: dt.dice_ce_loss(z, t, ignore_index=ignore, ce_weight=w, label_smoothing=smoothing,
                                            lambda_dice=0.0, backend=backend), x)
    ref = _grads(lambda z: Fn.cross_entropy(z, t, weight=w, ignore_index=-100 if ignore is None else ignore,
                                            label_smoothing=smoothing), x)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_ce_masked_channel(backend, weighted, reduction):
    """A channel masked to -inf (never a label) costs nothing, as in F.cross_entropy: its infinite
    L row must not reach the loss without label smoothing (0 * inf would make it NaN)."""
    x, t = _case(3, c=4)
    x[:, 3] = -math.inf
    t = t % 3
    w = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64) if weighted else None
    ours = _grads(lambda z: dt.dice_ce_loss(z, t, ce_weight=w, lambda_dice=0.0, reduction=reduction,
                                            backend=backend), x)
    ref = _grads(lambda z: Fn.cross_entropy(z, t, weight=w, reduction=reduction), x)
    assert math.isfinite(float(ours[0]))
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-14)
    both = dt.dice_ce_loss(x, t, ce_weight=w, reduction=reduction, backend=backend)  # with the Dice part
    assert math.isfinite(float(both))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_ce_probability_targets(backend, smoothing):
    x, _ = _case(2)
    t = torch.softmax(3 * torch.randn(x.shape, dtype=torch.float64), 1)
    w = torch.tensor([1.0, 0.25, 3.0, 1.0], dtype=torch.float64)
    ours = _grads(lambda z: dt.dice_ce_loss(z, t, ce_weight=w, label_smoothing=smoothing, lambda_dice=0.0,
                                            backend=backend), x)
    ref = _grads(lambda z: Fn.cross_entropy(z, t, weight=w, label_smoothing=smoothing), x)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["binary_labels", "onehot", "soft"])
def test_sigmoid_ce_equals_bce_with_logits(backend, target):
    x, lab = _case(3)
    if target == "binary_labels":
        x, t = x[:, :1], lab % 2
        dense = t.unsqueeze(1).double()
    else:
        dense = (torch.rand(x.shape, dtype=torch.float64) > 0.5).double() if target == "onehot" \
            else torch.rand(x.shape, dtype=torch.float64)
        t = dense
    w = torch.linspace(0.5, 2.0, x.shape[1], dtype=torch.float64)
    ours = _grads(lambda z: dt.dice_ce_loss(z, t, activation="sigmoid", ce_weight=w, lambda_dice=0.0,
                                            backend=backend), x)
    ref = _grads(lambda z: Fn.binary_cross_entropy_with_logits(z, dense, weight=w.view(1, -1, 1, 1)), x)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-10, atol=1e-14)


def test_sigmoid_ce_binary_labels_with_ignore_index():
    """C == 1: label 0 has no row, so the counted pixels come from the labels themselves."""
    x, lab = _case(4)
    x, t = x[:, :1], lab % 2
    t[0, 0, :3] = 255
    keep = (t != 255).unsqueeze(1)
    ours = dt.dice_ce_loss(x, t, activation="sigmoid", ignore_index=255, lambda_dice=0.0)
    ref = Fn.binary_cross_entropy_with_logits(x[keep], (t.unsqueeze(1) == 1).double()[keep])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (0.5, 0.25), (0.0, None), (3.0, 0.75)])
@pytest.mark.parametrize("target", ["onehot", "soft"])
def test_focal_equals_monai(backend, activation, gamma, alpha, target):
    monai = pytest.importorskip("monai.losses")
    x, lab = _case(5, dtype=torch.float32)
    t = Fn.one_hot(lab, 4).movedim(-1, 1).float() if target == "onehot" else torch.rand(x.shape)
    w = [0.5, 1.0, 2.0, 1.5]
    ours = _grads(lambda z: dt.dice_focal_loss(z, t, activation=activation, gamma=gamma, alpha=alpha,
                                               focal_weight=w, lambda_dice=0.0, backend=backend), x)
    ref = _grads(lambda z: monai.FocalLoss(use_softmax=activation == "softmax", gamma=gamma, alpha=alpha,
                                           weight=w)(z, t), x)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-6, atol=1e-7)  # float32 arithmetic on both sides
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_with_labels_equals_focal_with_onehot(backend):
    x, t = _case(6, ignore=255)
    keep = (t != 255)
    oh = Fn.one_hot(torch.where(keep, t, 0), 4).movedim(-1, 1).double()
    # ignored pixels count nowhere: the same as the one-hot loss over the kept pixels only
    xk = x.movedim(1, -1)[keep].T.unsqueeze(0)  # (1, C, kept)
    ok = oh.movedim(1, -1)[keep].T.unsqueeze(0)
    for activation in ("softmax", "sigmoid"):
        a = dt.dice_focal_loss(x, t, ignore_index=255, activation=activation, alpha=0.3, lambda_dice=0.0,
                               backend=backend)
        b = dt.dice_focal_loss(xk, ok, activation=activation, alpha=0.3, lambda_dice=0.0, backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [False, True])
def test_compound_is_the_sum_of_its_parts(backend, batch):
    x, t = _case(7, ignore=255)
    kw = dict(ignore_index=255, batch=batch, include_background=False, squared=True, backend=backend)
    total = _grads(lambda z: dt.dice_ce_loss(z, t, lambda_dice=0.7, lambda_ce=1.3, **kw), x)
    parts = _grads(lambda z: 0.7 * dt.dice_loss(z, t, **kw)
                   + 1.3 * Fn.cross_entropy(z, t, ignore_index=255), x)
    torch.testing.assert_close(total[0], parts[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(total[1], parts[1], rtol=1e-10, atol=1e-14)
    gtotal = _grads(lambda z: dt.generalized_dice_focal_loss(z, t, lambda_gdl=0.4, gamma=1.5, **kw), x)
    gparts = _grads(lambda z: 0.4 * dt.generalized_dice_loss(z, t, **kw)
                    + dt.dice_focal_loss(z, t, gamma=1.5, lambda_dice=0.0, **kw), x)
    torch.testing.assert_close(gtotal[0], gparts[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gtotal[1], gparts[1], rtol=1e-10, atol=1e-14)


def test_sum_reduction_and_modules():
    x, t = _case(8, ignore=255)
    s = dt.dice_ce_loss(x, t, ignore_index=255, reduction="sum")
    want = dt.dice_loss(x, t, ignore_index=255, reduction="sum") + Fn.cross_entropy(x, t, ignore_index=255,
                                                                                   reduction="sum")
    torch.testing.assert_close(s, want, rtol=1e-12, atol=1e-12)
    for cls, fn, extra in ((dt.DiceCELoss, dt.dice_ce_loss, dict(ce_weight=[1.0, 2.0, 0.5, 1.0], label_smoothing=0.1)),
                           (dt.DiceFocalLoss, dt.dice_focal_loss, dict(focal_weight=[1.0, 2.0, 0.5, 1.0], alpha=0.3)),
                           (dt.GeneralizedDiceFocalLoss, dt.generalized_dice_focal_loss, dict(gamma=1.0))):
        m = cls(ignore_index=255, **extra)
        torch.testing.assert_close(m(x, t), fn(x, t, ignore_index=255, **extra), rtol=0, atol=0)
        weight_name = next((k for k in extra if k.endswith("weight")), None)
        if weight_name:
            assert weight_name in m.state_dict() and getattr(m, weight_name).dtype == torch.float64
            assert f"{weight_name}=[1.0, 2.0, 0.5, 1.0]" in repr(m)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(label_smoothing=1.0), ValueError, r"label_smoothing must lie in \[0, 1\)"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be a finite number >= 0"),
    (dict(ce_weight=[1.0, 2.0]), ValueError, "ce_weight must have length C=4"),
    (dict(ce_weight=[1.0, -2.0, 1.0, 1.0]), ValueError, "class_weights must be finite and >= 0"),
    (dict(activation="none"), ValueError, "activation must be 'softmax' or 'sigmoid'"),
    (dict(reduction="none"), ValueError, "reduction must be one of"),
    (dict(lambda_ce=-1.0), ValueError, "lambda_ce must be a finite number >= 0"),
    (dict(activation="sigmoid", label_smoothing=0.1), ValueError, "label_smoothing applies to the softmax"),
])
def test_ce_errors(kwargs, error, match):
    x, t = _case(9)
    with pytest.raises(error, match=match):
        dt.dice_ce_loss(x, t, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=-1.0), "gamma must be a finite number >= 0"),
    (dict(alpha=1.5), r"alpha must lie in \[0, 1\]"),
    (dict(focal_weight=[1.0] * 5), "focal_weight must have length C=4"),
    (dict(gamma=math.inf), "gamma must be a finite number >= 0"),
])
def test_focal_errors(kwargs, match):
    x, t = _case(10)
    with pytest.raises(ValueError, match=match):
        dt.dice_focal_loss(x, t, **kwargs)
    with pytest.raises(ValueError, match=match):
        dt.DiceFocalLoss(**kwargs)(x, t)  # the weights' length is checked when C is known


def test_operator_rows_and_refusals():
    x, t = _case(11)
    s = ops.dice_stats(x, t, "softmax", 1, None, "reference", "ce")
    assert s.shape == (2, 5, 4)
    torch.testing.assert_close(s[:, :3], ops.dice_stats(x, t, "softmax", 1, None, "reference"))
    with pytest.raises(ValueError, match="pixel_loss must be one of"):
        ops.dice_stats(x, t, "softmax", 1, None, "reference", "dice")
    with pytest.raises(ValueError, match="pixel_loss='ce' needs activation 'softmax' or 'sigmoid'"):
        ops.dice_stats(x, t, "none", 1, None, "reference", "ce")
    torch.library.opcheck(ops.dice_stats_op, (x.float().requires_grad_(), t, "softmax", 2, None, "reference",
                                              "focal", 2.0))


def test_confident_pixels_stay_finite():
    """p rounds to 1 (logit gaps of 40): -log p = 0 and the focal slope's limit, no NaN for gamma < 1."""
    x, t = _case(12)
    x[:, 0] += 40.0
    for gamma in (0.25, 2.0):
        for act in ("softmax", "sigmoid"):
            loss, g = _grads(lambda z: dt.dice_focal_loss(z, t, activation=act, gamma=gamma), x)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
    loss, g = _grads(lambda z: dt.dice_ce_loss(z, t), x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_gradcheck_and_double_backward():
    x, t = _case(13, c=3, spatial=(3, 4), ignore=255)
    soft = torch.rand(x.shape, dtype=x.dtype)
    for fn in (lambda z: dt.dice_ce_loss(z, t, ignore_index=255, label_smoothing=0.1),
               lambda z: dt.dice_focal_loss(z, t, ignore_index=255, gamma=2.0, alpha=0.25),
               lambda z: dt.dice_focal_loss(z, soft, activation="sigmoid", gamma=1.5)):
        xr = x.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(fn, (xr,))
        assert torch.autograd.gradgradcheck(fn, (xr,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", [
    lambda b: dt.DiceCELoss(ignore_index=1, ce_weight=[1.0, 2.0, 0.5, 1.0], label_smoothing=0.1, backend=b),
    lambda b: dt.DiceFocalLoss(activation="sigmoid", gamma=1.5, alpha=0.25, backend=b),
    lambda b: dt.GeneralizedDiceFocalLoss(gamma=2.0, backend=b),
], ids=["dice_ce", "dice_focal_sigmoid", "generalized_dice_focal"])
def test_compile_fullgraph(backend, module):
    """torch.compile(fullgraph=True) traces the extended operator (5 rows) through its fake kernel;
    aot_eager runs the same kernels, so loss and gradient equal eager's to float32 rounding of the
    epilogue."""
    x, t = _case(5, dtype=torch.float32, ignore=1)
    loss_fn = module(backend)
    le, ge = _grads(lambda z: loss_fn(z, t), x)
    lc, gc = _grads(lambda z: torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(z, t), x)
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-8)
