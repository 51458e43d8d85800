"""Fitting the continuous choices of a Dice-family loss to exact float64 evaluations.

The data are *units*: one ratio's sums (I, P, T) with the loss's gradient gI = dL/dI for it, and the
loss values of the probes they come from.  Two model families:

* per-class ratios (Dice, Jaccard, Tversky, focal Tversky, log forms) -- one ratio per unit::

      ti   = (I + sn) / (I + alpha (P - I) + beta (T - I) + sd)
      phi  = (1 - ti)^gamma            or  -log(ti)
      L    = sum_units c[k] phi + o    (c[k]: reduction, class weight and scale together)

  Dice is alpha = beta = 1/2 (its smoothing is twice the Tversky form's), Jaccard alpha = beta = 1.

* generalized Dice -- one ratio per image (or batch) over the classes, with known weights w::

      R    = (2 sum_k w I + sn) / (sum_k w (P + T) + sd),   L = s sum_units phi(R) + o

Both are fitted by Levenberg-Marquardt on relative residuals of the values and of gI (float64, exact
data: a right model fits to rounding, ~1e-14).  The fits only propose; the caller confirms.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
from fractions import Fraction
from typing import Callable, Optional

import torch
from torch import Tensor

# The rounding level of the probes' dtype: thresholds are loosened for float32 probes (set by identify)
NOISE = contextvars.ContextVar("dicetorch_identify_noise", default=torch.finfo(torch.float64).eps)


def loose(tol: float, k: float = 100.0) -> float:
    """``tol``, or k times the rounding level of the probes' dtype if that is larger."""
    return max(tol, k * NOISE.get())


def fit_tol() -> float:
    """rms relative residual under which a model is taken to explain the data."""
    return loose(1e-7, 1e3)


@dataclasses.dataclass
class Units:
    """Per-ratio data.  ``group`` indexes the probe value a unit contributes to."""

    I: Tensor  # noqa: E741 - the design's name
    P: Tensor
    T: Tensor
    cls: Tensor      # class of the unit (per-class ratios) -- long
    group: Tensor    # probe index -- long
    gI: Tensor
    values: Tensor   # (K,) probe values

    @property
    def num_groups(self) -> int:
        return self.values.numel()

    @property
    def gmat(self) -> Tensor:
        """(groups, units) 0/1: which probe value each unit adds to."""
        return (torch.arange(self.num_groups).unsqueeze(1) == self.group.unsqueeze(0)).to(torch.float64)


def lm(fun: Callable[[Tensor], Tensor], p0: Tensor, iters: int = 60):
    """Levenberg-Marquardt; returns (params, cost = sum r^2).

    ``fun`` maps a batch of parameter vectors (B, n) to residuals (B, R): the Jacobian comes from one call
    on the 2n centrally perturbed vectors (the residuals themselves are exact, so an approximate Jacobian
    only slows the last steps down).
    """
    n = p0.numel()
    eye = torch.eye(n, dtype=torch.float64)

    def cost_of(p):
        r = fun(p.unsqueeze(0))[0]
        return r, (float(r @ r) if torch.isfinite(r).all() else math.inf)

    p = p0.clone()
    r, cost = cost_of(p)
    lam = 1e-3
    for _ in range(iters):
        if cost < 1e-30:
            break
        h = 1e-6 * p.abs().clamp_min(1e-3)
        rr = fun(torch.cat([p + eye * h, p - eye * h]))
        jac = ((rr[:n] - rr[n:]) / (2 * h.unsqueeze(1))).T
        if not torch.isfinite(jac).all():
            break
        grad, hess = jac.T @ r, jac.T @ jac
        diag = torch.diag(hess).clamp_min(1e-300)
        improved = done = False
        while lam < 1e12:
            try:
                step = torch.linalg.solve(hess + lam * torch.diag(diag), -grad)
            except RuntimeError:
                lam *= 10
                continue
            r2, c2 = cost_of(p + step)
            if c2 < cost:
                p, r, improved = p + step, r2, True
                done = cost - c2 <= 1e-10 * cost or c2 < 1e-26 * len(r2)
                cost = c2
                lam = max(lam / 10, 1e-12)
                break
            lam *= 10
        if not improved or done:
            break
    return p, cost


def snap(x: float, rel: float = 1e-6, zero: float = 0.0) -> float:
    """``x`` rounded to a short decimal or a small fraction when that is within ``rel``."""
    if abs(x) <= zero:
        return 0.0
    for digits in range(1, 8):
        y = float(f"{x:.{digits}g}")
        if abs(y - x) <= rel * abs(x):
            return y
    fr = Fraction(x).limit_denominator(64)
    if abs(float(fr) - x) <= rel * abs(x):
        return float(fr)
    return x


