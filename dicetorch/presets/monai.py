"""MONAI 1.6: ``DiceLoss``, ``GeneralizedDiceLoss``, ``TverskyLoss`` and the compound ``DiceCELoss``,
``DiceFocalLoss``, ``GeneralizedDiceFocalLoss``."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import compound as _compound
from .. import functional as _F
from .. import ops
from ._common import _activate, _labels_one_hot, _is_binary, _l1_is_i, _l1_stats, _float_target
from ._registry import Equivalent, PresetInfo, _register


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
        Shapes (N, C') or (C',) with ``batch``; 0-dim for input without spatial dims and without
        ``batch`` (see :meth:`_pooled`).
        """
        c = input.shape[1]
        act, x = self._activation(input), input
        if self.other_act is not None:
            x = self.other_act(input)  # unfused: the operator sums the activated values

        ii = self.ignore_index
        labels = self._labels(input, target)

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
        return self._finish_sums(tp, p_sum, t_sum, input)

    def _activation(self, input: Tensor) -> str:
        """The operator's activation for MONAI's flags ("none" with ``other_act``, which is applied apart)."""
        act = "none"
        if self.sigmoid:
            act = "sigmoid"
        if self.softmax:
            if input.shape[1] == 1:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=4)
            else:
                act = "softmax"
        return act

    def _labels(self, input: Tensor, target: Tensor) -> Optional[Tensor]:
        """The labels (N, 1, *spatial) as int64 that ``to_onehot_y`` one-hot encodes (C > 1), else None;
        raises where MONAI's one-hot or shape check does."""
        c = input.shape[1]
        labels = None
        if self.to_onehot_y:
            if c == 1:
                warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=4)
            else:
                labels = target if target.dim() >= 2 else target.reshape(*target.shape, 1)
                if labels.shape[1] != 1:
                    raise AssertionError("labels should have a channel with length equal to one.")
                if labels.shape[2:] != input.shape[2:] or labels.shape[0] != input.shape[0]:
                    raise AssertionError(
                        f"ground truth has different shape ({(labels.shape[0], c, *labels.shape[2:])}) "
                        f"from input ({tuple(input.shape)})")
                labels = labels.long()  # monai.networks.one_hot casts with .long()
                ops.check_target_values(input, labels, self.ignore_index)  # MONAI's scatter rejects other labels
        if labels is None and tuple(target.shape) != tuple(input.shape):
            raise AssertionError(f"ground truth has different shape ({target.shape}) from input ({input.shape})")
        return labels

    def _finish_sums(self, tp: Tensor, p_sum: Tensor, t_sum: Tensor, input: Tensor):
        """(N, C) sums -> MONAI's background slice, then the batch sum or the pooled sum (see :meth:`_sums`)."""
        c = input.shape[1]
        if not self.include_background:
            if c == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
            else:
                tp, p_sum, t_sum = tp[:, 1:], p_sum[:, 1:], t_sum[:, 1:]
        if self.batch:
            tp, p_sum, t_sum = tp.sum(0), p_sum.sum(0), t_sum.sum(0)
        elif self._pooled(input):
            tp, p_sum, t_sum = tp.sum(), p_sum.sum(), t_sum.sum()
        return tp, p_sum, t_sum

    def _pooled(self, input: Tensor) -> bool:
        """Whether MONAI pools every image and class into one ratio.

        MONAI reduces over ``reduce_axis = list(range(2, input.dim()))`` (plus 0 with ``batch``); for
        (N, C) input without ``batch`` that list is empty, and ``torch.sum(x, dim=[])`` (as
        ``vector_norm(x, dim=[])``) reduces over *every* dim: one ratio of the sums over the images and
        the kept classes.
        """
        return input.dim() == 2 and not self.batch

    def _kept_classes(self, input: Tensor) -> int:
        """MONAI's ``target.shape[1]`` after the background slice."""
        c = input.shape[1]
        return c if self.include_background or c == 1 else c - 1

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
        return self._from_sums(*self._sums(input, target, 2 if self.squared_pred else 1), input)

    def _from_sums(self, tp: Tensor, p_sum: Tensor, t_sum: Tensor, input: Tensor) -> Tensor:
        """MONAI's DiceLoss from the sums of :meth:`_sums` (also used by the compound presets)."""
        fp, fn = p_sum - tp, t_sum - tp
        if not self.jaccard:
            fp, fn = fp * 0.5, fn * 0.5
        numerator = 2 * tp + self.smooth_nr
        denominator = 2 * (tp + fp + fn) + self.smooth_dr
        f = 1 - numerator / denominator
        num_of_classes = self._kept_classes(input)  # a pooled f is 0-dim; the weights still broadcast
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

    Input without spatial dims, (N, C), and ``batch=False``: MONAI's reduction axes are then empty and
    ``torch.sum(x, dim=[])`` sums over every dim, so there is one ratio pooled over the images and
    classes (``f`` 0-dim; times ``weight`` it becomes (C,)); the preset does the same.

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
        if self._pooled(input):
            # MONAI's torch.max(w, dim=1) on the pooled 0-dim weights fails; so does the preset
            raise IndexError("MONAI 1.6's GeneralizedDiceLoss needs spatial dims or batch=True: without them its "
                             "sums pool every dim into a 0-dim tensor and torch.max(w, dim=1) raises IndexError")
        return self._from_sums(*self._sums(input, target, 1), input)

    def _from_sums(self, tp: Tensor, p_sum: Tensor, t_sum: Tensor, input: Tensor) -> Tensor:
        """MONAI's GeneralizedDiceLoss from the sums of :meth:`_sums` (also used by the compound presets)."""
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
    ``ignore_index`` here.  ``soft_label`` and ``other_act`` as in :func:`monai_dice`.  Input without
    spatial dims needs ``batch=True`` (MONAI raises IndexError otherwise, and so does the preset).
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

    ``reduction="none"`` returns (N, C) ((C,) with batch), as MONAI's Tversky does.  Input without
    spatial dims and ``batch=False``: one ratio pooled over the images and classes, as in
    :func:`monai_dice` (a 0-dim ``reduction="none"`` result).
    """
    return _MonaiTversky(include_background, to_onehot_y, sigmoid, softmax, other_act, alpha, beta, reduction,
                         smooth_nr, smooth_dr, batch, soft_label, ignore_index, backend=backend)


# ----------------------------------------------------------------------------------------------
# compound losses: DiceCELoss, DiceFocalLoss, GeneralizedDiceFocalLoss
# ----------------------------------------------------------------------------------------------
def _check_lambda(name: str, value) -> float:
    if value < 0.0:
        raise ValueError(f"{name} should be no less than 0.0.")
    return value


def _check_compound_shapes(input: Tensor, target: Tensor) -> None:
    """The checks at the top of MONAI's compound ``forward``s (same exceptions)."""
    if input.dim() != target.dim():
        raise ValueError(
            "the number of dimensions for input and target should be the same, "
            f"got shape {input.shape} (nb dims: {len(input.shape)}) and {target.shape} (nb dims: {len(target.shape)}). "
            "if target is not one-hot encoded, please provide a tensor with shape B1H[WD].")
    if target.shape[1] != 1 and target.shape[1] != input.shape[1]:
        raise ValueError(
            "number of channels for target is neither 1 (without one-hot encoding) nor the same as input, "
            f"got shape {input.shape} and {target.shape}.")


