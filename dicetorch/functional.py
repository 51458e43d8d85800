"""Dice-family losses as small PyTorch epilogues on :func:`dicetorch.ops.dice_stats`.

Notation (per image n and class k, ignored pixels excluded, p = activation(input), t = target)::

    I = sum_m p*t          P = sum_m p^q          T = sum_m t^q          (q = 2 if squared else 1)

Every function below computes (I, P, T) with one call to the fused operator and then applies an
O(N*C) formula; autograd carries the gradient back into the operator's hand-derived backward.

Shapes: ``input`` is (N, C, *spatial) with any number of spatial dims (0 to 3+); ``target`` is
integer labels (N, *spatial) or (N, 1, *spatial), or a float/bool tensor shaped like ``input``
(one-hot or soft).  With C == 1, label 1 is the foreground.

Data-parallel training: with ``batch=True, distributed=True`` the batch-summed stats (and every
count a loss normalizes by) are all-reduced over the process group (:func:`batch_sums`), so every
rank computes the loss of the whole global batch, and DDP's gradient averaging yields exactly the
gradient of single-process training on the concatenated batch.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import ops

__all__ = ["dice_loss", "generalized_dice_loss", "tversky_loss", "dice_score", "batch_sums", "check_distributed"]

Weights = Optional[Union[Tensor, Sequence[float]]]
REDUCTIONS = ("mean", "sum", "none")
WEIGHTINGS = ("square", "simple", "uniform")
ABSENT = ("max", "zero")


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
def _number(name: str, v, *, positive: bool = False):
    """A finite real >= 0 (> 0 with ``positive``) given as a Python, numpy or 0-dim tensor number.

    Returns a Python float (or the SymFloat/SymInt itself under ``torch.compile(dynamic=True)``).
    A 0-dim CUDA tensor is read once (a host copy): pass Python numbers in a hot loop.
    """
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        return v
    ok_tensor = isinstance(v, Tensor) and v.dim() == 0 and not v.is_complex() and v.dtype != torch.bool
    if isinstance(v, bool) or not (ok_tensor or isinstance(v, numbers.Real)) or isinstance(v, np.bool_):
        raise TypeError(f"{name} must be a real number (Python, numpy or 0-dim tensor), got {v!r}")
    v = float(v)
    if not (v > 0 if positive else v >= 0) or v == math.inf:
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {v!r}")
    return v


def _check_options(smooth_nr, smooth_dr, reduction):
    """Validated (smooth_nr, smooth_dr) as numbers; checks ``reduction``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return _number("smooth_nr", smooth_nr), _number("smooth_dr", smooth_dr)


def _check_loss_activation(activation: str) -> None:
    """Losses need a differentiable activation; the hard ones are for evaluation."""
    if activation in ops.HARD_ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is a hard (0/1) prediction with no gradient: a loss cannot train with it. "
            "Use 'softmax' or 'sigmoid' for losses, and the hard activations for evaluation "
            "(dicetorch.dice_score, dicetorch.metrics)")
    if activation not in ops.ACTIVATIONS:
        raise ValueError(f"activation must be one of {ops.ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------------------------
# data-parallel training: global batch sums
# ----------------------------------------------------------------------------------------------
def check_distributed(distributed: bool, batch: bool, process_group=None) -> None:
    """Refuse ``distributed=True`` where it cannot mean what it says (raises ValueError).

    It needs ``batch=True`` (only whole-batch sums are shared between ranks: a per-image loss is
    local to its images) and an initialized ``torch.distributed`` process group.
    """
    if not distributed:
        if process_group is not None:
            raise ValueError("process_group is used only with distributed=True")
        return
    if not batch:
        raise ValueError(
            "distributed=True needs batch=True: it all-reduces the whole-batch sums (I, P, T) so that every "
            "rank computes the Dice of the global batch; a per-image loss (batch=False) has nothing to share "
            "between ranks")
    if not _dist_ready():
        raise ValueError(
            "distributed=True needs an initialized torch.distributed process group (call "
            "torch.distributed.init_process_group, e.g. in a script launched by torchrun); "
            "without one, use distributed=False")


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(x: Tensor, process_group) -> Tensor:
    """Differentiable sum of ``x`` over the ranks of ``process_group`` (None: the world).

    Backward all-reduces the incoming gradient (a sum over ranks), as a sum's derivative must: each
    rank's stats feed the loss of every rank.  Uses the functional collective where it carries a
    gradient (torch >= 2.14, also traceable by torch.compile), else
    ``torch.distributed.nn.functional.all_reduce`` (deprecated from torch 2.14 on).
    """
    import torch.distributed as dist

    group = dist.group.WORLD if process_group is None else process_group
    fc = _functional_collectives()
    if fc is not None:
        return fc.all_reduce(x, "sum", group)
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM, group=group)


