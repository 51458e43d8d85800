"""Segmentation metrics on the fused operator: ``DiceScore``, ``GeneralizedDiceScore``, ``MeanIoU``.

They are ``torchmetrics.Metric`` subclasses (state synchronization across ranks, ``forward`` /
``update`` / ``compute`` / ``reset``, Lightning logging all come from torchmetrics) with the
constructor arguments of ``torchmetrics.segmentation`` and exactly its values (torchmetrics 1.9) for
its input formats, plus two additions:

* ``input_format="logits"``: raw scores (N, C, *spatial) go straight in, with integer labels
  (N, *spatial) or a one-hot target shaped like them.  The argmax over channels is fused in the
  operator's kernel (``dicetorch.ops.dice_stats(..., activation="argmax")``): one read of the logits,
  no argmax or one-hot tensor.  The values are those torchmetrics gives for the same logits passed
  as ``"one-hot"`` (with a one-hot target) or ``"mixed"`` (with labels), where it takes the argmax.
* ``ignore_index``: pixels whose *target label* equals it count nowhere (integer label targets only).

Every format ends in the same per-image, per-class integer counts (:func:`hard_counts`):
intersection I, prediction volume P, target volume T, then torchmetrics' formulas.  The counts are
exact: the fused kernel sums 0/1 values in fp32, exact below 2**24 pixels per image, and images
larger than that are counted in pieces.

``pip install "dicetorch[metrics]"`` installs torchmetrics.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

try:
    from torchmetrics import Metric
    from torchmetrics.utilities.data import dim_zero_cat
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "dicetorch.metrics needs torchmetrics, an optional dependency of dicetorch: "
        "pip install 'dicetorch[metrics]' (or pip install torchmetrics)") from exc

from . import ops

__all__ = ["DiceScore", "GeneralizedDiceScore", "MeanIoU", "hard_counts", "INPUT_FORMATS"]

INPUT_FORMATS = ("one-hot", "index", "mixed", "logits")
AVERAGES = ("micro", "macro", "weighted", "none")
AGGREGATION_LEVELS = ("samplewise", "global")
WEIGHT_TYPES = ("square", "simple", "linear")
_EXACT_PIXELS = 2**24 - 1  # fp32 sums of 0/1 values are exact up to here


# ----------------------------------------------------------------------------------------------
# Hard counts from any input format
# ----------------------------------------------------------------------------------------------
def hard_counts(preds: Tensor, target: Tensor, *, num_classes: Optional[int], input_format: str,
                include_background: bool = True, ignore_index: Optional[int] = None,
                intersection: str = "mul", backend: str = "auto") -> tuple:
    """Per-image, per-class hard counts (I, P, T), each an int64 (N, C) tensor.

    ``I[n, k]`` = pixels predicted k and labelled k, ``P[n, k]`` = pixels predicted k, ``T[n, k]`` =
    pixels labelled k, over the counted pixels (target label != ``ignore_index``).  Formats:

    * "logits":  preds (N, C, *spatial) float scores, argmax over C fused in the operator; target
      integer labels (N, *spatial) / (N, 1, *spatial), or one-hot shaped like preds;
    * "index":   preds and target integer labels of the same shape (N, *spatial);
    * "one-hot": preds and target (N, C, *spatial); integer/bool tensors are taken as they are,
      float tensors are replaced by their argmax over C (as torchmetrics does);
    * "mixed":   one of them one-hot (N, C, *spatial), the other labels (N, *spatial).

    ``include_background=False`` drops class 0 (when C > 1).  ``intersection`` is "mul" (Σ p·t, the
    Dice scores) or "and" (Σ p & t, MeanIoU): they differ only for one-hot input that is not 0/1.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError("preds and target must be torch.Tensor")
    if target.device != preds.device:
        raise ValueError(f"target is on {target.device} but preds is on {preds.device}")
    ignore_index = ops.as_ignore_index(ignore_index)
    pk, p, tk, t = _sides(preds, target, input_format)
    c = p.shape[1] if pk != "labels" else (t.shape[1] if tk != "labels" else num_classes)
    if c is None:
        raise ValueError(f"num_classes must be given for input_format={input_format!r}")
    if num_classes is not None and c != num_classes:
        raise ValueError(f"the one-hot/logits input has {c} channels but num_classes={num_classes}")
    if ignore_index is not None and tk != "labels":
        raise ValueError("ignore_index needs an integer label target (N, *spatial); the target here is one-hot")
    if tk == "scores":  # a float one-hot target: its argmax, as torchmetrics takes it
        t, tk = t.argmax(1), "labels"
    if pk == "scores" and c == 1:  # argmax over one channel: every pixel is class 0 (as torchmetrics)
        p, pk = torch.zeros_like(p[:, 0], dtype=torch.long), "labels"
    if pk == "scores" and (tk == "labels" or intersection == "mul"):
        i, pv, tv = _fused_counts(p, t, ignore_index, backend)
    elif pk == "labels" and tk == "labels":
        i, pv, tv = _label_counts(p, t, c, ignore_index)
    else:
        i, pv, tv = _onehot_counts(p, pk, t, tk, c, ignore_index, intersection)
    if not include_background and c > 1:
        i, pv, tv = i[:, 1:], pv[:, 1:], tv[:, 1:]
    return i, pv, tv


