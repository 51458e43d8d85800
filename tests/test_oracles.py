"""Differential tests against MONAI 1.6 and segmentation_models_pytorch 0.6 (test-only dependencies).

For every configuration where both libraries define the same quantity, the loss values and the input
gradients (autograd through the oracle vs. our hand-derived backward) must agree.  Everything runs in
float64, so the only differences are summation order (rtol 1e-9), except where an oracle rounds part of
the computation to float32 (noted at the comparison).

Argument mapping (read from the oracle sources):

MONAI ``DiceLoss``: ``softmax``/``sigmoid``/``other_act`` -> activation; ``to_onehot_y`` with (N,1,*)
labels -> integer labels; ``squared_pred`` -> squared; ``weight`` -> class_weights (length C, or C-1
without background); ``jaccard=True`` (linear) is ``1 - (2I + s_nr) / (2(P + T - I) + s_dr)`` ==
our ``TverskyLoss(alpha=1, beta=1, smooth_nr=s_nr/2, smooth_dr=s_dr/2)``.
MONAI ``GeneralizedDiceLoss``: ``w_type`` -> weighting; absent classes get the image's (batch's) max
weight == ``absent_weight="max"``.  MONAI ``TverskyLoss``: same alpha/beta/smoothing.

smp ``DiceLoss``/``TverskyLoss`` always sum over the batch (``dims=(0, 2)``) -> ``batch=True``;
``smooth`` s enters Dice as ``(I + s)/((P + T)/2 + s)`` == ``smooth_nr = smooth_dr = 2s`` and Tversky as
``smooth_nr = smooth_dr = s``; ``classes=[1..C-1]`` -> ``include_background=False``;
``from_logits=False`` -> activation "none"; modes binary (C=1, sigmoid), multiclass (softmax, labels),
multilabel (sigmoid, float target).

Differences of definition (tested below, not "fixed"):

* smp zeroes the loss of every class absent from the batch (T = 0) and still divides by C; we keep
  such classes (their Dice is s_nr/(P + s_dr), close to 0).  Replicated with ``reduction="none"``.
* smp ``class_weights`` normalise by the weights: ``sum_k w_k l_k / sum_k w_k``; ours (like MONAI)
  is ``mean_k w_k l_k`` = ``sum_k w_k l_k / C``.
* smp Tversky applies gamma to the class mean, ``(mean_k l_k)^gamma``; ours (focal Tversky,
  Abraham & Khan 2019) per class, ``mean_k l_k^gamma``.  Equal at gamma = 1.
* For soft (non-binary) targets, MONAI ``soft_label=True`` and smp use I = (sum p + sum t -
  sum |p - t|)/2 = sum min(p, t); ours is I = sum p*t (MONAI's default ``soft_label=False``).
  Identical for binary targets.
* MONAI's ``ignore_index`` also works on one-hot targets (pixels whose one-hot row is zero, or where the
  ignored class is set); smp multilabel masks per element.  Ours needs integer labels.
* MONAI jaccard with ``squared_pred`` (``2(sum p^2 + sum t^2 - I)``) has no counterpart (our Tversky is linear).
"""
from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch

import dicetorch as dt

monai_losses = pytest.importorskip("monai.losses")
smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = dict(rtol=1e-9, atol=1e-12)


def _data(seed, n=2, c=3, spatial=(5, 6), activation="softmax", ignore_index=None, all_present=True,
          classes=None):
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, c, *spatial, generator=g, dtype=torch.float64)
    if activation == "none":
        x = torch.softmax(x, 1) if c > 1 else torch.sigmoid(x)
    high = c if c > 1 else 2
    values = torch.as_tensor(classes if classes is not None else range(high))
    lab = values[torch.randint(0, len(values), (n, *spatial), generator=g)]
    if all_present:  # every class in every image
        lab.view(n, -1)[:, : len(values)] = values
    if ignore_index is not None:
        drop = torch.rand(lab.shape, generator=g) < 0.2
        drop.view(n, -1)[:, : len(values)] = False
        lab = torch.where(drop, torch.full_like(lab, ignore_index), lab)
    return x, lab


def _onehot(lab, c):
    if c == 1:
        return (lab == 1).double().unsqueeze(1)
    return torch.nn.functional.one_hot(lab.clamp(0, c - 1), c).movedim(-1, 1).double() * (
        (lab >= 0) & (lab < c)).unsqueeze(1)


