"""Differential tests of :mod:`dicetorch.presets` against the implementations they reproduce.

MONAI 1.6, segmentation_models_pytorch 0.6 and kornia 0.9 are installed and called directly.  nnU-Net,
Keras, the MATLAB layer, the V-Net paper and the seed posts are not: each is transcribed below into
PyTorch, citing the file and lines it transcribes.  Every test compares the loss value and the input
gradient (a fixed cotangent for unreduced losses).

Tolerances.  float64 cases: both sides are float64 and differ only in summation order and in
algebraically equal rewrites (e.g. MONAI's ``2 (tp + fp/2 + fn/2)`` against ``P + T``, smp's L1
intersection against I, ``log_softmax().exp()`` against ``softmax``), each a few ulps (1e-16) on
O(1) quantities of tensors with < 10^3 elements; rtol 1e-10 / atol 1e-12 leaves four orders of
magnitude of headroom while still catching any formula difference (those are >= 1e-6 here).
float32 cases (nnU-Net sums in float32; kornia's large-input path): float32 eps is 1.2e-7 and sums
run over <= 4*10^4 terms, so rtol 1e-5 / atol 1e-6.
"""
from __future__ import annotations

import itertools
import random
import warnings

import numpy as np
import pytest
import torch

import dicetorch as dt
from dicetorch import ops
from dicetorch import presets as P

import kornia  # noqa: E402  (kornia 0.9)
import monai.losses  # noqa: E402  (MONAI 1.6)
import segmentation_models_pytorch as smp  # noqa: E402  (smp 0.6)

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _value_and_grad(fn, args, pos=0):
    """fn(*args) and d/d args[pos] of <fn(...), fixed cotangent> (a cotangent that differs per element)."""
    args = list(args)
    x = args[pos].detach().clone().requires_grad_(True)
    args[pos] = x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(*args)
    cot = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * cot).sum().backward()
    return out.detach(), x.grad


def assert_same(ours, theirs, args, pos=0, tol=F64):
    v1, g1 = _value_and_grad(ours, args, pos)
    v2, g2 = _value_and_grad(theirs, args, pos)
    assert v1.shape == v2.shape, (v1.shape, v2.shape)
    torch.testing.assert_close(v1, v2.to(v1.dtype), equal_nan=True, **tol)
    if g2 is None:
        assert g1 is None or not g1.any()
    else:
        torch.testing.assert_close(g1, g2.to(g1.dtype), equal_nan=True, **tol)
    return v1, g1


def _one_hot(labels, c, dtype=torch.float64):
    """(N, *spatial) labels -> (N, C, *spatial)."""
    return torch.nn.functional.one_hot(labels.long(), c).movedim(-1, 1).to(dtype)


def _labels(n, c, spatial, absent=True, gen=None):
    """Random labels; with ``absent`` the last class is missing from image 0 (the batch still has it)."""
    lab = torch.randint(0, c, (n, *spatial), generator=gen)
    lab.view(n, -1)[:, :c] = torch.arange(c)  # every class somewhere in every image...
    if absent and c > 1:
        lab[0][lab[0] == c - 1] = 0  # ...except the last one in image 0
    return lab


def _sample(space: dict, count: int, seed: int):
    """``count`` configurations drawn from the product of ``space`` (fixed seed), as dicts."""
    keys = list(space)
    allc = list(itertools.product(*(space[k] for k in keys)))
    rng = random.Random(seed)
    return [dict(zip(keys, c)) for c in rng.sample(allc, min(count, len(allc)))]


# ----------------------------------------------------------------------------------------------
# MONAI 1.6
# ----------------------------------------------------------------------------------------------
def _monai_inputs(cfg, c):
    n, spatial = 2, cfg.get("spatial", (4, 5))
    x = torch.randn(n, c, *spatial, dtype=torch.float64) * 2
    lab = _labels(n, max(c, 2), spatial).unsqueeze(1)  # (N, 1, *) as MONAI's transforms give
    ii = cfg.get("ignore_index")
    if ii is not None:
        lab.view(-1)[::7] = ii if (cfg.get("to_onehot_y") or not 0 <= ii < c) else lab.view(-1)[::7]
    if cfg.get("to_onehot_y"):
        target = lab.double() if c > 1 else lab.clamp(0, 1).double()
    elif cfg.get("soft"):
        target = torch.rand(n, c, *spatial, dtype=torch.float64)
    elif c == 1:
        target = lab.clamp(0, 1).double()
    else:
        target = _one_hot(lab[:, 0].clamp(0, c - 1), c)
        if ii is not None and not 0 <= ii < c:
            target.movedim(1, -1).reshape(-1, c)[::7] = 0  # MONAI's sentinel mask: all-zero pixels
    return x, target


_ACTS = {
    "none": {},
    "sigmoid": {"sigmoid": True},
    "softmax": {"softmax": True},
    "tanh": {"other_act": torch.tanh},  # p in [-1, 1]: also exercises the soft-label reference path
    "other_softmax": {"other_act": lambda t: torch.softmax(t, 1)},
}

MONAI_DICE_SPACE = dict(
    c=[1, 3], act=list(_ACTS), to_onehot_y=[False, True], include_background=[True, False],
    squared_pred=[False, True], jaccard=[False, True], reduction=["mean", "sum", "none"], batch=[False, True],
    weight=[None, 0.7, "seq"], soft_label=[False, True], soft=[False, True], ignore_index=[None, 1, 255, -1],
    smooth=[(1e-5, 1e-5), (0.0, 1e-3), (1.0, 2.0)], spatial=[(4, 5), (3, 2, 3)],
)