def _dice_activation(dice: _MonaiBase, input: Tensor) -> str:
    """The Dice part's activation as the operator sees it (no warning: the Dice part warns itself)."""
    if dice.other_act is not None:
        return "other"
    if dice.sigmoid:
        return "sigmoid"
    return "softmax" if dice.softmax and input.shape[1] > 1 else "none"


def _pixel_stats(input: Tensor, target: Tensor, kind: str, activation: str, gamma: float, power: int,
                 backend: str) -> Tensor:
    """One operator call: (N, 5, C) rows I, P, T, X = sum t e, L = sum e of the pixel loss's term e."""
    return _F._stats(input, target, activation=activation, power=power, ignore_index=None, backend=backend,
                     pixel_loss=kind, gamma=gamma)


def _pixel_mean(s: Tensor, input: Tensor, labels: bool, *, kind: str, activation: str, weight: Optional[Tensor],
                label_smoothing: float = 0.0, alpha: Optional[float] = None, reduction: str = "mean") -> Tensor:
    """The pixel loss of :mod:`dicetorch.compound` from the stats (N, 5, C) of all pixels (no ignore value)."""
    s_sum = s.sum(0, keepdim=True)
    counted = torch.full((1,), float(input.shape[0] * input[0, 0].numel()), dtype=s.dtype, device=s.device)
    return _compound._pixel_loss(s_sum, counted, labels, kind=kind, activation=activation, weight=weight,
                                 label_smoothing=label_smoothing, alpha=alpha, reduction=reduction)


