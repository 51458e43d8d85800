"""dicetorch: exact, fused Dice-family segmentation losses for PyTorch.

Every loss is a small formula on per-class sums (I, P, T) computed by one fused operator,
:func:`dicetorch.ops.dice_stats`.
"""
from . import ops, presets
from .functional import dice_loss, dice_score, generalized_dice_loss, tversky_loss
from .losses import DiceLoss, GeneralizedDiceLoss, TverskyLoss

__version__ = "0.1.0"

__all__ = [
    "ops",
    "presets",
    "DiceLoss",
    "GeneralizedDiceLoss",
    "TverskyLoss",
    "dice_loss",
    "dice_score",
    "generalized_dice_loss",
    "tversky_loss",
]
