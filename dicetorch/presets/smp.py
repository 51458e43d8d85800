"""segmentation_models_pytorch 0.6: ``DiceLoss`` and ``TverskyLoss``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ._common import _activate, _labels_one_hot, _is_binary, _l1_is_i, _l1_stats, _float_target
from ._registry import Equivalent, PresetInfo, _register


_SMP_MODES = ("binary", "multiclass", "multilabel")


class _SmpDice(nn.Module):
    def __init__(self, mode, classes, log_loss, from_logits, smooth, ignore_index, eps, class_weights,
                 alpha, beta, gamma, tversky, backend):
        super().__init__()
        if mode not in _SMP_MODES:
            raise ValueError(f"mode must be one of {_SMP_MODES}, got {mode!r}")
        if class_weights is not None and mode == "binary":
            raise ValueError("class_weights are not supported with mode=binary")
        if classes is not None:
            if mode == "binary":
                raise ValueError("Masking classes is not supported with mode=binary")
            classes = torch.as_tensor(classes, dtype=torch.long)
        self.mode, self.classes, self.log_loss, self.from_logits = mode, classes, log_loss, from_logits
        self.smooth, self.eps, self.ignore_index = smooth, eps, ignore_index
        self.class_weights = torch.as_tensor(class_weights, dtype=torch.float) if class_weights is not None else None
        self.alpha, self.beta, self.gamma, self.tversky = alpha, beta, gamma, tversky
        self.backend = backend

    def _sums(self, y_pred: Tensor, y_true: Tensor):
        """(tp, P, T), each (C,): sums over the batch and pixels, as smp's dims=(0, 2)."""
        bs = y_true.size(0)
        ii = self.ignore_index
        if self.mode == "multiclass":
            act = "softmax" if self.from_logits else "none"
        else:
            act = "sigmoid" if self.from_logits else "none"
        if self.mode == "binary":
            x = y_pred.reshape(bs, 1, -1)
            t = y_true.reshape(bs, -1)
            c = 1
        else:
            c = y_pred.size(1)
            x = y_pred.reshape(bs, c, -1)
            t = y_true.reshape(bs, -1) if self.mode == "multiclass" else y_true.reshape(bs, c, -1)

        labels, mask, tf = None, None, None
        if self.mode == "multiclass":
            labels = t.long() if t.dtype != torch.long else t
            ops.check_target_values(x, labels, ii)  # F.one_hot rejects labels outside [0, C)
        elif ii is not None:
            rest = t[t != ii]
            if self.mode == "binary" and not t.is_floating_point() and _is_binary(rest):
                labels = t  # 0/1 labels with an ignore value: fused (C == 1 matches label 1)
            else:
                mask = (t != ii).to(x.dtype)  # smp multiplies both tensors by the mask (per element)
                tf = _float_target(t, x).to(x.dtype).reshape(bs, c, -1)
        if labels is None and tf is None:
            tf = _float_target(t, x).reshape(bs, c, -1)

        # smp's score is the L1 form (P + T - sum|p - t|) / 2: I for 0/1 targets and p in (0, 1), which
        # sigmoid and softmax give (up to saturation, where their own derivative vanishes)
        if self.mode == "multiclass" and c == 1 and act == "softmax":
            act, x = "none", y_pred.reshape(bs, c, -1).log_softmax(1).exp()  # softmax over one channel
        if mask is None and act != "none" and (labels is not None or _is_binary(tf)):
            s = ops.dice_stats(x, labels if labels is not None else tf, act, 1,
                               ii if labels is not None else None, self.backend)
            tp, p_sum, t_sum = s.sum(0).unbind(0)
            return tp, p_sum, t_sum
        p = _activate(x, act)
        if labels is not None:
            valid = labels != ii if ii is not None else torch.ones_like(labels, dtype=torch.bool)
            if self.mode == "binary":  # 0/1 labels of the single channel
                tf = (labels.masked_fill(~valid, 0).to(p.dtype) * valid).unsqueeze(1)
            else:
                tf = _labels_one_hot(labels.masked_fill(~valid, 0), c, p.dtype) * valid.unsqueeze(1)
            p = p * valid.unsqueeze(1)
        if mask is not None:
            p, tf = p * mask, tf * mask
        tf = tf.to(p.dtype)
        if _l1_is_i(p, tf, norms=False):
            s = ops.dice_stats(p, tf, "none", 1, None, self.backend)
            tp, p_sum, t_sum = s.sum(0).unbind(0)
        else:
            tp, p_sum, t_sum = (v.sum(0) for v in _l1_stats(p, tf, self.backend, norms=False))
        return tp, p_sum, t_sum

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        if y_true.size(0) != y_pred.size(0):
            raise ValueError(f"batch sizes differ: y_pred {tuple(y_pred.shape)}, y_true {tuple(y_true.shape)}")
        tp, p_sum, t_sum = self._sums(y_pred, y_true)
        alpha, beta = (self.alpha, self.beta) if self.tversky else (0.5, 0.5)
        fp, fn = p_sum - tp, t_sum - tp
        scores = (tp + self.smooth) / (tp + alpha * fp + beta * fn + self.smooth).clamp_min(self.eps)
        loss = -torch.log(scores.clamp_min(self.eps)) if self.log_loss else 1.0 - scores
        # smp: a class without true pixels in the batch contributes 0 (and still counts in the mean)
        loss = loss * (t_sum > 0).to(loss.dtype)
        if self.classes is not None:
            loss = loss[self.classes.to(loss.device)]
        if self.class_weights is not None:
            w = self.class_weights.to(loss.device)
            if self.classes is not None:
                w = w[self.classes.to(loss.device)]
            out = (loss * w).sum() / w.sum()
        else:
            out = loss.mean()
        return out ** self.gamma if self.tversky else out


