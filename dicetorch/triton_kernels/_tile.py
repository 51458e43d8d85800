"""Triton kernels for up to 128 channels: every channel of a pixel in the registers of one thread
(C <= 16) or of a few lanes of one warp, so channel max / sum / dot never touch shared memory.

Tile.  A step handles a [BLOCK_M, BLOCK_C] tile (pixels x channels, BLOCK_C = next power of two
>= C).  Triton derives the register layout from the addresses:

* contiguous input (pixel stride 1): a thread owns runs of PX = 16 bytes / element consecutive
  pixels of every channel it holds, so logits and gradients move as 128-bit vectors; BLOCK_M =
  PX x 32 x num_warps puts all lanes and warps along the pixels (channels in-thread).  Beyond 16
  channels (8 for 16-bit input) the channels are split over TPW_C lanes of a single-warp program;
* channels-last input (channel stride 1, pixel stride C, with C a compile-time constant so the
  compiler knows the alignment): a pixel's channels are contiguous, 128-bit vectors when
  C x element size is a multiple of 16 bytes; one pixel per thread, or per few lanes;
* any other strides: correct, unvectorized.

Labels are loaded in the logits' layout: in runs of PX pixels made of 16-byte sub-vectors (LV
labels each) joined in registers, so no layout conversion (shared memory and barriers) sits in the
tile loop; the one-hot target is tied to the logits' layout by :func:`_anchor`.  Labels are loaded
before the logits, and the forward prefetches the next tile's labels and logits into registers
while it computes the current one.

Each element costs exactly one exp per direction (softmax: exp(x - max), divided by the per-pixel
sum; sigmoid: 1 / (1 + exp(-x))).

Forward: a persistent grid of N x P programs; program (n, j) walks tiles j, j + P, ... of image n
and keeps (I, P, T) accumulators of [BLOCK_M / PX, BLOCK_C] (summed over each thread's run of PX
pixels in registers), reduced once at the end into one row of partial sums.  Backward: one program
per (image, tile); dL/dx written in the input's dtype and layout.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _anchor(v, like):
    """``v`` unchanged, in ``like``'s register layout.

    The select on ``like == NaN`` is always false (LLVM folds it away), but it makes Triton give
    ``v`` (the label-derived one-hot target) the logits' layout instead of converting between two
    layouts through shared memory, with barriers, inside the tile loop.
    """
    return tl.where(like == float("nan"), like, v.to(like.dtype))


@triton.jit
def _pixel_offsets(tile, BLOCK_M: tl.constexpr, PX: tl.constexpr, INT64: tl.constexpr):
    """[BLOCK_M // PX, PX] pixel indices of a tile: runs of PX consecutive pixels."""
    run = tl.arange(0, BLOCK_M // PX)
    lane = tl.arange(0, PX)
    if INT64:  # tile * (BLOCK_M // PX) < M / PX fits in int32; the products below need int64
        run = run.to(tl.int64)
        lane = lane.to(tl.int64)
    return (tile * (BLOCK_M // PX) + run)[:, None] * PX + lane[None, :]


@triton.jit
def _load_labels(t_base, tile, M, stride_tm, BLOCK_M: tl.constexpr, PX: tl.constexpr, LV: tl.constexpr,
                 INT64: tl.constexpr):
    """[BLOCK_M] labels of a tile, each thread holding runs of PX pixels (the logits' layout).

    A run is loaded as PX // LV sub-vectors of LV labels (16 bytes), joined in registers: Triton
    gives each load a layout of at most 16 bytes per thread, so loading a run of int64 labels in one
    piece would not match the logits' runs.  Masked pixels read 0.
    """
    if LV >= PX:
        offs = _pixel_offsets(tile, BLOCK_M, PX, INT64)
        lab = tl.load(t_base + offs * stride_tm, mask=offs < M, other=0)
    else:
        # part k of each run: pixels [k*LV, (k+1)*LV) of the run
        run = tl.arange(0, BLOCK_M // PX)
        if INT64:
            run = run.to(tl.int64)
        o0 = ((tile * (BLOCK_M // PX) + run) * PX)[:, None] + tl.arange(0, LV)[None, :]  # [runs, LV]
        a = tl.load(t_base + o0 * stride_tm, mask=o0 < M, other=0)
        b = tl.load(t_base + (o0 + LV) * stride_tm, mask=o0 + LV < M, other=0)
        if PX // LV == 2:
            lab = tl.permute(tl.join(a, b), (0, 2, 1))  # [runs, part, LV]
        else:  # 4 parts
            c = tl.load(t_base + (o0 + 2 * LV) * stride_tm, mask=o0 + 2 * LV < M, other=0)
            d = tl.load(t_base + (o0 + 3 * LV) * stride_tm, mask=o0 + 3 * LV < M, other=0)
            # join(join(a, b), join(c, d)): [runs, LV, lo, hi] with part = 2 * hi + lo
            lab = tl.permute(tl.join(tl.join(a, b), tl.join(c, d)), (0, 3, 2, 1))
    return tl.reshape(lab, [BLOCK_M])


# Addressing modes of a [BLOCK_M, BLOCK_C] operand (logits, float target, gradient):
STRIDED, CL, FLAT, GATHER = 0, 1, 2, 3
# STRIDED  2-D addresses from run-time strides: contiguous input (pixel stride 1, which the JIT
#          specializes) is vectorized along the pixels
# CL       channels-last with the compile-time pixel stride C: vectorized along the channels when
#          C x element size is a multiple of 16 bytes
# FLAT     channels-last with C a power of two and C x element size < 16 bytes: the tile is one
#          contiguous range of BLOCK_M*C elements, so a thread's 16 bytes hold PX whole pixels
# GATHER   one pixel per thread, each channel a strided 1-D load joined in registers (channels-last
#          with other C, and any other strides): no layout conversion, unvectorized


@triton.jit
def _ptrs(base, offs_m, offs_c, stride_c, stride_m, C: tl.constexpr, MODE: tl.constexpr):
    if MODE == 1:
        ptrs = base + offs_m[:, None] * C + offs_c[None, :]
    else:
        ptrs = base + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c
    return ptrs


@triton.jit
def _ld1(base, offs_m, mmask, k: tl.constexpr, stride_c, stride_m, C: tl.constexpr):
    return tl.load(base + offs_m * stride_m + k * stride_c, mask=mmask & (k < C), other=0.0)


@triton.jit
def _pairs(a, b, HALF: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_M, HALF] channels k.. and k+HALF.. -> [BLOCK_M, 2*HALF], in registers."""
    if HALF == 1:
        out = tl.join(a, b)
    else:
        out = tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [BLOCK_M, 2 * HALF])
    return out


@triton.jit
def _gather(base, offs_m, mmask, stride_c, stride_m, C: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_M: tl.constexpr):
    """[BLOCK_M, BLOCK_C] tile from BLOCK_C strided 1-D loads (GATHER mode; BLOCK_C <= 16)."""
    if BLOCK_C == 1:
        g = tl.reshape(_ld1(base, offs_m, mmask, 0, stride_c, stride_m, C), [BLOCK_M, 1])
    else:
        g = _pairs(_ld1(base, offs_m, mmask, 0, stride_c, stride_m, C),
                   _ld1(base, offs_m, mmask, 1, stride_c, stride_m, C), 1, BLOCK_M)
    if BLOCK_C >= 4:
        g = _pairs(g, _pairs(_ld1(base, offs_m, mmask, 2, stride_c, stride_m, C),
                             _ld1(base, offs_m, mmask, 3, stride_c, stride_m, C), 1, BLOCK_M), 2, BLOCK_M)
    if BLOCK_C >= 8:
        h = _pairs(_pairs(_ld1(base, offs_m, mmask, 4, stride_c, stride_m, C),
                          _ld1(base, offs_m, mmask, 5, stride_c, stride_m, C), 1, BLOCK_M),
                   _pairs(_ld1(base, offs_m, mmask, 6, stride_c, stride_m, C),
                          _ld1(base, offs_m, mmask, 7, stride_c, stride_m, C), 1, BLOCK_M), 2, BLOCK_M)
        g = _pairs(g, h, 4, BLOCK_M)
    if BLOCK_C >= 16:
        h0 = _pairs(_pairs(_ld1(base, offs_m, mmask, 8, stride_c, stride_m, C),
                           _ld1(base, offs_m, mmask, 9, stride_c, stride_m, C), 1, BLOCK_M),
                    _pairs(_ld1(base, offs_m, mmask, 10, stride_c, stride_m, C),
                           _ld1(base, offs_m, mmask, 11, stride_c, stride_m, C), 1, BLOCK_M), 2, BLOCK_M)
        h1 = _pairs(_pairs(_ld1(base, offs_m, mmask, 12, stride_c, stride_m, C),
                           _ld1(base, offs_m, mmask, 13, stride_c, stride_m, C), 1, BLOCK_M),
                    _pairs(_ld1(base, offs_m, mmask, 14, stride_c, stride_m, C),
                           _ld1(base, offs_m, mmask, 15, stride_c, stride_m, C), 1, BLOCK_M), 2, BLOCK_M)
        g = _pairs(g, _pairs(h0, h1, 4, BLOCK_M), 8, BLOCK_M)
    return g


@triton.jit
def _load_operand(base, tile, M, stride_c, stride_m, C: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, PX: tl.constexpr, MODE: tl.constexpr, INT64: tl.constexpr):
    """[BLOCK_M, BLOCK_C] tile of an (N, C, M) operand in its dtype; masked elements read 0."""
    offs_m = tl.reshape(_pixel_offsets(tile, BLOCK_M, PX, INT64), [BLOCK_M])
    mmask = offs_m < M
    if MODE == 3:
        v = _gather(base, offs_m, mmask, stride_c, stride_m, C, BLOCK_C, BLOCK_M)
    elif MODE == 2:
        flat = tl.reshape(_pixel_offsets(tile, BLOCK_M * C, PX * C, INT64), [BLOCK_M * C])
        v = tl.reshape(tl.load(base + flat, mask=flat < M * C, other=0.0), [BLOCK_M, BLOCK_C])
    else:
        offs_c = tl.arange(0, BLOCK_C)
        v = tl.load(_ptrs(base, offs_m, offs_c, stride_c, stride_m, C, MODE),
                    mask=mmask[:, None] & (offs_c < C)[None, :], other=0.0)
    return v


@triton.jit
def _split_half(v, HALF: tl.constexpr, BLOCK_M: tl.constexpr):
    """[BLOCK_M, 2*HALF] -> channels [0, HALF) and [HALF, 2*HALF) (1-D when HALF == 1)."""
    if HALF == 1:
        a, b = tl.split(v)
    else:
        a, b = tl.split(tl.permute(tl.reshape(v, [BLOCK_M, 2, HALF]), (0, 2, 1)))
    return a, b


@triton.jit
def _st1(base, offs_m, mmask, v, k: tl.constexpr, stride_c, stride_m, C: tl.constexpr):
    if k < C:
        tl.store(base + offs_m * stride_m + k * stride_c, v, mask=mmask)


@triton.jit
def _scatter4(base, offs_m, mmask, v, k: tl.constexpr, stride_c, stride_m, C: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """Store a [BLOCK_M, 4] block as channels k .. k+3."""
    lo, hi = _split_half(v, 2, BLOCK_M)
    a, b = tl.split(lo)
    c, d = tl.split(hi)
    _st1(base, offs_m, mmask, a, k, stride_c, stride_m, C)
    _st1(base, offs_m, mmask, b, k + 1, stride_c, stride_m, C)
    _st1(base, offs_m, mmask, c, k + 2, stride_c, stride_m, C)
    _st1(base, offs_m, mmask, d, k + 3, stride_c, stride_m, C)


@triton.jit
def _scatter(base, offs_m, mmask, v, stride_c, stride_m, C: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_M: tl.constexpr):
    """Inverse of :func:`_gather`: BLOCK_C strided 1-D stores of a [BLOCK_M, BLOCK_C] tile."""
    if BLOCK_C == 1:
        tl.store(base + offs_m * stride_m, tl.reshape(v, [BLOCK_M]), mask=mmask)
    elif BLOCK_C == 2:
        a, b = tl.split(v)
        _st1(base, offs_m, mmask, a, 0, stride_c, stride_m, C)
        _st1(base, offs_m, mmask, b, 1, stride_c, stride_m, C)
    elif BLOCK_C == 4:
        _scatter4(base, offs_m, mmask, v, 0, stride_c, stride_m, C, BLOCK_M)
    elif BLOCK_C == 8:
        lo, hi = _split_half(v, 4, BLOCK_M)
        _scatter4(base, offs_m, mmask, lo, 0, stride_c, stride_m, C, BLOCK_M)
        _scatter4(base, offs_m, mmask, hi, 4, stride_c, stride_m, C, BLOCK_M)
    else:
        lo, hi = _split_half(v, 8, BLOCK_M)
        q0, q1 = _split_half(lo, 4, BLOCK_M)
        q2, q3 = _split_half(hi, 4, BLOCK_M)
        _scatter4(base, offs_m, mmask, q0, 0, stride_c, stride_m, C, BLOCK_M)
        _scatter4(base, offs_m, mmask, q1, 4, stride_c, stride_m, C, BLOCK_M)
        _scatter4(base, offs_m, mmask, q2, 8, stride_c, stride_m, C, BLOCK_M)
        _scatter4(base, offs_m, mmask, q3, 12, stride_c, stride_m, C, BLOCK_M)


@triton.jit
def _store_operand(base, tile, M, v, stride_c, stride_m, C: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_M: tl.constexpr, PX: tl.constexpr, MODE: tl.constexpr, INT64: tl.constexpr):
    """Store a [BLOCK_M, BLOCK_C] tile (the mirror of :func:`_load_operand`)."""
    offs_m = tl.reshape(_pixel_offsets(tile, BLOCK_M, PX, INT64), [BLOCK_M])
    mmask = offs_m < M
    if MODE == 3:
        _scatter(base, offs_m, mmask, v, stride_c, stride_m, C, BLOCK_C, BLOCK_M)
    elif MODE == 2:
        flat = tl.reshape(_pixel_offsets(tile, BLOCK_M * C, PX * C, INT64), [BLOCK_M * C])
        tl.store(base + flat, tl.reshape(v, [BLOCK_M * C]), mask=flat < M * C)
    else:
        offs_c = tl.arange(0, BLOCK_C)
        tl.store(_ptrs(base, offs_m, offs_c, stride_c, stride_m, C, MODE), v,
                 mask=mmask[:, None] & (offs_c < C)[None, :])


@triton.jit
def _load_tile(x_base, t_base, tile, M, stride_xc, stride_xm, stride_tc, stride_tm,
               C: tl.constexpr, LABELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
               PX: tl.constexpr, LV: tl.constexpr, X_MODE: tl.constexpr, T_MODE: tl.constexpr, INT64: tl.constexpr):
    """Raw loads of one tile: the target first (labels, or the float target), then the logits."""
    if LABELS:
        tgt = _load_labels(t_base, tile, M, stride_tm, BLOCK_M, PX, LV, INT64)
    else:
        tgt = _load_operand(t_base, tile, M, stride_tc, stride_tm, C, BLOCK_C, BLOCK_M, PX, T_MODE, INT64)
    x = _load_operand(x_base, tile, M, stride_xc, stride_xm, C, BLOCK_C, BLOCK_M, PX, X_MODE, INT64)
    return tgt, x


@triton.jit
def _tile_math(tgt, x_raw, tile, M, ignore_index, C: tl.constexpr, ACTIVATION: tl.constexpr,
               LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, LABEL_OFFSET: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, PX: tl.constexpr, INT64: tl.constexpr,
               FP64: tl.constexpr):
    """(p, t, keep, x, aux) of a tile in the accumulation dtype; p and t are 0 where keep is false.

    keep: the pixel exists, is not ignored, and the channel exists.  Ignored pixels are selected
    away (never multiplied by 0), so NaN/inf there changes nothing.  x: the upcast logits; aux, for
    the pixel losses: log p (softmax: x - max - log sum, one log per pixel) or exp(-x) (sigmoid), so
    they need no exp of their own.
    """
    offs_m = tl.reshape(_pixel_offsets(tile, BLOCK_M, PX, INT64), [BLOCK_M])
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    x = x_raw.to(tl.float64 if FP64 else tl.float32)  # upcast right after the load
    keep_m = offs_m < M
    if LABELS:
        lab = tgt.to(tl.int64)  # compared in int64, never used as an address
        if HAS_IGNORE:
            keep_m = keep_m & (lab != ignore_index)
        cls = lab - LABEL_OFFSET
        cls = tl.where((cls >= 0) & (cls < C), cls, -1).to(tl.int32)
        keep = keep_m[:, None] & cmask[None, :]
        t = _anchor(tl.where(keep & (cls[:, None] == offs_c[None, :]), 1.0, 0.0), x)
    else:
        keep = keep_m[:, None] & cmask[None, :]
        t = tgt.to(x.dtype)  # masked elements were loaded as 0
    aux = x
    if ACTIVATION == 0:
        if BLOCK_C != C:
            x = tl.where(cmask[None, :], x, float("-inf"))  # padding channels: exp = 0
        shifted = x - tl.max(x, axis=1)[:, None]
        e = tl.exp(shifted)
        total = tl.sum(e, axis=1)
        p = e * (1.0 / total)[:, None]
        aux = shifted - tl.log(total)[:, None]  # log p (only used by the pixel losses)
    elif ACTIVATION == 1:
        aux = tl.exp(-x)
        p = 1.0 / (1.0 + aux)
    elif ACTIVATION == 3:
        p = tl.where(offs_c[None, :] == _argmax(x, offs_c, cmask, BLOCK_C)[:, None], 1.0, 0.0).to(x.dtype)
    elif ACTIVATION == 4:
        p = tl.where(x > 0, 1.0, 0.0).to(x.dtype)  # sigmoid(x) > 0.5; NaN gives 0
    else:
        p = x
    p = tl.where(keep, p, 0.0)
    return p, t, keep, x, aux


@triton.jit
def _join_gamma(gamma, gamma_lo, FP64: tl.constexpr):
    """The focal exponent from its two float32 halves (gamma = hi + lo, see ``split_gamma``): a
    float argument reaches a compiled kernel as float32, which would round 1.3 in a float64 kernel."""
    if FP64:
        return tl.cast(gamma, tl.float64) + tl.cast(gamma_lo, tl.float64)
    else:
        return gamma


@triton.jit
def _pow(q, gamma, GAMMA: tl.constexpr):
    """q ** gamma for q >= 0: GAMMA 0, 1, 2 are exact products (no exp); -1: the general power."""
    if GAMMA == 0:
        out = tl.full(q.shape, 1.0, q.dtype)
    elif GAMMA == 1:
        out = q
    elif GAMMA == 2:
        out = q * q
    else:
        out = tl.where(q > 0, tl.exp(gamma * tl.log(tl.where(q > 0, q, 1.0))), 0.0)
    return out


@triton.jit
def _softplus_parts(x, ex):
    """softplus(x) from ex = exp(-x): max(x, 0) + log(1 + exp(-|x|)), exp(-|x|) = min(ex, 1/ex)."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.minimum(ex, 1.0 / ex))


@triton.jit
def _sigmoid_of_signed(x, t, p, LABELS: tl.constexpr):
    """sigmoid(-x (2t - 1)): 1 - p where t = 1, p where t = 0; soft targets take one exp."""
    if LABELS:
        out = tl.where(t > 0.5, 1.0 - p, p)
    else:
        out = 1.0 / (1.0 + tl.exp(x * (2.0 * t - 1.0)))
    return out


@triton.jit
def _bce(x, aux, t):
    """softplus(x) - t x; t x is 0 where t == 0 (x = -inf: the term is 0, not NaN)."""
    return _softplus_parts(x, aux) - tl.where(t == 0, 0.0, t * x)


@triton.jit
def _t_times(t, e):
    """t * e, except 0 where t == 0 and e == +inf: a channel masked with -inf logits has e = -log 0 =
    +inf, and the pixels that are not of its class add 0 (t log p -> 0), not 0 * inf = NaN."""
    return tl.where((t == 0) & (e == float("inf")), 0.0, t * e)


@triton.jit
def _pixel_term(x, aux, p, t, keep, gamma, ACTIVATION: tl.constexpr, PIXEL: tl.constexpr,
                GAMMA: tl.constexpr, LABELS: tl.constexpr):
    """The element term e of the pixel loss (see dicetorch.reference), 0 where keep is false."""
    if ACTIVATION == 0:
        e = -aux  # -log p
        if PIXEL == 2:
            e = _pow(1.0 - p, gamma, GAMMA) * e
    else:
        e = _bce(x, aux, t)  # binary cross-entropy with logits
        if PIXEL == 2:
            e = _pow(_sigmoid_of_signed(x, t, p, LABELS), gamma, GAMMA) * e
    return tl.where(keep, e, 0.0)


@triton.jit
def _softmax_pixel_h(aux, p, keep, w, gamma, PIXEL: tl.constexpr, GAMMA: tl.constexpr):
    """Per element h of the softmax pixel losses, whose gradient is dL/dz_j = h_j - p_j sum_k h_k:
    h = -w (cross-entropy), h = w (gamma p (1-p)^(gamma-1) log p - (1-p)^gamma) (focal), for
    w = gX * t + gL.  Padding channels and ignored pixels (keep false) have h = 0: their log p
    (-inf, or garbage) is replaced by 0 so that no NaN enters the per-pixel sum."""
    if PIXEL == 1:
        h = -w
    else:
        logp = tl.where(keep, aux, 0.0)
        q = 1.0 - p
        # gamma p (1-p)^(gamma-1) log p -> 0 as p -> 1 (also for gamma < 1), and p log p -> 0 as
        # p -> 0 (a channel masked with -inf)
        plogp = tl.where(logp == float("-inf"), 0.0, p * logp)
        slope = tl.where(q > 0, gamma * plogp * _pow(q, gamma, GAMMA) / tl.where(q > 0, q, 1.0), 0.0)
        h = w * (slope - _pow(q, gamma, GAMMA))
    return tl.where(keep, h, 0.0)


@triton.jit
def _sigmoid_pixel_dz(x, aux, p, t, w, gamma, PIXEL: tl.constexpr, GAMMA: tl.constexpr, LABELS: tl.constexpr):
    """dL/dz of the sigmoid pixel losses (elementwise), aux = exp(-x)."""
    if PIXEL == 1:
        dz = w * (p - t)
    else:
        s_neg = _sigmoid_of_signed(x, t, p, LABELS)  # sigmoid(-z (2t - 1))
        b = _bce(x, aux, t)
        dz = w * _pow(s_neg, gamma, GAMMA) * ((p - t) - gamma * b * (2.0 * t - 1.0) * (1.0 - s_neg))
    return dz


@triton.jit
def _pixel_dz(x, aux, p, t, keep, w, gamma, ACTIVATION: tl.constexpr, PIXEL: tl.constexpr, GAMMA: tl.constexpr,
              LABELS: tl.constexpr):
    """dL/dz of the pixel-loss rows for w = gX * t + gL (see dicetorch.reference._pixel_backward)."""
    if ACTIVATION == 0:
        h = _softmax_pixel_h(aux, p, keep, w, gamma, PIXEL, GAMMA)
        dz = h - p * tl.sum(h, axis=1)[:, None]
    else:
        dz = _sigmoid_pixel_dz(x, aux, p, t, w, gamma, PIXEL, GAMMA, LABELS)
    return dz


@triton.jit
def _argmax(x, offs_c, cmask, BLOCK_C: tl.constexpr):
    """Per pixel, torch.argmax over the channels: the lowest index among equal maxima; a NaN counts
    as the largest value (the first NaN wins); all -inf gives 0.  Padding channels never win."""
    x = tl.where(cmask[None, :], x, float("-inf"))
    nan = x != x
    first_nan = tl.min(tl.where(nan, offs_c[None, :], BLOCK_C), axis=1)
    x = tl.where(nan, float("-inf"), x)
    first_max = tl.min(tl.where(x == tl.max(x, axis=1)[:, None], offs_c[None, :], BLOCK_C), axis=1)
    return tl.where(first_nan < BLOCK_C, first_nan, first_max)


@triton.jit
def _fold(v, BLOCK_M: tl.constexpr, PX: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_M, BLOCK_C] -> [BLOCK_M // PX, BLOCK_C]: sum over each thread's run (in registers)."""
    if PX == 1:
        out = v
    else:
        out = tl.sum(tl.reshape(v, [BLOCK_M // PX, PX, BLOCK_C]), axis=1)
    return out


# the grid-shape arguments are not specialized: a warm-up compile (to size the grid from the
# kernel's registers) then builds the very kernel that the launch runs
@triton.jit(do_not_specialize=["programs_per_image", "num_tiles", "gamma", "gamma_lo"])
def _tile_fwd_kernel(
    x_ptr, t_ptr, part_ptr,
    M, programs_per_image, num_tiles, ignore_index, gamma, gamma_lo,
    stride_xn, stride_xc, stride_xm,
    stride_tn, stride_tc, stride_tm,
    C: tl.constexpr, ACTIVATION: tl.constexpr, POWER: tl.constexpr, LABELS: tl.constexpr,
    HAS_IGNORE: tl.constexpr, LABEL_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    PX: tl.constexpr, LV: tl.constexpr, X_MODE: tl.constexpr, T_MODE: tl.constexpr, PREFETCH: tl.constexpr,
    PIXEL: tl.constexpr, GAMMA: tl.constexpr, INT64: tl.constexpr, FP64: tl.constexpr,
):
    """part[n, j] = (sum p*t, sum p^q, sum t^q [, sum t*e, sum e]) over the tiles j, j + P, ... of image n.

    PIXEL: 0 none, 1 cross-entropy, 2 focal (rows X, L of the pixel loss's element term e); GAMMA:
    the focal exponent when it is 0, 1 or 2 (products), else -1 (the run-time ``gamma``).
    """
    gamma = _join_gamma(gamma, gamma_lo, FP64)
    pid = tl.program_id(0)
    n = pid // programs_per_image
    j = pid % programs_per_image
    if INT64:
        n = n.to(tl.int64)
    x_base = x_ptr + n * stride_xn
    t_base = t_ptr + n * stride_tn
    acc_dt = tl.float64 if FP64 else tl.float32
    acc_i = tl.zeros([BLOCK_M // PX, BLOCK_C], dtype=acc_dt)
    acc_p = tl.zeros([BLOCK_M // PX, BLOCK_C], dtype=acc_dt)
    acc_t = tl.zeros([BLOCK_M // PX, BLOCK_C], dtype=acc_dt)
    acc_x = tl.zeros([BLOCK_M // PX, BLOCK_C], dtype=acc_dt)  # pixel-loss rows (eliminated when PIXEL == 0)
    acc_l = tl.zeros([BLOCK_M // PX, BLOCK_C], dtype=acc_dt)
    if PREFETCH:
        tgt, x = _load_tile(x_base, t_base, j, M, stride_xc, stride_xm, stride_tc, stride_tm, C, LABELS,
                            BLOCK_C, BLOCK_M, PX, LV, X_MODE, T_MODE, INT64)
    for tile in range(j, num_tiles, programs_per_image):
        if PREFETCH:
            # the next tile's loads are in flight while this one is computed (past the end: masked)
            tgt_next, x_next = _load_tile(x_base, t_base, tile + programs_per_image, M, stride_xc, stride_xm,
                                          stride_tc, stride_tm, C, LABELS, BLOCK_C, BLOCK_M, PX, LV, X_MODE,
                                          T_MODE, INT64)
        else:
            tgt, x = _load_tile(x_base, t_base, tile, M, stride_xc, stride_xm, stride_tc, stride_tm, C, LABELS,
                                BLOCK_C, BLOCK_M, PX, LV, X_MODE, T_MODE, INT64)
        p, t, keep, z, aux = _tile_math(tgt, x, tile, M, ignore_index, C, ACTIVATION, LABELS, HAS_IGNORE,
                                        LABEL_OFFSET, BLOCK_C, BLOCK_M, PX, INT64, FP64)
        acc_i += _fold(p * t, BLOCK_M, PX, BLOCK_C)
        if POWER == 1:
            acc_p += _fold(p, BLOCK_M, PX, BLOCK_C)
            acc_t += _fold(t, BLOCK_M, PX, BLOCK_C)
        else:
            acc_p += _fold(p * p, BLOCK_M, PX, BLOCK_C)
            acc_t += _fold(t * t, BLOCK_M, PX, BLOCK_C)
        if PIXEL != 0:
            e = _pixel_term(z, aux, p, t, keep, gamma, ACTIVATION, PIXEL, GAMMA, LABELS)
            acc_x += _fold(_t_times(t, e), BLOCK_M, PX, BLOCK_C)
            acc_l += _fold(e, BLOCK_M, PX, BLOCK_C)
        if PREFETCH:
            tgt = tgt_next
            x = x_next
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    rows = 3 if PIXEL == 0 else 5
    part = part_ptr + pid.to(tl.int64) * rows * C
    tl.store(part + offs_c, tl.sum(acc_i, axis=0), mask=cmask)
    tl.store(part + C + offs_c, tl.sum(acc_p, axis=0), mask=cmask)
    tl.store(part + 2 * C + offs_c, tl.sum(acc_t, axis=0), mask=cmask)
    if PIXEL != 0:
        tl.store(part + 3 * C + offs_c, tl.sum(acc_x, axis=0), mask=cmask)
        tl.store(part + 4 * C + offs_c, tl.sum(acc_l, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["gamma", "gamma_lo"])
def _tile_bwd_kernel(
    grad_ptr, x_ptr, t_ptr, out_ptr,
    M, tiles_per_image, ignore_index, gamma, gamma_lo,
    stride_xn, stride_xc, stride_xm,
    stride_tn, stride_tc, stride_tm,
    stride_on, stride_oc, stride_om,
    C: tl.constexpr, ACTIVATION: tl.constexpr, POWER: tl.constexpr, LABELS: tl.constexpr,
    HAS_IGNORE: tl.constexpr, LABEL_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    PX: tl.constexpr, LV: tl.constexpr, X_MODE: tl.constexpr, T_MODE: tl.constexpr, O_MODE: tl.constexpr,
    PIXEL: tl.constexpr, GAMMA: tl.constexpr, INT64: tl.constexpr, FP64: tl.constexpr,
):
    """dL/dx of one (image, tile): g = gI*t + gP*q*p^(q-1), then the activation's Jacobian, plus the
    pixel loss's gradient (PIXEL, GAMMA as in the forward)."""
    gamma = _join_gamma(gamma, gamma_lo, FP64)
    pid = tl.program_id(0)
    n = pid // tiles_per_image
    tile = pid % tiles_per_image
    if INT64:
        n = n.to(tl.int64)
    tgt, x = _load_tile(x_ptr + n * stride_xn, t_ptr + n * stride_tn, tile, M, stride_xc, stride_xm, stride_tc,
                        stride_tm, C, LABELS, BLOCK_C, BLOCK_M, PX, LV, X_MODE, T_MODE, INT64)
    offs_c = tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    rows = 3 if PIXEL == 0 else 5
    g_base = grad_ptr + n.to(tl.int64) * rows * C
    gi = tl.load(g_base + offs_c, mask=cmask, other=0.0)
    gp = tl.load(g_base + C + offs_c, mask=cmask, other=0.0)
    p, t, keep, z, aux = _tile_math(tgt, x, tile, M, ignore_index, C, ACTIVATION, LABELS, HAS_IGNORE, LABEL_OFFSET,
                                    BLOCK_C, BLOCK_M, PX, INT64, FP64)
    if POWER == 1:
        g = gi[None, :] * t + gp[None, :]
    else:
        g = gi[None, :] * t + 2.0 * gp[None, :] * p
    if ACTIVATION == 0:
        # padding channels and ignored pixels have p == 0: they do not enter the sum
        dz = p * (g - tl.sum(p * g, axis=1)[:, None])
    elif ACTIVATION == 1:
        dz = g * p * (1.0 - p)
    else:
        dz = g
    if PIXEL != 0:
        gx = tl.load(g_base + 3 * C + offs_c, mask=cmask, other=0.0)
        gl = tl.load(g_base + 4 * C + offs_c, mask=cmask, other=0.0)
        w = tl.where(keep, gx[None, :] * t + gl[None, :], 0.0)
        dz += _pixel_dz(z, aux, p, t, keep, w, gamma, ACTIVATION, PIXEL, GAMMA, LABELS)
    dz = tl.where(keep, dz, 0.0)  # exactly 0 for ignored pixels, whatever grad holds
    _store_operand(out_ptr + n * stride_on, tile, M, dz.to(out_ptr.dtype.element_ty), stride_oc, stride_om, C,
                   BLOCK_C, BLOCK_M, PX, O_MODE, INT64)
