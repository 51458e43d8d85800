"""Probing an unknown loss: calling conventions, crafted inputs, and the per-class gradients (gI, gP).

Every probe is built in the canonical layout -- ``x`` (N, C, *spatial) float, ``lab`` (N, *spatial)
integer labels -- and handed to the loss in the caller's convention (:class:`Convention`).  The
loss's input gradient, taken back to the canonical layout, is then explained as that of a function of
the per-class sums: for a function of (I, P, T) after an activation a with power q,

    dL/dp[n,k,m] = gI[n,k] t[n,k,m] + gP[n,k] q p[n,k,m]^(q-1),     p = a(x),

and dL/dx follows by the activation's Jacobian.  :func:`pixel_fit` solves that linear system for
(gI, gP) image by image and reports the relative residual: zero (to rounding) exactly when the
gradient has this form.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import torch
from torch import Tensor

LAYOUTS = ("channels_first", "channels_last", "matlab")
TARGETS = ("labels", "labels_1ch", "onehot")
ACTIVATIONS = ("softmax", "sigmoid", "none")


class ProbeError(Exception):
    """The loss could not be evaluated on a probe (the message says why, for the user)."""


# ----------------------------------------------------------------------------------------------
# Calling conventions
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Convention:
    """How a loss takes its arguments.

    ``layout``: "channels_first" (input (N, C, *spatial)), "channels_last" ((N, *spatial, C)) or
    "matlab" ((*spatial, C, N), MATLAB's H×W×K×N).  ``target``: "labels" (N, *spatial),
    "labels_1ch" (N, 1, *spatial) or "onehot" (float, shaped like the input), each in ``layout``
    (MATLAB labels are (*spatial, N) and (*spatial, 1, N)).  ``target_first``: ``loss(target, input)``
    (Keras) instead of ``loss(input, target)``.
    """

    layout: str = "channels_first"
    target: str = "labels"
    target_first: bool = False

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")

    # canonical -> the loss's arguments
    def _from_nc(self, a: Tensor) -> Tensor:
        if self.layout == "channels_last":
            return a.movedim(1, -1)
        if self.layout == "matlab":
            return a.permute(*range(2, a.dim()), 1, 0)
        return a

    def args(self, x: Tensor, lab: Tensor, num_classes: int) -> tuple:
        """The loss's arguments for canonical input ``x`` (N, C, *S) and labels ``lab`` (N, *S)."""
        if self.target == "onehot":
            t = _one_hot(lab, num_classes, x.dtype)
        elif self.target == "labels_1ch":
            t = lab.unsqueeze(1)
        else:
            t = lab
        inp = self._from_nc(x)
        if self.target == "onehot" or self.target == "labels_1ch":
            t = self._from_nc(t)
        elif self.layout == "matlab":
            t = t.movedim(0, -1)
        return (t, inp) if self.target_first else (inp, t)

    # the loss's arguments -> canonical (for the built module)
    def _to_nc(self, a: Tensor) -> Tensor:
        if self.layout == "channels_last":
            return a.movedim(-1, 1)
        if self.layout == "matlab":
            nd = a.dim()
            return a.permute(nd - 1, nd - 2, *range(nd - 2))
        return a

    def canonical(self, first: Tensor, second: Tensor):
        """(input (N, C, *S), target for a dicetorch loss) from the loss's two arguments."""
        target, inp = (first, second) if self.target_first else (second, first)
        x = self._to_nc(inp)
        if self.target in ("onehot", "labels_1ch"):
            target = self._to_nc(target)
        elif self.layout == "matlab":
            target = target.movedim(-1, 0)
        return x, target

    def describe(self) -> str:
        order = "loss(target, input)" if self.target_first else "loss(input, target)"
        return f"{order}, {self.layout.replace('_', '-')} layout, {self.target.replace('_', ' ')} targets"


def _one_hot(lab: Tensor, c: int, dtype: torch.dtype) -> Tensor:
    return torch.nn.functional.one_hot(lab, c).movedim(-1, 1).to(dtype)


# ----------------------------------------------------------------------------------------------
# Crafted inputs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Probe:
    """One call of the loss: canonical input and labels, and what the loss returned."""

    x: Tensor                      # (N, C, *S) float64 (the probe dtype for the call)
    lab: Tensor                    # (N, *S) int64
    what: str                      # a description, for reasons
    ramp: bool = False             # gradient of <out, ramp> instead of out.sum() (checks element order)
    out: Tensor = None             # the loss's output (detached, float64)
    grad: Tensor = None            # d <out, cot> / dx, canonical layout, float64
    gI: Tensor = None              # (N, C) per-class gradients (after pixel_fit)
    gP: Tensor = None
    residual: float = math.nan     # pixel_fit's relative residual
    stats: Tensor = None           # (N, 3, C) I, P, T for the identified activation and q


def make_labels(gen: torch.Generator, n: int, c: int, spatial: tuple, absent=None, small=None) -> Tensor:
    """(N, *spatial) labels with every class in every image, except ``absent[n]``; ``small[n]``: 1-2 pixels.

    The volumes of the other classes are random (a few pixels up to most of the image) so that the
    sums differ widely between images and classes.
    """
    absent, small = absent or {}, small or {}
    m = math.prod(spatial)
    out = torch.empty(n, m, dtype=torch.long)
    for i in range(n):
        present = [k for k in range(c) if k not in absent.get(i, ())]
        tiny = [k for k in present if k in small.get(i, ())]
        big = [k for k in present if k not in tiny]
        sizes = {k: 1 + int(torch.randint(0, 2, (1,), generator=gen)) for k in tiny}
        rest = m - sum(sizes.values())
        if big:
            w = torch.rand(len(big), generator=gen, dtype=torch.float64) ** 2 + 0.05
            base = 2
            extra = torch.floor(w / w.sum() * (rest - base * len(big))).long()
            for k, e in zip(big, extra.tolist()):
                sizes[k] = base + e
            sizes[big[0]] += m - sum(sizes.values())
        vals = torch.cat([torch.full((v,), k, dtype=torch.long) for k, v in sizes.items()])
        out[i] = vals[torch.randperm(m, generator=gen)]
    return out.reshape(n, *spatial)


def make_input(gen: torch.Generator, activation: str, lab: Tensor, c: int, small=None,
               dtype=torch.float64) -> Tensor:
    """Canonical input for ``activation``: logits for softmax/sigmoid, values in (0, 1) for none.

    Classes in ``small[n]`` get low predictions except on their target pixels (small P), which makes the
    smoothing terms visible.
    """
    small = small or {}
    n, spatial = lab.shape[0], tuple(lab.shape[1:])
    shape = (n, c, *spatial)
    if activation in ("softmax", "sigmoid"):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
        x = x + torch.randn(n, c, *([1] * len(spatial)), generator=gen, dtype=torch.float64) * 0.7
    else:
        x = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.96 + 0.02
        x = x * (torch.rand(n, c, *([1] * len(spatial)), generator=gen, dtype=torch.float64) * 0.7 + 0.3)
    for i, ks in small.items():
        for k in ks:
            # low but varied predictions (varied, so that the per-pixel system stays well conditioned)
            on = lab[i] == k
            u = torch.rand(x[i, k].shape, generator=gen, dtype=torch.float64)
            if activation == "none":
                lo, hi = 0.005 + 0.03 * u, 0.5 + 0.45 * u
            else:
                lo, hi = -4.5 + u, 0.5 + u
            x[i, k] = torch.where(on, hi, lo)
    return x.to(dtype)


def neutral_input(gen: torch.Generator, lab: Tensor, c: int, dtype=torch.float64) -> Tensor:
    """Values in (0.05, 0.95): valid as logits and as probabilities (for telling the activation)."""
    n, spatial = lab.shape[0], tuple(lab.shape[1:])
    return (torch.rand((n, c, *spatial), generator=gen, dtype=torch.float64) * 0.9 + 0.05).to(dtype)


# ----------------------------------------------------------------------------------------------
# Calling the loss
# ----------------------------------------------------------------------------------------------
def evaluate(loss_fn: Callable, conv: Convention, probe: Probe, num_classes: int) -> Probe:
    """Call the loss on ``probe``; fill ``out`` and ``grad`` (of out.sum(), or <out, ramp> with ``ramp``)."""
    x = probe.x.detach().clone().requires_grad_(True)
    args = conv.args(x, probe.lab, num_classes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = loss_fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported, not raised
        shapes = ", ".join(f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" for a in args)
        raise ProbeError(f"the loss raised {type(e).__name__}: {e} -- when called with ({shapes}) "
                         f"[{conv.describe()}]; check `target`, `layout` and `target_first`") from e
    if not isinstance(out, Tensor):
        raise ProbeError(f"the loss returned {type(out).__name__}, not a tensor")
    if not out.is_floating_point() or out.numel() == 0:
        raise ProbeError(f"the loss returned a {out.dtype} tensor of shape {tuple(out.shape)}")
    cot = 1.0
    if probe.ramp and out.numel() > 1:
        cot = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    if not out.requires_grad:
        grad = None
    else:
        (grad,) = torch.autograd.grad((out * cot).sum(), x, allow_unused=True)
    probe.out = out.detach().to(torch.float64)
    probe.grad = (torch.zeros_like(probe.x) if grad is None else grad).detach().to(torch.float64)
    return probe


# ----------------------------------------------------------------------------------------------
# The gradient as that of a function of the per-class sums
# ----------------------------------------------------------------------------------------------
def activate(x: Tensor, activation: str) -> Tensor:
    x = x.to(torch.float64)
    if activation == "softmax":
        return torch.softmax(x, 1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def pixel_fit(probe: Probe, activation: str, q: int, num_classes: int):
    """Least-squares (gI, gP), each (N, C), explaining ``probe.grad``; and the relative residual.

    Rows are the N·C·M gradient entries, columns the 2C unknowns of each image (solved image by image,
    batched).  With softmax and q = 1 the system has a null direction (a constant added to every gP of an
    image: the softmax's P sum to the pixel count); the minimum-norm solution is returned, gI is unique.
    """
    n, c = probe.x.shape[0], num_classes
    x = probe.x.reshape(n, c, -1).to(torch.float64)
    p = activate(x, activation)
    t = _one_hot(probe.lab.reshape(n, -1), c, torch.float64)            # (N, C, M)
    dp = q * p ** (q - 1)                                                  # dP/dp per pixel
    g = probe.grad.reshape(n, c, -1)
    m = x.shape[-1]
    eye = torch.eye(c, dtype=torch.float64)
    if activation == "softmax":
        # dz[k,m] = p_k (g_k - sum_j p_j g_j): column j multiplies p_k (delta_kj - p_j) by t_j or dp_j
        jac = p.unsqueeze(2) * (eye.view(1, c, c, 1) - p.unsqueeze(1))   # (N, k, j, M)
    else:
        scale = p * (1 - p) if activation == "sigmoid" else torch.ones_like(p)
        jac = eye.view(1, c, c, 1) * scale.unsqueeze(2)                   # (N, k, j, M)
    a_i = jac * t.unsqueeze(1)                                             # (N, k, j, M)
    a_p = jac * dp.unsqueeze(1)
    a = torch.cat([a_i, a_p], 2).permute(0, 1, 3, 2).reshape(n, c * m, 2 * c)
    b = g.reshape(n, c * m, 1)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        nan = torch.full((n, c), math.nan, dtype=torch.float64)
        return nan, nan.clone(), math.inf
    # unit columns: a class of one or two pixels has small columns, and its gI should be as accurate as the rest
    norm = a.norm(dim=1, keepdim=True)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    sol = torch.linalg.lstsq(a / norm, b, driver="gelsd").solution
    res = ((a / norm) @ sol - b).norm() / b.norm().clamp_min(1e-300)
    sol = (sol / norm.transpose(1, 2)).squeeze(-1)
    return sol[:, :c], sol[:, c:], float(res)


def stats(probe: Probe, activation: str, q: int, num_classes: int) -> Tensor:
    """(N, 3, C) sums I, P, T of the probe, float64."""
    n, c = probe.x.shape[0], num_classes
    p = activate(probe.x.reshape(n, c, -1), activation)
    t = _one_hot(probe.lab.reshape(n, -1), c, torch.float64)
    return torch.stack([(p * t).sum(-1), (p ** q).sum(-1), (t ** q).sum(-1)], 1)