class _MonaiDiceCE(nn.Module):
    def __init__(self, include_background=True, to_onehot_y=False, sigmoid=False, softmax=False, other_act=None,
                 squared_pred=False, jaccard=False, reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5, batch=False,
                 weight=None, lambda_dice=1.0, lambda_ce=1.0, label_smoothing=0.0, *, backend="auto"):
        super().__init__()
        reduction = getattr(reduction, "value", reduction)
        if reduction not in ("mean", "sum"):
            # MONAI's DiceCEReduction: the Dice reduces (N, C) ratios, the cross-entropy pixels
            raise ValueError(f"Unsupported option {reduction!r}, available options are ['mean', 'sum'] "
                             "(MONAI's DiceCELoss has no reduction='none').")
        weight = None if weight is None else torch.as_tensor(weight)
        dice_weight = weight[1:] if weight is not None and not include_background else weight
        self.dice = _MonaiDice(include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
                               reduction, smooth_nr, smooth_dr, batch, dice_weight, backend=backend)
        self.register_buffer("ce_weight", weight)
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing!r}")
        self.lambda_dice = _check_lambda("lambda_dice", lambda_dice)
        self.lambda_ce = _check_lambda("lambda_ce", lambda_ce)
        self.reduction, self.backend = reduction, backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_compound_shapes(input, target)
        dice, c = self.dice, input.shape[1]
        power = 2 if dice.squared_pred else 1
        # MONAI's pixel loss: softmax cross-entropy for C > 1, BCE with logits (pos_weight=weight) for C == 1
        pixel_act = "softmax" if c > 1 else "sigmoid"
        if _dice_activation(dice, input) == pixel_act and not (c == 1 and self.ce_weight is not None):
            # fused: the Dice sums and the cross-entropy sums from one operator call
            labels = dice._labels(input, target)
            t = labels if labels is not None else _float_target(target, input)
            s = _pixel_stats(input, t, "ce", pixel_act, 2.0, power, self.backend)
            dice_loss = dice._from_sums(*dice._finish_sums(*s[:, :3].unbind(1), input), input)
            return self.lambda_dice * dice_loss + self.lambda_ce * self._ce(s, input, labels is not None)
        # the Dice part's activation is not the cross-entropy's (MONAI's default applies none to the Dice
        # part), other_act, or BCE's pos_weight: the Dice preset and the pixel loss apart
        dice_loss = dice(input, target)
        if c == 1 and self.ce_weight is not None:
            # pos_weight weighs the positive term only, not a function of the sums of t e and e
            t = target if target.is_floating_point() else target.to(input.dtype)
            ce = torch.nn.functional.binary_cross_entropy_with_logits(
                input, t, pos_weight=self.ce_weight.to(input.dtype), reduction=self.reduction)
            return self.lambda_dice * dice_loss + self.lambda_ce * ce
        labels = c > 1 and target.shape[1] == 1  # MONAI's ce(): squeeze the channel, .long()
        t = target[:, 0].long() if labels else _float_target(target, input)
        s = _pixel_stats(input, t, "ce", pixel_act, 2.0, 1, self.backend)
        return self.lambda_dice * dice_loss + self.lambda_ce * self._ce(s, input, labels)

    def _ce(self, s: Tensor, input: Tensor, labels: bool) -> Tensor:
        c = input.shape[1]
        w = None
        if self.ce_weight is not None:  # C > 1 here: nn.CrossEntropyLoss(weight=weight)
            w = _compound._pixel_weights(self.ce_weight, c, s, "weight")
        return _pixel_mean(s, input, labels, kind="ce", activation="softmax" if c > 1 else "sigmoid", weight=w,
                           label_smoothing=self.label_smoothing if c > 1 else 0.0, reduction=self.reduction)