@pytest.mark.parametrize("cfg", _sample(MONAI_DICE_SPACE, 90, seed=1), ids=str)
def test_monai_dice(cfg):
    c = cfg["c"]
    if cfg["to_onehot_y"] and cfg["soft"]:
        cfg = {**cfg, "soft": False}
    weight = cfg["weight"]
    if weight == "seq":
        kept = c if cfg["include_background"] or c == 1 else c - 1
        weight = [0.5 + k for k in range(kept)]
    kw = dict(include_background=cfg["include_background"], to_onehot_y=cfg["to_onehot_y"],
              squared_pred=cfg["squared_pred"], jaccard=cfg["jaccard"], reduction=cfg["reduction"],
              smooth_nr=cfg["smooth"][0], smooth_dr=cfg["smooth"][1], batch=cfg["batch"], weight=weight,
              soft_label=cfg["soft_label"], ignore_index=cfg["ignore_index"], **_ACTS[cfg["act"]])
    if cfg["act"] == "other_softmax" and c == 1:
        kw.pop("other_act")
    x, target = _monai_inputs(cfg, c)
    tol = F64
    if cfg["to_onehot_y"] and cfg["squared_pred"] and c > 1:
        # MONAI's one-hot is float32 and its squared path takes ||t||_2 = sqrt(sum t^2) in float32:
        # its T carries float32 rounding (relative 6e-8) also for float64 input
        tol = dict(rtol=1e-6, atol=1e-8)
    assert_same(P.monai_dice(**kw), monai.losses.DiceLoss(**kw), (x, target), tol=tol)


MONAI_GDL_SPACE = dict(
    c=[1, 3, 4], act=list(_ACTS), to_onehot_y=[False, True], include_background=[True, False],
    w_type=["square", "simple", "uniform"], reduction=["mean", "sum", "none"], batch=[False, True],
    soft_label=[False, True], soft=[False, True], smooth=[(1e-5, 1e-5), (0.0, 1e-3)], spatial=[(4, 5), (3, 2, 3)],
)


@pytest.mark.parametrize("cfg", _sample(MONAI_GDL_SPACE, 50, seed=2), ids=str)
def test_monai_generalized_dice(cfg):
    c = cfg["c"]
    kw = dict(include_background=cfg["include_background"], to_onehot_y=cfg["to_onehot_y"], w_type=cfg["w_type"],
              reduction=cfg["reduction"], smooth_nr=cfg["smooth"][0], smooth_dr=cfg["smooth"][1],
              batch=cfg["batch"], soft_label=cfg["soft_label"], **_ACTS[cfg["act"]])
    if cfg["act"] == "other_softmax" and c == 1:
        kw.pop("other_act")
    x, target = _monai_inputs({**cfg, "soft": cfg["soft"] and not cfg["to_onehot_y"]}, c)
    assert_same(P.monai_generalized_dice(**kw), monai.losses.GeneralizedDiceLoss(**kw), (x, target))


def test_monai_generalized_dice_absent_classes():
    # image 1 has no class 2 and image 0 none of classes 1..3: the "max weight" rule of each image
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    lab = torch.zeros(2, 1, 5, 5)
    lab[1, 0, :2] = 1
    lab[1, 0, 3:] = 3
    for batch in (False, True):
        kw = dict(softmax=True, to_onehot_y=True, batch=batch, reduction="none")
        assert_same(P.monai_generalized_dice(**kw), monai.losses.GeneralizedDiceLoss(**kw), (x, lab))


MONAI_TVERSKY_SPACE = dict(
    c=[1, 3], act=list(_ACTS), to_onehot_y=[False, True], include_background=[True, False],
    ab=[(0.5, 0.5), (0.3, 0.7), (1.0, 1.0), (0.0, 2.0)], reduction=["mean", "sum", "none"], batch=[False, True],
    soft_label=[False, True], soft=[False, True], ignore_index=[None, 1, 255], smooth=[(1e-5, 1e-5), (1.0, 0.5)],
)


@pytest.mark.parametrize("cfg", _sample(MONAI_TVERSKY_SPACE, 50, seed=3), ids=str)
def test_monai_tversky(cfg):
    c = cfg["c"]
    kw = dict(include_background=cfg["include_background"], to_onehot_y=cfg["to_onehot_y"], alpha=cfg["ab"][0],
              beta=cfg["ab"][1], reduction=cfg["reduction"], smooth_nr=cfg["smooth"][0], smooth_dr=cfg["smooth"][1],
              batch=cfg["batch"], soft_label=cfg["soft_label"], ignore_index=cfg["ignore_index"],
              **_ACTS[cfg["act"]])
    if cfg["act"] == "other_softmax" and c == 1:
        kw.pop("other_act")
    x, target = _monai_inputs({**cfg, "soft": cfg["soft"] and not cfg["to_onehot_y"]}, c)
    assert_same(P.monai_tversky(**kw), monai.losses.TverskyLoss(**kw), (x, target))


def test_monai_argument_errors_match():
    for fn, cls in ((P.monai_dice, monai.losses.DiceLoss), (P.monai_tversky, monai.losses.TverskyLoss)):
        for bad in (dict(sigmoid=True, softmax=True), dict(other_act=3), dict(reduction="avg")):
            with pytest.raises(Exception) as theirs:
                cls(**bad)
            with pytest.raises(type(theirs.value)):
                fn(**bad)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(AssertionError):
        P.monai_dice()(x, torch.zeros(2, 1, 4, 4))  # no to_onehot_y: shapes differ, as in MONAI
    with pytest.raises(ValueError, match="weight"):
        P.monai_dice(weight=[1.0, 2.0])(x, _one_hot(torch.zeros(2, 4, 4), 3))


