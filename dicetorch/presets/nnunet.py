"""nnU-Net v2: ``MemoryEfficientSoftDiceLoss`` and the compound ``DC_and_CE_loss`` / ``DC_and_BCE_loss``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import compound as _compound
from .. import functional as _F
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


# ----------------------------------------------------------------------------------------------
# compound losses: DC_and_CE_loss, DC_and_BCE_loss (nnunetv2/training/loss/compound_losses.py)
# ----------------------------------------------------------------------------------------------
_DICE_CLASSES = ("SoftDiceLoss", "MemoryEfficientSoftDiceLoss")
_SOFT_DICE_KWARGS = ("batch_dice", "do_bg", "smooth", "ddp")


def _dice_class_name(dice_class) -> str:
    """"SoftDiceLoss" / "MemoryEfficientSoftDiceLoss", given as a name or as nnU-Net's class itself."""
    name = dice_class if isinstance(dice_class, str) else getattr(dice_class, "__name__", None)
    if name not in _DICE_CLASSES:
        raise ValueError(f"dice_class must be one of {_DICE_CLASSES} (or nnU-Net's class of that name), "
                         f"got {dice_class!r}")
    return name


def _soft_dice(dice_class, soft_dice_kwargs, apply_nonlin: str, backend: str) -> _NnUNetSoftDice:
    """``dice_class(apply_nonlin=..., **soft_dice_kwargs)``, with the constructor's argument errors."""
    name = _dice_class_name(dice_class)
    kw = dict(soft_dice_kwargs)
    if "apply_nonlin" in kw:
        raise TypeError(f"{name}() got multiple values for keyword argument 'apply_nonlin' (the compound loss "
                        "sets it)")
    allowed = _SOFT_DICE_KWARGS + (("clip_tp",) if name == "SoftDiceLoss" else ())
    for key in kw:
        if key not in allowed:
            raise TypeError(f"{name}.__init__() got an unexpected keyword argument {key!r}")
    return _NnUNetSoftDice(apply_nonlin, kw.get("batch_dice", False), kw.get("do_bg", True), kw.get("smooth", 1.0),
                           kw.get("ddp", True), backend, clip_tp=kw.get("clip_tp"))


def _reduction_kwarg(owner: str, kwargs: dict, name: str) -> str:
    reduction = kwargs.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{owner}['reduction']={reduction!r} is not supported: the unreduced pixel loss "
                         f"(N, *spatial) would be broadcast against the scalar Dice ({name} takes 'mean' or 'sum')")
    return reduction


