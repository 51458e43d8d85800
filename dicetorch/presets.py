"""Presets: the Dice losses of well-known libraries, papers and posts, reproduced on one operator.

"Which Dice is this?"  Every implementation below is a ratio of the same per-class sums ::

    I = sum_m p*t          P = sum_m p^q          T = sum_m t^q          (q = 2 if squared)

and they differ only in the activation, the power q, where the smoothing goes, the class weights,
what happens to a class absent from the target, whether sums run per image or over the batch, and
the sign.  Each function here returns an ``nn.Module`` that takes the original's constructor
arguments and its calling convention (argument order, layout, target type) and returns the same
loss value and input gradient; the sums come from :func:`dicetorch.ops.dice_stats` (one fused pass,
``backend="auto"`` unless a ``backend`` keyword says otherwise).  ``docs/which_dice.md`` tabulates
them; regenerate it with ``python -m dicetorch.presets --write``.

Conventions shared by all presets:

* **Precision.**  Sums are accumulated as :func:`~dicetorch.ops.dice_stats` does (float32 for
  fp16/bf16/fp32 input, float64 for float64), and the loss is returned in that dtype, also where the
  original would sum in half precision.
* **Fused path.**  When the original's activation is softmax, sigmoid or none and its target is
  labels, a one-hot/soft float target or labels with an ignore value, the operator sees the raw
  input and nothing of size N*C*M is materialized besides the gradient.
* **Unfused path.**  Where the original applies something the operator does not fuse (a custom
  activation callable, a mask on a float target, a per-element ignore value, a loss mask), the preset
  applies it in PyTorch exactly as the original does and calls ``dice_stats(..., activation="none")``
  on the result: the sums still come from the operator.
* **Reference path.**  The "soft label" L1 formulation (MONAI ``soft_label=True``, smp) needs
  ``sum_m |p - t|``, which is not a function of (I, P, T) unless t is 0/1 and p lies in [0, 1] (then
  ``sum |p - t| = P + T - 2 I``).  The presets check this; when it does not hold they compute that one
  sum in PyTorch (the docstrings say where).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops
from .reference import acc_dtype

__all__ = [
    "Equivalent",
    "PresetInfo",
    "PRESETS",
    "matlab",
    "monai_dice",
    "monai_generalized_dice",
    "monai_tversky",
    "smp_dice",
    "smp_tversky",
    "nnunet_soft_dice",
    "kornia_dice",
    "keras_dice",
    "vnet",
    "tf_dice",
    "mxnet_dice",
    "keras_generalized_dice_seed",
    "keras_generalized_dice_fixed",
    "which_dice_markdown",
]


# ----------------------------------------------------------------------------------------------
# Metadata (the "Which Dice is this?" table is generated from it)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Equivalent:
    """The dicetorch loss that reproduces a preset's default configuration.

    ``cls`` is a class name in :mod:`dicetorch` and ``kwargs`` its arguments; ``adapt`` says how the
    preset's inputs become (N, C, *spatial) for it; ``offset`` is added to its value; ``when`` states
    the condition under which the two agree (empty: always); ``exact=False`` marks a close but not
    exact match (``when`` says what differs); ``preset_args`` are the preset's required arguments.
    """

    cls: str
    kwargs: dict
    adapt: str = ""
    offset: float = 0.0
    when: str = ""
    exact: bool = True
    preset_args: tuple = ()

    def call(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        text = f"`dt.{self.cls}({args})`"
        if self.adapt:
            text += f" on {self.adapt}"
        if self.offset:
            text += f" {'+' if self.offset > 0 else '-'} {abs(self.offset):g}"
        return text

    def describe(self, preset: str) -> str:
        """The table cell."""
        head = f"for `{preset}({', '.join(map(repr, self.preset_args))})`: " if self.preset_args else ""
        if not self.exact:
            return f"{head}close, not exact: {self.call()} ({self.when})"
        return f"{head}exact{' when ' + self.when if self.when else ''}: {self.call()}"


@dataclasses.dataclass(frozen=True)
class PresetInfo:
    """What a preset reproduces, in the terms of the table (all for its default arguments)."""

    name: str
    original: str
    source: str
    call: str
    activation: str
    denominator: str
    smoothing: str
    weights: str
    absent: str
    sums: str
    loss: str
    equivalent: Equivalent


PRESETS: dict = {}


def _register(info: PresetInfo):
    def deco(fn):
        fn.info = info
        PRESETS[info.name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# MATLAB
# ----------------------------------------------------------------------------------------------
class _MatlabDice(nn.Module):
    def __init__(self, name: str, layout: str, backend: str):
        super().__init__()
        if layout not in ("HWKN", "NKHW"):
            raise ValueError(f"layout must be 'HWKN' (MATLAB) or 'NKHW' (PyTorch), got {layout!r}")
        self.name, self.layout, self.backend = name, layout, backend
        self.epsilon = 1e-8  # the layer's Constant property

    def _to_nk(self, y: Tensor, t: Tensor):
        if t.shape == y.shape and not t.is_floating_point():
            t = t.to(y.dtype)  # a logical/integer one-hot T
        if self.layout == "NKHW":
            return y, t
        if y.dim() < 3:
            raise ValueError(f"layout 'HWKN' needs Y shaped (*spatial, K, N), got {tuple(y.shape)}")
        nd = y.dim()
        y = y.permute(nd - 1, nd - 2, *range(nd - 2))
        if t.is_floating_point():
            t = t.permute(nd - 1, nd - 2, *range(nd - 2))
        else:  # labels (*spatial, N) or (*spatial, 1, N)
            t = t.movedim(-1, 0)
            if t.dim() == nd:
                t = t.squeeze(-1)
        return y, t

    def forward(self, Y: Tensor, T: Tensor) -> Tensor:  # noqa: N803 - MATLAB's names
        y, t = self._to_nk(Y, T)
        s = ops.dice_stats(y, t, "none", 2, None, self.backend)  # I, sum Y^2, sum T^2
        # W uses the linear volume sum(sum(T)); for one-hot T it equals sum T^2
        vol = s[:, 2]
        if t.is_floating_point():
            vol = t.detach().to(s.dtype).reshape(s.shape[0], s.shape[2], -1).sum(-1)
        w = 1.0 / vol.detach() ** 2  # an absent class: Inf, then Inf*0 = NaN, exactly as in MATLAB
        numer = 2 * (w * s[:, 0]).sum(-1) + self.epsilon
        denom = (w * (s[:, 1] + s[:, 2])).sum(-1) + self.epsilon
        dice = numer / denom
        return (1 - dice).sum() / y.shape[0]


@_register(PresetInfo(
    name="matlab",
    original="MATLAB `dicePixelClassificationLayer` (custom layer example)",
    source="seed 000; forwardLoss/backwardLoss of dicePixelClassificationLayer.m",
    call="`loss(Y, T)`: Y probabilities H×W×K×N (`layout='NKHW'`: N×K×H×W), T one-hot of Y's shape or labels",
    activation="none (a softmaxLayer precedes it)",
    denominator="Σp² + Σt²",
    smoothing="ε = 1e-8 on the class-summed numerator and denominator",
    weights="1/(Σt)² per image and class",
    absent="weight 1/0 = Inf, Inf·0 = NaN: the loss is NaN",
    sums="per image, one ratio over classes; mean over N",
    loss="1 − GDice",
    equivalent=Equivalent("GeneralizedDiceLoss", dict(activation="none", squared=True, smooth_nr=1e-8, smooth_dr=1e-8),
                          adapt="`Y.permute(3, 2, 0, 1)`",
                          when="every class occurs in every image (else MATLAB gives NaN, dicetorch the max weight)"),
))
def matlab(name: str = "dice", *, layout: str = "HWKN", backend: str = "auto") -> nn.Module:
    """MATLAB's ``dicePixelClassificationLayer(name)``: generalized Dice with squared volumes.

    ``forward(Y, T)``: Y is the probability array of the softmax layer before it, H×W×K×N
    (``layout="HWKN"``, MATLAB's own; any number of leading spatial dims) or N×K×H×W
    (``layout="NKHW"``); T is the one-hot target of the same shape, or integer labels (H×W×N,
    H×W×1×N; (N, H, W) with "NKHW").  Per image n::

        W_k   = 1 / (sum_m T_km)^2
        dice  = (2 sum_k W_k I_k + 1e-8) / (sum_k W_k (sum_m Y_km^2 + sum_m T_km^2) + 1e-8)
        loss  = sum_n (1 - dice_n) / N

    The input gradient is the layer's ``backwardLoss``, ``(2 W Y numer / denom^2 - 2 W T / denom) / N``.
    A class absent from an image makes the loss NaN, as the layer does (1/0 = Inf, Inf·0 = NaN).
    ``name`` is kept for parity (``layer.Name``) and has no effect.
    """
    return _MatlabDice(name, layout, backend)


# ----------------------------------------------------------------------------------------------
# MONAI 1.6
# ----------------------------------------------------------------------------------------------
_MONAI_REDUCTIONS = ("none", "mean", "sum")


class _MonaiBase(nn.Module):
    """Shared pre-processing of monai.losses.{DiceLoss, GeneralizedDiceLoss, TverskyLoss}."""

    def __init__(self, include_background, to_onehot_y, sigmoid, softmax, other_act, reduction,
                 smooth_nr, smooth_dr, batch, soft_label, ignore_index, backend):
        super().__init__()
        reduction = getattr(reduction, "value", reduction)
        if reduction not in _MONAI_REDUCTIONS:
            raise ValueError(f"{reduction!r} is not a valid LossReduction (one of {_MONAI_REDUCTIONS})")
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.reduction = reduction
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        self.soft_label = soft_label
        self.ignore_index = ignore_index
        self.backend = backend

    def _sums(self, input: Tensor, target: Tensor, power: int):
        """(tp, P, T) after MONAI's activation, one-hot, ignore mask, background slice and batch sum.

        tp is I, or the soft-label ``(P + T - sum|p - t|) / 2`` where that differs from I.
        Shapes (N, C') or (C',) with ``batch``.
        """
        c = input.shape[1]
        act, x = "none", input
        if self.sigmoid:
            act = "sigmoid"
        if self.softmax:
            if c == 1:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
            else:
                act = "softmax"
        if self.other_act is not None:
            x = self.other_act(input)  # unfused: the operator sums the activated values

        ii = self.ignore_index
        labels = None
        if self.to_onehot_y:
            if c == 1:
                warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
            else:
                labels = target if target.dim() >= 2 else target.reshape(*target.shape, 1)
                if labels.shape[1] != 1:
                    raise AssertionError("labels should have a channel with length equal to one.")
                if labels.shape[2:] != input.shape[2:] or labels.shape[0] != input.shape[0]:
                    raise AssertionError(
                        f"ground truth has different shape ({(labels.shape[0], c, *labels.shape[2:])}) "
                        f"from input ({tuple(input.shape)})")
                labels = labels.long()  # monai.networks.one_hot casts with .long()
                ops.check_target_values(input, labels, ii)  # MONAI's scatter rejects other labels
        if labels is None and tuple(target.shape) != tuple(input.shape):
            raise AssertionError(f"ground truth has different shape ({target.shape}) from input ({input.shape})")

        # MONAI's spatial ignore mask (create_ignore_mask) on a float target: unfused
        mask = None
        if labels is None and ii is not None:
            if target.shape[1] == 1:
                mask = (target != ii).to(x.dtype)
            elif 0 <= ii < target.shape[1]:
                mask = 1.0 - target[:, ii:ii + 1].to(x.dtype)
            else:
                mask = (target.sum(dim=1, keepdim=True) > 0).to(x.dtype)

        soft_l1 = self.soft_label and power == 1
        fused = self.other_act is None and mask is None
        if fused and soft_l1:
            # the L1 form is I for 0/1 targets and p in (0, 1), which sigmoid and softmax give (up to
            # saturation, where their own derivative vanishes); given probabilities need a look
            fused = act != "none" and (labels is not None or _is_binary(target))
        if fused:
            t = labels if labels is not None else _float_target(target, input)
            s = ops.dice_stats(x, t, act, power, ii if labels is not None else None, self.backend)
            tp, p_sum, t_sum = s.unbind(1)
        else:
            p = _activate(x, act)
            if labels is not None:
                t = _labels_one_hot(labels[:, 0], c, p.dtype)
                if ii is not None:
                    mask = (labels != ii).to(p.dtype)
            else:
                t = _float_target(target, p).to(p.dtype)
            if mask is not None:
                p, t = p * mask, t * mask
            if soft_l1 and not _l1_is_i(p, t, norms=True):
                tp, p_sum, t_sum = _l1_stats(p, t, self.backend, norms=True)
            else:
                s = ops.dice_stats(p, t, "none", power, None, self.backend)
                tp, p_sum, t_sum = s.unbind(1)

        if not self.include_background:
            if c == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
            else:
                tp, p_sum, t_sum = tp[:, 1:], p_sum[:, 1:], t_sum[:, 1:]
        if self.batch:
            tp, p_sum, t_sum = tp.sum(0), p_sum.sum(0), t_sum.sum(0)
        return tp, p_sum, t_sum

    def _reduce_broadcast(self, f: Tensor, ndim: int) -> Tensor:
        if self.reduction == "mean":
            return torch.mean(f)
        if self.reduction == "sum":
            return torch.sum(f)
        return f.view(list(f.shape[0:2]) + [1] * (ndim - 2))


class _MonaiDice(_MonaiBase):
    def __init__(self, include_background=True, to_onehot_y=False, sigmoid=False, softmax=False, other_act=None,
                 squared_pred=False, jaccard=False, reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5, batch=False,
                 weight=None, soft_label=False, ignore_index=None, *, backend="auto"):
        super().__init__(include_background, to_onehot_y, sigmoid, softmax, other_act, reduction,
                         smooth_nr, smooth_dr, batch, soft_label, ignore_index, backend)
        self.squared_pred = squared_pred
        self.jaccard = jaccard
        self.register_buffer("class_weight", torch.as_tensor(weight) if weight is not None else None)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        tp, p_sum, t_sum = self._sums(input, target, 2 if self.squared_pred else 1)
        fp, fn = p_sum - tp, t_sum - tp
        if not self.jaccard:
            fp, fn = fp * 0.5, fn * 0.5
        numerator = 2 * tp + self.smooth_nr
        denominator = 2 * (tp + fp + fn) + self.smooth_dr
        f = 1 - numerator / denominator
        num_of_classes = f.shape[-1]
        if self.class_weight is not None and num_of_classes != 1:
            w = self.class_weight
            if w.ndim == 0:
                w = torch.as_tensor([w] * num_of_classes)
            elif w.shape[0] != num_of_classes:
                raise ValueError(
                    "The length of the `weight` sequence should be the same as the number of classes. "
                    "If `include_background=False`, the weight should not include the background category class 0.")
            if w.min() < 0:
                raise ValueError("the value/values of the `weight` should be no less than 0.")
            f = f * w.to(f)
        return self._reduce_broadcast(f, input.dim())


@_register(PresetInfo(
    name="monai_dice",
    original="MONAI 1.6 `monai.losses.DiceLoss`",
    source="monai/losses/dice.py (DiceLoss.forward), monai/losses/utils.py (compute_tp_fp_fn)",
    call="`loss(input, target)`: input (N, C, *spatial), target one-hot/soft (N, C, *), "
         "or labels (N, 1, *) with `to_onehot_y=True`",
    activation="none (`sigmoid=`, `softmax=`, `other_act=`)",
    denominator="Σp + Σt (`squared_pred`: Σp² + Σt²)",
    smoothing="`smooth_nr`=1e-5 on 2I, `smooth_dr`=1e-5 on the denominator, per class",
    weights="`weight`: multiplies each class's loss",
    absent="nothing special (smoothing only)",
    sums="per image and class (`batch=True`: over the batch)",
    loss="1 − Dice (`jaccard`: 1 − (2I+s)/(2(P+T−I)+s)), mean over images and classes",
    equivalent=Equivalent("DiceLoss", dict(activation="none")),
))
def monai_dice(include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
               softmax: bool = False, other_act: Optional[Callable] = None, squared_pred: bool = False,
               jaccard: bool = False, reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
               batch: bool = False, weight=None, soft_label: bool = False, ignore_index: Optional[int] = None,
               *, backend: str = "auto") -> nn.Module:
    """``monai.losses.DiceLoss`` (MONAI 1.6) with all of its arguments.

    ``forward(input, target)``: input (N, C, *spatial); target shaped like input, or labels
    (N, 1, *spatial) with ``to_onehot_y=True``.  Per image and class (over the batch with ``batch``)::

        tp = I, fp = P - I, fn = T - I          (q = 2 with squared_pred)
        f  = 1 - (2 tp + smooth_nr) / (2 (tp + fp/2 + fn/2) + smooth_dr)    (jaccard: without the /2)
        f  = f * weight[k]

    ``reduction="none"`` returns MONAI's broadcastable shape (N, C, 1, ...) ((C, 1, ...) with batch).

    Paths: fused for sigmoid/softmax/no activation with labels or float targets and ``ignore_index``
    on labels.  ``other_act`` (any callable) and ``ignore_index`` on a one-hot/soft target (MONAI's
    spatial mask: pixels of class ``ignore_index``, or with all-zero target for an out-of-range value)
    take the unfused path.  ``soft_label=True`` uses ``tp = (||p||_1 + ||t||_1 - ||p - t||_1) / 2``, which
    equals I (value and gradient) for 0/1 targets and p in (0, 1), as sigmoid and softmax give; for
    soft targets, for given probabilities outside (0, 1) or tied with t, and with ``other_act``, the
    L1 norms are computed in PyTorch (reference path).
    With ``squared_pred`` MONAI's norm-based tp equals I, for any target (MONAI's float32 one-hot makes
    its ``||t||_2^2`` carry float32 rounding with ``to_onehot_y``; the preset's T is exact).
    """
    return _MonaiDice(include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
                      reduction, smooth_nr, smooth_dr, batch, weight, soft_label, ignore_index, backend=backend)


_W_TYPES = ("square", "simple", "uniform")


class _MonaiGeneralizedDice(_MonaiBase):
    def __init__(self, include_background=True, to_onehot_y=False, sigmoid=False, softmax=False, other_act=None,
                 w_type="square", reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5, batch=False, soft_label=False,
                 *, backend="auto"):
        super().__init__(include_background, to_onehot_y, sigmoid, softmax, other_act, reduction,
                         smooth_nr, smooth_dr, batch, soft_label, None, backend)
        w_type = str(getattr(w_type, "value", w_type))
        if w_type not in _W_TYPES:
            raise ValueError(f"Unsupported option {w_type!r}, available options are {_W_TYPES}")
        self.w_type = w_type

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        tp, p_sum, t_sum = self._sums(input, target, 1)
        fp, fn = (p_sum - tp) * 0.5, (t_sum - tp) * 0.5
        denominator = 2 * (tp + fp + fn)
        ground_o = t_sum.detach().float()  # MONAI: w_func(ground_o.float()), float32 weights
        if self.w_type == "simple":
            w = torch.reciprocal(ground_o)
        elif self.w_type == "square":
            w = torch.reciprocal(ground_o * ground_o)
        else:
            w = torch.ones_like(ground_o)
        infs = torch.isinf(w)
        w = w.masked_fill(infs, 0.0)
        if self.batch:
            w = w + infs * torch.max(w)
        else:
            w = w + infs * torch.max(w, dim=1)[0].unsqueeze(dim=1)
        dim = 0 if self.batch else 1
        numer = 2.0 * (tp * w).sum(dim, keepdim=True) + self.smooth_nr
        denom = (denominator * w).sum(dim, keepdim=True) + self.smooth_dr
        f = 1.0 - numer / denom
        return self._reduce_broadcast(f, input.dim())


@_register(PresetInfo(
    name="monai_generalized_dice",
    original="MONAI 1.6 `monai.losses.GeneralizedDiceLoss`",
    source="monai/losses/dice.py (GeneralizedDiceLoss.forward)",
    call="as `monai_dice`",
    activation="none (`sigmoid=`, `softmax=`, `other_act=`)",
    denominator="Σp + Σt",
    smoothing="1e-5 on the class-summed numerator and denominator",
    weights="`w_type`: 1/(Σt)² (square), 1/Σt (simple), 1 (uniform), computed in float32",
    absent="largest weight of the image (`batch=True`: of the batch)",
    sums="per image, one ratio over classes (`batch=True`: one ratio)",
    loss="1 − GDice, mean over images",
    equivalent=Equivalent("GeneralizedDiceLoss", dict(activation="none")),
))
def monai_generalized_dice(include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                           softmax: bool = False, other_act: Optional[Callable] = None, w_type: str = "square",
                           reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                           batch: bool = False, soft_label: bool = False, *, backend: str = "auto") -> nn.Module:
    """``monai.losses.GeneralizedDiceLoss`` (MONAI 1.6) with all of its arguments.

    Per image (one ratio with ``batch``), after the pre-processing of :func:`monai_dice`::

        w_k = 1 / (sum_m t_k)^2  (w_type: "square" | "simple" 1/sum t | "uniform" 1)   in float32, as MONAI
        w_k = max_j w_j          for a class absent from the image (batch: from the batch)
        f   = 1 - (2 sum_k w_k tp_k + smooth_nr) / (sum_k w_k (P_k + T_k) + smooth_dr)

    ``reduction="none"`` gives (N, 1, 1, ...) ((1, 1, ...) with batch).  MONAI 1.6 has no
    ``ignore_index`` here.  ``soft_label`` and ``other_act`` as in :func:`monai_dice`.
    """
    return _MonaiGeneralizedDice(include_background, to_onehot_y, sigmoid, softmax, other_act, w_type, reduction,
                                 smooth_nr, smooth_dr, batch, soft_label, backend=backend)


class _MonaiTversky(_MonaiBase):
    def __init__(self, include_background=True, to_onehot_y=False, sigmoid=False, softmax=False, other_act=None,
                 alpha=0.5, beta=0.5, reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5, batch=False,
                 soft_label=False, ignore_index=None, *, backend="auto"):
        super().__init__(include_background, to_onehot_y, sigmoid, softmax, other_act, reduction,
                         smooth_nr, smooth_dr, batch, soft_label, ignore_index, backend)
        self.alpha, self.beta = alpha, beta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        tp, p_sum, t_sum = self._sums(input, target, 1)
        # MONAI's Tversky sums p(1-t) and (1-p)t: P - I and T - I
        fp, fn = (p_sum - tp) * self.alpha, (t_sum - tp) * self.beta
        numerator = tp + self.smooth_nr
        denominator = tp + fp + fn + self.smooth_dr
        score = 1.0 - numerator / denominator
        if self.reduction == "sum":
            return torch.sum(score)
        if self.reduction == "none":
            return score  # (N, C) ((C,) with batch), not broadcastable, as MONAI
        return torch.mean(score)


@_register(PresetInfo(
    name="monai_tversky",
    original="MONAI 1.6 `monai.losses.TverskyLoss`",
    source="monai/losses/tversky.py (TverskyLoss.forward)",
    call="as `monai_dice`",
    activation="none (`sigmoid=`, `softmax=`, `other_act=`)",
    denominator="TP + α·FP + β·FN (α = β = 0.5)",
    smoothing="`smooth_nr`=1e-5 on TP, `smooth_dr`=1e-5 on the denominator, per class",
    weights="none",
    absent="nothing special (smoothing only)",
    sums="per image and class (`batch=True`: over the batch)",
    loss="1 − TI, mean over images and classes",
    equivalent=Equivalent("TverskyLoss", dict(activation="none")),
))
def monai_tversky(include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                  softmax: bool = False, other_act: Optional[Callable] = None, alpha: float = 0.5, beta: float = 0.5,
                  reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                  soft_label: bool = False, ignore_index: Optional[int] = None, *, backend: str = "auto") -> nn.Module:
    """``monai.losses.TverskyLoss`` (MONAI 1.6) with all of its arguments.

    Per image and class (over the batch with ``batch``), pre-processing as :func:`monai_dice`::

        ti = (tp + smooth_nr) / (tp + alpha (P - tp) + beta (T - tp) + smooth_dr),   loss = 1 - ti

    ``reduction="none"`` returns (N, C) ((C,) with batch), as MONAI's Tversky does.
    """
    return _MonaiTversky(include_background, to_onehot_y, sigmoid, softmax, other_act, alpha, beta, reduction,
                         smooth_nr, smooth_dr, batch, soft_label, ignore_index, backend=backend)


# ----------------------------------------------------------------------------------------------
# segmentation_models_pytorch 0.6
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# nnU-Net v2
# ----------------------------------------------------------------------------------------------
class _NnUNetSoftDice(nn.Module):
    def __init__(self, apply_nonlin, batch_dice, do_bg, smooth, ddp, backend):
        super().__init__()
        if apply_nonlin not in (None, "softmax", "sigmoid") and not callable(apply_nonlin):
            raise TypeError(f"apply_nonlin must be None, 'softmax', 'sigmoid' or a callable, got {apply_nonlin!r}")
        self.apply_nonlin, self.batch_dice, self.do_bg, self.smooth, self.ddp = (
            apply_nonlin, batch_dice, do_bg, smooth, ddp)
        self.backend = backend

    def forward(self, x: Tensor, y: Tensor, loss_mask: Optional[Tensor] = None) -> Tensor:
        if self.ddp and self.batch_dice and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise NotImplementedError("ddp=True with batch_dice all-gathers the sums across processes (nnU-Net's "
                                      "AllGatherGrad); this preset sums within one process only")
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
        if not self.do_bg:
            intersect, sum_pred, sum_gt = intersect[:, 1:], sum_pred[:, 1:], sum_gt[:, 1:]
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
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


# ----------------------------------------------------------------------------------------------
# kornia 0.9
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Keras 3
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Papers and seed posts
# ----------------------------------------------------------------------------------------------
class _VNet(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if input.shape[1] < 2:
            raise ValueError("vnet() expects (N, C >= 2, *spatial) logits of a softmax (C = 2 in the paper)")
        s = ops.dice_stats(input, target, "softmax", 2, None, self.backend)[..., 1:]
        d = 2 * s[:, 0] / (s[:, 1] + s[:, 2])
        return (1 - d).mean()


@_register(PresetInfo(
    name="vnet",
    original="V-Net Dice (Milletari, Navab, Ahmadi, 3DV 2016, Eq. 1)",
    source="the paper: D = 2 Σ p g / (Σ p² + Σ g²)",
    call="`loss(input, target)`: input (N, 2, *) logits of the two-way softmax, target labels (N, *) or one-hot",
    activation="softmax",
    denominator="Σp² + Σt²",
    smoothing="none",
    weights="none (foreground channel only)",
    absent="nothing special (softmax keeps Σp² > 0)",
    sums="per image",
    loss="1 − D, mean over images (and foreground classes for C > 2)",
    equivalent=Equivalent("DiceLoss", dict(squared=True, smooth_nr=0.0, smooth_dr=0.0, include_background=False)),
))
def vnet(*, backend: str = "auto") -> nn.Module:
    """The V-Net Dice loss (Milletari et al. 2016): squared volumes of the foreground, no smoothing.

    ``forward(input, target)``: input (N, 2, *spatial) logits of the network's two-way softmax,
    target labels (N, *spatial) (1 = foreground) or one-hot/soft (N, 2, *)::

        D = 2 sum_m p_m g_m / (sum_m p_m^2 + sum_m g_m^2),   loss = mean_n (1 - D_n)

    with p the foreground probability; for C > 2 the mean also runs over classes 1..C-1.
    """
    return _VNet(backend)


class _TfDice(nn.Module):
    def __init__(self, ignore_background, square, backend):
        super().__init__()
        self.ignore_background, self.square, self.backend = ignore_background, square, backend

    def forward(self, softmax_output: Tensor, labels: Tensor) -> Tensor:
        x = softmax_output.movedim(-1, 1)
        t = _float_target(labels, softmax_output).movedim(-1, 1)
        s = ops.dice_stats(x, t, "none", 2 if self.square else 1, None, self.backend).sum(0)
        if self.ignore_background:
            s = s[:, 1:]
        eps = 1e-7
        nom = 2 * s[0] + eps
        denom = s[2] + s[1] + eps
        return 1 - torch.mean(nom / denom)


@_register(PresetInfo(
    name="tf_dice",
    original="TensorFlow `dice_loss(softmax_output, labels, ignore_background, square)` (blog post)",
    source="seed 002",
    call="`loss(softmax_output, labels)`: probabilities and one-hot labels, channels-last (N, H, W, C)",
    activation="none (softmax output)",
    denominator="Σp + Σt (`square`: Σp² + Σt²)",
    smoothing="1e-7 on 2I and on the denominator, per class",
    weights="none (`ignore_background` drops class 0)",
    absent="nothing special (smoothing only)",
    sums="over the batch (axis=(0, 1, 2)): one ratio per class",
    loss="1 − mean over classes of Dice",
    equivalent=Equivalent("DiceLoss", dict(activation="none", smooth_nr=1e-7, smooth_dr=1e-7, batch=True),
                          adapt="`softmax_output.movedim(-1, 1)`"),
))
def tf_dice(ignore_background: bool = False, square: bool = False, *, backend: str = "auto") -> nn.Module:
    """The TensorFlow ``dice_loss`` of seed 002 (DICE, DICE_SQUARE, DICEFG, DICEFG_SQUARE).

    ``forward(softmax_output, labels)``: channels-last (N, *spatial, C) probabilities and one-hot
    labels.  Per class, sums over the batch and pixels::

        nom   = 2 I + 1e-7;   denom = T + P + 1e-7     (q = 2 with square; class 0 dropped with ignore_background)
        loss  = 1 - mean_k nom / denom
    """
    return _TfDice(ignore_background, square, backend)


class _MxnetDice(nn.Module):
    def __init__(self, smooth, backend):
        super().__init__()
        self.smooth, self.backend = smooth, backend

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        x = y_pred.reshape(1, 1, -1)
        t = _float_target(y_true, y_pred).reshape(1, 1, -1)
        s = ops.dice_stats(x, t, "none", 1, None, self.backend)[0, :, 0]
        coefficient = (2.0 * s[0] + self.smooth) / (s[1] + s[2] + self.smooth)
        return (1.0 - coefficient).reshape(1)  # MXNet's nd.sum gives shape (1,)


@_register(PresetInfo(
    name="mxnet_dice",
    original="MXNet `dice_loss(y_pred, y_true)` with Laplace smoothing (blog post)",
    source="seed 003",
    call="`loss(y_pred, y_true)`: probabilities and 0/1 targets of any one shape; returns shape (1,)",
    activation="none",
    denominator="Σp + Σt",
    smoothing="1 on 2I and on the denominator",
    weights="none",
    absent="pooled: nothing special",
    sums="over the whole tensor",
    loss="1 − Dice",
    equivalent=Equivalent("DiceLoss", dict(activation="none", smooth_nr=1.0, smooth_dr=1.0),
                          adapt="`y_pred.reshape(1, 1, -1)`"),
))
def mxnet_dice(smooth: float = 1.0, *, backend: str = "auto") -> nn.Module:
    """The MXNet ``dice_loss`` of seed 003 (Laplace smoothing: +1 in numerator and denominator).

    ``forward(y_pred, y_true)``: any shape, sums over the whole tensor::

        loss = 1 - (2 sum(y_pred * y_true) + smooth) / (sum(y_pred) + sum(y_true) + smooth)

    returned with shape (1,), as MXNet's ``nd.sum`` gives.
    """
    return _MxnetDice(smooth, backend)


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


# ----------------------------------------------------------------------------------------------
# "Which Dice is this?" (docs/which_dice.md)
# ----------------------------------------------------------------------------------------------
DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "which_dice.md"


def _seed001_example() -> str:
    """Numbers for the absent-class explanation, from the formulas (deterministic)."""
    bg, fg, classes = 650, 134, 11  # a 28x28 digit image: background, one digit, 9 absent digit classes
    w = lambda n: 1 / (n * n + 1e-5)  # noqa: E731 - the seed's weight
    p = 28 * 28 / classes  # sum of p per class at initialization (uniform softmax)
    present = w(bg) * (bg + p) + w(fg) * (fg + p)
    present_share = present / (present + 9 * w(0) * p)
    return (
        f"Take the answer's example: 28×28 digit images with 11 classes (background and ten digits), so an "
        f"image holds the background (about {bg} pixels), one digit (about {fg} pixels) and nine absent classes. "
        f"With one image per batch the weights are w = 1/(count² + 1e-5):\n\n"
        f"| class | count | weight |\n|---|---|---|\n"
        f"| background | {bg} | {w(bg):.1e} |\n| the digit | {fg} | {w(fg):.1e} |\n"
        f"| each absent digit | 0 | 1/(0 + 1e-5) = {w(0):.0e} |\n\n"
        f"An absent class weighs {w(0) / w(fg):.0e} times the digit that is there. Its intersection is 0, so it "
        f"adds nothing to the numerator, but it adds w·Σp to the denominator: at initialization (Σp ≈ {p:.0f} per "
        f"class) the two present classes make up a fraction {present_share:.0e} of the denominator. The ratio is then "
        f"about 2·(w_bg·I_bg + w_digit·I_digit)/(1e5·Σ_absent Σp) ≈ 0, and the only way to lower the loss "
        f"is to "
        f"shrink Σp of every class absent from the batch. A digit is absent from nine batches in ten, where it "
        f"is pushed towards probability 0 everywhere with a weight 1e5, while it is rewarded with a weight of "
        f"{w(fg):.1e} in the batches where it occurs; larger batches only make the absences rarer, not the weights "
        f"milder. Meanwhile the loss sits at 1 to float32 precision and the gradient of the present classes "
        f"is about 1e-10: in `examples/digits_segmentation.py` the network barely moves from its "
        f"initialization (held-out digit Dice 0.16 at batch 16, against 0.96 with the fixed weights), and "
        f"the question saw it end up predicting only background. (The question's weights \"around "
        f"10^-10\" are those of present classes with ~10⁵ voxels, next to 1e5 for an absent class: 15 orders "
        f"of magnitude.)\n"
    )


def _cell(text: str) -> str:
    """A markdown table cell: a literal | would end the cell."""
    return text.replace("|", "\\|")


README_PATH = DOC_PATH.parents[1] / "README.md"
README_BEGIN, README_END = "<!-- which-dice:begin -->", "<!-- which-dice:end -->"


def _property_table() -> list:
    """The per-preset table of formula choices (shared by docs/which_dice.md and README.md)."""
    out = [
        "| preset | original | activation | denominator | smoothing | class weights | absent class | sums | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, fn in PRESETS.items():
        i = fn.info
        cells = (i.original, i.activation, i.denominator, i.smoothing, i.weights, i.absent, i.sums, i.loss)
        out.append(f"| `{name}` | " + " | ".join(_cell(c) for c in cells) + " |")
    return out


def readme_with_table(readme: str) -> str:
    """README.md text with the block between the which-dice markers replaced by the generated table."""
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = "\n".join(["", "<!-- Generated by `python -m dicetorch.presets --write`; do not edit. -->", "",
                       *_property_table(), ""])
    return head + README_BEGIN + block + "\n" + README_END + tail


def which_dice_markdown() -> str:
    """The content of docs/which_dice.md, generated from the presets' metadata."""
    out = [
        "# Which Dice is this?",
        "",
        "<!-- Generated by `python -m dicetorch.presets --write` from the metadata in dicetorch/presets.py;"
        " do not edit. -->",
        "",
        "Every Dice loss below is a formula on three per-class sums over the pixels m of an image:",
        "I = Σ p·t (intersection), P = Σ p^q (prediction volume), T = Σ t^q (target volume), with q = 2 for",
        "the \"squared\" denominator. They differ in the activation that makes p, the power q, where the",
        "smoothing goes, the class weights, what happens to a class absent from the target, whether the",
        "sums run per image or over the whole batch, and the sign. `dicetorch.presets` reproduces each one",
        "(same constructor arguments, same calling convention, same loss value and input gradient) on the",
        "fused `dicetorch.ops.dice_stats` operator; the differential tests in `tests/test_presets.py`",
        "compare them with MONAI, segmentation_models_pytorch and kornia, and with transcriptions of the",
        "others.",
        "",
        "## The table",
        "",
        *_property_table(),
        "",
        "## Calling conventions and the dicetorch arguments that reproduce them",
        "",
        "`import dicetorch as dt`. \"Exact\" means the same value and gradient up to floating-point rounding;",
        "`tests/test_presets.py` checks every line of this column.",
        "",
        "| preset | call | source | dicetorch equivalent |",
        "|---|---|---|---|",
    ]
    for name, fn in PRESETS.items():
        i = fn.info
        eq = i.equivalent.describe(name)
        out.append(f"| `{name}` | " + " | ".join(_cell(c) for c in (i.call, i.source, eq)) + " |")
    out += [
        "",
        "## Why the seed-001 generalized Dice does not learn",
        "",
        "The question's `generalized_dice_loss_w` (preset `keras_generalized_dice_seed`) weighs class l by",
        "w_l = 1/(count_l² + 1e-5), with the counts taken over the whole batch, and computes one ratio",
        "1 − 2·Σ_l w_l I_l / Σ_l w_l (T_l + P_l). The 1e-5 was meant to avoid a division by zero, but for a",
        "class that does not occur, count = 0 and w = 1/(0 + 1e-5) = 1e5, while a present class with n pixels",
        "gets 1/n².",
        "",
        _seed001_example(),
        "What the fixes do: the accepted answer (`keras_generalized_dice_fixed`) computes the weights per",
        "image and gives an absent class a small fixed weight eps = 1e-6, so a false positive on it is still",
        "penalized, but weakly. `dt.GeneralizedDiceLoss` has no additive constant in the weight: it takes",
        "w = 1/V² for the classes present in the image and decides the weight of an absent class (V = 0)",
        "with `absent_weight`:",
        "",
        "* `absent_weight=\"max\"` (default, MONAI's rule): an absent class gets the largest weight among the",
        "  classes present in that image (with `batch=True`, in the batch), i.e. the weight of the rarest",
        "  present class. In the example that is 1/134² ≈ 5.6e-05 instead of 1e5: predicting an absent digit",
        "  costs as much as missing the digit that is there, and no more.",
        "* `absent_weight=\"zero\"`: an absent class leaves the ratio; its false positives are penalized only",
        "  through the softmax, which takes that probability from the present classes.",
        "",
        "Either way the weights are finite and of the order of the present classes' weights, so no term can",
        "dominate the ratio by orders of magnitude, and an image with no foreground at all still has a",
        "well-defined loss.",
        "",
    ]
    return "\n".join(out)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicetorch.presets", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print docs/which_dice.md to stdout")
    group.add_argument("--write", action="store_true", help=f"write {DOC_PATH} and the table in README.md")
    group.add_argument("--check", action="store_true", help="exit 1 if either file is stale")
    args = parser.parse_args(argv)
    text = which_dice_markdown()
    if args.markdown:
        sys.stdout.write(text)
        return 0
    readme = README_PATH.read_text(encoding="utf-8")
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text, encoding="utf-8")
        README_PATH.write_text(readme_with_table(readme), encoding="utf-8")
        return 0
    current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
    stale = [p for p, ok in ((DOC_PATH, current == text), (README_PATH, readme == readme_with_table(readme))) if not ok]
    for path in stale:
        print(f"{path} is stale: run `python -m dicetorch.presets --write`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