def _functional_collectives():
    try:
        import torch.distributed._functional_collectives as fc
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return fc if hasattr(fc, "all_reduce_backward") else None  # autograd support: torch >= 2.14


def batch_sums(*tensors: Tensor, distributed: bool = False, process_group=None) -> list:
    """Each (N, ...) tensor summed over the batch (dim 0, kept), and with ``distributed`` over all ranks.

    The stats of a batch loss and any counts it normalizes by go in together: with ``distributed``
    they travel in one all-reduce (cast to the first tensor's dtype).  The all-reduce is
    differentiable (its backward sums the gradients of all ranks), so a loss computed from the result
    is the same on every rank and its gradient, averaged over ranks by DDP, is exactly the gradient of
    that loss on the concatenated batch: each rank's stats receive W times the shared gradient, which
    DDP's division by W cancels (no loss scaling is needed, for any per-rank batch sizes).
    A ``None`` in ``tensors`` (an optional sum the loss does not need) comes back as ``None``.
    """
    sums = [t.sum(0, keepdim=True) for t in tensors if t is not None]
    if distributed:
        dtype = sums[0].dtype
        flat = _all_reduce_sum(torch.cat([t.reshape(-1).to(dtype) for t in sums]), process_group)
        out, start = [], 0
        for t in sums:
            out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
            start += t.numel()
        sums = out
    it = iter(sums)
    return [None if t is None else next(it) for t in tensors]


def _stats(input, target, *, activation, power, ignore_index, backend, pixel_loss="none", gamma=2.0) -> Tensor:
    """Validated call of the operator; returns (N, 3, C), or (N, 5, C) with a pixel loss."""
    ignore_index = ops.as_ignore_index(ignore_index)
    ops.check_inputs(input, target, activation, power, ignore_index, pixel_loss, gamma)
    by_count = ops.labels_checked_by_count(input, target, ignore_index)
    if not by_count:
        ops.check_target_values(input, target, ignore_index)
    stats = ops.dice_stats(input, target, activation, power, ignore_index, backend, pixel_loss, gamma)
    if by_count:
        ops.check_labels_by_count(stats, input, target, ignore_index)
    return stats


def _class_slice(x: Tensor, include_background: bool) -> Tensor:
    """Drop class 0 (last dim) unless include_background; C == 1 keeps its only channel."""
    if include_background:
        return x
    if x.shape[-1] == 1:
        warnings.warn("include_background=False is ignored for single-channel input", stacklevel=3)
        return x
    return x[..., 1:]


