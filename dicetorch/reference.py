"""Plain-PyTorch reference of the ``dice_stats`` operator: the oracle every kernel is tested against.

Both functions work on the canonical layout that :mod:`dicetorch.ops` hands to every backend:

* ``input``  -- (N, C, M) float logits or probabilities (any strides, any float dtype);
* ``target`` -- (N, M) integer labels, or (N, C, M) float targets with ``input``'s dtype.

Label semantics (shared by all backends): channel ``k`` matches label value ``k``; with C == 1 the
single channel matches label value 1 (binary segmentation).  Labels are *compared* with channel
indices, never used as addresses, so an out-of-range label simply matches no channel.  Pixels whose
label equals ``ignore_index`` are left out of every sum and receive zero gradient.

Hard activations (evaluation only, no gradient) make p a 0/1 prediction per element:

* "argmax":    p[k] = 1 for the channel k = torch.argmax(x, dim=1) of the pixel, 0 for the others.
  torch.argmax's rules: the lowest index among equal maxima; a NaN counts as the largest value, so
  the first NaN channel of a pixel wins; a pixel of all -inf (or all +inf) picks channel 0.
* "threshold": p[k] = 1 where x[k] > 0, i.e. sigmoid(x) > 0.5 (multi-label), else 0; NaN gives 0
  (``torch.sigmoid(nan) > 0.5`` is False).

Pixel losses (``pixel_loss`` "ce" or "focal") add two rows of per-class sums of an element term e,
computed from the same logits, so a compound loss (Dice + cross-entropy / focal) is one operator::

    X[n,k] = sum_m t * e          L[n,k] = sum_m e          (t * e := 0 where t == 0 and e == +inf)

    softmax, "ce":     e = -log p_k = lse(z) - z_k
    sigmoid, "ce":     e = softplus(z) - t z                       (binary cross-entropy with logits)
    softmax, "focal":  e = (1 - p_k)^gamma * (-log p_k)            (MONAI's softmax focal term)
    sigmoid, "focal":  e = exp(gamma * logsigmoid(-z (2t - 1))) * (softplus(z) - t z)   (MONAI's)

The epilogue turns them into F.cross_entropy / BCE / focal means (class weights, label smoothing
and focal alpha are per-class constants there).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["HARD_ACTIVATIONS", "PIXEL_LOSSES", "stats_rows", "pixel_term", "activate", "one_hot", "keep_mask", "dice_stats_reference", "dice_stats_backward_reference", "acc_dtype"]


HARD_ACTIVATIONS = ("argmax", "threshold")
PIXEL_LOSSES = ("none", "ce", "focal")


def stats_rows(pixel_loss: str) -> int:
    """Rows of the operator's result: I, P, T, and X, L with a pixel loss."""
    return 3 if pixel_loss == "none" else 5


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(x: Tensor, activation: str) -> Tensor:
    """Apply ``activation`` ("softmax" over dim 1, "sigmoid", "none"; hard: "argmax", "threshold")
    in the accumulation dtype."""
    if activation == "argmax":
        classes = torch.arange(x.shape[1], device=x.device).view(1, -1, *([1] * (x.dim() - 2)))
        return (x.argmax(1, keepdim=True) == classes).to(acc_dtype(x.dtype))
    if activation == "threshold":
        return (x > 0).to(acc_dtype(x.dtype))
    x = x.to(acc_dtype(x.dtype))
    if activation == "softmax":
        return torch.softmax(x, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(N, M) labels -> (N, C, M) one-hot by comparison (C == 1: foreground is label 1)."""
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1)
    if num_classes == 1:
        classes = classes + 1
    return (labels.unsqueeze(1) == classes).to(dtype)


def keep_mask(target: Tensor, ignore_index: Optional[int]) -> Optional[Tensor]:
    """(N, 1, M) bool mask of the counted pixels (labels != ignore_index), or None when all count."""
    if ignore_index is None or target.is_floating_point():
        return None
    # compare as int64: torch would wrap ignore_index=-1 to 255 against uint8 labels
    return (target.long() != ignore_index).unsqueeze(1)


def _prepared(input: Tensor, target: Tensor, ignore_index: Optional[int]):
    """p = activation input with ignored pixels replaced by 0, float target, keep mask (or None).

    Ignored pixels are *selected* away, never multiplied by a 0 mask: whatever they hold (NaN, inf)
    changes nothing, and autograd gives them exactly 0 gradient.
    """
    dt = acc_dtype(input.dtype)
    keep = keep_mask(target, ignore_index)
    if keep is not None:
        input = torch.where(keep, input, torch.zeros((), dtype=input.dtype, device=input.device))
    t = target.to(dt) if target.is_floating_point() else one_hot(target, input.shape[1], dt)
    if keep is not None:
        t = torch.where(keep, t, torch.zeros((), dtype=dt, device=t.device))
    return input, t, keep


def _pow_safe(base: Tensor, gamma: float) -> Tensor:
    """base ** gamma for base >= 0 with gradient 0 (not inf/NaN) at base == 0 when 0 < gamma < 1."""
    positive = base > 0
    return torch.where(positive, torch.where(positive, base, torch.ones_like(base)) ** gamma,
                       torch.zeros_like(base) ** gamma)


def pixel_term(x: Tensor, t: Tensor, activation: str, pixel_loss: str, gamma: float) -> Tensor:
    """Element term e of a pixel loss (see the module docstring), (N, C, M) in x's dtype.

    ``x`` are the logits in the accumulation dtype, ``t`` the float target; log p comes from the
    log-softmax / softplus (never the log of a rounded p).  Differentiable by autograd.
    """
    if activation == "softmax":
        e = -torch.log_softmax(x, dim=1)
        if pixel_loss == "focal":
            e = _pow_safe(-torch.expm1(-e), gamma) * e  # (1 - p)^gamma, 1 - p = -expm1(log p)
        return e
    e = torch.nn.functional.softplus(x) - t * x
    if pixel_loss == "focal":
        e = torch.exp(gamma * torch.nn.functional.logsigmoid(-x * (2.0 * t - 1.0))) * e
    return e


def dice_stats_reference(
    input: Tensor, target: Tensor, activation: str, power: int, ignore_index: Optional[int],
    pixel_loss: str = "none", gamma: float = 2.0,
) -> Tensor:
    """Per-class sums, differentiable by autograd (any order, forward mode, functorch transforms).

    Returns (N, 3, C) -- (N, 5, C) with a pixel loss -- in the accumulation dtype::

        stats[:, 0] = I = sum_m p * t
        stats[:, 1] = P = sum_m p ** power
        stats[:, 2] = T = sum_m t ** power
        stats[:, 3] = X = sum_m t * e,   stats[:, 4] = L = sum_m e      (pixel_loss "ce" / "focal")

    with ``p = activation(input)`` and ignored pixels excluded (their values never enter a sum).
    A hard activation ("argmax", "threshold") gives 0/1 values of p and a result without gradient.
    """
    if activation in HARD_ACTIVATIONS:
        input = input.detach()
    x, t, keep = _prepared(input, target, ignore_index)
    p = activate(x, activation)
    if keep is not None:
        p = torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))
    pq = p if power == 1 else p * p
    tq = t if power == 1 else t * t
    rows = [(p * t).sum(-1), pq.sum(-1), tq.sum(-1)]
    if pixel_loss != "none":
        e = pixel_term(x.to(p.dtype), t, activation, pixel_loss, gamma)
        if keep is not None:
            e = torch.where(keep, e, torch.zeros((), dtype=e.dtype, device=e.device))
        # t * e, but 0 where t == 0 and e == +inf (the kernels' target_times): a channel masked with
        # -inf logits has e = -log 0 = inf, and pixels not of that class add 0 (t log p -> 0), not NaN
        te = torch.where((t == 0) & (e == math.inf), torch.zeros((), dtype=e.dtype, device=e.device), t * e)
        rows += [te.sum(-1), e.sum(-1)]
    return torch.stack(rows, dim=1)


def _pixel_backward(grad: Tensor, x: Tensor, t: Tensor, p: Tensor, activation: str, pixel_loss: str,
                    gamma: float) -> Tensor:
    """dL/dz of the pixel-loss rows X = sum t e, L = sum e (see :func:`dice_stats_backward_reference`)."""
    w = grad[:, 3].to(p.dtype).unsqueeze(-1) * t + grad[:, 4].to(p.dtype).unsqueeze(-1)
    if activation == "softmax":
        if pixel_loss == "ce":
            return p * w.sum(dim=1, keepdim=True) - w
        logp = torch.log_softmax(x, dim=1)
        q = -torch.expm1(logp)  # 1 - p
        # gamma p (1-p)^(gamma-1) log p -> 0 as p -> 1 (also for gamma < 1)
        slope = torch.where(q > 0, gamma * p * logp * _pow_safe(q, gamma) / torch.where(q > 0, q, 1.0), 0.0)
        h = w * (slope - _pow_safe(q, gamma))
        return h - p * h.sum(dim=1, keepdim=True)
    if pixel_loss == "ce":
        return w * (p - t)
    sign = 2.0 * t - 1.0
    m = torch.exp(gamma * torch.nn.functional.logsigmoid(-x * sign))
    b = torch.nn.functional.softplus(x) - t * x
    return w * m * ((p - t) - gamma * b * sign * torch.sigmoid(x * sign))


def hard_backward_message(activation: str) -> str:
    """The error every backend raises when the backward of a hard activation is asked for."""
    return (f"dicetorch: activation={activation!r} is a hard (0/1) prediction with no gradient; it is meant "
            "for evaluation (dicetorch.dice_score, dicetorch.metrics). Train with 'softmax' or 'sigmoid'.")


def dice_stats_backward_reference(
    grad: Tensor, input: Tensor, target: Tensor, activation: str, power: int, ignore_index: Optional[int],
    pixel_loss: str = "none", gamma: float = 2.0,
) -> Tensor:
    """Hand-derived input gradient of :func:`dice_stats_reference`, in plain (differentiable) PyTorch.

    With gI = grad[:, 0], gP = grad[:, 1] (each (N, C)) and p = activation(input)::

        g     = gI * t + gP * power * p ** (power - 1)
        dL/dz = p * (g - sum_j p_j g_j)     (softmax, per pixel)
              = g * p * (1 - p)             (sigmoid)
              = g                           (none)

    plus, with a pixel loss and w = gX * t + gL (gX = grad[:, 3], gL = grad[:, 4])::

        softmax, "ce":     p_j * sum_k w_k - w_j
        softmax, "focal":  h_j - p_j * sum_k h_k,  h = w * (gamma p (1-p)^(gamma-1) log p - (1-p)^gamma)
        sigmoid, "ce":     w * (p - t)
        sigmoid, "focal":  w * m * ((p - t) - gamma * b * (2t - 1) * sigmoid(z (2t - 1))),
                           b = softplus(z) - t z,  m = exp(gamma * logsigmoid(-z (2t - 1)))

    and exactly zero on ignored pixels, whatever ``grad`` holds.  Returns a tensor shaped and typed
    like ``input``.  Autograd differentiates it (double backward).  Hard activations have no gradient:
    they raise.
    """
    if activation in HARD_ACTIVATIONS:
        raise RuntimeError(hard_backward_message(activation))
    x, t, keep = _prepared(input, target, ignore_index)
    p = activate(x, activation)
    g_i = grad[:, 0].to(p.dtype).unsqueeze(-1)
    g_p = grad[:, 1].to(p.dtype).unsqueeze(-1)
    g = g_i * t + (g_p if power == 1 else 2.0 * g_p * p)
    if activation == "softmax":
        g = p * (g - (p * g).sum(dim=1, keepdim=True))
    elif activation == "sigmoid":
        g = g * p * (1.0 - p)
    if pixel_loss != "none":
        g = g + _pixel_backward(grad, x.to(p.dtype), t, p, activation, pixel_loss, gamma)
    if keep is not None:
        g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
    # keep the input's strides (channels-last gradient for channels-last input)
    return torch.empty_like(input).copy_(g)