MONAI_FLAT_SPACE = dict(
    loss=["dice", "generalized_dice", "tversky"], c=[1, 3], act=["none", "sigmoid", "softmax", "tanh"],
    to_onehot_y=[False, True], include_background=[True, False], batch=[False, True],
    reduction=["mean", "sum", "none"], soft_label=[False, True], soft=[False, True], ignore_index=[None, 1, 255],
    extra=[{}, {"squared_pred": True}, {"jaccard": True}, {"weight": "seq"}, {"w_type": "simple"},
           {"alpha": 0.3, "beta": 0.7}],
)


@pytest.mark.parametrize("cfg", _sample(MONAI_FLAT_SPACE, 60, seed=4), ids=str)
def test_monai_without_spatial_dims(cfg):
    # (N, C) input: MONAI's reduction axes are empty and torch.sum(x, dim=[]) sums over every dim, so
    # without batch=True there is one ratio pooled over images and classes
    c, n, loss = cfg["c"], 5, cfg["loss"]
    gen = torch.Generator().manual_seed(hash(str(cfg)) % 2**31)
    x = torch.randn(n, c, dtype=torch.float64, generator=gen) * 2
    lab = torch.randint(0, max(c, 2), (n, 1), generator=gen)
    kw = dict(include_background=cfg["include_background"], to_onehot_y=cfg["to_onehot_y"],
              reduction=cfg["reduction"], batch=cfg["batch"], soft_label=cfg["soft_label"], **_ACTS[cfg["act"]])
    extra = dict(cfg["extra"])
    if extra.get("weight") == "seq":
        extra["weight"] = [0.5 + k for k in range(c if cfg["include_background"] or c == 1 else c - 1)]
    allowed = {"dice": ("squared_pred", "jaccard", "weight"), "generalized_dice": ("w_type",),
               "tversky": ("alpha", "beta")}[loss]
    kw.update({k: v for k, v in extra.items() if k in allowed})
    if loss != "generalized_dice" and cfg["ignore_index"] is not None and cfg["to_onehot_y"]:
        kw["ignore_index"] = cfg["ignore_index"]
        lab[1::2] = cfg["ignore_index"]
    if cfg["to_onehot_y"]:
        target = lab.double() if c > 1 else lab.clamp(0, 1).double()
    elif cfg["soft"]:
        target = torch.rand(n, c, dtype=torch.float64, generator=gen)
    else:
        target = _one_hot(lab[:, 0].clamp(0, c - 1), c) if c > 1 else lab.clamp(0, 1).double()
    ours, theirs = {"dice": (P.monai_dice, monai.losses.DiceLoss),
                    "generalized_dice": (P.monai_generalized_dice, monai.losses.GeneralizedDiceLoss),
                    "tversky": (P.monai_tversky, monai.losses.TverskyLoss)}[loss]
    tol = dict(rtol=1e-6, atol=1e-8) if kw.get("squared_pred") and cfg["to_onehot_y"] and c > 1 else F64
    if loss == "generalized_dice" and not cfg["batch"]:
        with pytest.raises(IndexError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs(**kw)(x, target)
        with pytest.raises(IndexError, match="spatial dims or batch=True"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours(**kw)(x, target)
        return
    assert_same(ours(**kw), theirs(**kw), (x, target), tol=tol)


def test_monai_without_spatial_dims_pools_images_and_classes():
    # one ratio of the sums over all images and classes, not a mean of per-image-and-class ratios
    x = torch.randn(4, 3, dtype=torch.float64)
    lab = torch.tensor([[0], [2], [1], [2]])
    kw = dict(softmax=True, to_onehot_y=True)
    v = P.monai_dice(**kw)(x, lab)
    torch.testing.assert_close(v, monai.losses.DiceLoss(**kw)(x, lab), **F64)
    s = ops.dice_stats(x, lab[:, 0], "softmax", 1, None, "reference").sum((0, 2))
    torch.testing.assert_close(v, 1 - (2 * s[0] + 1e-5) / (s[1] + s[2] + 1e-5), **F64)


# ----------------------------------------------------------------------------------------------
# segmentation_models_pytorch 0.6
# ----------------------------------------------------------------------------------------------
SMP_SPACE = dict(
    mode=["binary", "multiclass", "multilabel", "multiclass1"], classes=[None, [0, 2], [2, 1]], log_loss=[False, True],
    from_logits=[True, False, "raw"], smooth=[0.0, 1.0], ignore_index=[None, 255, -1], eps=[1e-7, 0.5],
    class_weights=[None, [1.0, 2.0, 0.5]], soft=[False, True], int_target=[False, True],
    tversky=[None, (0.3, 0.7, 1.0), (0.5, 0.5, 2.0)],
)


def _smp_inputs(cfg):
    n, c, spatial = 3, 3, (4, 5)
    if cfg["mode"] in ("binary", "multiclass1"):
        c = 1
    x = torch.randn(n, c, *spatial, dtype=torch.float64) * 2
    if cfg["from_logits"] is False:  # probabilities
        x = torch.softmax(x, 1) if cfg["mode"].startswith("multiclass") else torch.sigmoid(x)
    ii = cfg["ignore_index"]
    if cfg["mode"] == "multiclass":
        y = _labels(n, c, spatial)
        y[:, 0, :][y[:, 0, :] == 1] = 0
        y[y == 1] = 2  # class 1 absent from the whole batch: smp's zeroed term
    elif cfg["mode"] == "multiclass1":  # one class: smp's one-hot puts label 0 into the channel
        y = torch.zeros(n, *spatial, dtype=torch.long)
    elif cfg["mode"] == "binary":
        y = torch.rand(n, *spatial, dtype=torch.float64) if cfg["soft"] else torch.randint(0, 2, (n, *spatial))
    else:
        y = torch.rand(n, c, *spatial, dtype=torch.float64) if cfg["soft"] else torch.randint(0, 2, (n, c, *spatial))
        y[:, 1] = 0  # class 1 absent
    if cfg["mode"] in ("binary", "multilabel") and not cfg["int_target"]:
        y = y.double()
    if ii is not None:
        y.view(-1)[::5] = ii
    return x, y


@pytest.mark.parametrize("cfg", _sample(SMP_SPACE, 120, seed=4), ids=str)
def test_smp(cfg):
    x, y = _smp_inputs(cfg)
    if cfg["mode"] == "binary":
        cfg = {**cfg, "classes": None, "class_weights": None}
    if cfg["mode"] == "multiclass1":
        cfg = {**cfg, "mode": "multiclass", "classes": None if cfg["classes"] is None else [0],
               "class_weights": None if cfg["class_weights"] is None else [2.0]}
    kw = dict(classes=cfg["classes"], log_loss=cfg["log_loss"], from_logits=cfg["from_logits"] is True,
              smooth=cfg["smooth"], ignore_index=cfg["ignore_index"], eps=cfg["eps"],
              class_weights=cfg["class_weights"])
    if cfg["tversky"] is None:
        ours, theirs = P.smp_dice(cfg["mode"], **kw), smp.losses.DiceLoss(cfg["mode"], **kw)
    else:
        a, b, g = cfg["tversky"]
        ours = P.smp_tversky(cfg["mode"], alpha=a, beta=b, gamma=g, **kw)
        theirs = smp.losses.TverskyLoss(cfg["mode"], alpha=a, beta=b, gamma=g, **kw)
    assert_same(ours, theirs, (x, y))


def test_l1_form_with_hard_predictions():
    # probabilities with exact 0s and 1s: |p - t| has its kink at p == t (and |p| at p == 0), where
    # smp's and MONAI's soft-label gradients differ from those of I; the presets follow them
    lab = _labels(2, 3, (4, 5))
    probs = (_one_hot(torch.roll(lab, 1, dims=-1), 3) * 0.9 + 0.05).contiguous()
    probs.view(-1)[::3] = _one_hot(lab, 3).reshape(-1)[::3]  # ties with the target, exact 0 and 1
    assert_same(P.smp_dice("multiclass", from_logits=False), smp.losses.DiceLoss("multiclass", from_logits=False),
                (probs, lab))
    kw = dict(soft_label=True, to_onehot_y=True)
    assert_same(P.monai_dice(**kw), monai.losses.DiceLoss(**kw), (probs, lab.unsqueeze(1)))
    assert_same(P.monai_tversky(**kw), monai.losses.TverskyLoss(**kw), (probs, lab.unsqueeze(1)))


def test_smp_binary_without_channel_dim_and_errors():
    x = torch.randn(2, 5, 6, dtype=torch.float64)  # smp reshapes (N, *) predictions in binary mode
    y = torch.randint(0, 2, (2, 5, 6))
    assert_same(P.smp_dice("binary"), smp.losses.DiceLoss("binary"), (x, y))
    with pytest.raises(ValueError):
        P.smp_dice("binary", classes=[0])
    with pytest.raises(ValueError):
        P.smp_dice("softmax")
    with pytest.raises(ValueError, match="labels"):
        P.smp_dice("multiclass")(torch.randn(2, 3, 4), torch.full((2, 4), 3))


# ----------------------------------------------------------------------------------------------
# kornia 0.9
# ----------------------------------------------------------------------------------------------
KORNIA_SPACE = dict(average=["micro", "macro"], weight=[None, "w"], ignore_index=[-100, None, 255],
                    eps=[1e-8, 0.5], c=[3, 1], ignored_image=[False, True])


@pytest.mark.parametrize("cfg", _sample(KORNIA_SPACE, 40, seed=5), ids=str)
def test_kornia(cfg):
    c = cfg["c"]
    x = torch.randn(2, c, 4, 5, dtype=torch.float64)
    y = _labels(2, c, (4, 5)) if c > 1 else torch.zeros(2, 4, 5, dtype=torch.long)
    ii = cfg["ignore_index"]
    if ii is not None:
        y.view(-1)[::6] = ii
        if cfg["ignored_image"]:
            y[1] = ii  # every pixel of image 1 ignored: kornia's "empty" branch
    w = torch.linspace(0.5, 2.0, c, dtype=torch.float64) if cfg["weight"] else None
    kw = dict(average=cfg["average"], eps=cfg["eps"], weight=w, ignore_index=ii)
    assert_same(P.kornia_dice(**kw), kornia.losses.DiceLoss(**kw), (x, y))


@pytest.mark.parametrize("average", ["micro", "macro"])
def test_kornia_large_float32(average):
    # >= 2^15 logits: kornia's CPU path without a one-hot target (same math, other summation order)
    x = torch.randn(2, 4, 64, 64)
    y = _labels(2, 4, (64, 64))
    y.view(-1)[::11] = -100
    assert_same(P.kornia_dice(average), kornia.losses.DiceLoss(average), (x, y), tol=F32)


# ----------------------------------------------------------------------------------------------
# nnU-Net v2 (transcription)
# ----------------------------------------------------------------------------------------------
def nnunet_memory_efficient_soft_dice(x, y, loss_mask=None, *, apply_nonlin, batch_dice, do_bg, smooth):
    """Transcribes nnunetv2/training/loss/dice.py, class MemoryEfficientSoftDiceLoss, ``forward``
    (lines 72-119 of github.com/MIC-DKFZ/nnUNet at commit 0e495086eb108ff79afe106291e8c15bd2f2bc3a),
    in one process (``AllGatherGrad`` with a world of one is the identity)."""
    if apply_nonlin is not None:
        x = apply_nonlin(x)
    axes = tuple(range(2, x.ndim))
    with torch.no_grad():
        if x.ndim != y.ndim:
            y = y.view((y.shape[0], 1, *y.shape[1:]))
        if x.shape == y.shape:
            y_onehot = y.to(torch.float32)
        else:
            y_onehot = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
            y_onehot.scatter_(1, y.long(), 1)
        if not do_bg:
            y_onehot = y_onehot[:, 1:]
        sum_gt = (y_onehot.sum(axes, dtype=torch.float32) if loss_mask is None
                  else (y_onehot * loss_mask).sum(axes, dtype=torch.float32))
    if not do_bg:
        x = x[:, 1:]
    if loss_mask is None:
        intersect = (x * y_onehot).sum(axes, dtype=torch.float32)
        sum_pred = x.sum(axes, dtype=torch.float32)
    else:
        intersect = (x * y_onehot * loss_mask).sum(axes, dtype=torch.float32)
        sum_pred = (x * loss_mask).sum(axes, dtype=torch.float32)
    if batch_dice:
        intersect = intersect.sum(0, dtype=torch.float32)
        sum_pred = sum_pred.sum(0, dtype=torch.float32)
        sum_gt = sum_gt.sum(0, dtype=torch.float32)
    dc = (2 * intersect + smooth) / (sum_gt + sum_pred + float(smooth)).clamp_min(1e-8)
    dc = dc.mean()
    return -dc


NNUNET_NONLIN = {
    "softmax": lambda x: torch.softmax(x, 1),  # nnunetv2.utilities.helpers.softmax_helper_dim1
    "sigmoid": torch.sigmoid,
    None: None,
    "callable": lambda x: torch.tanh(x) * 0.5 + 0.5,
}
NNUNET_SPACE = dict(nonlin=list(NNUNET_NONLIN), batch_dice=[False, True], do_bg=[True, False],
                    smooth=[1.0, 1e-5, 0.0], target=["b1", "b", "onehot"], mask=[None, "binary", "bool", "soft"],
                    spatial=[(4, 5), (3, 3, 2)])


@pytest.mark.parametrize("cfg", _sample(NNUNET_SPACE, 50, seed=6), ids=str)
def test_nnunet_soft_dice(cfg):
    n, c, spatial = 2, 3, cfg["spatial"]
    x = torch.randn(n, c, *spatial)  # float32: nnU-Net sums in float32
    if cfg["nonlin"] is None:
        x = torch.softmax(x, 1)
    lab = _labels(n, c, spatial)
    y = {"b1": lab.unsqueeze(1).float(), "b": lab, "onehot": _one_hot(lab, c, torch.float32)}[cfg["target"]]
    mask = None
    if cfg["mask"] is not None:
        mask = torch.rand(n, 1, *spatial)
        mask = {"binary": (mask > 0.3).float(), "bool": mask > 0.3, "soft": mask}[cfg["mask"]]
    nonlin = NNUNET_NONLIN[cfg["nonlin"]]
    opts = dict(batch_dice=cfg["batch_dice"], do_bg=cfg["do_bg"], smooth=cfg["smooth"])
    ours = P.nnunet_soft_dice(nonlin if cfg["nonlin"] == "callable" else cfg["nonlin"], ddp=False, **opts)
    assert_same(lambda a, b: ours(a, b, mask),
                lambda a, b: nnunet_memory_efficient_soft_dice(a, b, mask, apply_nonlin=nonlin, **opts),
                (x, y), tol=F32)


# ----------------------------------------------------------------------------------------------
# Keras 3 (transcription)
# ----------------------------------------------------------------------------------------------
def keras_dice_fn(y_true, y_pred, axis=None):
    """Transcribes keras/src/losses/losses.py ``dice`` (lines 2567-2615 of github.com/keras-team/keras at
    commit 3422977a5e38fb2f7709aaa9a08e47f0c43d0f60, Keras 3.16)."""
    y_true = y_true.to(y_pred.dtype)
    inputs, targets = y_true, y_pred
    dims = tuple(range(y_pred.dim())) if axis is None else axis
    intersection = torch.sum(inputs * targets, dim=dims)
    dice = (2.0 * intersection) / (torch.sum(y_true, dim=dims) + torch.sum(y_pred, dim=dims) + 1e-7)
    return 1 - dice


def keras_reduce_values(values, reduction):
    """Transcribes keras/src/losses/loss.py ``reduce_values`` (lines 140-161, same commit), no sample weight."""
    if reduction is None or reduction == "none" or tuple(values.shape) in ((), (0,)):
        return values
    loss = values.sum()
    if reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
        loss = loss / values.numel()
    return loss


@pytest.mark.parametrize("axis", [None, (1, 2), (0, 1, 2), (1, 2, 3), -1, (3,), 1, (0, 2)])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", None])
def test_keras_dice(axis, reduction):
    y_pred = torch.softmax(torch.randn(2, 4, 5, 3, dtype=torch.float64), -1)  # channels-last
    y_true = _one_hot(_labels(2, 3, (4, 5)), 3).movedim(1, -1)
    ours = P.keras_dice(reduction=reduction, axis=axis)
    assert_same(lambda yt, yp: ours(yt, yp),
                lambda yt, yp: keras_reduce_values(keras_dice_fn(yt, yp, axis), reduction), (y_true, y_pred), pos=1)


# ----------------------------------------------------------------------------------------------
# MATLAB dicePixelClassificationLayer (transcription, forward and hand-written backward)
# ----------------------------------------------------------------------------------------------
def matlab_forward_loss(Y, T, epsilon=1e-8):  # noqa: N803
    """Transcribes forwardLoss of dicePixelClassificationLayer.m (seed 000, "Completed Layer");
    Y, T are H x W x K x N; MATLAB's sum(sum(., 1), 2) is a sum over dims 0 and 1."""
    W = 1.0 / T.sum((0, 1), keepdim=True) ** 2
    intersection = (Y * T).sum((0, 1), keepdim=True)
    union = (Y ** 2 + T ** 2).sum((0, 1), keepdim=True)
    numer = 2 * (W * intersection).sum(2, keepdim=True) + epsilon
    denom = (W * union).sum(2, keepdim=True) + epsilon
    dice = numer / denom
    N = Y.shape[3]
    return (1 - dice).sum() / N


def matlab_backward_loss(Y, T, epsilon=1e-8):  # noqa: N803
    """Transcribes backwardLoss of dicePixelClassificationLayer.m (seed 000):
    dLdY = (2*W.*Y.*numer./denom.^2 - 2*W.*T./denom)./N."""
    W = 1.0 / T.sum((0, 1), keepdim=True) ** 2
    intersection = (Y * T).sum((0, 1), keepdim=True)
    union = (Y ** 2 + T ** 2).sum((0, 1), keepdim=True)
    numer = 2 * (W * intersection).sum(2, keepdim=True) + epsilon
    denom = (W * union).sum(2, keepdim=True) + epsilon
    N = Y.shape[3]
    return (2 * W * Y * numer / denom ** 2 - 2 * W * T / denom) / N


@pytest.mark.parametrize("target", ["onehot", "soft", "labels"])
def test_matlab_forward_and_hand_written_backward(target):
    h, w, k, n = 5, 4, 3, 2
    Y = torch.softmax(torch.randn(h, w, k, n, dtype=torch.float64), 2)
    lab = _labels(n, k, (h, w), absent=False)  # every class in every image (else MATLAB gives NaN)
    T = _one_hot(lab, k).permute(2, 3, 1, 0).contiguous()  # H x W x K x N
    if target == "soft":
        T = T * 0.8 + 0.05
    layer = P.matlab("dice")
    Yr = Y.clone().requires_grad_(True)
    loss = layer(Yr, lab.permute(1, 2, 0) if target == "labels" else T)
    loss.backward()
    torch.testing.assert_close(loss.detach(), matlab_forward_loss(Y, T), **F64)
    # the operator's hand-derived backward reproduces the layer's own backwardLoss
    torch.testing.assert_close(Yr.grad, matlab_backward_loss(Y, T), **F64)
    # PyTorch layout and a 3-D volume (H x W x D x K x N) give the same loss
    assert_same(P.matlab(layout="NKHW"), lambda y, t: P.matlab()(y.permute(2, 3, 1, 0), t.permute(2, 3, 1, 0)),
                (Y.permute(3, 2, 0, 1), T.permute(3, 2, 0, 1)))
    Y3 = torch.softmax(torch.randn(3, 4, 2, k, n, dtype=torch.float64), 3)
    T3 = _one_hot(_labels(n, k, (3, 4, 2), absent=False), k).permute(2, 3, 4, 1, 0)
    v, _ = _value_and_grad(P.matlab(), (Y3, T3))
    v_ref = dt.generalized_dice_loss(Y3.permute(4, 3, 0, 1, 2), T3.permute(4, 3, 0, 1, 2), activation="none",
                                     squared=True, smooth_nr=1e-8, smooth_dr=1e-8)
    torch.testing.assert_close(v, v_ref, **F64)


def test_matlab_absent_class_is_nan_like_matlab():
    Y = torch.softmax(torch.randn(4, 4, 3, 2, dtype=torch.float64), 2)
    lab = torch.zeros(2, 4, 4, dtype=torch.long)
    lab[:, :2] = 1  # class 2 absent
    T = _one_hot(lab, 3).permute(2, 3, 1, 0)
    assert torch.isnan(matlab_forward_loss(Y, T))
    v, g = _value_and_grad(P.matlab(), (Y, T))
    assert torch.isnan(v) and torch.isnan(g).all() == torch.isnan(matlab_backward_loss(Y, T)).all()


# ----------------------------------------------------------------------------------------------
# V-Net (Milletari et al. 2016), the seed posts
# ----------------------------------------------------------------------------------------------
def vnet_dice_loss(x, target):
    """Milletari, Navab, Ahmadi, "V-Net", 3DV 2016, Eq. (1): D = 2 sum p g / (sum p^2 + sum g^2) on the
    foreground probability of the two-way softmax; loss 1 - D per volume, averaged."""
    p = torch.softmax(x, 1)[:, 1].flatten(1)
    g = (target[:, 1] if target.dim() == x.dim() else target == 1).to(p.dtype).flatten(1)
    d = 2 * (p * g).sum(1) / ((p ** 2).sum(1) + (g ** 2).sum(1))
    return (1 - d).mean()


def test_vnet():
    x = torch.randn(3, 2, 4, 3, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 4, 3, 5))
    y[2] = 0  # a volume without foreground: D = 0, still defined
    assert_same(P.vnet(), vnet_dice_loss, (x, y))
    assert_same(P.vnet(), vnet_dice_loss, (x, _one_hot(y, 2)))


def tf_dice_loss(softmax_output, labels, ignore_background=False, square=False):
    """Transcribes seed 002 (shared/seeds/002_13f0b98687e7e5df.txt), ``dice_loss``, line for line."""
    if ignore_background:
        labels = labels[..., 1:]
        softmax_output = softmax_output[..., 1:]
    axis = (0, 1, 2)
    eps = 1e-7
    nom = 2 * torch.sum(labels * softmax_output, dim=axis) + eps
    if square:
        labels = torch.square(labels)
        softmax_output = torch.square(softmax_output)
    denom = torch.sum(labels, dim=axis) + torch.sum(softmax_output, dim=axis) + eps
    return 1 - torch.mean(nom / denom)


@pytest.mark.parametrize("ignore_background,square", list(itertools.product([False, True], [False, True])))
def test_tf_dice(ignore_background, square):
    p = torch.softmax(torch.randn(2, 4, 5, 3, dtype=torch.float64), -1)
    t = _one_hot(_labels(2, 3, (4, 5)), 3).movedim(1, -1)
    assert_same(P.tf_dice(ignore_background, square), lambda a, b: tf_dice_loss(a, b, ignore_background, square),
                (p, t))


def mxnet_dice_loss(y_pred, y_true, smooth=1.0):
    """Transcribes seed 003 (shared/seeds/003_da4b02082458e672.txt), ``dice_loss``."""
    product = y_pred * y_true
    intersection = product.sum().reshape(1)  # nd.sum gives shape (1,)
    coefficient = (2.0 * intersection + smooth) / (y_pred.sum() + y_true.sum() + smooth)
    return 1.0 - coefficient


def test_mxnet_dice():
    y_pred = torch.rand(3, 4, 5, dtype=torch.float64)
    y_true = torch.randint(0, 2, (3, 4, 5)).double()
    assert_same(P.mxnet_dice(), mxnet_dice_loss, (y_pred, y_true))
    # the seed's own run (MXNet 1.0.1, float32): its printed y_pred, y_true and loss [0.35692084]
    y_pred = torch.tensor([[0.38574776, 0.08795848, 0.83927506], [0.21592768, 0.44453627, 0.10463644],
                           [0.8793516, 0.65118235, 0.5184219]])
    y_true = torch.tensor([[1.0, 0, 0], [0, 0, 0], [1, 1, 1]])
    torch.testing.assert_close(P.mxnet_dice()(y_pred, y_true), torch.tensor([0.35692084]), rtol=1e-6, atol=1e-7)
    # "no smooth": coefficient 0.59916145, i.e. loss 0.40083855
    torch.testing.assert_close(P.mxnet_dice(0.0)(y_pred, y_true), torch.tensor([0.40083855]), rtol=1e-6, atol=1e-7)


def keras_generalized_dice_loss_w(y_true, y_pred):
    """Transcribes seed 001 (shared/seeds/001_6179a16dbdf02b73.txt), the question's
    ``generalized_dice_loss_w`` (5-D channels-last tensors; K.sum -> torch.sum, np weights kept)."""
    Ncl = y_pred.shape[-1]
    w = np.zeros((Ncl,))
    for l in range(0, Ncl):  # noqa: E741 - the seed's name
        w[l] = np.sum(np.asarray(y_true[:, :, :, :, l].numpy() == 1, np.int8))
    w = torch.as_tensor(1 / (w ** 2 + 0.00001))
    numerator = y_true * y_pred
    numerator = w * torch.sum(numerator, (0, 1, 2, 3))
    numerator = torch.sum(numerator)
    denominator = y_true + y_pred
    denominator = w * torch.sum(denominator, (0, 1, 2, 3))
    denominator = torch.sum(denominator)
    gen_dice_coef = numerator / denominator
    return 1 - 2 * gen_dice_coef


def test_keras_generalized_dice_seed():
    y_pred = torch.softmax(torch.randn(2, 3, 4, 2, 4, dtype=torch.float64), -1)
    lab = _labels(2, 4, (3, 4, 2))
    lab[lab == 3] = 0  # class 3 absent from the batch: weight 1e5
    y_true = _one_hot(lab, 4).movedim(1, -1)
    assert_same(P.keras_generalized_dice_seed(), keras_generalized_dice_loss_w, (y_true, y_pred), pos=1)


def keras_gen_dice_fixed(y_true, y_pred, eps=1e-6):
    """Transcribes seed 001 (shared/seeds/001_6179a16dbdf02b73.txt), the answer's ``gen_dice``
    (tf.nn.softmax -> torch.softmax(-1), tf.reduce_sum -> torch.sum, tf.where -> torch.where)."""
    pred_tensor = torch.softmax(y_pred, -1)
    s = y_true.shape
    y_true = y_true.reshape(-1, s[1] * s[2], s[3])
    y_pred = pred_tensor.reshape(-1, s[1] * s[2], s[3])
    counts = torch.sum(y_true, 1)
    weights = 1.0 / (counts ** 2)
    weights = torch.where(torch.isfinite(weights), weights, torch.full_like(weights, eps))
    multed = torch.sum(y_true * y_pred, 1)
    summed = torch.sum(y_true + y_pred, 1)
    numerators = torch.sum(weights * multed, -1)
    denom = torch.sum(weights * summed, -1)
    dices = 1.0 - 2.0 * numerators / denom
    dices = torch.where(torch.isfinite(dices), dices, torch.zeros_like(dices))
    return torch.mean(dices)


@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_keras_generalized_dice_fixed(eps):
    y_pred = torch.randn(3, 4, 5, 4, dtype=torch.float64)  # logits
    y_true = _one_hot(_labels(3, 4, (4, 5)), 4).movedim(1, -1)  # class 3 absent from image 0
    assert_same(P.keras_generalized_dice_fixed(eps), lambda a, b: keras_gen_dice_fixed(a, b, eps),
                (y_true, y_pred), pos=1)


def test_seed001_absent_class_dominates_and_absent_weight_tames_it():
    # the seed's weights give the absent class 1e5 and a loss near 1; dicetorch's policies stay finite
    y_pred = torch.softmax(torch.randn(1, 8, 8, 1, 3, dtype=torch.float64), -1)
    lab = torch.zeros(1, 8, 8, 1, dtype=torch.long)
    lab[:, :3] = 1  # class 2 absent
    y_true = _one_hot(lab, 3).movedim(1, -1)
    seed = P.keras_generalized_dice_seed()(y_true, y_pred)
    assert seed > 0.999  # dominated by 1e5 * sum p of the absent class
    x, t = y_pred.movedim(-1, 1), y_true.movedim(-1, 1)
    for policy in ("max", "zero"):
        gd = dt.generalized_dice_loss(x, t, activation="none", absent_weight=policy, smooth_nr=0, smooth_dr=0)
        assert gd < 0.9


# ----------------------------------------------------------------------------------------------
# The table's claims: each preset with a dicetorch equivalent agrees with it
# ----------------------------------------------------------------------------------------------
def _equivalence_case(name):
    """(preset args, index of the input, function mapping those args to the dicetorch call's args)."""
    n, c, spatial = 2, 3, (4, 5)
    lab = _labels(n, c, spatial, absent=False)
    logits = torch.randn(n, c, *spatial, dtype=torch.float64)
    probs, onehot = torch.softmax(logits, 1), _one_hot(lab, c)
    cl = lambda a: a.movedim(1, -1)  # noqa: E731 - channels-last
    ident = lambda *a: a  # noqa: E731
    if name == "matlab":
        return (probs.permute(2, 3, 1, 0), onehot.permute(2, 3, 1, 0)), 0, \
            lambda y, t: (y.permute(3, 2, 0, 1), t.permute(3, 2, 0, 1))
    if name.startswith("monai"):
        return (probs, onehot), 0, ident
    if name.startswith("smp"):
        return (logits, lab), 0, ident
    if name.startswith("keras_generalized"):
        x = probs if name.endswith("seed") else logits
        return (cl(onehot), cl(x)), 1, lambda yt, yp: (yp.movedim(-1, 1), yt.movedim(-1, 1))
    if name in ("nnunet_soft_dice", "vnet"):
        return (logits if name == "nnunet_soft_dice" else logits[:, :2], lab if name == "nnunet_soft_dice"
                else lab.clamp(max=1)), 0, ident
    if name == "kornia_dice":
        lab2 = lab.clone()
        lab2.view(-1)[::7] = -100
        return (logits, lab2), 0, ident
    if name == "keras_dice":
        return (cl(onehot), cl(probs)), 1, lambda yt, yp: (yp.movedim(-1, 1), yt.movedim(-1, 1))
    if name == "tf_dice":
        return (cl(probs), cl(onehot)), 0, lambda p, t: (p.movedim(-1, 1), t.movedim(-1, 1))
    if name == "mxnet_dice":
        return (probs[:, 1], onehot[:, 1]), 0, lambda p, t: (p.reshape(1, 1, -1), t.reshape(1, 1, -1))
    raise KeyError(name)


@pytest.mark.parametrize("name", list(P.PRESETS))
def test_table_equivalents(name):
    eq = P.PRESETS[name].info.equivalent
    args, pos, adapt = _equivalence_case(name)
    generic = getattr(dt, eq.cls)(**eq.kwargs)
    tol = F64
    if name == "monai_generalized_dice":
        tol = dict(rtol=1e-6, atol=1e-8)  # MONAI computes the weights in float32: relative 6e-8 on them
    if not eq.exact:
        # the seed's 1e-5 in 1/(count^2 + 1e-5), count >= 10 here: relative <= 1e-7 on the weights
        assert name == "keras_generalized_dice_seed"
        tol = dict(rtol=1e-6, atol=1e-8)
    shape = (1,) if name == "mxnet_dice" else ()  # MXNet's nd.sum keeps a dimension
    assert_same(P.PRESETS[name](*eq.preset_args), lambda *a: (generic(*adapt(*a)) + eq.offset).reshape(shape),
                args, pos, tol=tol)


def test_every_preset_is_documented_and_calls_the_operator(monkeypatch):
    calls = []
    real = ops.dice_stats

    def spy(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "dice_stats", spy)
    for name in P.PRESETS:
        fn = P.PRESETS[name]
        assert fn.__doc__ and fn.info.name == name
        calls.clear()
        args, pos, _ = _equivalence_case(name)
        pargs = fn.info.equivalent.preset_args
        v_ref, g_ref = _value_and_grad(fn(*pargs, backend="reference"), args, pos)
        assert calls and set(calls) == {"reference"}, (name, calls)
        # and the default backend gives the same result (auto: the C++ kernel when built)
        v, g = _value_and_grad(fn(*pargs), args, pos)
        torch.testing.assert_close(v, v_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_which_dice_doc_is_up_to_date():
    assert P.DOC_PATH.exists(), "docs/which_dice.md is missing: run `python -m dicetorch.presets --write`"
    assert P.DOC_PATH.read_text(encoding="utf-8") == P.which_dice_markdown(), \
        "docs/which_dice.md is stale: run `python -m dicetorch.presets --write`"
    assert P._main(["--check"]) == 0
    readme = P.README_PATH.read_text(encoding="utf-8")
    assert readme == P.readme_with_table(readme), "README.md's preset table is stale: run `python -m dicetorch.presets --write`"
    assert "`keras_generalized_dice_seed`" in readme.split(P.README_BEGIN)[1].split(P.README_END)[0]
    for name in P.PRESETS:
        assert f"`{name}`" in P.which_dice_markdown()