def check_class_weights(class_weights) -> Optional[Tensor]:
    """``class_weights`` as a 1-D float64 tensor (on its device), validated; None stays None.

    Weights must be finite and >= 0.  Host data (sequences, numpy, CPU tensors) is checked here;
    CUDA tensors are checked on the device (no host synchronization).
    """
    if class_weights is None:
        return None
    if isinstance(class_weights, Tensor):
        w = class_weights.detach()
        if w.is_complex() or w.dtype == torch.bool:
            raise TypeError(f"class_weights must be real numbers, got dtype {w.dtype}")
        w = w.to(torch.float64)
    else:
        try:
            w = torch.as_tensor(np.asarray(class_weights, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError(f"class_weights must be a 1-D sequence of numbers, got {class_weights!r}") from None
    if w.dim() != 1:
        raise ValueError(f"class_weights must be 1-D (one weight per class), got shape {tuple(w.shape)}")
    if not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active():
        bad = ~(torch.isfinite(w) & (w >= 0)).all()
        ops._data_check(bad, lambda on_device=False: "class_weights must be finite and >= 0"
                        + ("" if on_device else f", got {w.tolist()}"))
    return w


def _class_weights(class_weights: Weights, num_classes: int, include_background: bool, like: Tensor):
    """Class weights as a tensor for the kept classes (``like``'s dtype and device), or None.

    Accepts length C, or length C-1 when ``include_background=False`` (the MONAI convention).
    """
    w = check_class_weights(class_weights)
    if w is None:
        return None
    kept = num_classes if include_background or num_classes == 1 else num_classes - 1
    if w.numel() == num_classes and kept != num_classes:
        w = w[1:]
    if w.numel() != kept:
        allowed = f"{num_classes}" + ("" if kept == num_classes else f" or {kept}")
        raise ValueError(f"class_weights must have length {allowed} (C={num_classes}), got {w.numel()}")
    return w.to(dtype=like.dtype, device=like.device)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _ratio_to_loss(score: Tensor, log_loss: bool) -> Tensor:
    return -torch.log(score) if log_loss else 1.0 - score


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def dice_loss(
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
) -> Tensor:
    """Soft Dice loss, one ratio per image and class.

    ::

        dice[n,k] = (2 I[n,k] + smooth_nr) / (P[n,k] + T[n,k] + smooth_dr)
        loss[n,k] = w[k] * (1 - dice[n,k])        (or  -w[k] * log(dice[n,k])  with log_loss)

    With ``batch=True`` the sums run over the whole batch first (one ratio per class).

    Args:
        input: (N, C, *spatial) logits (probabilities with ``activation="none"``).
        target: labels (N, *spatial) / (N, 1, *spatial) or float (N, C, *spatial).
        squared: use q = 2 (sum p^2 + sum t^2 in the denominator, V-Net).
        class_weights: length C (or C-1 without background); the loss of class k is multiplied by it.
        reduction: "mean" / "sum" over the (N, C) losses, or "none" returning (N, C) ((C,) with batch).
        distributed: with ``batch=True``, sum the stats over all ranks of ``process_group`` (default:
            the world) before the ratio: every rank gets the loss of the global batch (see
            :func:`batch_sums`).

    Returns:
        A scalar, or the unreduced losses.
    """
    smooth_nr, smooth_dr = _check_options(smooth_nr, smooth_dr, reduction)
    _check_loss_activation(activation)
    check_distributed(distributed, batch, process_group)
    s = _stats(input, target, activation=activation, power=2 if squared else 1,
               ignore_index=ignore_index, backend=backend)
    if batch:
        (s,) = batch_sums(s, distributed=distributed, process_group=process_group)
    return _dice_epilogue(s, batch=batch, include_background=include_background, smooth_nr=smooth_nr,
                          smooth_dr=smooth_dr, log_loss=log_loss, class_weights=class_weights, reduction=reduction)


def _dice_epilogue(s: Tensor, *, batch, include_background, smooth_nr, smooth_dr, log_loss, class_weights,
                   reduction) -> Tensor:
    """:func:`dice_loss` from the stats (N, >=3, C), already summed over the batch (1, ., C) with ``batch``."""
    num_classes = s.shape[-1]
    s = _class_slice(s, include_background)
    i, p, t = s.unbind(1)[:3]  # one autograd node (3 selects: a zeros tensor and a copy each, per step)
    loss = _ratio_to_loss((2.0 * i + smooth_nr) / (p + t + smooth_dr), log_loss)
    w = _class_weights(class_weights, num_classes, include_background, loss)
    if w is not None:
        loss = loss * w
    if batch:
        loss = loss.squeeze(0)
    return _reduce(loss, reduction)


def dice_score(
    input: Tensor,
    target: Tensor,
    *,
    activation: str = "softmax",
    hard: bool = False,
    squared: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    include_background: bool = True,
    ignore_index: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Dice coefficient per image and class, (N, C) ((C,) with ``batch=True``).

    ``dice = (2 I + smooth_nr) / (P + T + smooth_dr)``.  With ``hard=True`` the prediction is first
    made 0/1, the usual evaluation metric: the argmax over channels for softmax and ``sigmoid > 0.5``
    (``input > 0``) for sigmoid, both fused in the operator (``activation="argmax"`` /
    ``"threshold"``, which may also be passed directly); ``input > 0.5`` for ``activation="none"``.
    """
    if hard:
        activation = {"softmax": "argmax", "sigmoid": "threshold"}.get(activation, activation)
        if activation == "none":
            with torch.no_grad():
                input = (input > 0.5).to(input.dtype)  # keeps the input's precision
    smooth_nr, smooth_dr = _check_options(smooth_nr, smooth_dr, "none")
    s = _stats(input, target, activation=activation, power=2 if squared else 1,
               ignore_index=ignore_index, backend=backend)
    if batch:
        s = s.sum(0)
    s = _class_slice(s, include_background)
    i, p, t = s.unbind(-2)
    return (2.0 * i + smooth_nr) / (p + t + smooth_dr)


def generalized_dice_loss(
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
) -> Tensor:
    """Generalized Dice loss (Sudre et al. 2017): one ratio per image over all classes.

    ::

        V[n,k]  = sum_m t                         (linear target volume, also for squared=True)
        w[n,k]  = 1/V^2 ("square") | 1/V ("simple") | 1 ("uniform"), times class_weights[k]
        gdice[n] = (2 sum_k w I + smooth_nr) / (sum_k w (P + T) + smooth_dr)
        loss[n]  = 1 - gdice[n]                   (or -log(gdice[n]) with log_loss)

    A class absent from an image (V = 0) gets, with ``absent_weight="max"``, the largest finite weight
    of that image (MONAI's rule; with ``batch=True``, of the batch), or 0 with ``"zero"``.  The weights
    are constants for autograd.  ``reduction="none"`` returns (N,) (a 0-dim tensor with ``batch``).
    With ``batch=True, distributed=True`` the sums and the volumes are global (all ranks of
    ``process_group``): the weights and the absent-class rule use the volumes of the global batch.
    """
    smooth_nr, smooth_dr = _check_options(smooth_nr, smooth_dr, reduction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if absent_weight not in ABSENT:
        raise ValueError(f"absent_weight must be one of {ABSENT}, got {absent_weight!r}")
    _check_loss_activation(activation)
    check_distributed(distributed, batch, process_group)
    power = 2 if squared else 1
    s = _stats(input, target, activation=activation, power=power, ignore_index=ignore_index, backend=backend)
    vol = linear_volume(s, target, power)
    if batch:
        s, vol = batch_sums(s, vol, distributed=distributed, process_group=process_group)
    return _generalized_epilogue(s, vol, batch=batch, include_background=include_background, smooth_nr=smooth_nr,
                                 smooth_dr=smooth_dr, log_loss=log_loss, class_weights=class_weights,
                                 reduction=reduction, weighting=weighting, absent_weight=absent_weight)


def linear_volume(s: Tensor, target: Tensor, power: int) -> Optional[Tensor]:
    """(N, C) sum_m t where it differs from the stats' T row (soft targets with q = 2), else None."""
    if power == 2 and target.is_floating_point():
        # soft targets: sum t != sum t^2, and the weights are defined on the linear volume
        return target.detach().to(s.dtype).reshape(s.shape[0], s.shape[2], -1).sum(-1)  # also 0 spatial dims
    return None


def _generalized_epilogue(s: Tensor, vol: Optional[Tensor], *, batch, include_background, smooth_nr, smooth_dr,
                          log_loss, class_weights, reduction, weighting, absent_weight) -> Tensor:
    """:func:`generalized_dice_loss` from the stats (N, >=3, C) and the linear volumes (or None: T),
    both already summed over the batch with ``batch``."""
    num_classes = s.shape[-1]
    s = _class_slice(s, include_background)
    i, p, t = s.unbind(1)[:3]
    vol = t.detach() if vol is None else _class_slice(vol, include_background).detach()

    if weighting == "uniform":
        w = torch.ones_like(vol)
    else:
        w = vol.reciprocal() if weighting == "simple" else (vol * vol).reciprocal()
        absent = torch.isinf(w)
        w = w.masked_fill(absent, 0.0)
        if absent_weight == "max":
            w = torch.where(absent, w.amax(dim=-1, keepdim=True), w)
    cw = _class_weights(class_weights, num_classes, include_background, w)
    if cw is not None:
        w = w * cw
    score = (2.0 * (w * i).sum(-1) + smooth_nr) / ((w * (p + t)).sum(-1) + smooth_dr)
    loss = _ratio_to_loss(score, log_loss)
    if batch:
        loss = loss.squeeze(0)
    return _reduce(loss, reduction)


def tversky_loss(
    input: Tensor,
    target: Tensor,
    *,
    activation: str = "softmax",
    alpha: float = 0.5,
    beta: float = 0.5,
    gamma: float = 1.0,
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
) -> Tensor:
    """Tversky loss (and focal Tversky with ``gamma``), one index per image and class.

    ::

        TP = I,  FP = P - I,  FN = T - I                     (linear sums, q = 1)
        ti[n,k]   = (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr)
        loss[n,k] = w[k] * (1 - ti)^gamma                    (or -w[k] log(ti) with log_loss)

    alpha = beta = 0.5 is Dice, alpha = beta = 1 is Jaccard (IoU); alpha weighs false positives.
    Shapes, ``reduction`` and ``distributed`` as in :func:`dice_loss`.
    """
    smooth_nr, smooth_dr = _check_options(smooth_nr, smooth_dr, reduction)
    alpha, beta = _number("alpha", alpha), _number("beta", beta)
    if alpha == 0 and beta == 0:
        raise ValueError("alpha and beta must not both be 0 (the Tversky index would be constant)")
    gamma = _number("gamma", gamma, positive=True)  # gamma = 0 would make the loss constant
    if log_loss and gamma != 1:
        raise ValueError("log_loss=True is defined for gamma=1 only")
    _check_loss_activation(activation)
    check_distributed(distributed, batch, process_group)
    s = _stats(input, target, activation=activation, power=1, ignore_index=ignore_index, backend=backend)
    if batch:
        (s,) = batch_sums(s, distributed=distributed, process_group=process_group)
    s = _class_slice(s, include_background)
    i, p, t = s.unbind(1)
    ti = (i + smooth_nr) / (i + alpha * (p - i) + beta * (t - i) + smooth_dr)
    if log_loss:
        loss = -torch.log(ti)
    elif gamma == 1:
        loss = 1.0 - ti
    else:
        # rounding can push P - I or T - I a hair below 0 and ti above 1
        loss = (1.0 - ti).clamp_min(0.0) ** gamma
    w = _class_weights(class_weights, input.shape[1], include_background, loss)
    if w is not None:
        loss = loss * w
    if batch:
        loss = loss.squeeze(0)
    return _reduce(loss, reduction)
