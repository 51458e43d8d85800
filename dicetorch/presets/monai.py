"""MONAI 1.6: ``DiceLoss``, ``GeneralizedDiceLoss`` and ``TverskyLoss``."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

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
