"""Tensor helpers shared by the presets (activation, one-hot, the soft-label L1 sums)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops


def _activate(x: Tensor, activation: str) -> Tensor:
    """The activation in PyTorch (unfused paths), over dim 1."""
    if activation == "softmax":
        return torch.softmax(x, 1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def _labels_one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(N, *spatial) labels -> (N, C, *spatial) one-hot by comparison (a non-class label gives zeros)."""
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, *([1] * (labels.dim() - 1)))
    return (labels.unsqueeze(1) == classes).to(dtype)


def _single_class_labels(labels: Tensor, ignore_index: Optional[int]):
    """Labels for a one-channel input whose original one-hot encodes label 0 into that channel.

    With C == 1 the operator matches label 1 (binary segmentation); kornia's one-hot puts label 0
    there, so shift the labels (and the ignore value) by one.
    """
    return labels + 1, (None if ignore_index is None else ignore_index + 1)


def _is_binary(t: Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def _in_unit_interval(p: Tensor) -> bool:
    return bool(((p >= 0) & (p <= 1)).all())


def _l1_is_i(p: Tensor, t: Tensor, norms: bool) -> bool:
    """Whether the soft-label L1 form equals the I form in value *and* gradient for these tensors.

    The values agree for 0/1 targets and p in [0, 1] (|p - t| = p + t - 2 p t).  The gradients also
    agree except where |.| is at its kink: ties p == t (and p == 0 for MONAI's L1 norm of p).
    """
    if not (_is_binary(t) and _in_unit_interval(p)) or bool((p == t).any()):
        return False
    return not (norms and bool((p == 0).any()))


def _l1_stats(p: Tensor, t: Tensor, backend: str, norms: bool):
    """(I_soft, P, T), each (N, C), of the soft-label formulation (reference path for one sum).

    ``I_soft = (P + T - sum_m |p - t|) / 2``; P and T come from the operator (of |p| and |t| with
    ``norms``, as MONAI's L1 norms; smp sums p and t as they are), the L1 sum from PyTorch.
    """
    t = t.to(p.dtype)
    s = ops.dice_stats(p.abs() if norms else p, t.abs() if norms else t, "none", 1, None, backend)
    n, c = p.shape[0], p.shape[1]
    acc = s.dtype
    d = (p.to(acc) - t.to(acc)).abs().reshape(n, c, -1).sum(-1)
    return (s[:, 1] + s[:, 2] - d) / 2, s[:, 1], s[:, 2]


def _float_target(target: Tensor, like: Tensor) -> Tensor:
    return target if target.is_floating_point() else target.to(like.dtype)