class _NnUNetDCAndCE(nn.Module):
    def __init__(self, soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice, ignore_label, dice_class, backend):
        super().__init__()
        ce_kwargs = dict(ce_kwargs)
        for key in ce_kwargs:
            if key not in ("weight", "ignore_index", "reduction", "label_smoothing"):
                raise ValueError(f"ce_kwargs[{key!r}] is not supported (RobustCrossEntropyLoss's weight, "
                                 "ignore_index, reduction and label_smoothing are)")
        if ignore_label is not None:
            ce_kwargs["ignore_index"] = ignore_label  # as nnU-Net
        self.ce_ignore_index = ce_kwargs.get("ignore_index", -100)
        self.reduction = _reduction_kwarg("ce_kwargs", ce_kwargs, "DC_and_CE_loss")
        self.label_smoothing = float(ce_kwargs.get("label_smoothing", 0.0))
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {self.label_smoothing!r}")
        w = ce_kwargs.get("weight")
        self.register_buffer("ce_weight", torch.as_tensor(w) if w is not None else None)
        self.weight_dice, self.weight_ce, self.ignore_label = weight_dice, weight_ce, ignore_label
        self.dc = _soft_dice(dice_class, soft_dice_kwargs, "softmax", backend)  # softmax_helper_dim1
        self.backend = backend

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        x, c = net_output, net_output.shape[1]
        if target.dim() != x.dim() or target.shape[1] != 1:
            if self.ignore_label is not None:
                raise AssertionError("ignore label is not implemented for one hot encoded target variables "
                                     "(DC_and_CE_loss)")
            raise ValueError(f"DC_and_CE_loss takes the target as a label map (N, 1, *spatial) (its cross-entropy "
                             f"reads target[:, 0] as labels), got {tuple(target.shape)} for net_output "
                             f"{tuple(x.shape)}")
        if c < 2:
            raise ValueError("DC_and_CE_loss needs C >= 2 channels: its softmax over one channel is constant 1")
        ii = self.ce_ignore_index
        if self.ignore_label is None and 0 <= ii < c:
            raise ValueError(f"ce_kwargs['ignore_index']={ii} without ignore_label: the cross-entropy would leave out "
                             "the pixels of that class while the Dice counts them; pass ignore_label instead")
        # nnU-Net's loss mask (target != ignore_label) on label maps is the operator's ignore value: those
        # pixels leave the Dice sums and the cross-entropy alike (an ignore_index outside [0, C) without
        # ignore_label matches no valid label: nothing to leave out)
        labels = target.long()
        ignore = self.ignore_label
        self.dc._check_ddp()
        s = _F._stats(x, labels, activation="softmax", power=1, ignore_index=ignore, backend=self.backend,
                      pixel_loss="ce")
        result = 0
        if self.weight_ce != 0:
            result = self.weight_ce * self._ce(s, c)
        if self.weight_dice != 0:
            result = result + self.weight_dice * self.dc._from_sums(s[:, 0], s[:, 1], s[:, 2])
        if isinstance(result, int):  # both weights 0: nnU-Net returns the number 0
            return torch.zeros((), dtype=s.dtype, device=s.device)
        return result

    def _ce(self, s: Tensor, c: int) -> Tensor:
        """RobustCrossEntropyLoss (nn.CrossEntropyLoss on target[:, 0]); 0 when every pixel is ignored."""
        s_sum = s.sum(0)
        X, L, T = s_sum[3], s_sum[4], s_sum[2]
        w = torch.ones_like(X) if self.ce_weight is None else _compound._pixel_weights(self.ce_weight, c, s, "weight")
        eps = self.label_smoothing
        num = (1.0 - eps) * (w * X).sum() + (eps / c) * (w * L).sum()
        if self.reduction == "sum":
            return num
        den = (w * T).sum()
        if self.ignore_label is None:
            return num / den
        # nnU-Net skips the cross-entropy when no pixel is labelled (num_fg == 0); then num is 0 too, and
        # dividing by 1 keeps the value and the gradient 0 instead of 0/0
        counted = T.sum().detach()
        return num / torch.where(counted > 0, den, torch.ones_like(den))