# ----------------------------------------------------------------------------------------------
# Per-class ratios (Dice / Jaccard / Tversky)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RatioFit:
    h: str                 # "pow" ((1 - ti)^gamma) or "log" (-log ti)
    alpha: float
    beta: float
    sn: float
    sd: float
    gamma: float
    c: Tensor              # per class (classes not fitted: 0)
    o: float
    rms: float


_NONLIN = ("alpha", "beta", "sn", "sd", "gamma")


def ratio_terms(u: Units, a, b, sn, sd, g, h):
    """phi and dphi/dI per unit."""
    den = u.I + a * (u.P - u.I) + b * (u.T - u.I) + sd
    num = u.I + sn
    ti = num / den
    dti = (den - num * (1 - a - b)) / den ** 2
    if h == "log":
        return -torch.log(ti), -dti / ti
    base = 1 - ti
    if isinstance(g, float) and g == 1.0:
        return base, -dti
    base = base.clamp_min(1e-300)
    return base ** g, -g * base ** (g - 1) * dti


def _scales(u: Units):
    vs = u.values.abs().mean().clamp_min(1e-12)
    gs = u.gI.abs().clamp_min(1e-300)
    return vs, gs


def _linear_c(u: Units, phi, dphi, classes):
    """Least-squares (c per fitted class, o) for fixed phi (values and gI rows, relative)."""
    vs, gs = _scales(u)
    onehot = (u.cls.unsqueeze(1) == torch.tensor(classes).unsqueeze(0)).to(phi.dtype)  # (U, classes)
    rows_v = u.gmat @ (onehot * phi.unsqueeze(1))
    rows_v = torch.cat([rows_v, torch.ones(u.num_groups, 1, dtype=phi.dtype)], 1)
    rows_g = torch.cat([onehot * dphi.unsqueeze(1), torch.zeros(len(phi), 1, dtype=phi.dtype)], 1)
    a = torch.cat([rows_v / vs, rows_g / gs.unsqueeze(1)])
    b = torch.cat([u.values / vs, u.gI / gs])
    return torch.linalg.lstsq(a, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)


def fit_ratio(u: Units, classes: list, h: str, start: dict, free: tuple) -> RatioFit:
    """Fit the per-class ratio model with the nonlinear parameters ``free`` started at ``start``."""
    fixed = dict(start)
    vs, gs = _scales(u)
    cls_index = {k: i for i, k in enumerate(classes)}
    idx = torch.tensor([cls_index[int(k)] for k in u.cls])
    gmat = u.gmat

    def unpack(p):  # p: (B, n)
        vals = dict(fixed)
        for i, name in enumerate(free):
            vals[name] = p[:, i:i + 1]
        return vals, p[:, len(free):len(free) + len(classes)], p[:, -1:]

    def fun(p):
        v, c, o = unpack(p)
        phi, dphi = ratio_terms(u, v["alpha"], v["beta"], v["sn"], v["sd"], v["gamma"], h)
        cu = c[:, idx]
        model_v = (cu * phi) @ gmat.T + o
        return torch.cat([(model_v - u.values) / vs, (cu * dphi - u.gI) / gs], 1)

    phi, dphi = ratio_terms(u, start["alpha"], start["beta"], start["sn"], start["sd"], start["gamma"], h)
    lin = _linear_c(u, phi, dphi, classes)
    p0 = torch.cat([torch.tensor([float(start[n]) for n in free], dtype=torch.float64), lin])
    if not torch.isfinite(p0).all():
        return None
    p, cost = lm(fun, p0)
    v, c, o = unpack(p.unsqueeze(0))
    nres = u.num_groups + len(u.gI)
    return RatioFit(h, float(v["alpha"]), float(v["beta"]), float(v["sn"]), float(v["sd"]), float(v["gamma"]),
                    c[0].clone(), float(o), math.sqrt(cost / nres))


def ratio_rms(u: Units, classes: list, f: RatioFit):
    """Refit c and o for f's nonlinear parameters; (c, o, rms)."""
    phi, dphi = ratio_terms(u, f.alpha, f.beta, f.sn, f.sd, f.gamma, f.h)
    lin = _linear_c(u, phi, dphi, classes)
    c, o = lin[:-1], lin[-1]
    idx = torch.tensor([classes.index(int(k)) for k in u.cls])
    vs, gs = _scales(u)
    model_v = u.gmat @ (c[idx] * phi) + o
    r = torch.cat([(model_v - u.values) / vs, (c[idx] * dphi - u.gI) / gs])
    return c, float(o), float(r.norm() / math.sqrt(len(r)))


