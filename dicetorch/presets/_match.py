"""Which registered presets equal an identified loss.

For each preset, a translator turns the identified choices into the preset's constructor arguments
(when the preset can express them) and an adapter turns the identified loss's canonical (input, target)
into the preset's calling convention.  Every candidate is confirmed on the same inputs as the
dicetorch build, so a listed preset is one that reproduces the loss, not one that looks alike.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from ._build import AdaptedPreset, as_labels, as_onehot
from .keras import keras_dice, keras_generalized_dice_fixed, keras_generalized_dice_seed
from .kornia import kornia_dice
from .matlab_layer import matlab
from .monai import monai_dice, monai_generalized_dice, monai_tversky
from .nnunet import nnunet_soft_dice
from .papers import mxnet_dice, tf_dice, vnet
from .smp import smp_dice, smp_tversky


@dataclasses.dataclass
class Candidate:
    label: str
    factory: Callable
    kwargs: dict
    adapter: Callable
    args: tuple = ()
    worst: float = math.nan
    convention: object = None
    shape: object = None

    def build(self):
        return AdaptedPreset(self.factory(*self.args, **self.kwargs), self.convention, self.adapter, self.shape)


def _close(a, b) -> bool:
    """Loosely equal: the fit of a loss outside the family is approximate; confirmation decides."""
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b)) + 1e-9


def _label(name, args, kwargs):
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def _same(x, t):
    return x, t


def _channels_last(x, t):
    return x.movedim(1, -1), as_onehot(x, t).movedim(1, -1)


def _keras_order(x, t):
    return as_onehot(x, t).movedim(1, -1), x.movedim(1, -1)


def _onehot(x, t):
    return x, as_onehot(x, t)


def _labels(x, t):
    return x, as_labels(x, t)


def _labels_1ch(x, t):
    return x, as_labels(x, t).unsqueeze(1)


def _plain(i) -> bool:
    return _close(i.scale, 1.0) and _close(i.offset, 0.0)


def _candidates(i, conv, c: int, spatial: tuple) -> list:
    out = []
    add = lambda name, fn, adapter, *args, **kw: out.append(  # noqa: E731
        Candidate(_label(name, args, kw), fn, kw, adapter, args))
    act = i.activation
    weights = None if i.class_weights is None else list(i.class_weights)
    dice = i.loss == "dice" and not i.log_loss
    gd = i.loss == "generalized_dice" and not i.log_loss

    # MONAI: DiceLoss (also jaccard), TverskyLoss, GeneralizedDiceLoss
    if _plain(i) and i.reduction in ("mean", "sum", "none"):
        kw = {"softmax": dict(softmax=True), "sigmoid": dict(sigmoid=True), "none": {}}[act]
        if not i.include_background:
            kw["include_background"] = False
        onehot_y = conv.target != "onehot"
        if onehot_y:
            kw["to_onehot_y"] = True
        if i.batch:
            kw["batch"] = True
        if i.reduction != "mean":
            kw["reduction"] = i.reduction
        adapter = _labels_1ch if onehot_y else _onehot
        sm = lambda nr, dr: {**({} if _close(nr, 1e-5) else {"smooth_nr": nr}),  # noqa: E731
                             **({} if _close(dr, 1e-5) else {"smooth_dr": dr})}
        jaccard = i.loss == "tversky" and i.alpha == 1 and i.beta == 1 and i.gamma == 1 and not i.log_loss
        if dice or jaccard:
            extra = dict(kw, **({"squared_pred": True} if i.q == 2 else {}))
            if jaccard:
                extra.update(jaccard=True, **sm(2 * i.smooth_nr, 2 * i.smooth_dr))
            else:
                extra.update(sm(i.smooth_nr, i.smooth_dr))
            if weights is not None:
                extra["weight"] = weights
            add("monai_dice", monai_dice, adapter, **extra)
        if i.loss == "tversky" and i.q == 1 and i.gamma == 1 and not i.log_loss and weights is None:
            add("monai_tversky", monai_tversky, adapter, **kw, alpha=i.alpha, beta=i.beta,
                **sm(i.smooth_nr, i.smooth_dr))
        if dice and i.q == 1 and weights is None:  # Tversky with alpha = beta = 1/2: half the Dice smoothing
            add("monai_tversky", monai_tversky, adapter, **kw, **sm(i.smooth_nr / 2, i.smooth_dr / 2))
        if gd and i.q == 1 and i.absent_weight == "max" and weights is None:
            wt = {} if i.weighting == "square" else {"w_type": i.weighting}
            add("monai_generalized_dice", monai_generalized_dice, adapter, **kw, **wt, **sm(i.smooth_nr, i.smooth_dr))

    # nnU-Net: -Dice with smooth on both
    if (dice and i.q == 1 and _close(i.scale, 1.0) and _close(i.offset, -1.0) and i.reduction == "mean"
            and weights is None and _close(i.smooth_nr, i.smooth_dr)):
        kw = {} if act == "softmax" else {"apply_nonlin": None if act == "none" else act}
        if i.batch:
            kw["batch_dice"] = True
        if not i.include_background:
            kw["do_bg"] = False
        if not _close(i.smooth_nr, 1.0):
            kw["smooth"] = i.smooth_nr
        add("nnunet_soft_dice", nnunet_soft_dice, _same, **kw)

    # segmentation_models_pytorch: batch Dice / Tversky, smooth on both (Dice form: twice smp's smooth)
    smp_ok = (i.loss in ("dice", "tversky") and i.q == 1 and i.batch and _plain(i) and i.reduction == "mean"
              and weights is None and _close(i.smooth_nr, i.smooth_dr))
    if smp_ok:
        if act == "softmax" or (act == "none" and conv.target != "onehot"):
            mode, adapter = "multiclass", _labels
        else:
            mode, adapter = "multilabel", _onehot
        kw = {} if act != "none" else {"from_logits": False}
        if not i.include_background:
            kw["classes"] = list(range(1, c))
        if i.loss == "dice":
            smooth = i.smooth_nr / 2
            if i.log_loss:
                kw["log_loss"] = True
            add("smp_dice", smp_dice, adapter, mode, **kw, **({"smooth": smooth} if smooth else {}))
        elif i.gamma == 1 and not i.log_loss:
            kw.update(alpha=i.alpha, beta=i.beta)
            add("smp_tversky", smp_tversky, adapter, mode, **kw, **({"smooth": i.smooth_nr} if i.smooth_nr else {}))
        if i.loss == "dice" and not i.log_loss:  # alpha = beta = 1/2
            add("smp_tversky", smp_tversky, adapter, mode, **kw, **({"smooth": i.smooth_nr / 2} if i.smooth_nr else {}))

    # kornia: softmax, per image, labels, 2-D; micro = pooled (uniform generalized Dice), macro = per class
    if act == "softmax" and len(spatial) == 2 and not i.batch and _plain(i) and i.reduction == "mean" \
            and i.q == 1 and i.include_background and _close(i.smooth_nr, 0.0) and i.smooth_dr is not None:
        eps = {} if _close(i.smooth_dr, 1e-8) else {"eps": i.smooth_dr}
        if gd and i.weighting == "uniform":
            w = {} if weights is None else {"weight": torch.tensor(weights, dtype=torch.float64)}
            add("kornia_dice", kornia_dice, _labels, **eps, **w)
        if dice and weights is None:
            add("kornia_dice", kornia_dice, _labels, "macro", **eps)

    # pooled over the whole tensor: Keras Dice, the MXNet snippet
    if gd and i.weighting == "uniform" and i.batch and act == "none" and i.q == 1 and _plain(i) \
            and i.include_background and weights is None:
        if _close(i.smooth_nr, 0.0) and _close(i.smooth_dr, 1e-7):
            add("keras_dice", keras_dice, _keras_order)
        if _close(i.smooth_nr, i.smooth_dr):
            add("mxnet_dice", mxnet_dice, _onehot, **({} if _close(i.smooth_nr, 1.0) else {"smooth": i.smooth_nr}))

    # V-Net, the TensorFlow snippet
    if dice and i.q == 2 and act == "softmax" and not i.include_background and not i.batch and _plain(i) \
            and i.reduction == "mean" and weights is None and _close(i.smooth_nr, 0) and _close(i.smooth_dr, 0):
        add("vnet", vnet, _same)
    if dice and i.batch and act == "none" and _plain(i) and i.reduction == "mean" and weights is None \
            and _close(i.smooth_nr, 1e-7) and _close(i.smooth_dr, 1e-7):
        kw = {**({"ignore_background": True} if not i.include_background else {}),
              **({"square": True} if i.q == 2 else {})}
        add("tf_dice", tf_dice, _channels_last, **kw)

    # generalized Dice of the MATLAB layer and of seed 001 (also when their absent-class rule is not dicetorch's)
    if gd and i.weighting == "square" and i.include_background and _plain(i) and weights is None:
        if i.q == 2 and act == "none" and not i.batch and _close(i.smooth_nr, 1e-8) and _close(i.smooth_dr, 1e-8):
            add("matlab", matlab, _onehot, layout="NKHW")
        if i.q == 1 and act == "none" and i.batch and abs(i.smooth_nr) < 1e-6 and abs(i.smooth_dr) < 1e-6:
            add("keras_generalized_dice_seed", keras_generalized_dice_seed, _keras_order)
        if i.q == 1 and act == "softmax" and not i.batch and abs(i.smooth_nr) < 1e-6 and abs(i.smooth_dr) < 1e-6:
            eps = i.absent_weight if isinstance(i.absent_weight, float) else 1e-6
            add("keras_generalized_dice_fixed", keras_generalized_dice_fixed, _keras_order,
                **({} if _close(eps, 1e-6) else {"eps": eps}))
    for cand in out:
        cand.convention = conv
    return out


def confirmed(ident, ctx, probes, rtol, confirm) -> list:
    """The candidates that reproduce the loss on ``probes`` (value and gradient)."""
    if ident.activation is None or ident.loss is None:
        return []
    found = []
    shape = tuple(probes[0].out.shape) if probes[0].out.numel() == 1 else None
    for cand in _candidates(ident, ctx.conv, ctx.c, ctx.spatial):
        cand.shape = shape
        try:
            module = cand.build()
        except (ValueError, TypeError):
            continue
        why, worst = confirm(module, ctx, probes, rtol)
        if why is None:
            cand.worst = worst
            found.append(cand)
    return found
