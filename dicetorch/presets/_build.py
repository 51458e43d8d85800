"""What an identification builds: a dicetorch loss (or a preset) behind the original's calling convention."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._probe import Convention


class IdentifiedLoss(nn.Module):
    """``scale * loss(input, target) + offset``, reshaped as the original returns it.

    ``loss`` is a dicetorch ``DiceLoss`` / ``GeneralizedDiceLoss`` / ``TverskyLoss`` on the fused
    operator; ``convention`` maps the original's arguments (order, layout, target form) to its
    (N, C, *spatial) input and target; ``trailing`` appends that many singleton dims to the result
    (MONAI's broadcastable ``reduction="none"`` shapes), ``shape`` fixes the shape of a one-element result.
    """

    def __init__(self, loss: nn.Module, convention: Convention, scale: float = 1.0, offset: float = 0.0,
                 trailing: int = 0, shape: Optional[tuple] = None):
        super().__init__()
        self.loss, self.convention = loss, convention
        self.scale, self.offset, self.trailing, self.shape = scale, offset, trailing, shape

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        x, t = self.convention.canonical(first, second)
        out = self.loss(x, t)
        if self.scale != 1.0:
            out = out * self.scale
        if self.offset != 0.0:
            out = out + self.offset
        if self.shape is not None:
            return out.reshape(self.shape)
        return out.reshape(*out.shape, *([1] * self.trailing)) if self.trailing else out

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, offset={self.offset!r}, {self.convention}"


class AdaptedPreset(nn.Module):
    """A preset called from another calling convention: ``preset(*adapter(x, target))``."""

    def __init__(self, preset: nn.Module, convention: Convention, adapter: Callable, shape: Optional[tuple] = None):
        super().__init__()
        self.preset, self.convention, self.adapter, self.shape = preset, convention, adapter, shape

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        x, t = self.convention.canonical(first, second)
        out = self.preset(*self.adapter(x, t))
        return out.reshape(self.shape) if self.shape is not None and out.numel() == 1 else out


def as_labels(x: Tensor, t: Tensor) -> Tensor:
    """(N, *spatial) int64 labels from labels (N, *S), (N, 1, *S) or a one-hot target shaped like x."""
    if t.is_floating_point() or (t.shape == x.shape and x.shape[1] > 1):
        return t.argmax(1)
    if t.dim() == x.dim():
        t = t.squeeze(1)
    return t.long()


def as_onehot(x: Tensor, t: Tensor) -> Tensor:
    """A float one-hot target shaped like x."""
    if t.is_floating_point() and t.shape == x.shape:
        return t
    lab = as_labels(x, t)
    return torch.nn.functional.one_hot(lab, x.shape[1]).movedim(-1, 1).to(x.dtype)