def best_ratio_fit(u: Units, classes: list) -> Optional[RatioFit]:
    """Dice first (alpha = beta = 1/2), then Tversky, then focal Tversky; pow then log forms."""
    dice = dict(alpha=0.5, beta=0.5, sn=0.0, sd=0.0, gamma=1.0)
    tries = [("pow", dice, ("sn", "sd")), ("log", dice, ("sn", "sd"))]
    for ab in ((0.5, 0.5), (1.0, 1.0)):
        tries.append(("pow", dict(dice, alpha=ab[0], beta=ab[1]), ("alpha", "beta", "sn", "sd")))
    for ab, g in (((0.5, 0.5), 0.75), ((0.5, 0.5), 2.0), ((0.3, 0.7), 0.75)):
        tries.append(("pow", dict(dice, alpha=ab[0], beta=ab[1], gamma=g), _NONLIN))
    for ab in ((0.5, 0.5), (1.0, 1.0)):
        tries.append(("log", dict(dice, alpha=ab[0], beta=ab[1]), ("alpha", "beta", "sn", "sd")))
    best = None
    for h, start, free in tries:
        f = fit_ratio(u, classes, h, start, free)
        # a richer model must fit far better: more parameters also absorb rounding in the original
        if f is not None and (best is None or f.rms < best.rms / 100):
            best = f
        if best is not None and best.rms < loose(1e-9):
            break
    return best


def snap_params(params: dict, rms_of: Callable[[dict], float], base: float, zero: dict) -> dict:
    """Round each parameter to the shortest number (or 0) that keeps the fit, one at a time.

    ``rms_of(params)`` re-evaluates the fit; a rounding is kept when the rms stays within
    max(2 base, 1e-11).  The loosest rounding is tried first, so 9.99996e-08 becomes 1e-07 where the data
    cannot tell them apart (then the confirmation decides, and the caller keeps the raw values to fall back on).
    """
    out = dict(params)
    limit = max(2 * base, loose(1e-11))
    for name, v in params.items():
        cands = [0.0] if name in zero and abs(v) <= zero[name] else []
        cands += [snap(v, rel) for rel in (0.3, 3e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-9)]
        for cand in dict.fromkeys(cands):
            if cand == v:
                break
            if rms_of(dict(out, **{name: cand})) <= limit:
                out[name] = cand
                break
    return out


def snap_ratio(u: Units, classes: list, f: RatioFit) -> RatioFit:
    """Round the nonlinear parameters to short numbers where that keeps the fit."""
    scale = float(torch.cat([u.P, u.T]).abs().median().clamp_min(1e-12))
    names = ("alpha", "beta", "gamma", "sn", "sd")
    rms_of = lambda d: ratio_rms(u, classes, dataclasses.replace(f, **d))[2]  # noqa: E731
    zero = {"sn": 1e-6 * scale, "sd": 1e-6 * scale, "alpha": 1e-9, "beta": 1e-9}
    params = snap_params({k: getattr(f, k) for k in names}, rms_of, f.rms, zero)
    g = dataclasses.replace(f, **params)
    c, o, rms = ratio_rms(u, classes, g)
    return dataclasses.replace(g, c=c, o=o, rms=rms)


# ----------------------------------------------------------------------------------------------
# Generalized Dice
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WeightFit:
    e: float               # weights V^-e (e = 2: square, 1: simple, 0: uniform)
    cw: Tensor             # class factors (min positive = 1); 0 for classes without gradient
    rms: float             # rms of the log-linear fit (relative)


