"""Compound losses: Dice (or generalized Dice) plus a pixel loss, from one fused operator call.

The operator returns, besides (I, P, T), two rows of per-class sums of the pixel loss's element term
e (see :mod:`dicetorch.reference`)::

    X[n,k] = sum_m t * e          L[n,k] = sum_m e          (ignored pixels excluded)

so the whole compound loss reads the logits once forward and once backward.  The pixel losses are
these epilogues (sums over the images and classes; n = counted pixels):

* softmax cross-entropy, exactly ``F.cross_entropy(input, target, weight=w, ignore_index,
  label_smoothing=eps)`` (mean)::

      [(1 - eps) sum_k w_k X_k + (eps / C) sum_k w_k L_k] / D,   D = sum_k w_k T_k   (labels)
                                                                 D = n               (float targets)
* sigmoid: ``F.binary_cross_entropy_with_logits`` (mean over n * C elements), class weights
  multiplying each class: ``sum_k w_k L_k / (n C)``;
* focal, MONAI's ``FocalLoss`` (mean over n * C elements)::

      softmax:  sum_k a_k w_k X_k / (n C),           a = (1 - alpha, alpha, ..., alpha) or 1
      sigmoid:  sum_k w_k (alpha X_k + (1 - alpha)(L_k - X_k)) / (n C),   or sum_k w_k L_k / (n C)

The pixel loss uses every channel, whatever ``include_background`` says (MONAI's ``DiceCELoss`` and
nnU-Net do the same); ``batch`` concerns the Dice part only.  With ``batch=True, distributed=True``
the stats and the pixel counts are all-reduced together, so the pixel loss is the global mean too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional as F
from .functional import Weights

__all__ = ["dice_ce_loss", "dice_focal_loss", "generalized_dice_focal_loss"]

COMPOUND_REDUCTIONS = ("mean", "sum")


def _check_compound(activation, reduction, lambdas, label_smoothing=0.0, alpha=None, gamma=None):
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid' for a compound loss (the pixel loss needs "
                         f"logits), got {activation!r}")
    if reduction not in COMPOUND_REDUCTIONS:
        raise ValueError(f"reduction must be one of {COMPOUND_REDUCTIONS} for a compound loss, got {reduction!r}")
    out = [F._number(name, v) for name, v in lambdas]
    smoothing = F._number("label_smoothing", label_smoothing)
    if smoothing >= 1:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
    if smoothing and activation != "softmax":
        raise ValueError("label_smoothing applies to the softmax cross-entropy only (activation='softmax')")
    if alpha is not None:
        alpha = F._number("alpha", alpha)
        if alpha > 1:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if gamma is not None:
        gamma = F._number("gamma", gamma)
    return out, smoothing, alpha, gamma


def _pixel_weights(weight: Weights, num_classes: int, like: Tensor, name: str) -> Optional[Tensor]:
    """Per-class weights of the pixel loss: every channel (length C), finite, >= 0."""
    w = F.check_class_weights(weight)
    if w is None:
        return None
    if w.numel() != num_classes:
        raise ValueError(f"{name} must have length C={num_classes} (the pixel loss uses every channel), "
                         f"got {w.numel()}")
    return w.to(dtype=like.dtype, device=like.device)


def _combine(lambda_a: float, a: Tensor, lambda_b: float, b: Tensor) -> Tensor:
    """lambda_a a + lambda_b b; a weight of 1 multiplies nothing (exact: 1 x = x), one op and node fewer."""
    return (a if lambda_a == 1 else lambda_a * a) + (b if lambda_b == 1 else lambda_b * b)


def _counted_pixels(input: Tensor, target: Tensor, s: Tensor, ignore_index: Optional[int]) -> Tensor:
    """(N,) pixels counted per image: all of them, or those whose label is not ``ignore_index``."""
    n, c = input.shape[0], input.shape[1]
    m = input[0, 0].numel()
    ignore_index = F.ops.as_ignore_index(ignore_index)
    if ignore_index is None or not F.ops._is_label_target(input, target):
        return torch.full((n,), float(m), dtype=s.dtype, device=s.device)
    if c > 1:  # valid labels match exactly one class: the counted pixels are sum_k T_k
        return s[:, 2].sum(-1).detach()
    return (target.reshape(n, -1) != ignore_index).sum(-1).to(s.dtype)  # binary: label 0 has no row


def _pixel_loss(s: Tensor, counted: Tensor, target_is_labels: bool, *, kind: str, activation: str,
                weight: Optional[Tensor], label_smoothing: float, alpha: Optional[float],
                reduction: str) -> Tensor:
    """The pixel loss from batch-summed stats (1, 5, C) and counted pixels (1,) (see the module doc)."""
    rows = s[0].unbind(0)  # two autograd nodes; three s[0, k] would be six, each a zeros tensor and a copy
    X, L, T = rows[3], rows[4], rows[2]
    C = s.shape[-1]

    def wsum(v):  # sum_k w_k v_k; without weights no ones tensor (each op is a launch and an autograd node)
        return v.sum() if weight is None else (weight * v).sum()

    if kind == "ce" and activation == "softmax":
        num = wsum(X)
        if label_smoothing != 0:  # else no L term: 0 * L is NaN where a masked (-inf) logit makes L inf
            num = (1.0 - label_smoothing) * num + (label_smoothing / C) * wsum(L)
        den = wsum(T) if target_is_labels else counted[0]
    elif kind == "ce":
        num, den = wsum(L), counted[0] * C
    else:
        if alpha is None:
            num = wsum(X if activation == "softmax" else L)
        elif activation == "softmax":
            a = torch.full_like(X, alpha)
            a[0] = 1.0 - alpha
            num = wsum(a * X)
        else:
            num = wsum(alpha * X + (1.0 - alpha) * (L - X))
        den = counted[0] * C
    return num / den if reduction == "mean" else num


def _compound(input, target, *, kind, activation, squared, ignore_index, backend, batch, distributed,
              process_group, gamma, pixel_weight, weight_name):
    """(stats (N, 5, C), counted pixels (N,) or None where unused, pixel-loss weights, whether the
    target is labels)."""
    F.check_distributed(distributed, batch, process_group)
    s = F._stats(input, target, activation=activation, power=2 if squared else 1, ignore_index=ignore_index,
                 backend=backend, pixel_loss=kind, gamma=gamma)
    labels = F.ops._is_label_target(input, target)
    # the softmax cross-entropy of labels divides by sum_k w_k T_k: no pixel count (nor its ops)
    counted = None if (kind, activation, labels) == ("ce", "softmax", True) else \
        _counted_pixels(input, target, s, ignore_index)
    w = _pixel_weights(pixel_weight, input.shape[1], s, weight_name)
    return s, counted, w, labels


def dice_ce_loss(
    input: Tensor,
    target: Tensor,
    *,
    activation: str = "softmax",
    squared: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    include_background: bool = True,
    ignore_index: Optional[int] = None,
    class_weights: Weights = None,
    log_loss: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    distributed: bool = False,
    process_group=None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    ce_weight: Weights = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``lambda_dice * dice_loss + lambda_ce * cross-entropy``, one fused pass over the logits.

    ::

        loss = lambda_dice * dice_loss(input, target, ...)          (see :func:`dicetorch.dice_loss`)
             + lambda_ce * F.cross_entropy(input, target, weight=ce_weight, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing)       (softmax)
             + lambda_ce * F.binary_cross_entropy_with_logits(input, target)     (sigmoid; ce_weight per class)

    Args:
        input: (N, C, *spatial) logits.  target: labels (N, *spatial) / (N, 1, *spatial) or float
            (N, C, *spatial) (one-hot or soft).
        ce_weight: per-class weights of the cross-entropy, length C (every channel).
        label_smoothing: in [0, 1), softmax only (PyTorch's definition).
        reduction: "mean" (the Dice mean and the cross-entropy mean) or "sum" (both summed).
        Every other argument as in :func:`dicetorch.dice_loss`; ``batch`` concerns the Dice part.

    Returns:
        A scalar.
    """
    smooth_nr, smooth_dr = F._check_options(smooth_nr, smooth_dr, reduction)
    (lambda_dice, lambda_ce), label_smoothing, _, _ = _check_compound(
        activation, reduction, (("lambda_dice", lambda_dice), ("lambda_ce", lambda_ce)), label_smoothing)
    s, counted, w, labels = _compound(input, target, kind="ce", activation=activation, squared=squared,
                                      ignore_index=ignore_index, backend=backend, batch=batch,
                                      distributed=distributed, process_group=process_group, gamma=2.0,
                                      pixel_weight=ce_weight, weight_name="ce_weight")
    s_sum, counted_sum = F.batch_sums(s, counted, distributed=distributed, process_group=process_group)
    dice = F._dice_epilogue(s_sum if batch else s, batch=batch, include_background=include_background,
                            smooth_nr=smooth_nr, smooth_dr=smooth_dr, log_loss=log_loss,
                            class_weights=class_weights, reduction=reduction)
    ce = _pixel_loss(s_sum, counted_sum, labels, kind="ce", activation=activation, weight=w,
                     label_smoothing=label_smoothing, alpha=None, reduction=reduction)
    return _combine(lambda_dice, dice, lambda_ce, ce)