@_register(PresetInfo(
    name="monai_dice_ce",
    original="MONAI 1.6 `monai.losses.DiceCELoss`",
    source="monai/losses/dice.py (DiceCELoss)",
    call="`loss(input, target)`: input (N, C, *spatial) logits, target labels (N, 1, *) with `to_onehot_y=True` "
         "or one-hot/soft (N, C, *)",
    activation="Dice part as `monai_dice` (none unless `softmax=`/`sigmoid=`); CE on the logits: softmax, "
               "BCE with logits for C = 1",
    denominator="Σp + Σt (`squared_pred`: Σp² + Σt²)",
    smoothing="as `monai_dice`",
    weights="`weight`: CE class weights, and Dice class weights (without class 0 if `include_background=False`)",
    absent="nothing special (smoothing only)",
    sums="Dice as `monai_dice`; CE: mean over all pixels and every channel",
    loss="`lambda_dice`·(1 − Dice) + `lambda_ce`·CE (`label_smoothing`)",
    equivalent=Equivalent("DiceCELoss", {}, preset_kwargs=dict(softmax=True, to_onehot_y=True)),
    pixel_loss="cross-entropy",
))
def monai_dice_ce(include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                  softmax: bool = False, other_act: Optional[Callable] = None, squared_pred: bool = False,
                  jaccard: bool = False, reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                  batch: bool = False, weight=None, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                  label_smoothing: float = 0.0, *, backend: str = "auto") -> nn.Module:
    """``monai.losses.DiceCELoss`` (MONAI 1.6, monai/losses/dice.py) with all of its arguments.

    ``forward(input, target)``: input (N, C, *spatial) logits; target labels (N, 1, *spatial) (with
    ``to_onehot_y=True`` for the Dice part) or one-hot/soft (N, C, *spatial)::

        loss = lambda_dice * monai_dice(...)(input, target)          (weight[1:] without background)
             + lambda_ce * F.cross_entropy(input, labels or target, weight, label_smoothing)   (C > 1)
             + lambda_ce * F.binary_cross_entropy_with_logits(input, target, pos_weight=weight)  (C == 1)

    As in MONAI, the activation flags concern the Dice part only (the cross-entropy always reads the
    logits), ``include_background`` too (the cross-entropy uses every channel), and ``reduction`` is
    "mean" or "sum" for both parts.

    Paths: with ``softmax=True`` (C > 1) or ``sigmoid=True`` (C == 1, no ``weight``) one operator call
    gives the Dice sums and the cross-entropy sums (:func:`dicetorch.dice_ce_loss`'s pixel rows).
    Otherwise the Dice part's activation differs from the cross-entropy's (MONAI's default, no
    activation for the Dice part; ``sigmoid=True`` with C > 1; ``other_act``): the Dice part is
    :func:`monai_dice` and the cross-entropy a second operator call; the BCE's ``pos_weight``
    (``weight`` with C == 1) is PyTorch's ``binary_cross_entropy_with_logits``.
    """
    return _MonaiDiceCE(include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
                        reduction, smooth_nr, smooth_dr, batch, weight, lambda_dice, lambda_ce, label_smoothing,
                        backend=backend)


