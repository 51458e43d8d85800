"""Input gradients: the hand-derived backward of the operator, and gradcheck of every loss.

* ``reference.dice_stats_backward_reference`` and the ``dice_stats_backward`` operator equal autograd
  through ``reference.dice_stats_reference`` for random upstream gradients (float64: the two differ
  only in summation order, rtol 1e-10).
* ``torch.autograd.gradcheck`` (float64 central differences) of the losses, over a covering subset
  of activation x squared x loss x batch x ignore_index x include_background x log_loss x target kind.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import dicetorch as dt
from dicetorch import reference
from test_losses import make_case

pytestmark = pytest.mark.filterwarnings("ignore:include_background=False is ignored")

TOL = dict(rtol=1e-10, atol=1e-12)


def _canonical(x, t):
    n, c = x.shape[:2]
    xt = x.reshape(n, c, -1)
    tt = t.reshape(n, c, -1) if t.is_floating_point() else t.reshape(n, -1)
    return xt, tt


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("kind,ignore_index", [("labels", None), ("labels", -1), ("labels", 1),
                                               ("labels_u8", 255), ("onehot", None), ("soft", None)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_hand_derived_backward_equals_autograd(activation, power, kind, ignore_index, channels_last):
    seed = zlib.crc32(f"{activation}{power}{kind}{ignore_index}{channels_last}".encode())
    x, t = make_case(seed, n=2, c=3, spatial=(4, 5), kind=kind, activation=activation,
                     ignore_index=ignore_index)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        if t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    xa = x.clone().requires_grad_()
    stats = reference.dice_stats_reference(*_canonical(xa, t), activation, power, ignore_index)
    (want,) = torch.autograd.grad(stats, xa, grad)

    # the reference's hand-derived formula on the canonical layout
    got = reference.dice_stats_backward_reference(grad, *_canonical(x, t), activation, power, ignore_index)
    torch.testing.assert_close(got.view(x.shape), want, **TOL)
    # the backward operator, and the operator's autograd registration
    got_op = dt.ops.dice_stats_backward(grad, x, t, activation, power, ignore_index, "reference")
    torch.testing.assert_close(got_op, want, **TOL)
    xb = x.clone().requires_grad_()
    dt.ops.dice_stats(xb, t, activation, power, ignore_index, "reference").backward(grad)
    torch.testing.assert_close(xb.grad, want, **TOL)
    if channels_last:
        assert got_op.is_contiguous(memory_format=torch.channels_last)
        assert xb.grad.is_contiguous(memory_format=torch.channels_last)
    if ignore_index is not None:
        ignored = (t == ignore_index).unsqueeze(1).expand_as(x)
        assert torch.all(got_op[ignored] == 0)


def test_backward_ignores_grad_of_target_sums():
    """grad[:, 2] (dL/dT) never reaches the input: targets are constants."""
    x, t = make_case(3, c=3, spatial=(4, 4))
    g = torch.randn(2, 3, 3, dtype=torch.float64)
    g2 = g.clone()
    g2[:, 2] = torch.randn(2, 3, dtype=torch.float64)
    a = dt.ops.dice_stats_backward(g, x, t, "softmax", 2, None, "reference")
    b = dt.ops.dice_stats_backward(g2, x, t, "softmax", 2, None, "reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _gradcheck_cases():
    """A covering subset: every value of every axis appears, with its neighbours varied cyclically."""
    losses = ["dice", "generalized", "tversky"]
    activations = ["softmax", "sigmoid", "none"]
    kinds = [("labels", None), ("labels", -1), ("labels1", 0), ("onehot", None), ("soft", None)]
    cases = []
    for i, (loss, act, sq, (kind, ii)) in enumerate(itertools.product(losses, activations, (False, True), kinds)):
        if loss == "tversky" and sq:
            continue
        batch = bool(i % 2)
        include_background = bool((i // 2) % 2)
        log_loss = bool((i // 3) % 2)
        cases.append((loss, act, sq, kind, ii, batch, include_background, log_loss))
    return cases


@pytest.mark.parametrize("loss,activation,squared,kind,ignore_index,batch,include_background,log_loss",
                         _gradcheck_cases())
def test_gradcheck_losses(loss, activation, squared, kind, ignore_index, batch, include_background, log_loss):
    seed = zlib.crc32(f"{loss}{activation}{squared}{kind}{ignore_index}{batch}".encode())
    x, t = make_case(seed, n=2, c=3, spatial=(3, 2), kind=kind, activation=activation,
                     ignore_index=ignore_index)
    opts = dict(activation=activation, batch=batch, include_background=include_background, log_loss=log_loss,
                ignore_index=ignore_index, reduction="none", smooth_nr=1e-3, smooth_dr=1e-3)
    if loss == "dice":
        fn = dt.dice_loss
        opts.update(squared=squared, class_weights=[0.5, 1.0, 2.0])
    elif loss == "generalized":
        fn = dt.generalized_dice_loss
        opts.update(squared=squared, weighting="simple" if batch else "square")
    else:
        fn = dt.tversky_loss
        opts.update(alpha=0.3, beta=0.7, gamma=1.0 if log_loss else 1.5)
    for backend in ("reference", "auto"):
        xr = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda z: fn(z, t, **opts, backend=backend), (xr,), eps=1e-6,
                                        atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cls", [dt.DiceLoss, dt.GeneralizedDiceLoss, dt.TverskyLoss])
def test_gradcheck_modules_binary_and_zero_spatial(cls):
    # C == 1 binary with sigmoid, and an input without spatial dims
    for shape, c in (((2, 1, 5), 1), ((4, 3), 3)):
        x, t = make_case(5, n=shape[0], c=c, spatial=shape[2:], activation="sigmoid")
        mod = cls(activation="sigmoid", backend="reference")
        assert torch.autograd.gradcheck(mod, (x.clone().requires_grad_(), t), eps=1e-6, atol=1e-7, rtol=1e-5)