def _sides(preds: Tensor, target: Tensor, fmt: str):
    """(kind, tensor) of each side; kind: "scores" (float, argmax over dim 1), "onehot", "labels"."""
    def onehot_kind(x):
        return "scores" if x.is_floating_point() else "onehot"

    def labels(x, what):
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{what} must be integer class labels for input_format={fmt!r}, got dtype {x.dtype}")
        return x

    if fmt == "logits":
        if not preds.is_floating_point() or preds.dim() < 2:
            raise TypeError(f"input_format='logits' needs float preds (N, C, *spatial), got dtype {preds.dtype}, "
                            f"shape {tuple(preds.shape)}")
        spatial = tuple(preds.shape[2:])
        if tuple(target.shape) == tuple(preds.shape):
            return "scores", preds, onehot_kind(target), target
        if tuple(target.shape) == (preds.shape[0], 1, *spatial) and preds.shape[1] > 1:
            target = target[:, 0]
        if tuple(target.shape) != (preds.shape[0], *spatial):
            raise ValueError(f"target must be labels (N, *spatial) = {(preds.shape[0], *spatial)} or one-hot "
                             f"shaped like preds {tuple(preds.shape)}; got {tuple(target.shape)}")
        return "scores", preds, "labels", labels(target, "target")
    if fmt == "index":
        if preds.shape != target.shape:
            raise ValueError(f"preds and target must have the same shape, got {tuple(preds.shape)} and "
                             f"{tuple(target.shape)}")
        return "labels", labels(preds, "preds"), "labels", labels(target, "target")
    if fmt == "one-hot":
        if preds.shape != target.shape or preds.dim() < 3:
            raise ValueError(f"preds and target must be one-hot of the same shape (N, C, *spatial), got "
                             f"{tuple(preds.shape)} and {tuple(target.shape)}")
        return onehot_kind(preds), preds, onehot_kind(target), target
    # mixed
    if preds.dim() == target.dim() + 1 and preds.shape[0] == target.shape[0] and preds.shape[2:] == target.shape[1:]:
        return onehot_kind(preds), preds, "labels", labels(target, "target")
    if target.dim() == preds.dim() + 1 and preds.shape[0] == target.shape[0] and target.shape[2:] == preds.shape[1:]:
        return "labels", labels(preds, "preds"), onehot_kind(target), target
    raise ValueError(f"input_format='mixed' needs one one-hot (N, C, *spatial) and one label (N, *spatial) tensor, "
                     f"got {tuple(preds.shape)} and {tuple(target.shape)}")


def _check_labels(x: Tensor, c: int, what: str, ignore_index: Optional[int] = None) -> None:
    if torch.compiler.is_compiling() or x.numel() == 0:
        return
    if ignore_index is None:
        lo, hi = torch.aminmax(x.reshape(-1))  # one pass
        bad = (lo < 0) | (hi >= c)
    else:
        bad = (((x < 0) | (x >= c)) & (x.long() != ignore_index)).any()
    ops._data_check(bad, lambda on_device=False: f"{what} labels must lie in [0, {c - 1}] for {c} classes"
                    + ("" if ignore_index is None else f" (besides ignore_index={ignore_index})"))