class _MonaiFocalPart(nn.Module):
    """MONAI 1.6's ``FocalLoss(use_softmax=False)`` inside DiceFocalLoss / GeneralizedDiceFocalLoss."""

    def _init_focal(self, include_background, gamma, weight, alpha, reduction, lambda_focal, backend):
        self.include_background = include_background
        # MONAI takes any number; the operator's focal term needs gamma >= 0 ((1 - p_t)^gamma, a
        # negative power is infinite where p_t = 1)
        self.gamma = _F._number("gamma", gamma)
        if alpha is None or isinstance(alpha, (float, int)):
            self.alpha = None if alpha is None else float(alpha)
        else:
            self.alpha = torch.as_tensor(alpha)  # per class: positives alpha[k], negatives 1
        self.register_buffer("focal_weight", torch.as_tensor(weight) if weight is not None else None)
        self.lambda_focal = _check_lambda("lambda_focal", lambda_focal)
        self.reduction, self.backend = reduction, backend

    def _fusable(self) -> bool:
        """Whether the focal part is a function of the operator's sums (else an element map in PyTorch)."""
        return self.reduction != "none" and not isinstance(self.alpha, Tensor)

    def _kept(self, c: int) -> int:
        return 1 if not self.include_background and c > 1 else 0

    def _weights(self, num_classes: int, like: Tensor) -> Optional[Tensor]:
        """MONAI's class_weight checks; the weights of the kept channels, or None."""
        if self.focal_weight is None:
            return None
        cw = self.focal_weight.to(device=like.device, dtype=like.dtype)
        if cw.ndim > 0:
            if num_classes == 1:
                raise ValueError("Per-class class_weight is not supported for single-channel outputs.")
            if cw.numel() != num_classes:
                raise ValueError(f"The number of class_weight ({cw.numel()}) must match the number of "
                                 f"output channels ({num_classes}).")
        if bool((cw < 0).any()):
            raise ValueError("class_weight values must be non-negative.")
        return cw.reshape(-1).expand(num_classes)

    def _focal_from_stats(self, s: Tensor, input: Tensor, labels: bool) -> Tensor:
        """Mean (over N * C' * pixels) or MONAI's sum (of per-image-and-class means) from the stats.

        MONAI's "sum" is ``loss.mean(dim=spatial dims).sum()``; without spatial dims that dim list is
        empty and ``mean(dim=[])`` averages every element, so "sum" is the mean there.
        """
        k0 = self._kept(input.shape[1])
        s = s[..., k0:]  # MONAI slices input and target: each sigmoid channel is independent
        w = self._weights(s.shape[-1], s)
        reduction = "mean" if self.reduction == "sum" and input.dim() == 2 else self.reduction
        num = _pixel_mean(s, input, labels, kind="focal", activation="sigmoid", weight=w, alpha=self.alpha,
                          reduction=reduction)
        return num / input[0, 0].numel() if reduction == "sum" else num

    def _focal_map(self, input: Tensor, target: Tensor) -> Tensor:
        """MONAI's element map (monai/losses/focal_loss.py, sigmoid_focal_loss) for reduction="none" and
        per-class alpha; target one-hot/soft shaped like input."""
        k0 = self._kept(input.shape[1])
        x, t = input[:, k0:], target[:, k0:].to(input.dtype)
        loss = x - x * t - torch.nn.functional.logsigmoid(x)
        loss = torch.exp(torch.nn.functional.logsigmoid(-x * (t * 2 - 1)) * self.gamma) * loss
        if self.alpha is not None:
            if isinstance(self.alpha, Tensor):
                a = self.alpha.to(device=x.device, dtype=x.dtype)
                if a.ndim == 0:
                    loss = (t * a + (1 - t) * (1 - a)) * loss
                else:
                    if a.shape[0] != t.shape[1]:
                        raise ValueError(f"The length of alpha ({a.shape[0]}) must match the number of classes "
                                         f"({t.shape[1]}).")
                    a = a.view([-1] + [1] * (t.dim() - 2))
                    loss = torch.where(t == 1, a, torch.ones_like(a)) * loss
            else:
                loss = (t * self.alpha + (1 - t) * (1 - self.alpha)) * loss
        w = self._weights(loss.shape[1], loss)
        if w is not None:
            loss = loss * w.reshape([1, -1] + [1] * (loss.dim() - 2))
        if self.reduction == "sum":
            return loss.mean(dim=list(range(2, loss.dim()))).sum()
        if self.reduction == "mean":
            return loss.mean()
        return loss

    def _focal_target(self, dice: _MonaiBase, input: Tensor, target: Tensor):
        """(target for the operator, whether it is labels) after MONAI's one-hot (no warning)."""
        if dice.to_onehot_y and input.shape[1] > 1:
            return dice._labels(input, target), True
        return _float_target(target, input), False

    def _focal(self, dice: _MonaiBase, input: Tensor, target: Tensor) -> Tensor:
        t, labels = self._focal_target(dice, input, target)
        if self._fusable():
            s = _pixel_stats(input, t, "focal", "sigmoid", self.gamma, 1, self.backend)
            return self._focal_from_stats(s, input, labels)
        if labels:
            t = _labels_one_hot(t[:, 0], input.shape[1], input.dtype)
        return self._focal_map(input, t)


