"""Triton kernels for many channels (C > 128): channel chunks with an online softmax.

Register use must not grow with C, so the channels are walked in chunks of BLOCK_C (64).

* Forward: ``_softmax_lse_kernel`` computes the per-pixel log-sum-exp with an online softmax
  (running max and rescaled sum over the chunks; N*M floats of scratch); then a persistent grid
  with a chunk axis accumulates p = exp(x - lse), t and the sums of its chunk of channels over its
  tiles into a [BLOCK_C, BLOCK_M] register accumulator and writes one row of partial sums.
* Backward: each program loops over the chunks three times (online softmax normaliser,
  sum_j p_j g_j, gradient), one program per (image, pixel tile).

The softmax is -inf safe: while every channel seen so far is -inf the running max is shifted by 0,
so a pixel whose leading channels are -inf stays finite.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tile import _join_gamma, _pixel_term, _sigmoid_pixel_dz, _softmax_pixel_h, _t_times

# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_x(x_base, offs_c, offs_m, cmask, mmask, stride_xc, stride_xm, ACTIVATION: tl.constexpr,
            FP64: tl.constexpr):
    """[BLOCK_C, BLOCK_M] tile upcast to the accumulation type; padding channels are -inf (softmax)."""
    mask = cmask[:, None] & mmask[None, :]
    x = tl.load(x_base + offs_c[:, None] * stride_xc + offs_m[None, :] * stride_xm, mask=mask, other=0.0)
    # Upcast right after the load: all math is fp32 (fp64 for fp64 input).
    if FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    if ACTIVATION == 0:
        x = tl.where(cmask[:, None], x, float("-inf"))
    return x


@triton.jit
def _elementwise_act(x, ACTIVATION: tl.constexpr):
    """Sigmoid, threshold (x > 0) or identity (softmax and argmax need all channels: the callers)."""
    if ACTIVATION == 1:
        out = 1.0 / (1.0 + tl.exp(-x))
    elif ACTIVATION == 4:
        out = tl.where(x > 0, 1.0, 0.0).to(x.dtype)
    else:
        out = x
    return out


@triton.jit
def _labels(t_base, offs_m, mmask, stride_tm, ignore_index, C, LABEL_OFFSET: tl.constexpr,
            HAS_IGNORE: tl.constexpr):
    """Per pixel: class index (int32, -1 when the label matches no channel) and the keep mask.

    Labels are compared in int64 (never used as addresses); only in-range classes are narrowed.
    """
    lab = tl.load(t_base + offs_m * stride_tm, mask=mmask, other=0).to(tl.int64)
    cls = lab - LABEL_OFFSET
    cls = tl.where((cls >= 0) & (cls < C), cls, -1).to(tl.int32)
    keep = mmask
    if HAS_IGNORE:
        keep = keep & (lab != ignore_index)
    return cls, keep


@triton.jit
def _target(t_base, cls, offs_c, offs_m, cmask, mmask, stride_tc, stride_tm, LABELS: tl.constexpr,
            FP64: tl.constexpr):
    """[BLOCK_C, BLOCK_M] target tile in the accumulation type."""
    if LABELS:
        t = (cls[None, :] == offs_c[:, None]).to(tl.float32)
    else:
        mask = cmask[:, None] & mmask[None, :]
        t = tl.load(t_base + offs_c[:, None] * stride_tc + offs_m[None, :] * stride_tm, mask=mask, other=0.0)
    if FP64:
        t = t.to(tl.float64)
    else:
        t = t.to(tl.float32)
    return t


@triton.jit
def _image_and_tile(pid, per_image, INT64: tl.constexpr):
    n = pid // per_image
    j = pid % per_image
    if INT64:
        n = n.to(tl.int64)
        j = j.to(tl.int64)
    return n, j


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _online_softmax_stats(x_base, offs_m, mmask, arange_c, C, stride_xc, stride_xm, BLOCK_C: tl.constexpr,
                          BLOCK_M: tl.constexpr, FP64: tl.constexpr):
    """Per pixel running max and sum of exp(x - max) over all channels, chunk by chunk."""
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float64 if FP64 else tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + arange_c
        x = _load_x(x_base, offs_c, offs_m, offs_c < C, mmask, stride_xc, stride_xm, 0, FP64)
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        # while every channel so far is -inf, shift by 0: exp(-inf - -inf) would be NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[None, :]), axis=0)
        run_max = new_max
    return run_max, run_sum


@triton.jit
def _softmax_lse_kernel(
    x_ptr, lse_ptr, C, M, tiles_per_image, stride_xn, stride_xc, stride_xm,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, INT64: tl.constexpr, FP64: tl.constexpr,
):
    """lse[n, m] = log(sum_c exp(x[n, c, m])) for many channels (online softmax over chunks)."""
    n, j = _image_and_tile(tl.program_id(0), tiles_per_image, INT64)
    arange_c = tl.arange(0, BLOCK_C)
    offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        arange_c = arange_c.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
    mmask = offs_m < M
    run_max, run_sum = _online_softmax_stats(x_ptr + n * stride_xn, offs_m, mmask, arange_c, C, stride_xc,
                                             stride_xm, BLOCK_C, BLOCK_M, FP64)
    tl.store(lse_ptr + n * M + offs_m, run_max + tl.log(run_sum), mask=mmask)


@triton.jit
def _argmax_kernel(
    x_ptr, idx_ptr, C, M, tiles_per_image, stride_xn, stride_xc, stride_xm,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, INT64: tl.constexpr, FP64: tl.constexpr,
):
    """idx[n, m] = torch.argmax(x[n, :, m]) over chunks of channels, stored as a float.

    Ties go to the lowest index (an earlier chunk keeps the lead on equal maxima), the first NaN
    wins over any number, all -inf gives 0.
    """
    n, j = _image_and_tile(tl.program_id(0), tiles_per_image, INT64)
    x_base = x_ptr + n * stride_xn
    arange_c = tl.arange(0, BLOCK_C)
    offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        arange_c = arange_c.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
    mmask = offs_m < M
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float64 if FP64 else tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=offs_m.dtype)
    first_nan = tl.full([BLOCK_M], C, dtype=offs_m.dtype)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + arange_c
        x = _load_x(x_base, offs_c, offs_m, offs_c < C, mmask, stride_xc, stride_xm, 0, FP64)  # padding: -inf
        nan = x != x
        first_nan = tl.minimum(first_nan, tl.min(tl.where(nan, offs_c[:, None], C), axis=0))
        x = tl.where(nan, float("-inf"), x)
        chunk_max = tl.max(x, axis=0)
        chunk_idx = tl.min(tl.where(x == chunk_max[None, :], offs_c[:, None], C), axis=0)
        better = chunk_max > best
        best_idx = tl.where(better, chunk_idx, best_idx)
        best = tl.maximum(best, chunk_max)
    idx = tl.where(first_nan < C, first_nan, best_idx)
    tl.store(idx_ptr + n * M + offs_m, idx.to(idx_ptr.dtype.element_ty), mask=mmask)


# see _tile_fwd_kernel
@triton.jit(do_not_specialize=["num_chunks", "programs_per_image", "num_tiles", "gamma", "gamma_lo"])
def _dice_fwd_kernel(
    x_ptr, t_ptr, lse_ptr, part_ptr,
    C, M, num_chunks, programs_per_image, num_tiles, ignore_index, gamma, gamma_lo,
    stride_xn, stride_xc, stride_xm,
    stride_tn, stride_tc, stride_tm,
    ACTIVATION: tl.constexpr, POWER: tl.constexpr, LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    LABEL_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    PIXEL: tl.constexpr, GAMMA: tl.constexpr, INT64: tl.constexpr, FP64: tl.constexpr,
):
    """Partial sums of one program: part[n, j, :, chunk] = (sum p*t, sum p^q, sum t^q [, sum t*e, sum e])
    over its tiles (PIXEL, GAMMA: the pixel loss, as in _tile_fwd_kernel).

    Program id = (n * programs_per_image + j) * num_chunks + chunk; each program handles BLOCK_C
    channels, and the softmax uses the per-pixel log-sum-exp from _softmax_lse_kernel.
    """
    gamma = _join_gamma(gamma, gamma_lo, FP64)
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    n, j = _image_and_tile(pid // num_chunks, programs_per_image, INT64)
    x_base = x_ptr + n * stride_xn
    t_base = t_ptr + n * stride_tn
    offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    arange_m = tl.arange(0, BLOCK_M)
    if INT64:
        offs_c = offs_c.to(tl.int64)
        arange_m = arange_m.to(tl.int64)
    cmask = offs_c < C
    # 2-D accumulators, reduced over pixels once at the end (no cross-thread work per tile)
    acc_i = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
    acc_p = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
    acc_t = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
    acc_x = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
    acc_l = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
    for tile in range(j, num_tiles, programs_per_image):
        offs_m = tile * BLOCK_M + arange_m
        mmask = offs_m < M
        x = _load_x(x_base, offs_c, offs_m, cmask, mmask, stride_xc, stride_xm, ACTIVATION, FP64)
        aux = x
        if ACTIVATION == 0:
            lse = tl.load(lse_ptr + n * M + offs_m, mask=mmask, other=0.0)
            aux = x - lse[None, :]  # log p
            p = tl.exp(aux)
        elif ACTIVATION == 1:
            aux = tl.exp(-x)
            p = 1.0 / (1.0 + aux)
        elif ACTIVATION == 3:  # the per-pixel argmax from _argmax_kernel
            idx = tl.load(lse_ptr + n * M + offs_m, mask=mmask, other=-1.0)
            p = tl.where(offs_c[:, None] == idx.to(tl.int64)[None, :], 1.0, 0.0).to(x.dtype)
        else:
            p = _elementwise_act(x, ACTIVATION)
        cls = offs_m  # unused for float targets
        keep = mmask
        if LABELS:
            cls, keep = _labels(t_base, offs_m, mmask, stride_tm, ignore_index, C, LABEL_OFFSET, HAS_IGNORE)
        t = _target(t_base, cls, offs_c, offs_m, cmask, mmask, stride_tc, stride_tm, LABELS, FP64)
        w = cmask[:, None] & keep[None, :]
        p = tl.where(w, p, 0.0)
        t = tl.where(w, t, 0.0)
        acc_i += p * t
        if POWER == 1:
            acc_p += p
            acc_t += t
        else:
            acc_p += p * p
            acc_t += t * t
        if PIXEL != 0:
            e = _pixel_term(x, aux, p, t, w, gamma, ACTIVATION, PIXEL, GAMMA, LABELS)
            acc_x += _t_times(t, e)
            acc_l += e
    rows = 3 if PIXEL == 0 else 5
    part_base = part_ptr + (n * programs_per_image + j).to(tl.int64) * rows * C
    tl.store(part_base + offs_c, tl.sum(acc_i, axis=1), mask=cmask)
    tl.store(part_base + C + offs_c, tl.sum(acc_p, axis=1), mask=cmask)
    tl.store(part_base + 2 * C + offs_c, tl.sum(acc_t, axis=1), mask=cmask)
    if PIXEL != 0:
        tl.store(part_base + 3 * C + offs_c, tl.sum(acc_x, axis=1), mask=cmask)
        tl.store(part_base + 4 * C + offs_c, tl.sum(acc_l, axis=1), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grad_p(gi, gp, p, t, POWER: tl.constexpr):
    """dL/dp = gI*t + gP*q*p^(q-1) for a [BLOCK_C, BLOCK_M] tile."""
    if POWER == 1:
        return gi[:, None] * t + gp[:, None]
    return gi[:, None] * t + 2.0 * gp[:, None] * p


@triton.jit(do_not_specialize=["gamma", "gamma_lo"])
def _dice_bwd_kernel(
    grad_ptr, x_ptr, t_ptr, out_ptr,
    C, M, tiles_per_image, ignore_index, gamma, gamma_lo,
    stride_xn, stride_xc, stride_xm,
    stride_tn, stride_tc, stride_tm,
    stride_on, stride_oc, stride_om,
    ACTIVATION: tl.constexpr, POWER: tl.constexpr, LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    LABEL_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    PIXEL: tl.constexpr, GAMMA: tl.constexpr, INT64: tl.constexpr, FP64: tl.constexpr,
):
    """dL/dx of one (image, pixel tile), written in the output's dtype and strides (with the pixel
    loss's gradient when PIXEL != 0)."""
    gamma = _join_gamma(gamma, gamma_lo, FP64)
    n, j = _image_and_tile(tl.program_id(0), tiles_per_image, INT64)
    x_base = x_ptr + n * stride_xn
    t_base = t_ptr + n * stride_tn
    o_base = out_ptr + n * stride_on
    rows = 3 if PIXEL == 0 else 5
    g_base = grad_ptr + n.to(tl.int64) * rows * C
    arange_c = tl.arange(0, BLOCK_C)
    offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        arange_c = arange_c.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
    mmask = offs_m < M
    cls = offs_m
    keep = mmask
    if LABELS:
        cls, keep = _labels(t_base, offs_m, mmask, stride_tm, ignore_index, C, LABEL_OFFSET, HAS_IGNORE)

    if ACTIVATION == 0:
        # pass 1: online softmax normaliser; pass 2: sum_j p_j g_j (and sum_j h_j of the pixel loss);
        # pass 3 below writes dL/dx
        run_max, run_sum = _online_softmax_stats(x_base, offs_m, mmask, arange_c, C, stride_xc, stride_xm,
                                                 BLOCK_C, BLOCK_M, FP64)
        inv_sum = 1.0 / run_sum
        log_norm = run_max + tl.log(run_sum)
        dot = tl.zeros([BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
        hsum = tl.zeros([BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + arange_c
            cmask = offs_c < C
            x = _load_x(x_base, offs_c, offs_m, cmask, mmask, stride_xc, stride_xm, ACTIVATION, FP64)
            p = tl.exp(x - run_max[None, :]) * inv_sum[None, :]
            t = _target(t_base, cls, offs_c, offs_m, cmask, mmask, stride_tc, stride_tm, LABELS, FP64)
            gi = tl.load(g_base + offs_c, mask=cmask, other=0.0)
            gp = tl.load(g_base + C + offs_c, mask=cmask, other=0.0)
            dot += tl.sum(p * _grad_p(gi, gp, p, t, POWER), axis=0)
            if PIXEL != 0:
                hsum += tl.sum(_pixel_h(x, log_norm, p, t, cmask, keep, g_base, offs_c, C, gamma, PIXEL, GAMMA),
                               axis=0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + arange_c
        cmask = offs_c < C
        x = _load_x(x_base, offs_c, offs_m, cmask, mmask, stride_xc, stride_xm, ACTIVATION, FP64)
        aux = x
        if ACTIVATION == 0:
            p = tl.exp(x - run_max[None, :]) * inv_sum[None, :]
        elif ACTIVATION == 1:
            aux = tl.exp(-x)
            p = 1.0 / (1.0 + aux)
        else:
            p = _elementwise_act(x, ACTIVATION)
        t = _target(t_base, cls, offs_c, offs_m, cmask, mmask, stride_tc, stride_tm, LABELS, FP64)
        gi = tl.load(g_base + offs_c, mask=cmask, other=0.0)
        gp = tl.load(g_base + C + offs_c, mask=cmask, other=0.0)
        g = _grad_p(gi, gp, p, t, POWER)
        if ACTIVATION == 0:
            dz = p * (g - dot[None, :])
            if PIXEL != 0:
                h = _pixel_h(x, log_norm, p, t, cmask, keep, g_base, offs_c, C, gamma, PIXEL, GAMMA)
                dz += h - p * hsum[None, :]
        elif ACTIVATION == 1:
            dz = g * p * (1.0 - p)
            if PIXEL != 0:
                gx = tl.load(g_base + 3 * C + offs_c, mask=cmask, other=0.0)
                gl = tl.load(g_base + 4 * C + offs_c, mask=cmask, other=0.0)
                w = gx[:, None] * t + gl[:, None]
                dz += _sigmoid_pixel_dz(x, aux, p, t, w, gamma, PIXEL, GAMMA, LABELS)
        else:
            dz = g
        dz = tl.where(keep[None, :], dz, 0.0)
        o_ptr = o_base + offs_c[:, None] * stride_oc + offs_m[None, :] * stride_om
        tl.store(o_ptr, dz.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & mmask[None, :])


@triton.jit
def _pixel_h(x, log_norm, p, t, cmask, keep, g_base, offs_c, C, gamma, PIXEL: tl.constexpr, GAMMA: tl.constexpr):
    """h of the softmax pixel loss for a [BLOCK_C, BLOCK_M] chunk (see _tile._softmax_pixel_h)."""
    gx = tl.load(g_base + 3 * C + offs_c, mask=cmask, other=0.0)
    gl = tl.load(g_base + 4 * C + offs_c, mask=cmask, other=0.0)
    keep2 = cmask[:, None] & keep[None, :]
    w = tl.where(keep2, gx[:, None] * t + gl[:, None], 0.0)
    return _softmax_pixel_h(x - log_norm[None, :], p, keep2, w, gamma, PIXEL, GAMMA)