_SMP_CALL = ("`loss(y_pred, y_true)`: y_pred (N, C, *) logits; y_true labels (N, *) (multiclass), "
             "(N, C, *) (multilabel) or (N, 1, *)/(N, *) (binary)")


@_register(PresetInfo(
    name="smp_dice",
    original="segmentation_models_pytorch 0.6 `smp.losses.DiceLoss`",
    source="segmentation_models_pytorch/losses/dice.py, losses/_functional.py (soft_tversky_score)",
    call=_SMP_CALL,
    activation="softmax (multiclass) / sigmoid (binary, multilabel); none with `from_logits=False`",
    denominator="Σp + Σt (L1 form (P+T−Σ|p−t|)/2 for I)",
    smoothing="`smooth`=0 on I and on (P+T)/2; denominator clamped ≥ `eps`=1e-7",
    weights="`class_weights`: weighted mean, normalized by Σw",
    absent="a class absent from the batch's target contributes 0, still counted in the mean",
    sums="over the batch: one ratio per class",
    loss="1 − Dice (`log_loss`: −log), mean over classes",
    equivalent=Equivalent("DiceLoss", dict(batch=True, smooth_nr=0.0, smooth_dr=0.0), preset_args=("multiclass",),
                          when="every class occurs in the batch (smp gives an absent class loss 0, not 1 − Dice)"),
))
def smp_dice(mode: str, classes: Optional[Sequence[int]] = None, log_loss: bool = False, from_logits: bool = True,
             smooth: float = 0.0, ignore_index: Optional[int] = None, eps: float = 1e-7,
             class_weights: Optional[Sequence[float]] = None, *, backend: str = "auto") -> nn.Module:
    """``segmentation_models_pytorch.losses.DiceLoss`` (smp 0.6) with all of its arguments.

    ``forward(y_pred, y_true)``; sums over the batch and pixels, one score per class::

        tp = (P + T - sum|p - t|) / 2       (= I for 0/1 targets and p in [0, 1])
        score_k = (tp + smooth) / clamp_min(tp + (P - tp)/2 + (T - tp)/2 + smooth, eps)
        loss_k  = (1 - score_k) * [T_k > 0]           (log_loss: -log(clamp_min(score_k, eps)))
        loss    = mean_k loss_k[classes]  or  sum_k w_k loss_k / sum_k w_k  (class_weights)

    Paths: with ``from_logits`` fused for multiclass labels (with ``ignore_index``), binary 0/1 labels
    with ``ignore_index``, and 0/1 float targets; unfused for ``ignore_index`` on float targets or in
    multilabel mode (smp's per-element mask) and for ``from_logits=False``; the L1 sum is computed in
    PyTorch (reference path) for soft targets, probabilities outside [0, 1], and ties p == t (where the
    kink of |p - t| gives smp a different gradient than I would).
    """
    return _SmpDice(mode, classes, log_loss, from_logits, smooth, ignore_index, eps, class_weights,
                    0.5, 0.5, 1.0, False, backend)


@_register(PresetInfo(
    name="smp_tversky",
    original="segmentation_models_pytorch 0.6 `smp.losses.TverskyLoss`",
    source="segmentation_models_pytorch/losses/tversky.py, losses/_functional.py (soft_tversky_score)",
    call=_SMP_CALL,
    activation="as `smp_dice`",
    denominator="TP + α·FP + β·FN (α = β = 0.5), clamped ≥ `eps`",
    smoothing="`smooth`=0 on TP and on the denominator",
    weights="`class_weights`: weighted mean, normalized by Σw",
    absent="as `smp_dice`",
    sums="over the batch: one ratio per class",
    loss="(mean over classes of 1 − TI)^γ — γ after the class mean",
    equivalent=Equivalent("TverskyLoss", dict(batch=True, smooth_nr=0.0, smooth_dr=0.0), preset_args=("multiclass",),
                          when="γ = 1 and every class occurs in the batch (smp gives an absent class loss 0 and "
                               "applies γ to the class mean, dicetorch per class)"),
))
def smp_tversky(mode: str, classes: Optional[Sequence[int]] = None, log_loss: bool = False, from_logits: bool = True,
                smooth: float = 0.0, ignore_index: Optional[int] = None, eps: float = 1e-7, alpha: float = 0.5,
                beta: float = 0.5, gamma: float = 1.0, class_weights: Optional[Sequence[float]] = None,
                *, backend: str = "auto") -> nn.Module:
    """``segmentation_models_pytorch.losses.TverskyLoss`` (smp 0.6) with all of its arguments.

    As :func:`smp_dice` with ``score_k = (tp + smooth) / clamp_min(tp + alpha fp + beta fn + smooth, eps)``
    and the aggregated class mean raised to ``gamma`` (after the mean, as smp does).
    """
    return _SmpDice(mode, classes, log_loss, from_logits, smooth, ignore_index, eps, class_weights,
                    alpha, beta, gamma, True, backend)
