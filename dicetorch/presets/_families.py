"""The two model families, fitted to the probes: per-class ratios and one generalized-Dice ratio.

Each ``try_*`` returns the fits that explain the probes as a list of ``(choices, rms, note)``, the
rounded numbers first and the raw fitted ones after (the caller confirms them in that order).  Choices
are in the terms of :class:`~dicetorch.presets.identification.Identification`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _fit
from ._probe import Probe

N0, N1 = 3, 2  # batch sizes of the probes (the scaling from N0 to N1 tells mean from sum)


def units(probes: list, classes: list, batch: bool) -> _fit.Units:
    """The per-class ratio data of ``probes``: one unit per image and class (per class with ``batch``)."""
    rows = []
    for g, pr in enumerate(probes):
        s, gi = pr.stats, pr.gI
        if batch:
            s, gi = s.sum(0, keepdim=True), gi.mean(0, keepdim=True)
        for n in range(s.shape[0]):
            for k in classes:
                rows.append((s[n, 0, k], s[n, 1, k], s[n, 2, k], k, g, gi[n, k]))
    col = lambda j, dt=torch.float64: torch.tensor([float(r[j]) for r in rows], dtype=dt)  # noqa: E731
    return _fit.Units(col(0), col(1), col(2), col(3, torch.long), col(4, torch.long), col(5),
                      torch.tensor([float(p.out.sum()) for p in probes], dtype=torch.float64))


def _scaling(c0: Tensor, c1: Tensor):
    """How the fitted factor changes from a batch of N0 to one of N1: 'mean', 'sum' or None."""
    keep = c0.abs() > 1e-12 * c0.abs().max()
    ratio = (c1[keep] / c0[keep])
    if bool(((ratio - N0 / N1).abs() < _fit.loose(1e-6, 1e3)).all()):
        return "mean"
    if bool(((ratio - 1).abs() < _fit.loose(1e-6, 1e3)).all()):
        return "sum"
    return None


def _decompose(per_unit: Tensor, counts: dict, multi: bool):
    """(reduction, class_weights or None, scale) for factors c (per loss class) under reduction counts."""
    options = [("none", per_unit)] if multi else [(red, per_unit * n) for red, n in counts.items()]
    tol = _fit.loose(1e-9)
    for red, kappa in options:
        if bool(((kappa - kappa[0]).abs() <= tol * kappa.abs().max()).all()) and abs(float(kappa[0]) - 1) < tol:
            return red, None, 1.0
    for red, kappa in options:
        if bool(((kappa - kappa[0]).abs() <= tol * kappa.abs().max()).all()):
            return red, None, _fit.snap(float(kappa[0]), rel=tol)
    red, kappa = options[0]
    sign = 1.0 if float(kappa.sum()) >= 0 else -1.0
    kappa = kappa * sign
    if bool((kappa < -1e-12 * kappa.abs().max()).any()):
        return None
    return red, tuple(_fit.snap(float(k), rel=tol, zero=1e-12 * float(kappa.abs().max())) for k in kappa), sign


def try_ratio(clean, small_n, classes, batch, n_loss, c, multi) -> list:
    """Per-class ratio models that fit: [(choices, rms, note)], the rounded one first."""
    u = units(clean, classes, batch)
    raw = _fit.best_ratio_fit(u, classes)
    if raw is None or raw.rms > _fit.fit_tol():
        return []
    out = []
    nonlinear = lambda f: (f.alpha, f.beta, f.sn, f.sd, f.gamma)  # noqa: E731
    for f in (_fit.snap_ratio(u, classes, raw), raw):
        if out and nonlinear(f) == nonlinear(out[-1][3]):
            continue
        c1, _, _ = _fit.ratio_rms(units([small_n], classes, batch), classes, f)
        how = "sum" if batch else _scaling(f.c, c1)
        note = ""
        if how is None:
            note, how = "the loss scales with the batch size in a way no reduction does", "mean"
        full = torch.zeros(c, dtype=torch.float64)
        full[classes] = f.c
        counts = {"mean": n_loss, "sum": 1} if batch else ({"mean": n_loss * N0} if how == "mean" else {"sum": 1})
        dec = _decompose(full[c - n_loss:], counts, multi)
        if dec is None:
            continue
        red, weights, scale = dec
        offset = _fit.snap(f.o, rel=_fit.loose(1e-9), zero=_fit.loose(1e-12))
        choices = dict(reduction=red, class_weights=weights, scale=scale, offset=offset,
                       log_loss=f.h == "log")
        if f.alpha == 0.5 and f.beta == 0.5 and (f.gamma == 1.0 or f.h == "log"):
            choices.update(loss="dice", smooth_nr=2 * f.sn, smooth_dr=2 * f.sd)
        else:
            choices.update(loss="tversky", smooth_nr=f.sn, smooth_dr=f.sd, alpha=f.alpha, beta=f.beta,
                           gamma=1.0 if f.h == "log" else f.gamma)
        out.append((choices, f.rms, note, f))
    return [o[:3] for o in out]


def try_generalized(num_classes, clean, small_n, absent, classes, batch, n_loss, multi) -> list:
    """Generalized-Dice models that fit: [(choices, rms, note)], the rounded one first."""
    if len(classes) < 2:
        return []

    def per_unit(pr):
        s, gi = pr.stats, pr.gI
        return (s.sum(0, keepdim=True), gi.mean(0, keepdim=True)) if batch else (s, gi)

    parts = [per_unit(pr) for pr in clean]
    s_all, g_all = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    group = torch.tensor([i for i, p in enumerate(parts) for _ in range(p[0].shape[0])])
    wf = _fit.fit_weights(g_all, s_all[:, 2], torch.arange(len(s_all)), classes, num_classes)  # labels: sum t = T
    if wf is None or wf.rms > _fit.loose(1e-5, 1e3):
        return []
    e = float(round(wf.e)) if abs(wf.e - round(wf.e)) < 1e-3 else wf.e
    cw = wf.cw.clone()
    cw[classes] = torch.tensor([_fit.snap(float(v), rel=_fit.loose(1e-5, 1e3)) for v in cw[classes]],
                               dtype=torch.float64)
    ks = torch.tensor(classes)

    def sums(s, gi):
        # the weights as the loss applies them (gI is proportional to them within a ratio), scaled to c_k T^-e:
        # exact also where the original rounds them (MONAI computes them in float32)
        model = cw[ks] * s[:, 2, ks] ** (-e)
        lam = (gi[:, ks] / model).mean(1, keepdim=True)
        w = gi[:, ks] / lam
        return 2 * (w * s[:, 0, ks]).sum(1), (w * (s[:, 1, ks] + s[:, 2, ks])).sum(1), lam.squeeze(1) / 2

    a_sum, b_sum, g_unit = sums(s_all, g_all)
    values = torch.tensor([float(p.out.sum()) for p in clean], dtype=torch.float64)
    prefer = (1.0,) if batch else (1.0 / N0, 1.0)
    fit = _fit.fit_gd(a_sum, b_sum, g_unit, group, values, prefer)
    if fit is None or fit.rms > _fit.loose(1e-5, 1e3):
        return []
    # mean or sum over images, from the batch of N1
    a1, b1, gu1 = sums(*per_unit(small_n))
    phi, dphi = _fit.gd_terms(a1, b1, fit.sn, fit.sd, fit.h)
    design = torch.stack([torch.cat([phi.sum().reshape(1), dphi]),
                          torch.cat([torch.ones(1, dtype=torch.float64), torch.zeros_like(dphi)])], 1)
    sol = torch.linalg.lstsq(design, torch.cat([small_n.out.sum().reshape(1), gu1]).unsqueeze(1)).solution
    how = "sum" if batch else _scaling(torch.tensor([fit.s]), sol[0])
    note = "" if wf.rms < _fit.loose(1e-9) else f"the weights follow c_k/T^{e:g} only to {wf.rms:.0e} (relative)"
    if how is None:
        note, how = "the loss scales with the batch size in a way no reduction does", "mean"
    red = "none" if multi else ("mean" if batch else how)
    kappa = fit.s * (N0 if how == "mean" and not batch and not multi else 1)
    weighting = {2.0: "square", 1.0: "simple", 0.0: "uniform"}.get(e, f"1/T^{e:g}")
    rule = "max" if weighting == "uniform" else _absent_rule(absent[1 if batch else 0], batch, classes, cw, e)
    kept = cw[num_classes - n_loss:]
    weights = None if bool(((kept - 1).abs() < _fit.loose(1e-9)).all()) else tuple(float(v) for v in kept)
    ref = float(b_sum.abs().median())
    raw = dict(sn=fit.sn, sd=fit.sd, s=fit.s, o=fit.o)
    rms_of = lambda d: _fit.gd_rms(a_sum, b_sum, g_unit, group, values, fit.h, **d)  # noqa: E731
    rounded = _fit.snap_params(raw, rms_of, fit.rms, {"sn": 1e-6 * ref, "sd": 1e-6 * ref, "o": _fit.loose(1e-9)})
    out = []
    for d in (rounded, raw):
        factor = kappa / fit.s
        choices = dict(loss="generalized_dice", smooth_nr=d["sn"], smooth_dr=d["sd"], reduction=red,
                       class_weights=weights, weighting=weighting, absent_weight=rule,
                       scale=_fit.snap(d["s"] * factor, rel=_fit.loose(1e-12)), offset=d["o"], log_loss=fit.h == "log")
        if not out or choices != out[0][0]:
            out.append((choices, fit.rms + wf.rms, note))
    return out


def _absent_rule(pr: Probe, batch: bool, classes: list, cw: Tensor, e: float):
    """'max', 'zero', 'nan' or the weight an absent class gets, from a probe with absent classes.

    A class without target pixels has no dL/dI (I cannot change), but its weight shows in dL/dP: within
    one ratio gI_j = 2 G w_j and gP_j = -G R w_j + c (c: the softmax's free constant), so a line through
    the present classes' (gI, gP) gives -R/2 and c, and the absent class's w = (gP - c) / (2 G slope).
    """
    s, gi, gp = pr.stats, pr.gI, pr.gP
    if batch:
        s, gi, gp = s.sum(0, keepdim=True), gi.mean(0, keepdim=True), gp.mean(0, keepdim=True)
    if not (torch.isfinite(gi).all() and torch.isfinite(gp).all() and torch.isfinite(pr.out).all()):
        return "nan"
    seen = []
    for r in range(s.shape[0]):
        vol = s[r, 2]
        present = [k for k in classes if vol[k] > 0]
        gone = [k for k in classes if vol[k] == 0]
        if not gone or len(present) < 2:
            continue
        w = cw[present] * vol[present] ** (-e)
        g2 = float((gi[r, present] / w).mean())                      # 2 G
        line = torch.stack([gi[r, present], torch.ones(len(present), dtype=torch.float64)], 1)
        slope, icpt = torch.linalg.lstsq(line, gp[r, present].unsqueeze(1)).solution.squeeze(1).tolist()
        top = float((vol[present] ** (-e)).max())
        for k in gone:
            w_obs = (float(gp[r, k]) - icpt) / (g2 * slope) if g2 * slope != 0 else math.nan
            seen.append((w_obs, float(cw[k]) * top, float(w.max())))
    if not seen:
        return "max"
    if all(abs(o - m) <= _fit.loose(1e-6, 1e3) * abs(m) for o, m, _ in seen):
        return "max"
    if all(abs(o) <= _fit.loose(1e-9) * big for o, _, big in seen):
        return "zero"
    return _fit.snap(seen[0][0], rel=1e-6)