def fit_weights(gI: Tensor, vol: Tensor, unit: Tensor, classes: list, num_classes: int) -> Optional[WeightFit]:
    """log|gI[u,k]| = A_u + B_k - e log V[u,k] by least squares (gI of one ratio is proportional to w).

    ``gI``, ``vol``: (R, C) per ratio unit (image or batch) and class; ``unit``: which rows to use.
    """
    rows = [(r, k) for r in unit.tolist() for k in classes if vol[r, k] > 0]
    if len(rows) < len(classes) + 3:
        return None
    units = sorted({r for r, _ in rows})
    cols = len(units) + len(classes) - 1 + 1
    a = torch.zeros(len(rows), cols, dtype=torch.float64)
    y = torch.zeros(len(rows), dtype=torch.float64)
    for i, (r, k) in enumerate(rows):
        a[i, units.index(r)] = 1.0
        j = classes.index(k)
        if j > 0:
            a[i, len(units) + j - 1] = 1.0
        a[i, -1] = -math.log(float(vol[r, k]))
        g = float(gI[r, k])
        if g == 0 or not math.isfinite(g):
            return None
        y[i] = math.log(abs(g))
    sol = torch.linalg.lstsq(a, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    rms = float((a @ sol - y).norm() / math.sqrt(len(rows)))
    e = float(sol[-1])
    b = torch.cat([torch.zeros(1, dtype=torch.float64), sol[len(units):-1]])
    cw = torch.zeros(num_classes, dtype=torch.float64)
    cw[classes] = torch.exp(b - b.min())
    return WeightFit(e, cw, rms)


@dataclasses.dataclass
class GDFit:
    h: str
    sn: float
    sd: float
    s: float
    o: float
    rms: float


def gd_terms(a_sum, b_sum, sn, sd, h):
    """phi(R) and dphi/dA (A = 2 sum w I, so dL/dI_k = s dphi/dA 2 w_k)."""
    den = b_sum + sd
    r = (a_sum + sn) / den
    if h == "log":
        return -torch.log(r), -1.0 / (a_sum + sn)
    return 1 - r, -1.0 / den


def gd_rms(a_sum, b_sum, g_unit, group, values, h, sn, sd, s, o) -> float:
    """The rms relative residual of a generalized-Dice fit (as fit_gd measures it)."""
    gmat = (torch.arange(values.numel()).unsqueeze(1) == group.unsqueeze(0)).to(torch.float64)
    phi, dphi = gd_terms(a_sum, b_sum, sn, sd, h)
    r = torch.cat([((gmat @ (s * phi)) + o - values) / values.abs().mean().clamp_min(1e-12),
                   (s * dphi - g_unit) / g_unit.abs().clamp_min(1e-300)])
    return float(r.norm() / math.sqrt(len(r)))


def fit_gd(a_sum: Tensor, b_sum: Tensor, g_unit: Tensor, group: Tensor, values: Tensor,
           prefer: tuple = ()) -> Optional[GDFit]:
    """Fit (sn, sd, s, o) of the generalized Dice ratio; ``g_unit`` = gI / (2 w) per ratio unit.

    ``prefer``: scales s to try with o = 0 after the free fit; one is taken when it fits as well.  This
    picks the plain member of a degenerate family: with softmax and uniform weights the denominator is
    the constant 2·(pixel count) + sd, and (s, sd, o) are not separately determined.
    """
    vs = values.abs().mean().clamp_min(1e-12)
    gs = g_unit.abs().clamp_min(1e-300)
    gmat = (torch.arange(values.numel()).unsqueeze(1) == group.unsqueeze(0)).to(torch.float64)
    nres = values.numel() + g_unit.numel()

    def residual(h, sn, sd, s_, o):  # each (B, 1) or a number
        phi, dphi = gd_terms(a_sum, b_sum, sn, sd, h)
        r_v = (s_ * phi) @ gmat.T + o - values
        r_g = s_ * dphi - g_unit
        return torch.cat([r_v / vs, r_g / gs], -1)

    best = None
    for h in ("pow", "log"):
        # a start from the linear relation of 1/g: pow: -(B + sd)/s, log: -(A + sn)/s
        xcol = b_sum if h == "pow" else a_sum
        design = torch.stack([xcol, torch.ones_like(xcol)], 1)
        slope, icpt = torch.linalg.lstsq(design, (1 / g_unit).unsqueeze(1), driver="gelsd").solution.squeeze(1).tolist()
        if slope == 0 or not math.isfinite(slope):
            continue
        s0 = -1.0 / slope
        smooth0 = icpt / slope
        sn0, sd0 = (0.0, smooth0) if h == "pow" else (smooth0, 0.0)
        phi, _ = gd_terms(a_sum, b_sum, sn0, sd0, h)
        o0 = float((values - gmat @ (s0 * phi)).mean())
        p, cost = lm(lambda p, h=h: residual(h, p[:, :1], p[:, 1:2], p[:, 2:3], p[:, 3:]),
                     torch.tensor([sn0, sd0, s0, o0], dtype=torch.float64))
        fit = GDFit(h, float(p[0]), float(p[1]), float(p[2]), float(p[3]), math.sqrt(cost / nres))
        for s_fixed in prefer:
            q, cost = lm(lambda q, h=h, s_fixed=s_fixed: residual(h, q[:, :1], q[:, 1:2], s_fixed, 0.0),
                         torch.zeros(2, dtype=torch.float64))
            rms = math.sqrt(cost / nres)
            if rms <= max(10 * fit.rms, 1e-13):
                fit = GDFit(h, float(q[0]), float(q[1]), s_fixed, 0.0, rms)
                break
        if best is None or fit.rms < best.rms:
            best = fit
    return best