def _compare(ours, oracle, x, t_ours, t_oracle, *, tol=TOL, shape=None):
    """Loss values (reshaped like ours) and input gradients of a random linear functional of them."""
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    la = ours(xa, t_ours)
    lb = oracle(xb, t_oracle)
    if shape is not None:
        assert tuple(la.shape) == shape
    assert lb.numel() == la.numel()
    lb = lb.reshape(la.shape)
    torch.testing.assert_close(la, lb, **tol)
    v = torch.rand(la.shape, dtype=la.dtype, generator=torch.Generator().manual_seed(0)) + 0.5
    (la * v).sum().backward()
    (lb * v).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **tol)


def _covering(axes, per_pair=5, seed=0):
    """Every pair of values of the first two axes, each with ``per_pair`` random draws of the others."""
    rng = random.Random(seed)
    (a_name, a_vals), (b_name, b_vals), *rest = axes
    return [{a_name: a, b_name: b, **{name: rng.choice(vals) for name, vals in rest}}
            for a, b in itertools.product(a_vals, b_vals) for _ in range(per_pair)]


# ------------------------------------------------------------------------------------------------
# MONAI DiceLoss
# ------------------------------------------------------------------------------------------------
MONAI_DICE = _covering([
    ("activation", ["softmax", "sigmoid", "none", "other_act"]),
    ("target", ["labels", "onehot", "soft"]),
    ("squared", [False, True]),
    ("batch", [False, True]),
    ("include_background", [True, False]),
    ("reduction", ["mean", "sum", "none"]),
    ("smooth", [(1e-5, 1e-5), (0.0, 1e-3), (1.0, 2.0)]),
    ("weight", [None, "w"]),
    ("ignore_index", [None, 255, 0]),
    ("spatial", [(5, 6), (3, 2, 4), (9,)]),
])


@pytest.mark.parametrize("cfg", MONAI_DICE, ids=str)
def test_monai_dice(cfg):
    act, kind = cfg["activation"], cfg["target"]
    c = 3
    ii = cfg["ignore_index"] if kind == "labels" else None  # MONAI's one-hot ignore rule differs
    x, lab = _data(zlib.crc32(str(cfg).encode()), c=c, spatial=cfg["spatial"],
                   activation="softmax" if act == "other_act" else act, ignore_index=ii)
    weight = None
    if cfg["weight"]:
        weight = [0.5, 2.0, 1.5] if cfg["include_background"] else [2.0, 1.5]
    snr, sdr = cfg["smooth"]
    oracle = monai_losses.DiceLoss(
        include_background=cfg["include_background"], to_onehot_y=kind == "labels", sigmoid=act == "sigmoid",
        softmax=act == "softmax", other_act=(lambda z: torch.softmax(z, 1)) if act == "other_act" else None,
        squared_pred=cfg["squared"], reduction=cfg["reduction"], smooth_nr=snr, smooth_dr=sdr,
        batch=cfg["batch"], weight=weight, ignore_index=ii)
    ours = dt.DiceLoss(
        activation="softmax" if act == "other_act" else act, squared=cfg["squared"], smooth_nr=snr,
        smooth_dr=sdr, batch=cfg["batch"], include_background=cfg["include_background"], ignore_index=ii,
        class_weights=weight, reduction=cfg["reduction"], backend="reference")
    if kind == "labels":
        t_ours, t_oracle = lab.unsqueeze(1), lab.unsqueeze(1)
    elif kind == "onehot":
        t_ours = t_oracle = _onehot(lab, c)
    else:
        t_ours = t_oracle = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tol = TOL
    if kind == "labels" and cfg["squared"]:
        # to_onehot_y makes a float32 one-hot and squared_pred takes sum t^2 as vector_norm(t)^2, i.e.
        # sqrt then square in float32: T carries a relative error ~2^-23, and I = (P + T - |p - t|^2)/2
        # inherits it (absolute T * 2^-23); rtol 1e-5 bounds that for these sizes (T <= 60, I >= ~1).
        tol = dict(rtol=1e-5, atol=1e-8)
    _compare(ours, oracle, x, t_ours, t_oracle, tol=tol)
    # the functional form on (N, *spatial) labels, auto backend
    if kind == "labels":
        fn = lambda z, t: dt.dice_loss(  # noqa: E731
            z, t, activation="softmax" if act == "other_act" else act, squared=cfg["squared"], smooth_nr=snr,
            smooth_dr=sdr, batch=cfg["batch"], include_background=cfg["include_background"], ignore_index=ii,
            class_weights=weight, reduction=cfg["reduction"])
        _compare(fn, oracle, x, lab, lab.unsqueeze(1), tol=tol)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("target", ["labels", "float"])