class _MonaiDiceFocal(_MonaiFocalPart):
    def __init__(self, include_background=True, to_onehot_y=False, sigmoid=False, softmax=False, other_act=None,
                 squared_pred=False, jaccard=False, reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5, batch=False,
                 gamma=2.0, weight=None, lambda_dice=1.0, lambda_focal=1.0, alpha=None, *, backend="auto"):
        super().__init__()
        # MONAI one-hot encodes the target before both parts: the same as the Dice part's to_onehot_y
        self.dice = _MonaiDice(include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
                               reduction, smooth_nr, smooth_dr, batch, weight, backend=backend)
        self._init_focal(include_background, gamma, weight, alpha, self.dice.reduction, lambda_focal, backend)
        self.lambda_dice = _check_lambda("lambda_dice", lambda_dice)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_compound_shapes(input, target)
        dice = self.dice
        if _dice_activation(dice, input) == "sigmoid" and self._fusable():
            # fused: the Dice sums and the focal sums from one operator call
            labels = dice._labels(input, target)
            t = labels if labels is not None else _float_target(target, input)
            s = _pixel_stats(input, t, "focal", "sigmoid", self.gamma, 2 if dice.squared_pred else 1, self.backend)
            dice_loss = dice._from_sums(*dice._finish_sums(*s[:, :3].unbind(1), input), input)
            focal = self._focal_from_stats(s, input, labels is not None)
            return self.lambda_dice * dice_loss + self.lambda_focal * focal
        return self.lambda_dice * dice(input, target) + self.lambda_focal * self._focal(dice, input, target)


@_register(PresetInfo(
    name="monai_dice_focal",
    original="MONAI 1.6 `monai.losses.DiceFocalLoss`",
    source="monai/losses/dice.py (DiceFocalLoss), monai/losses/focal_loss.py (FocalLoss, sigmoid_focal_loss)",
    call="as `monai_dice_ce`",
    activation="Dice part as `monai_dice`; focal: sigmoid on the logits, also with `softmax=True`",
    denominator="Σp + Σt (`squared_pred`: Σp² + Σt²)",
    smoothing="as `monai_dice`",
    weights="`weight`: Dice class weights and focal class weights (kept classes)",
    absent="nothing special (smoothing only)",
    sums="Dice as `monai_dice`; focal: mean over pixels and kept channels",
    loss="`lambda_dice`·(1 − Dice) + `lambda_focal`·focal (`gamma`=2, `alpha`)",
    equivalent=Equivalent("DiceFocalLoss", dict(activation="sigmoid"), preset_kwargs=dict(sigmoid=True)),
    pixel_loss="focal",
))
def monai_dice_focal(include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                     softmax: bool = False, other_act: Optional[Callable] = None, squared_pred: bool = False,
                     jaccard: bool = False, reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                     batch: bool = False, gamma: float = 2.0, weight=None, lambda_dice: float = 1.0,
                     lambda_focal: float = 1.0, alpha: Optional[float] = None, *, backend: str = "auto") -> nn.Module:
    """``monai.losses.DiceFocalLoss`` (MONAI 1.6, monai/losses/dice.py) with all of its arguments.

    ``forward(input, target)``: as :func:`monai_dice_ce`.  With ``to_onehot_y`` (C > 1) MONAI one-hot
    encodes the target for both parts; then::

        loss = lambda_dice * monai_dice(..., weight=weight)(input, target)
             + lambda_focal * FocalLoss(gamma, alpha, weight, use_softmax=False)(input, target)

    MONAI 1.6 builds its ``FocalLoss`` without ``use_softmax``: the focal part is the *sigmoid* focal
    loss of every kept channel (``include_background=False`` drops channel 0 from both parts), also
    with ``softmax=True``.  Per element, z the logit::

        e = exp(gamma * logsigmoid(-z (2t - 1))) * BCE(z, t) * (alpha t + (1 - alpha)(1 - t)) * weight[k]

    "mean" averages e over N * C' * pixels, "sum" sums the per-image-and-class means (MONAI's), "none"
    returns the Dice's (N, C', 1, ...) plus the focal map (N, C', *spatial).

    Paths: with ``sigmoid=True`` one operator call gives the Dice sums and the focal sums
    (:func:`dicetorch.dice_focal_loss`'s pixel rows).  Otherwise (``softmax=True``, no activation,
    ``other_act``) the Dice part is :func:`monai_dice` and the focal part a second operator call.  The
    element map (``reduction="none"``, a per-class ``alpha`` sequence) is computed in PyTorch.
    The focal part is computed in the input's precision (MONAI casts it to float32).
    """
    return _MonaiDiceFocal(include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
                           reduction, smooth_nr, smooth_dr, batch, gamma, weight, lambda_dice, lambda_focal, alpha,
                           backend=backend)