def _fused_counts(x: Tensor, t: Tensor, ignore_index: Optional[int], backend: str):
    """Counts of argmax(x) against t (labels or integer one-hot) from the fused operator."""
    n, c = x.shape[0], x.shape[1]
    xv = x.reshape(n, c, -1)
    label_target = t.dim() != x.dim()
    if label_target:
        _check_labels(t, c, "target", ignore_index)
        tv = t.reshape(n, -1)
    else:
        tv = t.reshape(n, c, -1)
    m = xv.shape[-1]
    piece = m if x.dtype == torch.float64 else _EXACT_PIXELS
    total = None
    for start in range(0, max(m, 1), piece):
        xs = xv[:, :, start:start + piece]
        ts = tv[..., start:start + piece]
        s = ops.dice_stats(xs, ts, "argmax", 1, ignore_index, backend).round().long()
        total = s if total is None else total + s
    return total[:, 0], total[:, 1], total[:, 2]


def _label_counts(p: Tensor, t: Tensor, c: int, ignore_index: Optional[int]):
    """Counts of label predictions against label targets: three bincounts, no one-hot tensor."""
    n = p.shape[0] if p.dim() > 0 else 1
    p, t = p.reshape(n, -1).long(), t.reshape(n, -1).long()
    _check_labels(p, c, "preds")
    _check_labels(t, c, "target", ignore_index)
    offset = (torch.arange(n, device=p.device) * c).unsqueeze(1)
    keep = None if ignore_index is None else t != ignore_index
    hit = p == t
    if keep is not None:
        hit &= keep

    def count(keys, mask):
        keys = keys + offset
        keys = keys.reshape(-1) if mask is None else keys[mask]
        return torch.bincount(keys, minlength=n * c).view(n, c)

    return count(t, hit), count(p, keep), count(t, keep)


def _onehot_counts(p, pk, t, tk, c, ignore_index, intersection):
    """Counts from one-hot tensors (torchmetrics' own formulas); label sides become one-hot first."""
    def as_onehot(x, kind):
        if kind == "scores":
            x = x.argmax(1)
        elif kind == "onehot":
            return x
        return torch.nn.functional.one_hot(x.long(), c).movedim(-1, 1)

    keep = None
    if tk == "labels":
        _check_labels(t, c, "target", ignore_index)
        if ignore_index is not None:
            keep = t != ignore_index
            t = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
    if pk == "labels":
        _check_labels(p, c, "preds")
    p1, t1 = as_onehot(p, pk), as_onehot(t, tk)
    if keep is not None:
        p1, t1 = p1 * keep.unsqueeze(1), t1 * keep.unsqueeze(1)
    dims = list(range(2, p1.dim()))
    inter = (p1 & t1) if intersection == "and" else (p1 * t1)
    return torch.sum(inter, dim=dims), torch.sum(p1, dim=dims), torch.sum(t1, dim=dims)


def _safe_divide(num: Tensor, denom: Tensor, zero_division="nan") -> Tensor:
    """num / denom in floating point; where denom == 0: NaN ("nan") or the given number."""
    num = num if num.is_floating_point() else num.float()
    denom = denom if denom.is_floating_point() else denom.float()
    if zero_division == "nan":
        return torch.true_divide(num, denom)
    return torch.where(denom != 0, num / denom, torch.full((), zero_division, dtype=num.dtype, device=num.device))


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def _check_common(num_classes, include_background, input_format, *, optional_classes=False):
    if num_classes is None and optional_classes:
        if input_format == "index":
            raise ValueError("num_classes must be given when input_format='index'")
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(include_background, bool):
        raise ValueError(f"include_background must be a boolean, got {include_background!r}")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")


