"""Identify an unknown Dice loss: probe it, name its choices, build it with dicetorch, confirm.

Every Dice-family loss is a function of the per-class sums (I, P, T) of ``dicetorch.ops.dice_stats``
with a handful of choices.  :func:`identify` finds them from the loss's values and input gradients on
crafted inputs, in this order:

1. activation and q: the input gradient of a function of (I, P, T) is, per pixel,
   ``a'(x)ᵀ (gI t + gP q p^(q-1))`` with per-class constants gI = dL/dI, gP = dL/dP; one least-squares
   solve per candidate (softmax / sigmoid / none × q = 1, 2) leaves a residual of ~1e-15 for the right
   one and ~1e-1 for the others (and for anything that is not a function of per-class sums);
2. per image or batch (gI equal across images), background and zero-weight classes (gI ≡ 0);
3. generalized Dice or one ratio per class: within one generalized-Dice ratio gI ∝ w_k, so
   ``log|gI| = A_image + B_class - e log T`` holds with e = 2, 1, 0 (square, simple, uniform);
4. the continuous choices (smoothing, Tversky alpha/beta/gamma, class weights, scale, offset) by a
   Levenberg-Marquardt fit to exact float64 values and gI (see :mod:`._fit`), rounded to short numbers;
   mean or sum from a batch of another size; the absent-class rule from images without some class;
5. confirmation: the built module against the loss on fresh random inputs it never saw (other batch
   sizes and image sizes, small and absent classes), value and input gradient, relative 1e-9 in float64.

Nothing is returned unconfirmed: ``exact=False`` carries the reason.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import _families, _fit, _match
from ._describe import buildable, dicetorch_kwargs, formula as formula_of
from ._build import IdentifiedLoss
from ._probe import ACTIVATIONS, Convention, Probe, ProbeError, evaluate, make_input, make_labels, neutral_input, \
    pixel_fit, stats

__all__ = ["Identification", "identify"]

_N0, _N1 = _families.N0, _families.N1


def _form_tol() -> float:
    """Pixel-level residual under which the gradient is that of a function of the per-class sums."""
    return _fit.loose(1e-6, 1e3)


@dataclasses.dataclass
class Identification:
    """What :func:`identify` found.  ``build()`` returns a module that reproduces the loss when ``exact``.

    Choices (None where they do not apply or were not found): ``loss`` ("dice", "tversky",
    "generalized_dice"), ``activation``, ``q`` (2: squared sums), ``smooth_nr``/``smooth_dr`` (in the
    form of that dicetorch loss: Dice ``(2I + smooth_nr)/(P + T + smooth_dr)``, Tversky
    ``(I + smooth_nr)/(... + smooth_dr)``, generalized Dice on the class-summed terms), ``batch``,
    ``include_background``, ``class_weights``, ``weighting``/``absent_weight`` (generalized Dice;
    absent_weight may also be a number or "nan" when the original does something dicetorch does not),
    ``alpha``/``beta``/``gamma``, ``log_loss``, ``reduction``, and the final affine map: the loss equals
    ``scale * L + offset`` with L the dicetorch loss (nnU-Net's -Dice is ``offset=-1``).

    ``formula`` is one line; ``presets`` lists the registered presets (with arguments) that equal the
    loss; ``in_family`` says whether a plain dicetorch loss reproduces it (else ``build()`` returns the
    preset that does); ``max_error`` is the largest relative difference seen in the confirmation.
    """

    exact: bool
    reason: str = ""
    loss: Optional[str] = None
    activation: Optional[str] = None
    q: Optional[int] = None
    smooth_nr: Optional[float] = None
    smooth_dr: Optional[float] = None
    batch: Optional[bool] = None
    include_background: Optional[bool] = None
    class_weights: Optional[tuple] = None
    weighting: Optional[str] = None
    absent_weight: object = None
    alpha: Optional[float] = None
    beta: Optional[float] = None
    gamma: Optional[float] = None
    log_loss: bool = False
    reduction: Optional[str] = None
    scale: float = 1.0
    offset: float = 0.0
    formula: str = ""
    presets: list = dataclasses.field(default_factory=list)
    in_family: bool = False
    max_error: float = math.nan
    convention: Optional[Convention] = None
    _builder: Optional[Callable] = dataclasses.field(default=None, repr=False, compare=False)

    def build(self) -> nn.Module:
        """A module taking the original's ``(input, target)`` (same order, layout and target form)."""
        if self._builder is None:
            raise ValueError(f"nothing to build: {self.reason}")
        return self._builder()

    def kwargs(self) -> Optional[tuple]:
        """``(class name, keyword arguments)`` of the dicetorch loss that reproduces it (None if none does)."""
        if not self.in_family:
            return None
        return dicetorch_kwargs(self)

    @property
    def form(self) -> Optional[str]:
        """The loss as a function of the ratio x: "1 − x", "−x" (nnU-Net), "x" (a score), "−log x",
        "(1 − x)^γ", or the affine map of one of them."""
        if self.loss is None:
            return None
        focal = self.gamma not in (None, 1.0)
        base = "−log x" if self.log_loss else (f"(1 − x)^{self.gamma:g}" if focal else "1 − x")
        if self.scale == 1 and self.offset == 0:
            return base
        if base == "1 − x" and self.reduction == "mean" and self.class_weights is None:
            if (self.scale, self.offset) == (1, -1):
                return "−x"
            if (self.scale, self.offset) == (-1, 1):
                return "x"
        return f"{self.scale:g}·({base}) {'+' if self.offset >= 0 else '−'} {abs(self.offset):g}"

    def __str__(self) -> str:
        lines = [f"formula: {self.formula}" if self.formula else "formula: (none found)"]
        names = ("loss", "activation", "q", "smooth_nr", "smooth_dr", "batch", "include_background",
                 "class_weights", "weighting", "absent_weight", "alpha", "beta", "gamma", "log_loss", "reduction",
                 "scale", "offset")
        found = [f"{k}={getattr(self, k)!r}" for k in names if getattr(self, k) is not None]
        lines.append("choices: " + ", ".join(found) + (f" (form: {self.form})" if self.form else ""))
        kw = self.kwargs()
        if kw is not None:
            cls, args = kw
            call = f"dicetorch.{cls}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
            if self.scale != 1 or self.offset != 0:
                call = f"{self.scale:g} * {call}" if self.scale != 1 else call
                call += f" {'+' if self.offset >= 0 else '-'} {abs(self.offset):g}" if self.offset else ""
            lines.append(f"dicetorch: {call}")
        lines.append("presets: " + (", ".join(self.presets) if self.presets else "none"))
        lines.append(f"exact: {self.exact}" + (f" (max relative error {self.max_error:.1e})"
                                               if math.isfinite(self.max_error) else ""))
        if self.reason:
            lines.append(f"reason: {self.reason}")
        return "\n".join(lines)


def _module(ident: Identification, trailing: int, shape) -> nn.Module:
    import dicetorch as dt
    cls, kw = dicetorch_kwargs(ident)
    return IdentifiedLoss(getattr(dt, cls)(**kw), ident.convention, ident.scale, ident.offset, trailing, shape)


# ----------------------------------------------------------------------------------------------
# The probes
# ----------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, loss_fn, conv, num_classes, spatial, dtype, seed):
        self.loss_fn, self.conv, self.c, self.spatial, self.dtype = loss_fn, conv, num_classes, spatial, dtype
        self.gen = torch.Generator().manual_seed(seed)

    def probe(self, activation, n, what, spatial=None, absent=None, small=None, neutral=False, ramp=False) -> Probe:
        lab = make_labels(self.gen, n, self.c, spatial or self.spatial, absent, small)
        x = neutral_input(self.gen, lab, self.c) if neutral else make_input(self.gen, activation, lab, self.c, small)
        return evaluate(self.loss_fn, self.conv, Probe(x.to(self.dtype), lab, what, ramp), self.c)

    def confirmation_probes(self, activation) -> list:
        c, last = self.c, self.c - 1
        other = tuple(s + (1 if i % 2 else -1) for i, s in enumerate(self.spatial)) if self.spatial else None
        if other is not None and math.prod(other) < 2 * c + 2:
            other = tuple(s + 1 for s in self.spatial)
        few = {0: {1}, 1: {last}} if c > 2 else {0: {1}}
        kw = dict(ramp=True)
        out = [self.probe(activation, _N0, "random inputs", **kw),
               self.probe(activation, _N0, "inputs in (0, 1)", neutral=True, **kw),
               self.probe(activation, _N1, f"a batch of {_N1}", **kw),
               self.probe(activation, 4, f"a batch of 4 images of size {other}", spatial=other, **kw),
               self.probe(activation, _N0, "classes of 1-2 pixels", small=few, **kw),
               self.probe(activation, _N0, "a class absent from some images", absent=few, **kw),
               self.probe(activation, _N0, f"class {last} absent from the whole batch",
                          absent={n: {last} for n in range(_N0)}, **kw)]
        return out


def _close(a: Tensor, b: Tensor, rtol: float) -> float:
    """Largest error of a against b relative to rtol-scaled magnitudes (<= 1 means close); NaN-aware."""
    a, b = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    if a.shape != b.shape:
        return math.inf
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return math.inf
    a, b = a[~nan_a], b[~nan_b]
    if a.numel() == 0:
        return 0.0
    tol = rtol * b.abs() + 1e-3 * rtol * b.abs().max().clamp_min(1e-300)
    err = (a - b).abs()
    if not torch.isfinite(err).all():
        return 0.0 if torch.equal(a, b) else math.inf
    return float((err / tol).max())


def confirm(module: nn.Module, ctx: _Ctx, probes: list, rtol: float):
    """(None, worst) when ``module`` reproduces every probe, else (what failed, worst relative error)."""
    worst = 0.0
    for pr in probes:
        try:
            mine = evaluate(module, ctx.conv, Probe(pr.x, pr.lab, pr.what, pr.ramp), ctx.c)
        except ProbeError as e:
            return f"on {pr.what} the dicetorch module failed: {e}", math.inf
        ev = _close(mine.out, pr.out, rtol)
        eg = _close(mine.grad, pr.grad, rtol)
        worst = max(worst, ev, eg)
        if ev > 1 or eg > 1:
            what = "value" if ev > 1 else "gradient"
            a, b = (mine.out, pr.out) if ev > 1 else (mine.grad, pr.grad)
            rel = float(((a.reshape(-1) - b.reshape(-1)).abs() / b.reshape(-1).abs().clamp_min(1e-300)).nan_to_num(
                math.inf).max()) if a.numel() == b.numel() else math.inf
            return (f"on {pr.what} the {what} differs (relative {rel:.1e}; "
                    f"loss {_short(pr.out)}, dicetorch {_short(mine.out)})"), worst * rtol
    return None, worst * rtol


def _short(t: Tensor) -> str:
    return f"{float(t.reshape(-1)[0]):.10g}" if t.numel() == 1 else f"shape {tuple(t.shape)}"


# ----------------------------------------------------------------------------------------------
# identify
# ----------------------------------------------------------------------------------------------
def identify(loss_fn: Callable, *, num_classes: int = 4, spatial: tuple = (8, 8), target: str = "labels",
             layout: str = "channels_first", target_first: bool = False, dtype: torch.dtype = torch.float64,
             seed: int = 0) -> Identification:
    """Find which Dice loss ``loss_fn`` computes, and build it with dicetorch.

    ``loss_fn(input, target)`` is called on crafted and random inputs: ``input`` (N, C, *spatial) with
    C = ``num_classes`` (logits or probabilities: probes use values valid as both, then the kind the
    activation found needs), ``target`` per ``target``: "labels" (N, *spatial) int64, "labels_1ch"
    (N, 1, *spatial) (MONAI's ``to_onehot_y``) or "onehot" (float, like the input).  ``layout``
    ("channels_last": (N, *spatial, C); "matlab": (*spatial, C, N)) and ``target_first``
    (``loss_fn(target, input)``, Keras) describe other conventions.

    The family (per image n and class k, sums over pixels m, p = softmax/sigmoid/identity of the input,
    q = 1 or 2)::

        I = sum_m p t,  P = sum_m p^q,  T = sum_m t^q
        Dice     r = (2I + s_nr) / (P + T + s_dr)            Tversky  r = (I + s_nr) / (I + a(P-I) + b(T-I) + s_dr)
        gen.Dice r = (2 sum_k w_k I_k + s_nr) / (sum_k w_k (P_k + T_k) + s_dr),  w_k = c_k T_k^-e (e = 2, 1, 0)
        loss     = scale * reduce_{n,k} c_k phi(r) + offset,   phi = 1 - r | (1 - r)^gamma | -log r

    with sums per image or over the batch, with or without the background class.  Returns an
    :class:`Identification`; its ``build()`` reproduces ``loss_fn`` (value and input gradient to
    relative 1e-9 in float64, confirmed on inputs the fit never saw) when ``exact``.
    """
    conv = Convention(layout, target, target_first)
    spatial = tuple(int(s) for s in spatial)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if math.prod(spatial) < 2 * num_classes + 2:
        raise ValueError(f"spatial {spatial} has too few pixels to hold every one of {num_classes} classes "
                         "twice in every image; use a larger one")
    ctx = _Ctx(loss_fn, conv, num_classes, spatial, dtype, seed)
    rtol = 1e-9 if dtype == torch.float64 else 2e3 * torch.finfo(dtype).eps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add wake-up stalls
    token = _fit.NOISE.set(torch.finfo(dtype).eps)
    try:
        return _identify(ctx, rtol)
    except ProbeError as e:
        return Identification(exact=False, reason=str(e), convention=conv)
    finally:
        _fit.NOISE.reset(token)
        torch.set_num_threads(threads)


def _identify(ctx: _Ctx, rtol: float) -> Identification:
    conv, c = ctx.conv, ctx.c
    fail = lambda reason, **kw: Identification(exact=False, reason=reason, convention=conv, **kw)  # noqa: E731

    # 1. activation and q
    neutral = [ctx.probe(None, _N0, "inputs in (0, 1)", neutral=True) for _ in range(2)]
    for pr in neutral:
        if not torch.isfinite(pr.out).all():
            return fail(f"the loss is not finite on {pr.what} with every class in every image")
        if not pr.grad.abs().max() > 0:
            return fail("the loss has no gradient with respect to its input (argmax, detach or a constant?)")
    res = {}
    for act in ACTIVATIONS:
        for q in (1, 2):
            res[(act, q)] = max(pixel_fit(pr, act, q, c)[2] for pr in neutral)
    (act, q), best = min(res.items(), key=lambda kv: kv[1])
    if best > _form_tol():
        return fail("not a function of per-class sums (I, P, T): no activation (softmax, sigmoid, none) and power "
                    f"q (1, 2) explains the input gradient pixel by pixel (best: {act}, q={q}, relative residual "
                    f"{best:.1e}); it depends on more than the per-class sums (pixel weights, cross-entropy, "
                    "a distance map, ...)")
    # several can explain it where the loss does not depend on P on the softmax's simplex (sum_k P_k is fixed)
    fits = sorted((k for k, r in res.items() if r <= _form_tol()), key=lambda k: (max(res[k], 1e-12), k[1]))
    outcome = None
    for act, q in fits:
        if act == "softmax" and c < 3:
            ident = fail("with softmax over 2 classes the per-class sums are not separately identifiable: use "
                         "num_classes >= 3", activation=act, q=q)
        else:
            ident = _identify_with(ctx, rtol, act, q)
        if ident.exact:
            return ident
        outcome = outcome or ident
    return outcome


def _identify_with(ctx: _Ctx, rtol: float, act: str, q: int) -> Identification:
    conv, c = ctx.conv, ctx.c
    fail = lambda reason, **kw: Identification(exact=False, reason=reason, convention=conv, **kw)  # noqa: E731

    # 2. probes with the activation's inputs
    last = c - 1
    clean = [ctx.probe(act, _N0, "random inputs") for _ in range(3)]
    clean.append(ctx.probe(act, _N0, "small classes", small={0: {1, last}, 1: {1}, 2: {1}}))
    small_n = ctx.probe(act, _N1, f"a batch of {_N1}")
    absent_img = ctx.probe(act, _N0, "absent classes", absent={0: {last}, 1: {1}} if c > 2 else {0: {1}})
    absent_all = ctx.probe(act, _N0, "a class absent from the batch", absent={n: {last} for n in range(_N0)})
    for pr in clean + [small_n, absent_img, absent_all]:
        pr.gI, pr.gP, pr.residual = pixel_fit(pr, act, q, c)
        pr.stats = stats(pr, act, q, c)
    for pr in clean + [small_n]:
        if not torch.isfinite(pr.out).all() or pr.residual > _form_tol():
            return fail(f"on {pr.what} the loss is not finite or not a function of the per-class sums "
                        f"(residual {pr.residual:.1e})", activation=act, q=q)
    multi = clean[0].out.numel() > 1 or small_n.out.numel() > 1

    # 3. structure: zero classes, background; per image unless gI is the same for every image
    gi = torch.cat([pr.gI for pr in clean])
    top = float(gi.abs().max())
    zero = [k for k in range(c) if float(gi[:, k].abs().max()) <= _fit.loose(1e-10, 10) * top]
    classes = [k for k in range(c) if k not in zero]
    if not classes:
        return fail("the loss does not depend on the intersections I", activation=act, q=q)
    background = 0 not in zero
    same = all(float((pr.gI - pr.gI[:1]).abs().max()) <= _fit.loose(1e-7) * float(pr.gI.abs().max())
               for pr in clean)
    n_loss = c if background else c - 1
    linear = all(float(gi[:, k].std() / gi[:, k].abs().mean()) < _fit.loose(1e-9) for k in classes)

    # 4. the two model families; a generalized Dice that fits is not tried as per-class ratios
    tried = []
    for batch in ((False, True) if same else (False,)):
        found = _families.try_generalized(c, clean, small_n, [absent_img, absent_all], classes, batch, n_loss,
                                          multi)
        # per-class ratios per image cannot give every image the same gI; one generalized ratio can (softmax
        # with uniform weights: the denominator is a constant)
        if (not found or found[0][1] > _fit.loose(1e-6, 1e3)) and (batch or not same):
            found += _families.try_ratio(clean, small_n, classes, batch, n_loss, c, multi)
        tried += [(dict(activation=act, q=q, batch=batch, include_background=background), *f) for f in found]
    tried.sort(key=lambda t: max(t[2], _fit.loose(1e-9)))  # stable: per image first; rounded numbers first
    base = dict(activation=act, q=q, batch=same, include_background=background)
    if not tried:
        if linear:
            return fail("dL/dI is the same for every image and class: the loss is linear in the sums (a squared "
                        "error or a plain sum of p·t), not a Dice ratio", **base)
        return fail("no Dice, Tversky or generalized Dice ratio of the sums fits the values and gradients", **base)

    # 5. confirmation
    conf = ctx.confirmation_probes(act)
    outcome = None
    for base, choices, rms, note in tried:
        ident = Identification(exact=False, convention=conv, **base, **choices)
        ident.formula = formula_of(ident, c)
        why = buildable(ident)
        rule = _shape_rule(ident, clean[0], ctx, multi) if why is True else None
        if isinstance(rule, str):
            why = rule
        if why is not True:
            ident.reason = why
        else:
            builder = lambda ident=ident, r=rule: _module(ident, *r)  # noqa: E731
            why, worst = confirm(builder(), ctx, conf, rtol)
            ident.max_error = worst
            if why is None:
                ident.exact, ident.in_family, ident._builder = True, True, builder
                ident.reason = note
                ident.presets = [p.label for p in _match.confirmed(ident, ctx, conf, rtol, confirm)]
                return ident
            ident.reason = f"the dicetorch loss with these choices differs: {why}" + (f"; {note}" if note else "")
            if rtol < worst < 1e-4:
                ident.reason += (f"; it agrees to {worst:.0e} relative, so the original probably rounds part of its "
                                 "computation to float32")
        if outcome is None:
            outcome = ident

    # not a plain dicetorch loss: does a preset reproduce it?
    ident = outcome
    found = _match.confirmed(ident, ctx, conf, rtol, confirm)
    if found:
        first = found[0]
        ident.presets = [p.label for p in found]
        ident.exact, ident.in_family, ident._builder, ident.max_error = True, False, first.build, first.worst
        ident.reason = f"{ident.reason}; presets.{first.label} reproduces it, and build() returns that"
    return ident


def _shape_rule(ident: Identification, probe: Probe, ctx: _Ctx, multi: bool):
    """(trailing singleton dims, fixed shape) that make the dicetorch output the original's shape."""
    shape = tuple(probe.out.shape)
    if not multi:
        return (0, None) if shape == () else (0, shape)
    if buildable(ident) is not True:
        return (0, None)
    import dicetorch as dt
    cls, kw = dicetorch_kwargs(ident)
    x, t = ctx.conv.canonical(*ctx.conv.args(probe.x, probe.lab, ctx.c))
    mine = tuple(getattr(dt, cls)(**kw)(x.detach(), t).shape)
    if shape == mine:
        return (0, None)
    if shape[:len(mine)] == mine and all(s == 1 for s in shape[len(mine):]):
        return (len(shape) - len(mine), None)
    return f"the loss returns shape {shape} where dicetorch's reduction='none' gives {mine}"
