"""Papers and posts: the V-Net Dice, and the TensorFlow and MXNet snippets of seeds 002 and 003."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ._common import _float_target
from ._registry import Equivalent, PresetInfo, _register


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