class _HardMetric(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def _init_inputs(self, num_classes, include_background, input_format, ignore_index, backend):
        self.num_classes = num_classes
        self.include_background = include_background
        self.input_format = input_format
        self.ignore_index = ops.as_ignore_index(ignore_index)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend

    def _counts(self, preds, target, intersection="mul"):
        return hard_counts(preds, target, num_classes=self.num_classes, input_format=self.input_format,
                           include_background=self.include_background, ignore_index=self.ignore_index,
                           intersection=intersection, backend=self.backend)


class DiceScore(_HardMetric):
    """Dice score, ``torchmetrics.segmentation.DiceScore``'s arguments and values, on fused counts.

    ``dice = 2 I / (P + T)`` per image and class (NaN where P + T = 0), then:

    * ``aggregation_level="samplewise"``: per image, averaged over the images (NaN ignored);
      ``"global"``: the sums over all images first;
    * ``average``: "micro" (sums over classes first), "macro" (mean over classes, NaN ignored),
      "weighted" (classes weighted by their target volume), "none"/None (per class).

    Args:
        num_classes: number of classes C.
        include_background: False drops class 0.
        input_format: "one-hot", "index", "mixed" (as torchmetrics) or "logits" (raw scores, argmax
            fused in the kernel); see :func:`hard_counts`.
        ignore_index: target label whose pixels count nowhere.
        backend: operator backend for "logits" input (see :func:`dicetorch.ops.dice_stats`).
        kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).

    Example::

        metric = DiceScore(num_classes=5, input_format="logits", average="none")
        metric.update(logits, labels)      # logits (N, 5, D, H, W) float, labels (N, D, H, W)
        metric.compute()                   # (5,), synchronized over ranks
    """

    def __init__(self, num_classes: int, include_background: bool = True, average: Optional[str] = "macro",
                 aggregation_level: Optional[str] = "samplewise", input_format: str = "one-hot",
                 ignore_index: Optional[int] = None, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_common(num_classes, include_background, input_format)
        if average is not None and average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES} or None, got {average!r}")
        if aggregation_level not in AGGREGATION_LEVELS:
            raise ValueError(f"aggregation_level must be one of {AGGREGATION_LEVELS}, got {aggregation_level!r}")
        self._init_inputs(num_classes, include_background, input_format, ignore_index, backend)
        self.average = average
        self.aggregation_level = aggregation_level
        self.add_state("numerator", [], dist_reduce_fx="cat")
        self.add_state("denominator", [], dist_reduce_fx="cat")
        self.add_state("support", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        i, p, t = self._counts(preds, target)
        self.numerator.append(2 * i)
        self.denominator.append(p + t)
        self.support.append(t)

    def compute(self) -> Tensor:
        num, den = dim_zero_cat(self.numerator), dim_zero_cat(self.denominator)
        support = dim_zero_cat(self.support) if self.average == "weighted" else None
        if self.aggregation_level == "global":
            num, den = num.sum(0).unsqueeze(0), den.sum(0).unsqueeze(0)
            support = support.sum(0) if support is not None else None
        if self.average == "micro":
            dice = _safe_divide(num.sum(-1), den.sum(-1))
        else:
            dice = _safe_divide(num, den)
            if self.average == "macro":
                dice = torch.nanmean(dice, dim=-1)
            elif self.average == "weighted":
                weights = _safe_divide(support, support.sum(-1, keepdim=True))
                all_nan = dice.isnan().all(dim=-1)
                dice = torch.nansum(dice * weights, dim=-1)
                dice[all_nan] = torch.nan
        return dice.nanmean(dim=0)


class GeneralizedDiceScore(_HardMetric):
    """Generalized Dice score, ``torchmetrics.segmentation.GeneralizedDiceScore``'s arguments and values.

    Per image: ``w_k`` = 1/T_k² ("square"), 1/T_k ("simple") or 1 ("linear"); the score is
    ``2 Σ_k w_k I_k / Σ_k w_k (P_k + T_k)`` (``per_class``: each class's ratio), 0 where the
    denominator is 0, averaged over all images.  A class absent from an image's target (infinite
    weight) gets a finite weight as torchmetrics 1.9 assigns it: in an update of N images, absent
    entry (n, k) takes the largest finite weight over the update's images of class ``(n·C + k) // N``
    (the image's own class for N = 1); this is reproduced exactly, so values match update for update.
    """

    def __init__(self, num_classes: int, include_background: bool = True, per_class: bool = False,
                 weight_type: str = "square", input_format: str = "one-hot", ignore_index: Optional[int] = None,
                 backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_common(num_classes, include_background, input_format)
        if not isinstance(per_class, bool):
            raise ValueError(f"per_class must be a boolean, got {per_class!r}")
        if weight_type not in WEIGHT_TYPES:
            raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
        self._init_inputs(num_classes, include_background, input_format, ignore_index, backend)
        self.per_class = per_class
        self.weight_type = weight_type
        kept = num_classes if include_background else num_classes - 1
        self.add_state("score", default=torch.zeros(kept if per_class else 1), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.zeros(1), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        i, p, t = self._counts(preds, target)
        if self.weight_type == "simple":
            weights = 1.0 / t
        elif self.weight_type == "linear":
            weights = torch.ones_like(t)
        else:
            weights = 1.0 / (t**2)
        weights = weights.contiguous()
        shape = weights.shape
        flat = weights.flatten()  # a view: the writes below reach ``weights``
        infs = torch.isinf(flat)
        flat[infs] = 0
        fill = torch.max(weights, 0).values.repeat(shape[0], 1).T.flatten()  # torchmetrics 1.9's layout
        flat[infs] = fill[infs]
        weights = flat.reshape(shape)
        num, den = 2.0 * i * weights, (t + p) * weights
        if not self.per_class:
            num, den = num.sum(1), den.sum(1)
        self.score += _safe_divide(num, den, zero_division=0.0).sum(dim=0)
        self.samples += i.shape[0]

    def compute(self) -> Tensor:
        return self.score / self.samples


class MeanIoU(_HardMetric):
    """Mean intersection over union, ``torchmetrics.segmentation.MeanIoU``'s arguments and values.

    Per image and class ``IoU = I / (P + T - I)``; classes with an empty union are left out.  The
    result averages the IoUs of all (image, class) pairs with a non-empty union (``per_class``: per
    class, -1 for a class that never occurs).  ``num_classes`` may be None for one-hot, mixed and
    logits input (taken from the first update).
    """

    def __init__(self, num_classes: Optional[int] = None, include_background: bool = True, per_class: bool = False,
                 input_format: str = "one-hot", ignore_index: Optional[int] = None, backend: str = "auto",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_common(num_classes, include_background, input_format, optional_classes=True)
        if not isinstance(per_class, bool):
            raise ValueError(f"per_class must be a boolean, got {per_class!r}")
        self._init_inputs(num_classes, include_background, input_format, ignore_index, backend)
        self.per_class = per_class
        self._has_states = False
        if num_classes is not None:
            self._add_states(num_classes, lazy=False)
        else:  # placeholders until the first update knows C (forward() merges the batch state into them)
            self.add_state("score", default=torch.zeros(1), dist_reduce_fx="sum")
            self.add_state("num_batches", default=torch.zeros(1), dist_reduce_fx="sum")

    def _add_states(self, num_classes: int, lazy: bool) -> None:
        # torchmetrics' state shapes, which the result depends on to the last bit: without per_class the
        # mean over classes of (C,) equal ratios, which rounds differently from the ratio itself
        kept = num_classes if self.include_background else num_classes - 1
        size = kept if self.per_class or lazy else 1
        self.add_state("score", default=torch.zeros(size, device=self.device, dtype=self.dtype), dist_reduce_fx="sum")
        self.add_state("num_batches", default=torch.zeros(kept, device=self.device,
                                                           dtype=torch.int32 if lazy else self.dtype),
                       dist_reduce_fx="sum")
        self._has_states = True

    def update(self, preds: Tensor, target: Tensor) -> None:
        if self.input_format in ("index", "mixed"):  # torchmetrics takes 1-D/2-D label input as one image
            preds, target = _one_image(preds), _one_image(target)
        i, p, t = self._counts(preds, target, intersection="and")
        if not self._has_states:
            self.num_classes = (preds if preds.dim() > target.dim() or self.input_format != "mixed" else target).shape[1]
            self._add_states(self.num_classes, lazy=True)
        union = t + p - i
        score = _safe_divide(i, union, zero_division=0.0)
        valid = union > 0
        if self.per_class:
            self.score += (score * valid).sum(dim=0)
            self.num_batches += valid.sum(dim=0)
        else:
            self.score += (score * valid).sum()
            self.num_batches += valid.sum()

    def compute(self) -> Tensor:
        if not self._has_states:
            raise RuntimeError("MeanIoU.compute() before any update: the number of classes is not known yet")
        out = self.score / self.num_batches
        return out.nan_to_num(-1.0) if self.per_class else out.nanmean()


def _one_image(x: Tensor) -> Tensor:
    if x.dim() == 1:
        return x.unsqueeze(0).unsqueeze(0)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x
