"""nnU-Net v2: ``MemoryEfficientSoftDiceLoss``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ._common import _activate, _labels_one_hot, _is_binary, _float_target
from ._registry import Equivalent, PresetInfo, _register


class _NnUNetSoftDice(nn.Module):
    def __init__(self, apply_nonlin, batch_dice, do_bg, smooth, ddp, backend, clip_tp=None):
        super().__init__()
        if apply_nonlin not in (None, "softmax", "sigmoid") and not callable(apply_nonlin):
            raise TypeError(f"apply_nonlin must be None, 'softmax', 'sigmoid' or a callable, got {apply_nonlin!r}")
        self.apply_nonlin, self.batch_dice, self.do_bg, self.smooth, self.ddp = (
            apply_nonlin, batch_dice, do_bg, smooth, ddp)
        self.clip_tp = clip_tp  # SoftDiceLoss only (MemoryEfficientSoftDiceLoss has none)
        self.backend = backend

    def _check_ddp(self) -> None:
        if self.ddp and self.batch_dice and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise NotImplementedError("ddp=True with batch_dice all-gathers the sums across processes (nnU-Net's "
                                      "AllGatherGrad); this preset sums within one process only")

    def forward(self, x: Tensor, y: Tensor, loss_mask: Optional[Tensor] = None) -> Tensor:
        self._check_ddp()
        c = x.shape[1]
        if x.dim() != y.dim():
            y = y.view((y.shape[0], 1, *y.shape[1:]))
        one_hot = all(i == j for i, j in zip(x.shape, y.shape))
        labels = None
        if not one_hot:
            labels = y.long()
            ops.check_target_values(x, labels, None)  # nnU-Net's scatter_ rejects other labels
        act = self.apply_nonlin if isinstance(self.apply_nonlin, str) else "none"
        # a custom callable, or softmax over one channel (the operator needs C >= 2): unfused
        fused = not callable(self.apply_nonlin) and not (act == "softmax" and c == 1)
        if loss_mask is not None:
            binary_mask = loss_mask.dtype == torch.bool or _is_binary(loss_mask)
            fused = fused and labels is not None and binary_mask
        if fused:
            ii = None
            t = labels if labels is not None else _float_target(y, x)
            if loss_mask is not None:
                # a 0/1 loss mask on labels is an ignore value: excluded from all three sums
                ii = -1
                t = labels.masked_fill(~loss_mask.to(torch.bool).expand_as(labels), ii)
            s = ops.dice_stats(x, t, act, 1, ii, self.backend)
            intersect, sum_pred, sum_gt = s.unbind(1)
        else:
            p = self.apply_nonlin(x) if callable(self.apply_nonlin) else _activate(x, act)
            t = _labels_one_hot(labels[:, 0], c, p.dtype) if labels is not None else _float_target(y, p).to(p.dtype)
            if loss_mask is None:
                s = ops.dice_stats(p, t, "none", 1, None, self.backend)
                intersect, sum_pred, sum_gt = s.unbind(1)
            else:
                m = loss_mask.to(p.dtype)
                s = ops.dice_stats(p * m, t, "none", 1, None, self.backend)  # sum p t m, sum p m
                intersect, sum_pred = s[:, 0], s[:, 1]
                sum_gt = (t * m).to(s.dtype).reshape(s.shape[0], c, -1).sum(-1)
        return self._from_sums(intersect, sum_pred, sum_gt)

    def _from_sums(self, intersect: Tensor, sum_pred: Tensor, sum_gt: Tensor) -> Tensor:
        """-mean(dc) from the (N, C) sums (also used by the compound presets).

        SoftDiceLoss's ``2 tp + fp + fn`` is ``P + T``; with ``clip_tp`` its tp is clipped first, so the
        denominator is ``2 clip(tp) + (P - I) + (T - I)``.
        """
        if not self.do_bg:
            intersect, sum_pred, sum_gt = intersect[:, 1:], sum_pred[:, 1:], sum_gt[:, 1:]
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        if self.clip_tp is not None:
            tp = torch.clip(intersect, min=self.clip_tp)
            dc = (2 * tp + self.smooth) / torch.clip(2 * tp + (sum_pred - intersect) + (sum_gt - intersect)
                                                     + self.smooth, 1e-8)
        else:
            dc = (2 * intersect + self.smooth) / torch.clip(sum_gt + sum_pred + self.smooth, 1e-8)
        return -dc.mean()


@_register(PresetInfo(
    name="nnunet_soft_dice",
    original="nnU-Net v2 `MemoryEfficientSoftDiceLoss` (softmax)",
    source="nnunetv2/training/loss/dice.py (MemoryEfficientSoftDiceLoss, lines 58–119 at 0e49508)",
    call="`loss(x, y, loss_mask=None)`: x (N, C, *) logits, y labels (N, 1, *)/(N, *) or one-hot",
    activation="softmax (`apply_nonlin`)",
    denominator="Σp + Σt",
    smoothing="`smooth`=1 on 2I and on the denominator (clipped ≥ 1e-8), per class",
    weights="none",
    absent="nothing special (smoothing only)",
    sums="per image and class (`batch_dice`: over the batch)",
    loss="−Dice (in [−1, 0]), mean over images and classes",
    equivalent=Equivalent("DiceLoss", dict(smooth_nr=1.0, smooth_dr=1.0), offset=-1.0),
))
def nnunet_soft_dice(apply_nonlin="softmax", batch_dice: bool = False, do_bg: bool = True, smooth: float = 1.0,
                     ddp: bool = True, *, backend: str = "auto") -> nn.Module:
    """nnU-Net v2's ``MemoryEfficientSoftDiceLoss`` with ``apply_nonlin=softmax_helper_dim1``.

    ``forward(x, y, loss_mask=None)``: x (N, C, *spatial) logits; y labels (N, 1, *) or (N, *), or a
    target shaped like x (then used as given, "one-hot"); loss_mask (N, 1, *) marks valid pixels.
    Per image and class (over the batch with ``batch_dice``; class 0 dropped unless ``do_bg``)::

        dc   = (2 I + smooth) / clip(T + P + smooth, 1e-8)
        loss = -mean(dc)                      (note the sign: -Dice, not 1 - Dice)

    nnU-Net sums in float32 (``sum(..., dtype=torch.float32)``); the preset sums as the operator does,
    so float64 input stays float64.

    ``apply_nonlin``: "softmax" (nnU-Net's ``softmax_helper_dim1``, default), "sigmoid" (region-based
    training), None (probabilities) or any callable (unfused path).  A 0/1 ``loss_mask`` with label
    targets is fused as an ignore value; other masks take the unfused path (``sum_gt`` of the masked
    target in PyTorch).  ``ddp`` is accepted; multi-process all-gathering of the batch sums is not
    reproduced (raises in a multi-process run with ``batch_dice``).
    """
    return _NnUNetSoftDice(apply_nonlin, batch_dice, do_bg, smooth, ddp, backend)
