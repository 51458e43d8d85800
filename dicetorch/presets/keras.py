"""Keras: ``keras.losses.Dice`` (Keras 3) and the two generalized-Dice functions of seed 001."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ._common import _float_target
from ._registry import Equivalent, PresetInfo, _register


_KERAS_EPSILON = 1e-7  # keras.backend.epsilon()


class _KerasDice(nn.Module):
    def __init__(self, reduction, name, axis, dtype, backend):
        super().__init__()
        if reduction not in ("sum_over_batch_size", "mean", "mean_with_sample_weight", "sum", "none", None):
            raise ValueError(f"Invalid value for argument `reduction`: {reduction!r}")
        self.reduction, self.name, self.axis, self.dtype, self.backend = reduction, name, axis, dtype, backend

    def forward(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        if self.dtype is not None:
            y_pred = y_pred.to(self.dtype)
        y_true = y_true.to(y_pred.dtype)
        if y_true.shape != y_pred.shape:
            raise ValueError(f"y_true {tuple(y_true.shape)} and y_pred {tuple(y_pred.shape)} must have one shape")
        nd = y_pred.dim()
        if self.axis is None:
            red = set(range(nd))
        else:
            axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
            red = {a % nd for a in axes} if nd else set()
        spatial = set(range(1, nd - 1))
        if nd >= 2 and spatial <= red:
            # channels-last view (N, C, *spatial): one pass, then sum the per-(image, class) sums
            s = ops.dice_stats(y_pred.movedim(-1, 1), y_true.movedim(-1, 1), "none", 1, None, self.backend)
            if 0 in red:
                s = s.sum(0, keepdim=True)
            if nd - 1 in red:
                s = s.sum(-1, keepdim=True)
            keep = [d for d in (0, nd - 1) if d not in red]
            i, p, t = s.unbind(1)
            shape = [y_pred.shape[d] for d in keep]
            i, p, t = i.reshape(shape), p.reshape(shape), t.reshape(shape)
        else:
            # any other axis: kept axes become the operator's images, reduced axes its pixels
            keep = [d for d in range(nd) if d not in red]
            order = keep + sorted(red)
            shape = [y_pred.shape[d] for d in keep]
            nk = math.prod(shape)
            xp = y_pred.permute(order).reshape(nk, 1, -1)
            tt = y_true.permute(order).reshape(nk, 1, -1)
            s = ops.dice_stats(xp, tt, "none", 1, None, self.backend)
            i, p, t = (v.reshape(shape) for v in s[:, :, 0].unbind(1))
        dice = (2.0 * i) / (t + p + _KERAS_EPSILON)
        loss = 1 - dice
        if self.reduction is None or self.reduction == "none" or loss.dim() == 0:
            return loss
        if self.reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):  # no sample weights
            return loss.sum() / max(loss.numel(), 1)
        return loss.sum()


@_register(PresetInfo(
    name="keras_dice",
    original="Keras 3 `keras.losses.Dice`",
    source="keras/src/losses/losses.py (`dice`, `Dice`), keras/src/losses/loss.py (`reduce_values`)",
    call="`loss(y_true, y_pred)`: probabilities, channels-last (N, *spatial, C), any shape with `axis=None`",
    activation="none (probabilities)",
    denominator="Σt + Σp",
    smoothing="`backend.epsilon()`=1e-7 on the denominator only",
    weights="none",
    absent="pooled: nothing special",
    sums="over the whole tensor (`axis=None`); over `axis` otherwise",
    loss="1 − Dice (`sum_over_batch_size` mean of the per-`axis` values)",
    equivalent=Equivalent("GeneralizedDiceLoss", dict(activation="none", weighting="uniform", batch=True,
                                                      smooth_nr=0.0, smooth_dr=1e-7),
                          adapt="`y_pred.movedim(-1, 1)`"),
))
def keras_dice(reduction="sum_over_batch_size", name: str = "dice", axis=None, dtype=None,
               *, backend: str = "auto") -> nn.Module:
    """Keras 3 ``keras.losses.Dice(reduction, name, axis, dtype)``.

    ``forward(y_true, y_pred)`` (Keras's argument order): tensors of one shape, probabilities;
    channels-last (N, *spatial, C) for the usual segmentation use.  Over the axes ``axis`` (all with
    None)::

        dice = 2 sum(y_true * y_pred) / (sum(y_true) + sum(y_pred) + 1e-7),   loss = 1 - dice

    then ``reduction`` ("sum_over_batch_size" = mean of the remaining values; there are no sample
    weights here).  ``dtype=None`` keeps the input's dtype (Keras would cast to ``floatx()``, float32).
    Any ``axis`` is expressible: the kept axes become the operator's images and the reduced axes its
    pixels (one transposed copy unless the reduced axes contain every spatial axis).
    """
    return _KerasDice(reduction, name, axis, dtype, backend)



class _KerasGDSeed(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        x = y_pred.movedim(-1, 1)
        t = _float_target(y_true, y_pred).movedim(-1, 1)
        s = ops.dice_stats(x, t, "none", 1, None, self.backend).sum(0)  # K.sum over (0, 1, 2, 3)
        with torch.no_grad():  # numpy in the seed: constants
            count = (y_true == 1).reshape(-1, y_true.shape[-1]).sum(0).to(torch.float64)
            w = (1 / (count ** 2 + 0.00001)).to(s.dtype)
        numerator = (w * s[0]).sum()
        denominator = (w * (s[2] + s[1])).sum()
        return 1 - 2 * (numerator / denominator)


@_register(PresetInfo(
    name="keras_generalized_dice_seed",
    original="Keras `generalized_dice_loss_w(y_true, y_pred)` as posted (question)",
    source="seed 001, the question's code",
    call="`loss(y_true, y_pred)`: one-hot targets and probabilities, channels-last (N, *spatial, C)",
    activation="none (probabilities)",
    denominator="Σt + Σp",
    smoothing="none; 1e-5 inside the weight",
    weights="1/(count² + 1e-5), count = #(t == 1) over the whole batch",
    absent="weight 1/1e-5 = 1e5: dominates the ratio (see below)",
    sums="over the batch: one ratio",
    loss="1 − 2·Σw I / Σw(T + P)",
    equivalent=Equivalent("GeneralizedDiceLoss", dict(activation="none", batch=True, smooth_nr=0.0, smooth_dr=0.0),
                          adapt="`y_pred.movedim(-1, 1)`", exact=False,
                          when="when every class occurs in the batch it differs only by the 1e-5 in the weights; "
                               "an absent class gets 1e5 in the seed, the max weight in dicetorch"),
))
def keras_generalized_dice_seed(*, backend: str = "auto") -> nn.Module:
    """Seed 001's ``generalized_dice_loss_w`` exactly as posted (the version that fails to train).

    ``forward(y_true, y_pred)``: channels-last (N, *spatial, C) one-hot targets and probabilities.
    Batch-wide, one ratio::

        count_l = number of entries with y_true[..., l] == 1      (over the whole batch; constants)
        w_l     = 1 / (count_l^2 + 1e-5)
        loss    = 1 - 2 sum_l w_l I_l / sum_l w_l (T_l + P_l)

    A class absent from the batch gets w = 1e5 while present classes get about 1/count^2: see
    ``docs/which_dice.md`` for why a network trained with it barely learns.
    """
    return _KerasGDSeed(backend)


class _KerasGDFixed(nn.Module):
    def __init__(self, eps, backend):
        super().__init__()
        self.eps, self.backend = eps, backend

    def forward(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        x = y_pred.movedim(-1, 1)  # logits; the softmax is fused
        t = _float_target(y_true, y_pred).movedim(-1, 1)
        s = ops.dice_stats(x, t, "softmax", 1, None, self.backend)
        counts = s[:, 2].detach()
        weights = 1.0 / (counts ** 2)
        weights = torch.where(torch.isfinite(weights), weights, torch.full_like(weights, self.eps))
        numerators = (weights * s[:, 0]).sum(-1)
        denom = (weights * (s[:, 2] + s[:, 1])).sum(-1)
        dices = 1.0 - 2.0 * numerators / denom
        dices = torch.where(torch.isfinite(dices), dices, torch.zeros_like(dices))
        return dices.mean()


@_register(PresetInfo(
    name="keras_generalized_dice_fixed",
    original="`gen_dice(y_true, y_pred, eps=1e-6)`, the accepted answer's fix",
    source="seed 001, the answer's code",
    call="`loss(y_true, y_pred)`: one-hot targets and logits, channels-last (N, *spatial, C)",
    activation="softmax",
    denominator="Σt + Σp",
    smoothing="none (a non-finite Dice becomes 0)",
    weights="1/(Σt)² per image and class",
    absent="fixed weight `eps`=1e-6",
    sums="per image, one ratio over classes",
    loss="1 − GDice, mean over images",
    equivalent=Equivalent("GeneralizedDiceLoss", dict(smooth_nr=0.0, smooth_dr=0.0), adapt="`y_pred.movedim(-1, 1)`",
                          when="every class occurs in every image (absent classes: eps here, the max weight or "
                               "0 in dicetorch)"),
))
def keras_generalized_dice_fixed(eps: float = 1e-6, *, backend: str = "auto") -> nn.Module:
    """Seed 001's answer ``gen_dice(y_true, y_pred, eps)``: per-image weights, absent classes get ``eps``.

    ``forward(y_true, y_pred)``: channels-last (N, *spatial, C) one-hot targets and *logits*
    (the softmax is applied inside).  Per image::

        w_c  = 1 / (sum_m t_c)^2,  or eps where that is not finite (absent class)
        dice = 1 - 2 sum_c w_c I_c / sum_c w_c (T_c + P_c)      (0 where not finite)
        loss = mean over images
    """
    return _KerasGDFixed(eps, backend)