def test_monai_dice_binary_single_channel(batch, target):
    x, lab = _data(5, c=1, spatial=(4, 7), activation="sigmoid")
    oracle = monai_losses.DiceLoss(sigmoid=True, batch=batch, reduction="none")
    ours = dt.DiceLoss(activation="sigmoid", batch=batch, reduction="none", backend="reference")
    t = lab if target == "labels" else lab.unsqueeze(1).double()
    _compare(ours, oracle, x, t, lab.unsqueeze(1).double())


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_monai_jaccard_is_tversky_one_one(batch, include_background, activation):
    """MONAI jaccard: 1 - (2I + s_nr)/(2(P + T - I) + s_dr) == Tversky(1, 1) with halved smoothing."""
    x, lab = _data(6, c=4, spatial=(5, 5), ignore_index=-1)
    snr, sdr = 1e-2, 3e-2
    oracle = monai_losses.DiceLoss(
        include_background=include_background, to_onehot_y=True, softmax=activation == "softmax",
        sigmoid=activation == "sigmoid", jaccard=True, smooth_nr=snr, smooth_dr=sdr, batch=batch,
        reduction="none", ignore_index=-1)
    ours = dt.TverskyLoss(activation=activation, alpha=1.0, beta=1.0, smooth_nr=snr / 2, smooth_dr=sdr / 2,
                          batch=batch, include_background=include_background, ignore_index=-1, reduction="none",
                          backend="reference")
    _compare(ours, oracle, x, lab, lab.unsqueeze(1))


# ------------------------------------------------------------------------------------------------
# MONAI GeneralizedDiceLoss and TverskyLoss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w_type", ["square", "simple", "uniform"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_monai_generalized_dice(w_type, batch, include_background, reduction):
    # classes 1 and 2 of 4 are sometimes absent: MONAI's max-weight rule == absent_weight="max"
    x, lab = _data(7, n=3, c=4, spatial=(4, 5), all_present=False, classes=(0, 1, 3))
    oracle = monai_losses.GeneralizedDiceLoss(
        include_background=include_background, to_onehot_y=True, softmax=True, w_type=w_type, batch=batch,
        reduction=reduction, smooth_nr=1e-4, smooth_dr=1e-4)
    ours = dt.GeneralizedDiceLoss(weighting=w_type, batch=batch, include_background=include_background,
                                  reduction=reduction, smooth_nr=1e-4, smooth_dr=1e-4, backend="reference")
    # MONAI computes the weights from the target volume cast to float32 (ground_o.float()): the
    # weights carry a relative error up to 2^-24 per rounding (squared: ~1.2e-7), hence rtol 1e-6.
    tol = dict(rtol=1e-6, atol=1e-9) if w_type != "uniform" else TOL
    want = None if reduction != "none" else (() if batch else (3,))
    _compare(ours, oracle, x, lab, lab.unsqueeze(1), tol=tol, shape=want)
    # float one-hot and sigmoid on the same data
    oracle = monai_losses.GeneralizedDiceLoss(include_background=include_background, sigmoid=True,
                                              w_type=w_type, batch=batch, reduction=reduction)
    ours = dt.GeneralizedDiceLoss(activation="sigmoid", weighting=w_type, batch=batch,
                                  include_background=include_background, reduction=reduction,
                                  backend="reference")
    _compare(ours, oracle, x, _onehot(lab, 4), _onehot(lab, 4), tol=tol)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.3, 0.7), (0.8, 0.2), (1.0, 1.0)])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_monai_tversky(alpha, beta, batch, include_background):
    ii = 255 if batch else None
    x, lab = _data(8, c=3, spatial=(6, 4), ignore_index=ii)
    for act in ("softmax", "sigmoid"):
        oracle = monai_losses.TverskyLoss(
            include_background=include_background, to_onehot_y=True, softmax=act == "softmax",
            sigmoid=act == "sigmoid", alpha=alpha, beta=beta, batch=batch, reduction="none", smooth_nr=1e-3,
            smooth_dr=2e-3, ignore_index=ii)
        ours = dt.TverskyLoss(activation=act, alpha=alpha, beta=beta, batch=batch, reduction="none",
                              include_background=include_background, smooth_nr=1e-3, smooth_dr=2e-3,
                              ignore_index=ii, backend="reference")
        _compare(ours, oracle, x, lab, lab.unsqueeze(1))
    # soft targets, probabilities as input: MONAI's default (decoupled=False) fp = sum p(1-t) = P - I
    t = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = torch.sigmoid(x)
    oracle = monai_losses.TverskyLoss(include_background=include_background, alpha=alpha, beta=beta,
                                      batch=batch, reduction="mean")
    ours = dt.TverskyLoss(activation="none", alpha=alpha, beta=beta, batch=batch,
                          include_background=include_background, backend="reference")
    _compare(ours, oracle, p, t, t)


