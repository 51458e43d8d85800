"""Drop-in ``nn.Module`` losses; each forwards to its function in :mod:`dicetorch.functional`.

All take ``(input, target)`` with input (N, C, *spatial) logits and target labels (N, *spatial) /
(N, 1, *spatial) or a float tensor shaped like the input.  ``class_weights`` is a persistent float64
buffer: ``.to(device)`` moves it, ``state_dict`` saves it, ``.half()`` does not round it.

``distributed=True`` (with ``batch=True``) makes the loss global in data-parallel training: the
batch-summed stats are all-reduced over ``process_group`` (default: the world), see
:func:`dicetorch.functional.batch_sums`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import compound
from . import functional as F
from . import ops

__all__ = ["DiceLoss", "GeneralizedDiceLoss", "TverskyLoss", "DiceCELoss", "DiceFocalLoss",
           "GeneralizedDiceFocalLoss"]


class _DiceBase(nn.Module):
    _fn = None  # the functional form
    _weights = ("class_weights",)  # per-class weight arguments, kept as float64 buffers

    def __init__(self, class_weights=None, process_group=None, _weights=None, **kwargs):
        super().__init__()
        # Validate (and normalize numpy / 0-dim tensor numbers) now rather than at the first forward.
        kwargs["smooth_nr"], kwargs["smooth_dr"] = F._check_options(kwargs["smooth_nr"], kwargs["smooth_dr"],
                                                                   kwargs["reduction"])
        kwargs["ignore_index"] = ops.as_ignore_index(kwargs["ignore_index"])
        if len(self._weights) == 1:  # compound losses check their activation themselves
            F._check_loss_activation(kwargs["activation"])
        if kwargs["distributed"] and not kwargs["batch"]:
            F.check_distributed(True, False)  # raises; the process group is looked for at call time
        if process_group is not None and not kwargs["distributed"]:
            raise ValueError("process_group is used only with distributed=True")
        self.process_group = process_group
        if kwargs["backend"] not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {kwargs['backend']!r}")
        self._kwargs = kwargs
        # float64 and persistent (saved in state_dict); cast to the loss dtype at use.
        given = dict(_weights or {}, class_weights=class_weights)
        for name in self._weights:
            w = F.check_class_weights(given.get(name))
            self.register_buffer(name, None if w is None else w.clone(), persistent=True)

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) would round the weights: move them to the new device, keep float64.
        saved = {name: getattr(self, name) for name in self._weights}
        super()._apply(fn, recurse)
        for name, w in saved.items():
            if w is not None:
                setattr(self, name, w.to(device=getattr(self, name).device))
        return self

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        weights = {name: getattr(self, name) for name in self._weights}
        if self.process_group is not None:
            weights["process_group"] = self.process_group
        return type(self)._fn(input, target, **weights, **self._kwargs)

    def extra_repr(self) -> str:
        items = [f"{k}={v!r}" for k, v in self._kwargs.items()]
        for name in self._weights:
            if getattr(self, name) is not None:
                items.append(f"{name}={getattr(self, name).tolist()}")
        return ", ".join(items)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"dicetorch.{type(self).__name__} cannot be compiled by torch.jit.script (its operator is a "
            "Python custom op); use torch.compile, or torch.jit.trace / torch.export on the model with the loss"
        )


class DiceLoss(_DiceBase):
    """Soft Dice loss, per image and class, averaged (see :func:`dicetorch.dice_loss`).

    ``loss = mean_{n,k} w_k (1 - (2 I + smooth_nr) / (P + T + smooth_dr))``

    Example::

        loss_fn = dicetorch.DiceLoss(include_background=False)
        loss = loss_fn(logits, labels)   # logits (N, C, H, W), labels (N, H, W) int64
    """

    _fn = staticmethod(F.dice_loss)

    def __init__(self, *, activation: str = "softmax", squared: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, batch: bool = False, include_background: bool = True,
                 ignore_index: Optional[int] = None, class_weights=None, log_loss: bool = False,
                 reduction: str = "mean", backend: str = "auto", distributed: bool = False, process_group=None):
        super().__init__(class_weights, process_group, activation=activation, squared=squared, smooth_nr=smooth_nr,
                         smooth_dr=smooth_dr, batch=batch, include_background=include_background,
                         ignore_index=ignore_index, log_loss=log_loss, reduction=reduction, backend=backend,
                         distributed=distributed)


class GeneralizedDiceLoss(_DiceBase):
    """Generalized Dice loss (Sudre et al. 2017), see :func:`dicetorch.generalized_dice_loss`.

    ``loss = 1 - (2 sum_k w_k I_k + smooth_nr) / (sum_k w_k (P_k + T_k) + smooth_dr)`` per image,
    with ``w_k = 1 / (sum_m t_k)^2`` by default.
    """

    _fn = staticmethod(F.generalized_dice_loss)

    def __init__(self, *, activation: str = "softmax", squared: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, batch: bool = False, include_background: bool = True,
                 ignore_index: Optional[int] = None, class_weights=None, log_loss: bool = False,
                 reduction: str = "mean", weighting: str = "square", absent_weight: str = "max",
                 backend: str = "auto", distributed: bool = False, process_group=None):
        if weighting not in F.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {F.WEIGHTINGS}, got {weighting!r}")
        if absent_weight not in F.ABSENT:
            raise ValueError(f"absent_weight must be one of {F.ABSENT}, got {absent_weight!r}")
        super().__init__(class_weights, process_group, activation=activation, squared=squared, smooth_nr=smooth_nr,
                         smooth_dr=smooth_dr, batch=batch, include_background=include_background,
                         ignore_index=ignore_index, log_loss=log_loss, reduction=reduction,
                         weighting=weighting, absent_weight=absent_weight, backend=backend, distributed=distributed)


class TverskyLoss(_DiceBase):
    """Tversky / focal Tversky loss, see :func:`dicetorch.tversky_loss`.

    ``ti = (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr)``, ``loss = mean w_k (1 - ti)^gamma``.
    alpha = beta = 0.5 gives Dice, alpha = beta = 1 gives Jaccard.
    """

    _fn = staticmethod(F.tversky_loss)

    def __init__(self, *, activation: str = "softmax", alpha: float = 0.5, beta: float = 0.5,
                 gamma: float = 1.0, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                 include_background: bool = True, ignore_index: Optional[int] = None, class_weights=None,
                 log_loss: bool = False, reduction: str = "mean", backend: str = "auto",
                 distributed: bool = False, process_group=None):
        super().__init__(class_weights, process_group, activation=activation, alpha=alpha, beta=beta, gamma=gamma,
                         smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch,
                         include_background=include_background, ignore_index=ignore_index,
                         log_loss=log_loss, reduction=reduction, backend=backend, distributed=distributed)


class DiceCELoss(_DiceBase):
    """Dice + cross-entropy in one fused pass, see :func:`dicetorch.dice_ce_loss`.

    ``loss = lambda_dice * DiceLoss + lambda_ce * CrossEntropy`` (softmax: exactly
    ``F.cross_entropy(weight=ce_weight, ignore_index, label_smoothing)``; sigmoid: BCE with logits).

    Example::

        loss_fn = dicetorch.DiceCELoss(include_background=False, ignore_index=255)
        loss = loss_fn(logits, labels)   # logits (N, C, H, W), labels (N, H, W)
    """

    _fn = staticmethod(compound.dice_ce_loss)
    _weights = ("class_weights", "ce_weight")

    def __init__(self, *, activation: str = "softmax", squared: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, batch: bool = False, include_background: bool = True,
                 ignore_index: Optional[int] = None, class_weights=None, log_loss: bool = False,
                 reduction: str = "mean", backend: str = "auto", distributed: bool = False, process_group=None,
                 lambda_dice: float = 1.0, lambda_ce: float = 1.0, ce_weight=None, label_smoothing: float = 0.0):
        (lambda_dice, lambda_ce), label_smoothing, _, _ = compound._check_compound(
            activation, reduction, (("lambda_dice", lambda_dice), ("lambda_ce", lambda_ce)), label_smoothing)
        super().__init__(class_weights, process_group, {"ce_weight": ce_weight}, activation=activation,
                         squared=squared, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch,
                         include_background=include_background, ignore_index=ignore_index, log_loss=log_loss,
                         reduction=reduction, backend=backend, distributed=distributed, lambda_dice=lambda_dice,
                         lambda_ce=lambda_ce, label_smoothing=label_smoothing)


class DiceFocalLoss(_DiceBase):
    """Dice + focal loss (MONAI's ``FocalLoss``) in one fused pass, see :func:`dicetorch.dice_focal_loss`."""

    _fn = staticmethod(compound.dice_focal_loss)
    _weights = ("class_weights", "focal_weight")

    def __init__(self, *, activation: str = "softmax", squared: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, batch: bool = False, include_background: bool = True,
                 ignore_index: Optional[int] = None, class_weights=None, log_loss: bool = False,
                 reduction: str = "mean", backend: str = "auto", distributed: bool = False, process_group=None,
                 lambda_dice: float = 1.0, lambda_focal: float = 1.0, gamma: float = 2.0,
                 alpha: Optional[float] = None, focal_weight=None):
        (lambda_dice, lambda_focal), _, alpha, gamma = compound._check_compound(
            activation, reduction, (("lambda_dice", lambda_dice), ("lambda_focal", lambda_focal)), alpha=alpha,
            gamma=gamma)
        super().__init__(class_weights, process_group, {"focal_weight": focal_weight}, activation=activation,
                         squared=squared, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch,
                         include_background=include_background, ignore_index=ignore_index, log_loss=log_loss,
                         reduction=reduction, backend=backend, distributed=distributed, lambda_dice=lambda_dice,
                         lambda_focal=lambda_focal, gamma=gamma, alpha=alpha)


class GeneralizedDiceFocalLoss(_DiceBase):
    """Generalized Dice + focal loss (MONAI's ``GeneralizedDiceFocalLoss``) in one fused pass, see
    :func:`dicetorch.generalized_dice_focal_loss`."""

    _fn = staticmethod(compound.generalized_dice_focal_loss)
    _weights = ("class_weights", "focal_weight")

    def __init__(self, *, activation: str = "softmax", squared: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, batch: bool = False, include_background: bool = True,
                 ignore_index: Optional[int] = None, class_weights=None, log_loss: bool = False,
                 reduction: str = "mean", weighting: str = "square", absent_weight: str = "max",
                 backend: str = "auto", distributed: bool = False, process_group=None, lambda_gdl: float = 1.0,
                 lambda_focal: float = 1.0, gamma: float = 2.0, alpha: Optional[float] = None, focal_weight=None):
        if weighting not in F.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {F.WEIGHTINGS}, got {weighting!r}")
        if absent_weight not in F.ABSENT:
            raise ValueError(f"absent_weight must be one of {F.ABSENT}, got {absent_weight!r}")
        (lambda_gdl, lambda_focal), _, alpha, gamma = compound._check_compound(
            activation, reduction, (("lambda_gdl", lambda_gdl), ("lambda_focal", lambda_focal)), alpha=alpha,
            gamma=gamma)
        super().__init__(class_weights, process_group, {"focal_weight": focal_weight}, activation=activation,
                         squared=squared, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch,
                         include_background=include_background, ignore_index=ignore_index, log_loss=log_loss,
                         reduction=reduction, weighting=weighting, absent_weight=absent_weight, backend=backend,
                         distributed=distributed, lambda_gdl=lambda_gdl, lambda_focal=lambda_focal, gamma=gamma,
                         alpha=alpha)