class _MonaiGeneralizedDiceFocal(_MonaiFocalPart):
    def __init__(self, include_background=True, to_onehot_y=False, sigmoid=False, softmax=False, other_act=None,
                 w_type="square", reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5, batch=False, gamma=2.0,
                 weight=None, lambda_gdl=1.0, lambda_focal=1.0, *, backend="auto"):
        super().__init__()
        self.generalized_dice = _MonaiGeneralizedDice(include_background, to_onehot_y, sigmoid, softmax, other_act,
                                                      w_type, reduction, smooth_nr, smooth_dr, batch, backend=backend)
        self._init_focal(include_background, gamma, weight, None, self.generalized_dice.reduction, lambda_focal,
                         backend)
        self.lambda_gdl = _check_lambda("lambda_gdl", lambda_gdl)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _check_compound_shapes(input, target)
        gdl = self.generalized_dice
        if _dice_activation(gdl, input) == "sigmoid" and self._fusable() and not gdl._pooled(input):
            labels = gdl._labels(input, target)
            t = labels if labels is not None else _float_target(target, input)
            s = _pixel_stats(input, t, "focal", "sigmoid", self.gamma, 1, self.backend)
            gdl_loss = gdl._from_sums(*gdl._finish_sums(*s[:, :3].unbind(1), input), input)
            focal = self._focal_from_stats(s, input, labels is not None)
            return self.lambda_gdl * gdl_loss + self.lambda_focal * focal
        return self.lambda_gdl * gdl(input, target) + self.lambda_focal * self._focal(gdl, input, target)


@_register(PresetInfo(
    name="monai_generalized_dice_focal",
    original="MONAI 1.6 `monai.losses.GeneralizedDiceFocalLoss`",
    source="monai/losses/dice.py (GeneralizedDiceFocalLoss), monai/losses/focal_loss.py (FocalLoss)",
    call="as `monai_dice_ce`",
    activation="generalized Dice part as `monai_generalized_dice`; focal: sigmoid on the logits",
    denominator="Σp + Σt",
    smoothing="as `monai_generalized_dice`",
    weights="`w_type` as `monai_generalized_dice`; `weight`: focal class weights",
    absent="largest weight of the image (`batch=True`: of the batch)",
    sums="generalized Dice as `monai_generalized_dice`; focal: mean over pixels and kept channels",
    loss="`lambda_gdl`·(1 − GDice) + `lambda_focal`·focal (`gamma`=2)",
    equivalent=Equivalent("GeneralizedDiceFocalLoss", dict(activation="sigmoid"), preset_kwargs=dict(sigmoid=True)),
    pixel_loss="focal",
))
def monai_generalized_dice_focal(include_background: bool = True, to_onehot_y: bool = False, sigmoid: bool = False,
                                 softmax: bool = False, other_act: Optional[Callable] = None, w_type: str = "square",
                                 reduction: str = "mean", smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                                 batch: bool = False, gamma: float = 2.0, weight=None, lambda_gdl: float = 1.0,
                                 lambda_focal: float = 1.0, *, backend: str = "auto") -> nn.Module:
    """``monai.losses.GeneralizedDiceFocalLoss`` (MONAI 1.6, monai/losses/dice.py) with all of its arguments.

    ``forward(input, target)``: as :func:`monai_dice_ce`::

        loss = lambda_gdl * monai_generalized_dice(...)(input, target)
             + lambda_focal * FocalLoss(to_onehot_y, gamma, weight, use_softmax=False)(input, target)

    The focal part is the sigmoid focal loss of :func:`monai_dice_focal` without ``alpha`` (MONAI 1.6
    passes none), also with ``softmax=True``.  "none" returns the generalized Dice's (N, 1, 1, ...)
    plus the focal map (N, C', *spatial).  Fused (one operator call) with ``sigmoid=True``; otherwise
    :func:`monai_generalized_dice` and a second operator call for the focal part (PyTorch for "none").
    """
    return _MonaiGeneralizedDiceFocal(include_background, to_onehot_y, sigmoid, softmax, other_act, w_type, reduction,
                                      smooth_nr, smooth_dr, batch, gamma, weight, lambda_gdl, lambda_focal,
                                      backend=backend)