def test_monai_soft_label_definition_differs():
    """MONAI soft_label=True uses I = sum min(p, t): equal to ours on binary targets, not on soft ones."""
    x, lab = _data(9, c=3, spatial=(5, 5), activation="none")
    ours = dt.DiceLoss(activation="none", backend="reference")
    monai_soft = monai_losses.DiceLoss(soft_label=True)
    _compare(ours, monai_soft, x, _onehot(lab, 3), _onehot(lab, 3))
    soft = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _compare(ours, monai_losses.DiceLoss(soft_label=False), x, soft, soft)
    a, b = ours(x, soft), monai_soft(x, soft)
    assert not torch.allclose(a, b, rtol=1e-3)
    i_min = torch.minimum(x, soft).sum((2, 3))
    p, t = x.sum((2, 3)), soft.sum((2, 3))
    torch.testing.assert_close(b, (1 - (2 * i_min + 1e-5) / (p + t + 1e-5)).mean(), **TOL)


# ------------------------------------------------------------------------------------------------
# segmentation_models_pytorch DiceLoss / TverskyLoss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("smooth", [0.0, 0.5])
@pytest.mark.parametrize("log_loss", [False, True])
@pytest.mark.parametrize("ignore_index,background", [(None, True), (255, True), (-1, False)])
def test_smp_dice_multiclass(from_logits, smooth, log_loss, ignore_index, background):
    c = 4
    x, lab = _data(10, c=c, spatial=(5, 6), activation="softmax" if from_logits else "none",
                   ignore_index=ignore_index)
    oracle = smp_losses.DiceLoss("multiclass", classes=None if background else list(range(1, c)),
                                 log_loss=log_loss, from_logits=from_logits, smooth=smooth,
                                 ignore_index=ignore_index)
    ours = dt.DiceLoss(activation="softmax" if from_logits else "none", smooth_nr=2 * smooth,
                       smooth_dr=2 * smooth, batch=True, include_background=background, log_loss=log_loss,
                       ignore_index=ignore_index, backend="reference")
    _compare(ours, oracle, x, lab, lab)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("target", ["labels", "float"])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_smp_dice_binary(from_logits, target, ignore_index):
    x, lab = _data(11, c=1, spatial=(6, 5), activation="sigmoid" if from_logits else "none",
                   ignore_index=ignore_index if target == "labels" else None)
    ii = ignore_index if target == "labels" else None
    oracle = smp_losses.DiceLoss("binary", from_logits=from_logits, smooth=0.1, ignore_index=ii)
    ours = dt.DiceLoss(activation="sigmoid" if from_logits else "none", smooth_nr=0.2, smooth_dr=0.2,
                       batch=True, ignore_index=ii, backend="reference")
    t_ours = lab if target == "labels" else lab.unsqueeze(1).double()
    _compare(ours, oracle, x, t_ours, lab.unsqueeze(1))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("log_loss", [False, True])
def test_smp_dice_multilabel(from_logits, log_loss):
    x, lab = _data(12, c=3, spatial=(4, 4, 3), activation="sigmoid" if from_logits else "none")
    # independent binary channels, each present somewhere in the batch
    t = (torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) < 0.4).double()
    t.view(2, 3, -1)[:, :, 0] = 1
    oracle = smp_losses.DiceLoss("multilabel", from_logits=from_logits, log_loss=log_loss, smooth=0.0)
    ours = dt.DiceLoss(activation="sigmoid" if from_logits else "none", smooth_nr=0.0, smooth_dr=0.0, batch=True,
                       log_loss=log_loss, backend="reference")
    _compare(ours, oracle, x, t, t)


