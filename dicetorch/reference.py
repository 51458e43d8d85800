"""Plain-PyTorch reference of the ``dice_stats`` operator: the oracle every kernel is tested against.

Both functions work on the canonical layout that :mod:`dicetorch.ops` hands to every backend:

* ``input``  -- (N, C, M) float logits or probabilities (any strides, any float dtype);
* ``target`` -- (N, M) integer labels, or (N, C, M) float targets with ``input``'s dtype.

Label semantics (shared by all backends): channel ``k`` matches label value ``k``; with C == 1 the
single channel matches label value 1 (binary segmentation).  Labels are *compared* with channel
indices, never used as addresses, so an out-of-range label simply matches no channel.  Pixels whose
label equals ``ignore_index`` are left out of every sum and receive zero gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["activate", "one_hot", "dice_stats_reference", "dice_stats_backward_reference", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(x: Tensor, activation: str) -> Tensor:
    """Apply ``activation`` ("softmax" over dim 1, "sigmoid", "none") in the accumulation dtype."""
    x = x.to(acc_dtype(x.dtype))
    if activation == "softmax":
        return torch.softmax(x, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(N, M) labels -> (N, C, M) one-hot by comparison (C == 1: foreground is label 1)."""
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1)
    if num_classes == 1:
        classes = classes + 1
    return (labels.unsqueeze(1) == classes).to(dtype)


def _target_and_mask(input: Tensor, target: Tensor, ignore_index: Optional[int]):
    """Float target (N, C, M) and pixel mask (N, 1, M) (or None) in the accumulation dtype."""
    dt = acc_dtype(input.dtype)
    if target.is_floating_point():
        return target.to(dt), None
    t = one_hot(target, input.shape[1], dt)
    if ignore_index is None:
        return t, None
    # compare as int64: torch would wrap ignore_index=-1 to 255 against uint8 labels
    return t, (target.long() != ignore_index).unsqueeze(1).to(dt)


def dice_stats_reference(
    input: Tensor, target: Tensor, activation: str, power: int, ignore_index: Optional[int]
) -> Tensor:
    """Per-class sums, differentiable by autograd.

    Returns (N, 3, C) in the accumulation dtype::

        stats[:, 0] = I = sum_m p * t
        stats[:, 1] = P = sum_m p ** power
        stats[:, 2] = T = sum_m t ** power

    with ``p = activation(input)`` and ignored pixels excluded.
    """
    p = activate(input, activation)
    t, mask = _target_and_mask(input, target, ignore_index)
    if mask is not None:
        p = p * mask
        t = t * mask
    pq = p if power == 1 else p * p
    tq = t if power == 1 else t * t
    return torch.stack([(p * t).sum(-1), pq.sum(-1), tq.sum(-1)], dim=1)


def dice_stats_backward_reference(
    grad: Tensor, input: Tensor, target: Tensor, activation: str, power: int, ignore_index: Optional[int]
) -> Tensor:
    """Hand-derived input gradient of :func:`dice_stats_reference` (no autograd).

    With gI = grad[:, 0], gP = grad[:, 1] (each (N, C)) and p = activation(input)::

        g     = gI * t + gP * power * p ** (power - 1)
        dL/dz = p * (g - sum_j p_j g_j)     (softmax, per pixel)
              = g * p * (1 - p)             (sigmoid)
              = g                           (none)

    and zero on ignored pixels.  Returns a tensor shaped and typed like ``input``.
    """
    p = activate(input, activation)
    t, mask = _target_and_mask(input, target, ignore_index)
    g_i = grad[:, 0].to(p.dtype).unsqueeze(-1)
    g_p = grad[:, 1].to(p.dtype).unsqueeze(-1)
    g = g_i * t + (g_p if power == 1 else 2.0 * g_p * p)
    if activation == "softmax":
        g = p * (g - (p * g).sum(dim=1, keepdim=True))
    elif activation == "sigmoid":
        g = g * p * (1.0 - p)
    if mask is not None:
        g = g * mask
    # keep the input's strides (channels-last gradient for channels-last input), as the fake kernel says
    return torch.empty_like(input).copy_(g)
