"""kornia 0.9: ``dice_loss`` / ``DiceLoss``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..reference import acc_dtype
from ._common import _single_class_labels
from ._registry import Equivalent, PresetInfo, _register


class _KorniaDice(nn.Module):
    def __init__(self, average, eps, weight, ignore_index, backend):
        super().__init__()
        if average not in ("micro", "macro"):
            raise ValueError(f"The `average` has to be one of {{'micro', 'macro'}}. Got: {average}")
        self.average, self.eps, self.ignore_index, self.backend = average, eps, ignore_index, backend
        if isinstance(weight, nn.Parameter):
            self.weight = weight
        else:
            self.register_buffer("weight", weight, persistent=False)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.dim() != 4:
            raise ValueError(f"Invalid pred shape, we expect BxNxHxW. Got: {pred.shape}")
        if not (pred.shape[0] == target.shape[0] and pred.shape[2:] == target.shape[1:]):
            raise ValueError(f"Expected target size {torch.Size((pred.shape[0], *pred.shape[2:]))}, got {target.shape}")
        if target.dtype != torch.int64:
            raise ValueError(f"labels must be of dtype torch.int64. Got: {target.dtype}")
        c = pred.shape[1]
        weight = self.weight
        if weight is not None:
            if not (weight.shape[0] == c and weight.numel() == c):
                raise ValueError(f"weight must hold one value per class of pred: got weight of shape {weight.shape} "
                                 f"for pred of shape {pred.shape}")
            if weight.device != pred.device:
                raise ValueError(f"weight and pred must be in the same device. Got: {weight.device} and {pred.device}")
        ii = self.ignore_index
        ops.check_target_values(pred, target, ii)  # kornia's one_hot rejects labels outside [0, C)
        if c == 1:
            if bool(((target != 0) & (target != ii if ii is not None else True)).any()):
                raise ValueError("Class values must be smaller than num_classes.")
            # softmax over one channel is 1 (a constant loss, zero gradient): unfused, as the operator needs
            # C >= 2; kornia's one-hot puts label 0 into the single channel
            x, act = torch.softmax(pred, 1), "none"
            target, ii = _single_class_labels(target, ii)
        else:
            x, act = pred, "softmax"
        s = ops.dice_stats(x, target, act, 1, ii, self.backend)
        w = s.new_ones(c) if weight is None else weight.detach().to(s.dtype)
        out_dtype = torch.promote_types(pred.dtype, pred.dtype if weight is None else weight.dtype)
        inter, card = s[:, 0], s[:, 1] + s[:, 2]
        if self.average == "micro":
            inter, card = (w * inter).sum(-1), (w * card).sum(-1)
        # an empty sum (all pixels ignored, or zero weights): score 0 with zero gradient, as kornia
        empty = card == 0
        score = (2.0 * inter / (card + self.eps).masked_fill(empty, 1.0)).masked_fill(empty, 0.0)
        loss = -score + 1.0
        if self.average == "macro":
            wp = w * (s[:, 2] > 0)  # only the classes present in the image's non-ignored target
            norm = wp.sum(-1)
            none = norm == 0
            loss = ((loss * wp).sum(-1) / norm.masked_fill(none, 1)).masked_fill(none, 1)
        return torch.mean(loss).to(torch.promote_types(out_dtype, acc_dtype(pred.dtype)))


@_register(PresetInfo(
    name="kornia_dice",
    original="kornia 0.9 `kornia.losses.dice_loss` / `DiceLoss`",
    source="kornia/losses/dice.py (dice_loss)",
    call="`loss(pred, target)`: pred (B, C, H, W) logits, target (B, H, W) int64 labels",
    activation="softmax",
    denominator="Σp + Σt",
    smoothing="`eps`=1e-8 on the denominator only",
    weights="`weight`: scales class terms in both sums (micro); weighted mean over present classes (macro)",
    absent="micro: pooled, nothing special; macro: left out of the class mean",
    sums="per image; micro pools classes into one ratio, macro one ratio per class",
    loss="1 − Dice, mean over images",
    equivalent=Equivalent("GeneralizedDiceLoss", dict(weighting="uniform", smooth_nr=0.0, smooth_dr=1e-8,
                                                      ignore_index=-100)),
))
def kornia_dice(average: str = "micro", eps: float = 1e-8, weight: Optional[Tensor] = None,
                ignore_index: Optional[int] = -100, *, backend: str = "auto") -> nn.Module:
    """kornia 0.9 ``DiceLoss(average, eps, weight, ignore_index)``.

    ``forward(pred, target)``: pred (B, C, H, W) logits, target (B, H, W) int64 labels.  Per image::

        micro:  loss = 1 - 2 sum_c w_c I_c / (sum_c w_c (P_c + T_c) + eps)
        macro:  loss = sum_c w_c [T_c > 0] (1 - 2 I_c / (P_c + T_c + eps)) / sum_c w_c [T_c > 0]

    then the mean over images.  An empty ratio (all pixels ignored) scores 0 with zero gradient, and a
    macro image without a present weighted class counts as loss 1, as kornia does.  The weights are
    constants (no gradient flows to a ``weight`` Parameter).
    """
    return _KorniaDice(average, eps, weight, ignore_index, backend)