def test_smp_absent_classes_are_zeroed():
    """smp sets the loss of classes absent from the batch to 0 (and still divides by C)."""
    c = 4
    x, lab = _data(13, c=c, spatial=(5, 5), classes=(0, 2))  # classes 1, 3 absent from the batch
    oracle = smp_losses.DiceLoss("multiclass", smooth=0.25)

    def smp_like(z, t):
        per_class = dt.dice_loss(z, t, smooth_nr=0.5, smooth_dr=0.5, batch=True, reduction="none",
                                 backend="reference")
        present = torch.stack([(t == k).any() for k in range(c)])
        return (per_class * present).mean()

    _compare(smp_like, oracle, x, lab, lab)
    plain = dt.dice_loss(x, lab, smooth_nr=0.5, smooth_dr=0.5, batch=True, backend="reference")
    assert plain > oracle(x, lab) + 0.4  # absent classes cost ~1 each in ours


def test_smp_class_weights_normalisation():
    """smp: sum_k w_k l_k / sum_k w_k; ours: mean_k w_k l_k = sum_k w_k l_k / C."""
    c, w = 3, [0.5, 2.0, 1.0]
    x, lab = _data(14, c=c, spatial=(5, 5))
    oracle = smp_losses.DiceLoss("multiclass", class_weights=w, smooth=0.1)

    def rescaled(z, t):
        loss = dt.dice_loss(z, t, smooth_nr=0.2, smooth_dr=0.2, batch=True, class_weights=w, backend="reference")
        return loss * c / sum(w)

    _compare(rescaled, oracle, x, lab, lab)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.3, 0.7), (1.0, 1.0)])
@pytest.mark.parametrize("mode", ["multiclass", "multilabel", "binary"])
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_smp_tversky(alpha, beta, mode, gamma):
    c = 1 if mode == "binary" else 3
    act = "softmax" if mode == "multiclass" else "sigmoid"
    x, lab = _data(15, c=c, spatial=(6, 6), activation=act)
    t = lab if mode != "multilabel" else _onehot(lab, c)
    oracle = smp_losses.TverskyLoss(mode, alpha=alpha, beta=beta, gamma=gamma, smooth=0.3)
    if gamma == 1.0:
        ours = dt.TverskyLoss(activation=act, alpha=alpha, beta=beta, smooth_nr=0.3, smooth_dr=0.3, batch=True,
                              backend="reference")
    else:
        def ours(z, tt):  # smp: gamma on the class mean
            per_class = dt.tversky_loss(z, tt, activation=act, alpha=alpha, beta=beta, smooth_nr=0.3,
                                        smooth_dr=0.3, batch=True, reduction="none", backend="reference")
            return per_class.mean() ** gamma
    _compare(ours, oracle, x, t, t if mode != "binary" else lab.unsqueeze(1))
    if gamma != 1.0 and c > 1:
        # ours is per-class focal Tversky: mean_k l_k^gamma >= (mean_k l_k)^gamma (Jensen)
        focal = dt.tversky_loss(x, t, activation=act, alpha=alpha, beta=beta, gamma=gamma, smooth_nr=0.3,
                                smooth_dr=0.3, batch=True, backend="reference")
        assert focal > oracle(x, t)


def test_smp_soft_target_definition_differs():
    """smp's I = (sum p + sum t - sum|p - t|)/2 = sum min(p, t) != sum p*t for soft targets."""
    x, _ = _data(16, c=3, spatial=(5, 5), activation="none")
    soft = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    oracle = smp_losses.DiceLoss("multilabel", from_logits=False, smooth=0.0)
    ours = dt.dice_loss(x, soft, activation="none", smooth_nr=0.0, smooth_dr=0.0, batch=True, backend="reference")
    assert not torch.allclose(ours, oracle(x, soft), rtol=1e-3)
    i_min = torch.minimum(x, soft).sum((0, 2, 3))
    p, t = x.sum((0, 2, 3)), soft.sum((0, 2, 3))
    torch.testing.assert_close(oracle(x, soft), (1 - 2 * i_min / (p + t)).mean(), **TOL)