@_register(PresetInfo(
    name="nnunet_dc_and_ce",
    original="nnU-Net v2 `DC_and_CE_loss` (with `MemoryEfficientSoftDiceLoss`, as `nnUNetTrainer`)",
    source="nnunetv2/training/loss/compound_losses.py (DC_and_CE_loss), dice.py, robust_ce_loss.py at 0e49508 "
           "(nnunetv2 2.8.1)",
    call="`loss(net_output, target)`: net_output (N, C, *) logits, target labels (N, 1, *)",
    activation="softmax (`softmax_helper_dim1`); CE on the logits",
    denominator="Σp + Σt",
    smoothing="`smooth` on 2I and on the denominator (clipped ≥ 1e-8), per class",
    weights="none for the Dice; `ce_kwargs['weight']` for the CE",
    absent="nothing special (smoothing only)",
    sums="per image and class (`batch_dice`: over the batch); `ignore_label` pixels left out of both parts",
    loss="`weight_ce`·CE + `weight_dice`·(−Dice), Dice mean over images and classes",
    equivalent=Equivalent("DiceCELoss", dict(include_background=False), offset=-1.0,
                          preset_args=(dict(batch_dice=False, smooth=1e-5, do_bg=False, ddp=False), {}),
                          preset_kwargs=dict(dice_class="MemoryEfficientSoftDiceLoss")),
    pixel_loss="cross-entropy",
))
def nnunet_dc_and_ce(soft_dice_kwargs: dict, ce_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                     ignore_label: Optional[int] = None, dice_class="SoftDiceLoss", *,
                     backend: str = "auto") -> nn.Module:
    """nnU-Net v2's ``DC_and_CE_loss`` (nnunetv2/training/loss/compound_losses.py, nnunetv2 2.8.1).

    ``forward(net_output, target)``: net_output (N, C, *spatial) logits, C >= 2; target a label map
    (N, 1, *spatial) (float or integer, as nnU-Net's data loader gives it)::

        loss = weight_ce * CE(net_output, target[:, 0]) + weight_dice * dc(net_output, target)
        dc   = -mean_k (2 I_k + smooth) / clip(P_k + T_k + smooth, 1e-8)     (softmax; do_bg, batch_dice)

    ``dice_class``: "SoftDiceLoss" (the class's default) or "MemoryEfficientSoftDiceLoss" (what
    ``nnUNetTrainer._build_loss`` passes, with ``soft_dice_kwargs={'batch_dice': ..., 'smooth': 1e-5,
    'do_bg': False, 'ddp': ...}``), as a name or nnU-Net's class; the two give the same loss (up to
    rounding) except SoftDiceLoss's ``clip_tp`` (tp clipped from below).  ``soft_dice_kwargs``:
    batch_dice, do_bg, smooth, ddp (as in :func:`nnunet_soft_dice`) and, for SoftDiceLoss, clip_tp.
    ``ce_kwargs``: weight, label_smoothing, reduction ("mean" or "sum"), ignore_index.

    ``ignore_label``: pixels with that label leave the Dice sums (nnU-Net's loss mask) and the
    cross-entropy (its ``ignore_index``); with every pixel ignored the cross-entropy is 0 (nnU-Net skips
    it).  A weight of 0 skips its part, as in nnU-Net.

    One operator call gives the Dice sums and the cross-entropy sums (:func:`dicetorch.dice_ce_loss`'s
    pixel rows, the ignore label as the operator's ``ignore_index``).  nnU-Net sums the Dice in
    float32; the preset in the operator's precision (float64 input stays float64).  Not supported
    (errors say so): one-hot targets (nnU-Net's cross-entropy would read channel 0 as labels), a
    ``ce_kwargs`` ignore_index of a valid class without ``ignore_label``, reduction "none".
    """
    return _NnUNetDCAndCE(soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice, ignore_label, dice_class, backend)


# where a region pixel is ignored the logit becomes this: sigmoid is exactly 0 there (also in float16
# and after the float32 promotion of the kernels) and so is the BCE term softplus(z) - 0 * z
_MASKED_LOGIT = -1e4


class _NnUNetDCAndBCE(nn.Module):
    def __init__(self, bce_kwargs, soft_dice_kwargs, weight_ce, weight_dice, use_ignore_label, dice_class, backend):
        super().__init__()
        bce_kwargs = dict(bce_kwargs)
        for key in bce_kwargs:
            if key != "reduction":
                raise ValueError(f"bce_kwargs[{key!r}] is not supported (BCEWithLogitsLoss's reduction is; weight and "
                                 "pos_weight broadcast over arbitrary shapes)")
        if use_ignore_label:
            bce_kwargs["reduction"] = "none"  # as nnU-Net, which then averages over the valid pixels
            self.reduction = "none"
        else:
            self.reduction = _reduction_kwarg("bce_kwargs", bce_kwargs, "DC_and_BCE_loss")
        self.weight_dice, self.weight_ce, self.use_ignore_label = weight_dice, weight_ce, use_ignore_label
        self.dc = _soft_dice(dice_class, soft_dice_kwargs, "sigmoid", backend)
        self.backend = backend

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        x = net_output
        if self.use_ignore_label:
            # the last channel of the one-hot target marks the ignored pixels
            mask = ~target[:, -1:] if target.dtype == torch.bool else (1 - target[:, -1:]).bool()
            target_regions = target[:, :-1]
        else:
            target_regions, mask = target, None
        if tuple(target_regions.shape) != tuple(x.shape):
            extra = " plus the ignore channel" if self.use_ignore_label else ""
            raise ValueError(f"DC_and_BCE_loss takes one-hot region targets shaped like net_output {tuple(x.shape)}"
                             f"{extra}, got {tuple(target.shape)}")
        t = target_regions.to(x.dtype)
        if mask is not None:
            # a masked pixel adds nothing to I, P, T nor to the BCE sum, and gets no gradient
            x = x.masked_fill(~mask, _MASKED_LOGIT)
            t = t * mask
        self.dc._check_ddp()
        s = _F._stats(x, t, activation="sigmoid", power=1, ignore_index=None, backend=self.backend, pixel_loss="ce")
        dc_loss = self.dc._from_sums(s[:, 0], s[:, 1], s[:, 2])
        bce_sum = s[:, 4].sum()
        if mask is not None:
            ce_loss = bce_sum / torch.clip(mask.sum(), min=1e-8)  # valid pixels, not pixels times channels
        elif self.reduction == "mean":
            ce_loss = bce_sum / x.numel()
        else:
            ce_loss = bce_sum
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss


@_register(PresetInfo(
    name="nnunet_dc_and_bce",
    original="nnU-Net v2 `DC_and_BCE_loss` (region-based training)",
    source="nnunetv2/training/loss/compound_losses.py (DC_and_BCE_loss), dice.py at 0e49508 (nnunetv2 2.8.1)",
    call="`loss(net_output, target)`: net_output (N, R, *) logits, target one-hot regions (N, R, *) "
         "(+ ignore channel last with `use_ignore_label`)",
    activation="sigmoid (`torch.sigmoid`); BCE with logits",
    denominator="Σp + Σt",
    smoothing="`smooth` on 2I and on the denominator (clipped ≥ 1e-8), per region",
    weights="none",
    absent="nothing special (smoothing only)",
    sums="per image and region (`batch_dice`: over the batch); ignored pixels left out of both parts",
    loss="`weight_ce`·BCE + `weight_dice`·(−Dice); with `use_ignore_label` the BCE sum is divided by the "
         "valid pixels (not times R)",
    equivalent=Equivalent("DiceCELoss", dict(activation="sigmoid"), offset=-1.0,
                          preset_args=({}, dict(batch_dice=False, do_bg=True, smooth=1e-5, ddp=False))),
    pixel_loss="binary cross-entropy",
))
def nnunet_dc_and_bce(bce_kwargs: dict, soft_dice_kwargs: dict, weight_ce: float = 1, weight_dice: float = 1,
                      use_ignore_label: bool = False, dice_class="MemoryEfficientSoftDiceLoss", *,
                      backend: str = "auto") -> nn.Module:
    """nnU-Net v2's ``DC_and_BCE_loss`` (nnunetv2/training/loss/compound_losses.py, nnunetv2 2.8.1).

    ``forward(net_output, target)``: net_output (N, R, *spatial) region logits; target the one-hot
    (possibly overlapping) regions (N, R, *spatial), float or bool, with one more channel last when
    ``use_ignore_label`` (1/True where the pixel is ignored)::

        loss = weight_ce * BCE + weight_dice * dc,    dc as in :func:`nnunet_dc_and_ce` with sigmoid
        BCE  = mean over N * R * pixels of BCEWithLogits              (bce_kwargs reduction "mean"/"sum")
        BCE  = sum_valid BCEWithLogits / max(#valid pixels, 1e-8)     (use_ignore_label: nnU-Net divides
                                                                      by the pixels, not pixels times R)

    ``nnUNetTrainer._build_loss`` builds it as ``DC_and_BCE_loss({}, {'batch_dice': ..., 'do_bg': True,
    'smooth': 1e-5, 'ddp': ...}, use_ignore_label=..., dice_class=MemoryEfficientSoftDiceLoss)``.

    One operator call gives the Dice sums and the BCE sums.  With ``use_ignore_label`` the ignored
    pixels' logits are replaced by -1e4 (a copy of the input), where the sigmoid and the BCE term are
    exactly 0 and the gradient is 0, and their targets by 0: they then add nothing to any sum, as
    nnU-Net's loss mask.  ``bce_kwargs`` other than reduction ("mean"/"sum") raise.
    """
    return _NnUNetDCAndBCE(bce_kwargs, soft_dice_kwargs, weight_ce, weight_dice, use_ignore_label, dice_class,
                           backend)
