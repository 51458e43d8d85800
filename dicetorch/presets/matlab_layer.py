"""MATLAB: the ``dicePixelClassificationLayer`` custom layer (generalized Dice, squared volumes)."""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from ._registry import Equivalent, PresetInfo, _register


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
