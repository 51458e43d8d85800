"""dicetorch: exact, fused Dice-family segmentation losses for PyTorch.

Every loss is a small formula on per-class sums (I, P, T) -- and, for the compound losses, sums of
a pixel loss's element term -- computed by one fused operator, :func:`dicetorch.ops.dice_stats`.
"""
from . import ops, presets
from .compound import dice_ce_loss, dice_focal_loss, generalized_dice_focal_loss
from .functional import dice_loss, dice_score, generalized_dice_loss, tversky_loss
from .losses import DiceCELoss, DiceFocalLoss, DiceLoss, GeneralizedDiceFocalLoss, GeneralizedDiceLoss, TverskyLoss

__version__ = "0.1.0"

__all__ = [
    "ops",
    "presets",
    "DiceLoss",
    "GeneralizedDiceLoss",
    "TverskyLoss",
    "DiceCELoss",
    "DiceFocalLoss",
    "GeneralizedDiceFocalLoss",
    "dice_loss",
    "dice_score",
    "generalized_dice_loss",
    "tversky_loss",
    "dice_ce_loss",
    "dice_focal_loss",
    "generalized_dice_focal_loss",
]