def dice_focal_loss(
    input: Tensor,
    target: Tensor,
    *,
    activation: str = "softmax",
    squared: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    include_background: bool = True,
    ignore_index: Optional[int] = None,
    class_weights: Weights = None,
    log_loss: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    distributed: bool = False,
    process_group=None,
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
    focal_weight: Weights = None,
) -> Tensor:
    """``lambda_dice * dice_loss + lambda_focal * focal``, one fused pass over the logits.

    The focal term is MONAI's ``FocalLoss`` (mean over pixels and classes)::

        softmax:  -a_k (1 - p_k)^gamma log p_k t_k,          a = (1 - alpha, alpha, ..., alpha)
        sigmoid:  exp(gamma logsigmoid(-z (2t - 1))) BCE(z, t) (alpha t + (1 - alpha)(1 - t))

    times ``focal_weight[k]``; without ``alpha`` no alpha factor.  Other arguments as in
    :func:`dice_ce_loss`.
    """
    smooth_nr, smooth_dr = F._check_options(smooth_nr, smooth_dr, reduction)
    (lambda_dice, lambda_focal), _, alpha, gamma = _check_compound(
        activation, reduction, (("lambda_dice", lambda_dice), ("lambda_focal", lambda_focal)), alpha=alpha,
        gamma=gamma)
    s, counted, w, labels = _compound(input, target, kind="focal", activation=activation, squared=squared,
                                      ignore_index=ignore_index, backend=backend, batch=batch,
                                      distributed=distributed, process_group=process_group, gamma=gamma,
                                      pixel_weight=focal_weight, weight_name="focal_weight")
    s_sum, counted_sum = F.batch_sums(s, counted, distributed=distributed, process_group=process_group)
    dice = F._dice_epilogue(s_sum if batch else s, batch=batch, include_background=include_background,
                            smooth_nr=smooth_nr, smooth_dr=smooth_dr, log_loss=log_loss,
                            class_weights=class_weights, reduction=reduction)
    focal = _pixel_loss(s_sum, counted_sum, labels, kind="focal", activation=activation, weight=w,
                        label_smoothing=0.0, alpha=alpha, reduction=reduction)
    return _combine(lambda_dice, dice, lambda_focal, focal)


