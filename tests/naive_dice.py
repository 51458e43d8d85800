"""Independent float64 NumPy formulas for the Dice-family losses, used as test oracles.

Written from the definitions (DESIGN.md §1 and §3) with explicit loops over images and classes,
without calling into dicetorch, so that a wrong sum, mask, weight or reduction in the library shows up
as a mismatch.  Inputs are torch tensors (converted to float64 NumPy here).
"""
from __future__ import annotations

import numpy as np
import torch


def probs(x: np.ndarray, activation: str) -> np.ndarray:
    """Activation over the channel axis 1 of an (N, C, M) float64 array."""
    if activation == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return x.copy()


def target_and_valid(input: torch.Tensor, target: torch.Tensor, ignore_index):
    """(N, C, M) float64 target and (N, M) boolean mask of counted pixels.

    Integer targets are labels unless shaped like a multi-channel input (then one-hot); a bool
    target shaped like the input is a float target.  Channel k matches label k; with C == 1 the
    only channel matches label 1.
    """
    n, c = input.shape[0], input.shape[1]
    is_float = target.is_floating_point() or (target.dtype == torch.bool and target.shape == input.shape)
    if is_float or (target.shape == input.shape and c > 1):
        t = target.double().reshape(n, c, -1).numpy()
        return t, np.ones((n, t.shape[2]), dtype=bool)
    lab = target.reshape(n, -1).long().numpy()
    t = np.zeros((n, c, lab.shape[1]))
    for k in range(c):
        cls = 1 if c == 1 else k
        t[:, k, :] = lab == cls
    valid = np.ones_like(lab, dtype=bool) if ignore_index is None else lab != ignore_index
    return t, valid


def stats(input: torch.Tensor, target: torch.Tensor, activation="softmax", power=1, ignore_index=None):
    """(I, P, T, V), each (N, C) float64: sums over the counted pixels of p*t, p^q, t^q, t."""
    n, c = input.shape[0], input.shape[1]
    p = probs(input.detach().double().reshape(n, c, -1).numpy(), activation)
    t, valid = target_and_valid(input, target, ignore_index)
    out = np.zeros((4, n, c))
    for i in range(n):
        for k in range(c):
            pv, tv = p[i, k, valid[i]], t[i, k, valid[i]]
            out[:, i, k] = [(pv * tv).sum(), (pv**power).sum(), (tv**power).sum(), tv.sum()]
    return out


def _kept(c, include_background):
    return list(range(c)) if include_background or c == 1 else list(range(1, c))


def _weights(class_weights, c, include_background):
    kept = _kept(c, include_background)
    if class_weights is None:
        return np.ones(len(kept))
    w = np.asarray(class_weights, dtype=np.float64).ravel()
    return w[kept] if w.size == c else w


def _reduce(loss: np.ndarray, reduction: str):
    if reduction == "mean":
        return np.asarray(loss.mean())
    if reduction == "sum":
        return np.asarray(loss.sum())
    return loss


def dice_loss(input, target, *, activation="softmax", squared=False, smooth_nr=1e-5, smooth_dr=1e-5,
              batch=False, include_background=True, ignore_index=None, class_weights=None, log_loss=False,
              reduction="mean"):
    """loss[n,k] = w_k (1 - (2I + s_nr)/(P + T + s_dr)), (N, C') or (C',) with batch."""
    i_, p_, t_, _ = stats(input, target, activation, 2 if squared else 1, ignore_index)
    if batch:
        i_, p_, t_ = i_.sum(0, keepdims=True), p_.sum(0, keepdims=True), t_.sum(0, keepdims=True)
    kept = _kept(input.shape[1], include_background)
    w = _weights(class_weights, input.shape[1], include_background)
    loss = np.zeros((i_.shape[0], len(kept)))
    for n in range(i_.shape[0]):
        for j, k in enumerate(kept):
            d = (2 * i_[n, k] + smooth_nr) / (p_[n, k] + t_[n, k] + smooth_dr)
            loss[n, j] = w[j] * (-np.log(d) if log_loss else 1 - d)
    return _reduce(loss[0] if batch else loss, reduction)


def tversky_loss(input, target, *, activation="softmax", alpha=0.5, beta=0.5, gamma=1.0, smooth_nr=1e-5,
                 smooth_dr=1e-5, batch=False, include_background=True, ignore_index=None, class_weights=None,
                 log_loss=False, reduction="mean"):
    """ti = (TP + s_nr)/(TP + alpha FP + beta FN + s_dr); loss = w_k (1 - ti)^gamma (or -w_k log ti)."""
    i_, p_, t_, _ = stats(input, target, activation, 1, ignore_index)
    if batch:
        i_, p_, t_ = i_.sum(0, keepdims=True), p_.sum(0, keepdims=True), t_.sum(0, keepdims=True)
    kept = _kept(input.shape[1], include_background)
    w = _weights(class_weights, input.shape[1], include_background)
    loss = np.zeros((i_.shape[0], len(kept)))
    for n in range(i_.shape[0]):
        for j, k in enumerate(kept):
            tp, fp, fn = i_[n, k], p_[n, k] - i_[n, k], t_[n, k] - i_[n, k]
            ti = (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)
            loss[n, j] = w[j] * (-np.log(ti) if log_loss else max(1 - ti, 0.0) ** gamma)
    return _reduce(loss[0] if batch else loss, reduction)


def generalized_dice_loss(input, target, *, activation="softmax", squared=False, smooth_nr=1e-5, smooth_dr=1e-5,
                          batch=False, include_background=True, ignore_index=None, class_weights=None,
                          log_loss=False, reduction="mean", weighting="square", absent_weight="max"):
    """Per image: 1 - (2 sum_k w_k I_k + s_nr)/(sum_k w_k (P_k + T_k) + s_dr), w_k from V_k = sum_m t."""
    i_, p_, t_, v_ = stats(input, target, activation, 2 if squared else 1, ignore_index)
    if batch:
        i_, p_, t_, v_ = (a.sum(0, keepdims=True) for a in (i_, p_, t_, v_))
    kept = _kept(input.shape[1], include_background)
    cw = _weights(class_weights, input.shape[1], include_background)
    loss = np.zeros(i_.shape[0])
    for n in range(i_.shape[0]):
        w = np.zeros(len(kept))
        absent = []
        for j, k in enumerate(kept):
            if weighting == "uniform":
                w[j] = 1.0
            elif v_[n, k] == 0:
                absent.append(j)
            else:
                w[j] = 1 / v_[n, k] ** (2 if weighting == "square" else 1)
        if absent_weight == "max":
            for j in absent:
                w[j] = w.max()
        w = w * cw
        num = 2 * sum(w[j] * i_[n, k] for j, k in enumerate(kept)) + smooth_nr
        den = sum(w[j] * (p_[n, k] + t_[n, k]) for j, k in enumerate(kept)) + smooth_dr
        loss[n] = -np.log(num / den) if log_loss else 1 - num / den
    return _reduce(loss[0] if batch else loss, reduction)