def generalized_dice_focal_loss(
    input: Tensor,
    target: Tensor,
    *,
    activation: str = "softmax",
    squared: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    include_background: bool = True,
    ignore_index: Optional[int] = None,
    class_weights: Weights = None,
    log_loss: bool = False,
    reduction: str = "mean",
    weighting: str = "square",
    absent_weight: str = "max",
    backend: str = "auto",
    distributed: bool = False,
    process_group=None,
    lambda_gdl: float = 1.0,
    lambda_focal: float = 1.0,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
    focal_weight: Weights = None,
) -> Tensor:
    """``lambda_gdl * generalized_dice_loss + lambda_focal * focal`` (MONAI's
    ``GeneralizedDiceFocalLoss``), one fused pass; arguments as in :func:`dicetorch.generalized_dice_loss`
    and :func:`dice_focal_loss`.
    """
    smooth_nr, smooth_dr = F._check_options(smooth_nr, smooth_dr, reduction)
    if weighting not in F.WEIGHTINGS:
        raise ValueError(f"weighting must be one of {F.WEIGHTINGS}, got {weighting!r}")
    if absent_weight not in F.ABSENT:
        raise ValueError(f"absent_weight must be one of {F.ABSENT}, got {absent_weight!r}")
    (lambda_gdl, lambda_focal), _, alpha, gamma = _check_compound(
        activation, reduction, (("lambda_gdl", lambda_gdl), ("lambda_focal", lambda_focal)), alpha=alpha,
        gamma=gamma)
    s, counted, w, labels = _compound(input, target, kind="focal", activation=activation, squared=squared,
                                      ignore_index=ignore_index, backend=backend, batch=batch,
                                      distributed=distributed, process_group=process_group, gamma=gamma,
                                      pixel_weight=focal_weight, weight_name="focal_weight")
    vol = F.linear_volume(s, target, 2 if squared else 1)
    s_sum, counted_sum, vol_sum = F.batch_sums(s, counted, vol, distributed=distributed, process_group=process_group)
    gdl = F._generalized_epilogue(s_sum if batch else s, vol_sum if batch else vol,
                                  batch=batch, include_background=include_background, smooth_nr=smooth_nr,
                                  smooth_dr=smooth_dr, log_loss=log_loss, class_weights=class_weights,
                                  reduction=reduction, weighting=weighting, absent_weight=absent_weight)
    focal = _pixel_loss(s_sum, counted_sum, labels, kind="focal", activation=activation, weight=w,
                        label_smoothing=0.0, alpha=alpha, reduction=reduction)
    return _combine(lambda_gdl, gdl, lambda_focal, focal)
