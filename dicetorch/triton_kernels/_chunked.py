"""Fused Triton kernels of the ``dice_stats`` operator (backend "triton").

Both entry points work on the canonical layout of :mod:`dicetorch.reference`:

* ``x`` -- (N, C, M) float logits/probabilities (fp16/bf16/fp32/fp64), any strides: contiguous
  input has strides (C*M, M, 1), channels-last input (M*C, 1, C); both are read in place.
* ``t`` -- (N, M) integer labels (int32/int64/uint8) or (N, C, M) float target (x's dtype).

Forward (:func:`forward`).  A 1-D grid of N * P programs; program (n, j) walks the pixel tiles
j, j + P, j + 2P, ... of image n (ceil(tiles / P) or one fewer).  For each
[BLOCK_C, BLOCK_M] tile it loads every channel of BLOCK_M pixels, upcasts right after the load
(fp32; fp64 for fp64 input), applies the activation, builds t by comparing labels with channel
indices, masks ignored and out-of-range pixels and accumulates p*t, p^q, t^q in registers.  Each
program writes one row of a (N, P, 3, C) partials buffer; P is a few programs per SM, so the buffer
stays tiny.  The rows are then summed by ``torch.sum`` over a fixed dimension of a fixed shape,
which is deterministic: no float atomics anywhere, results are bit-identical from run to run on a
given device.

Backward (:func:`backward`).  One elementwise pass, one program per (image, pixel tile), that
recomputes the activation from x and writes dL/dx in x's dtype and strides::

    g     = gI * t + gP * q * p^(q-1)
    dL/dx = p * (g - sum_j p_j g_j)   (softmax)  |  g * p * (1 - p)  (sigmoid)  |  g  (none)

and 0 on ignored pixels.

Many channels (C > ``MAX_SINGLE_BLOCK_C``) are split into chunks of ``CHUNK_BLOCK_C`` so that
register use does not grow with C.  Forward: a first kernel computes the per-pixel log-sum-exp
with an online softmax (running max and rescaled sum over the chunks; N*M floats of scratch), then
the grid gains a chunk axis and each program accumulates its chunk of channels with
p = exp(x - lse).  Backward: each program loops over the chunks three times (online softmax,
sum_j p_j g_j, gradient).

Launch heuristic (:func:`launch_config`): BLOCK_C is the next power of two >= C (chunks of 64
beyond 128 channels); BLOCK_M fills a tile of 1024 elements in the forward (2048 in the backward;
half for fp64) capped by the number of pixels; num_warps follows from 8 (forward) or 16
(backward) values per thread; the forward launches 16 warps' worth of programs per SM, which
all fit on the SM at once (one wave, no tail), given the register counts.  Autotuning
would need a GPU at the first call, so it is not used; the heuristic is deterministic.

Offsets are 32-bit unless an addressed span reaches 2**31 elements (``INT64`` constexpr).

On CPU tensors the kernels run in the Triton interpreter when ``TRITON_INTERPRET=1`` was set
before ``triton`` was first imported (``triton.language`` decorates its own helpers at import).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["forward", "backward", "launch_config", "LaunchConfig", "needs_int64"]

SOFTMAX, SIGMOID, NONE = 0, 1, 2  # values of the ACTIVATION constexpr (the kernels use the literals)
_ACT_CODE = {"softmax": SOFTMAX, "sigmoid": SIGMOID, "none": NONE}

MAX_SINGLE_BLOCK_C = 128  # beyond this many channels, loop over channel chunks
CHUNK_BLOCK_C = 64
WARPS_PER_SM = 16  # forward programs per SM = 16 warps' worth: always co-resident (<= 128 registers)
MIN_BLOCK_M = 16
MAX_BLOCK_M = 1024
TILE_ELEMS = 2048  # elements of a backward tile (the forward uses half): 16 values per thread with 4 warps


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
    """Sigmoid or identity (softmax is handled by the callers, it needs the channel normalizer)."""
    if ACTIVATION == 1:
        return 1.0 / (1.0 + tl.exp(-x))
    return x


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
def _dice_fwd_kernel(
    x_ptr, t_ptr, lse_ptr, part_ptr,
    C, M, num_chunks, programs_per_image, num_tiles, ignore_index,
    stride_xn, stride_xc, stride_xm,
    stride_tn, stride_tc, stride_tm,
    ACTIVATION: tl.constexpr, POWER: tl.constexpr, LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    LABEL_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, CHUNKED: tl.constexpr,
    INT64: tl.constexpr, FP64: tl.constexpr,
):
    """Partial sums of one program: part[n, j, 0:3, chunk] = (sum p*t, sum p^q, sum t^q) over its tiles.

    Program id = (n * programs_per_image + j) * num_chunks + chunk.  Without CHUNKED there is one
    chunk holding every channel and the softmax is computed in the tile; with CHUNKED each program
    handles BLOCK_C channels and the softmax uses the per-pixel log-sum-exp from _softmax_lse_kernel.
    """
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
    for tile in range(j, num_tiles, programs_per_image):
        offs_m = tile * BLOCK_M + arange_m
        mmask = offs_m < M
        x = _load_x(x_base, offs_c, offs_m, cmask, mmask, stride_xc, stride_xm, ACTIVATION, FP64)
        if ACTIVATION == 0:
            if CHUNKED:
                lse = tl.load(lse_ptr + n * M + offs_m, mask=mmask, other=0.0)
                p = tl.exp(x - lse[None, :])
            else:
                e = tl.exp(x - tl.max(x, axis=0)[None, :])
                p = e * (1.0 / tl.sum(e, axis=0))[None, :]
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
    part_base = part_ptr + (n * programs_per_image + j).to(tl.int64) * 3 * C
    tl.store(part_base + offs_c, tl.sum(acc_i, axis=1), mask=cmask)
    tl.store(part_base + C + offs_c, tl.sum(acc_p, axis=1), mask=cmask)
    tl.store(part_base + 2 * C + offs_c, tl.sum(acc_t, axis=1), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grad_p(gi, gp, p, t, POWER: tl.constexpr):
    """dL/dp = gI*t + gP*q*p^(q-1) for a [BLOCK_C, BLOCK_M] tile."""
    if POWER == 1:
        return gi[:, None] * t + gp[:, None]
    return gi[:, None] * t + 2.0 * gp[:, None] * p


@triton.jit
def _dice_bwd_kernel(
    grad_ptr, x_ptr, t_ptr, out_ptr,
    C, M, tiles_per_image, ignore_index,
    stride_xn, stride_xc, stride_xm,
    stride_tn, stride_tc, stride_tm,
    stride_on, stride_oc, stride_om,
    ACTIVATION: tl.constexpr, POWER: tl.constexpr, LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    LABEL_OFFSET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, CHUNKED: tl.constexpr,
    INT64: tl.constexpr, FP64: tl.constexpr,
):
    """dL/dx of one (image, pixel tile), written in the output's dtype and strides."""
    n, j = _image_and_tile(tl.program_id(0), tiles_per_image, INT64)
    x_base = x_ptr + n * stride_xn
    t_base = t_ptr + n * stride_tn
    o_base = out_ptr + n * stride_on
    g_base = grad_ptr + n.to(tl.int64) * 3 * C
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

    if not CHUNKED:
        offs_c = arange_c
        cmask = offs_c < C
        x = _load_x(x_base, offs_c, offs_m, cmask, mmask, stride_xc, stride_xm, ACTIVATION, FP64)
        if ACTIVATION == 0:
            e = tl.exp(x - tl.max(x, axis=0)[None, :])
            p = e * (1.0 / tl.sum(e, axis=0))[None, :]
        else:
            p = _elementwise_act(x, ACTIVATION)
        t = _target(t_base, cls, offs_c, offs_m, cmask, mmask, stride_tc, stride_tm, LABELS, FP64)
        gi = tl.load(g_base + offs_c, mask=cmask, other=0.0)
        gp = tl.load(g_base + C + offs_c, mask=cmask, other=0.0)
        g = _grad_p(gi, gp, p, t, POWER)
        if ACTIVATION == 0:
            # padding channels have p == 0 and g == 0, so they do not enter the sum
            dz = p * (g - tl.sum(p * g, axis=0)[None, :])
        elif ACTIVATION == 1:
            dz = g * p * (1.0 - p)
        else:
            dz = g
        dz = tl.where(keep[None, :], dz, 0.0)
        o_ptr = o_base + offs_c[:, None] * stride_oc + offs_m[None, :] * stride_om
        tl.store(o_ptr, dz.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & mmask[None, :])
    else:
        if ACTIVATION == 0:
            # pass 1: online softmax normaliser; pass 2: sum_j p_j g_j; pass 3 below writes dL/dx
            run_max, run_sum = _online_softmax_stats(x_base, offs_m, mmask, arange_c, C, stride_xc, stride_xm,
                                                     BLOCK_C, BLOCK_M, FP64)
            inv_sum = 1.0 / run_sum
            dot = tl.zeros([BLOCK_M], dtype=tl.float64 if FP64 else tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + arange_c
                cmask = offs_c < C
                x = _load_x(x_base, offs_c, offs_m, cmask, mmask, stride_xc, stride_xm, ACTIVATION, FP64)
                p = tl.exp(x - run_max[None, :]) * inv_sum[None, :]
                t = _target(t_base, cls, offs_c, offs_m, cmask, mmask, stride_tc, stride_tm, LABELS, FP64)
                gi = tl.load(g_base + offs_c, mask=cmask, other=0.0)
                gp = tl.load(g_base + C + offs_c, mask=cmask, other=0.0)
                dot += tl.sum(p * _grad_p(gi, gp, p, t, POWER), axis=0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + arange_c
            cmask = offs_c < C
            x = _load_x(x_base, offs_c, offs_m, cmask, mmask, stride_xc, stride_xm, ACTIVATION, FP64)
            if ACTIVATION == 0:
                p = tl.exp(x - run_max[None, :]) * inv_sum[None, :]
            else:
                p = _elementwise_act(x, ACTIVATION)
            t = _target(t_base, cls, offs_c, offs_m, cmask, mmask, stride_tc, stride_tm, LABELS, FP64)
            gi = tl.load(g_base + offs_c, mask=cmask, other=0.0)
            gp = tl.load(g_base + C + offs_c, mask=cmask, other=0.0)
            g = _grad_p(gi, gp, p, t, POWER)
            if ACTIVATION == 0:
                dz = p * (g - dot[None, :])
            elif ACTIVATION == 1:
                dz = g * p * (1.0 - p)
            else:
                dz = g
            dz = tl.where(keep[None, :], dz, 0.0)
            o_ptr = o_base + offs_c[:, None] * stride_oc + offs_m[None, :] * stride_om
            tl.store(o_ptr, dz.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & mmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and launch parameters of both kernels (see :func:`launch_config`)."""

    block_c: int
    block_m: int
    chunked: bool
    num_warps: int
    programs_per_sm: int = 4


def launch_config(C: int, M: int, dtype: torch.dtype, backward: bool = False) -> LaunchConfig:
    """Heuristic tile shape for C channels, M pixels per image and input ``dtype``.

    * C <= 128: one tile holds all channels, BLOCK_C = next_power_of_2(C).
    * C > 128: chunks of BLOCK_C = 64 channels (the forward runs one program per chunk after a
      log-sum-exp pass; the backward loops over the chunks with an online softmax).
    * Tile size: the forward keeps three [BLOCK_C, BLOCK_M] accumulators across its tiles, so its
      tile is 1024 elements (8 per thread and tensor with 4 warps); the backward (and the
      log-sum-exp pass) keeps none and uses 2048 (16 per thread).  fp64 halves the tile and keeps
      the warps (an fp64 value takes two registers).
    * BLOCK_M = tile // BLOCK_C within [16, 1024], and no larger than next_power_of_2(M).
    * num_warps = tile size in 32-bit words / (32 * values per thread), between 1 and 8: 4 for
      full tiles, 8 for the forward with C in (64, 128] (where BLOCK_M stops at 16), fewer for
      small images.
    * programs_per_sm (forward) = 16 // num_warps: every program of the persistent grid is
      resident at once (fp32/fp16/bf16 kernels use at most ~110 registers, so 4 CTAs of 4 warps
      fit in the 64K registers of an SM), so there is no second, partial wave.

    On sm_80 and sm_90 no kernel spills (checked by tests/test_triton_aot.py).
    """
    chunked = C > MAX_SINGLE_BLOCK_C
    block_c = CHUNK_BLOCK_C if chunked else triton.next_power_of_2(C)
    tile = TILE_ELEMS if backward else TILE_ELEMS // 2
    if dtype == torch.float64:
        tile //= 2
    block_m = max(MIN_BLOCK_M, min(MAX_BLOCK_M, tile // block_c))
    block_m = min(block_m, max(MIN_BLOCK_M, triton.next_power_of_2(M)))
    per_thread = 16 if backward else 8  # 32-bit values per thread and tensor (an fp64 value counts twice)
    words = block_c * block_m * (2 if dtype == torch.float64 else 1)
    num_warps = max(1, min(8, words // (32 * per_thread)))
    return LaunchConfig(block_c=block_c, block_m=block_m, chunked=chunked, num_warps=num_warps,
                        programs_per_sm=max(1, WARPS_PER_SM // num_warps))


def needs_int64(*tensors: Tensor) -> bool:
    """True when some element offset of one of ``tensors`` (largest index times stride) reaches 2**31."""
    for t in tensors:
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if span >= 2**31 - 1:
            return True
    return False


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: few programs is fastest


def _check(x: Tensor, t: Tensor, activation: str, power: int) -> tuple:
    if x.dim() != 3:
        raise ValueError(f"x must be (N, C, M), got shape {tuple(x.shape)}")
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {tuple(_ACT_CODE)}, got {activation!r}")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"unsupported input dtype {x.dtype}")
    N, C, M = x.shape
    labels = not t.is_floating_point()
    if labels:
        if t.shape != (N, M) or t.dtype not in (torch.int32, torch.int64, torch.uint8):
            raise ValueError(f"labels must be (N, M) int32/int64/uint8, got {tuple(t.shape)} {t.dtype}")
        stride_t = (t.stride(0), 0, t.stride(1))
    else:
        if t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(f"a float target must match x (shape and dtype), got {tuple(t.shape)} {t.dtype}")
        stride_t = tuple(t.stride())
    return N, C, M, labels, stride_t


def _constexprs(C: int, activation: str, power: int, labels: bool, ignore_index, cfg: LaunchConfig,
                int64: bool, dtype: torch.dtype) -> dict:
    return dict(
        ACTIVATION=_ACT_CODE[activation], POWER=power, LABELS=labels,
        HAS_IGNORE=labels and ignore_index is not None, LABEL_OFFSET=1 if C == 1 else 0,
        BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m, CHUNKED=cfg.chunked, INT64=int64,
        FP64=dtype == torch.float64,
    )


# ----------------------------------------------------------------------------------------------
# Backend entry points
# ----------------------------------------------------------------------------------------------
def forward(x: Tensor, t: Tensor, activation: str, power: int, ignore_index: Optional[int],
            *, config: Optional[LaunchConfig] = None, programs_per_image: Optional[int] = None) -> Tensor:
    """Per-class sums (N, 3, C): [:,0] = sum_m p*t, [:,1] = sum_m p^q, [:,2] = sum_m t^q.

    Args:
        x: (N, C, M) float tensor, any strides.
        t: (N, M) int32/int64/uint8 labels or (N, C, M) float target of x's dtype.
        activation: "softmax" | "sigmoid" | "none"; power: q in {1, 2}.
        ignore_index: label value excluded from all sums (labels only), or None.
        config, programs_per_image: override the launch heuristic (tests and benchmarks).

    Returns:
        float32 (float64 for float64 x) tensor (N, 3, C), deterministic.
    """
    N, C, M, labels, stride_t = _check(x, t, activation, power)
    cfg = config or launch_config(C, M, x.dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    num_tiles = triton.cdiv(M, cfg.block_m)
    num_chunks = triton.cdiv(C, cfg.block_c)
    if programs_per_image is None:
        programs_per_image = triton.cdiv(_num_sms(x.device) * cfg.programs_per_sm, N * num_chunks)
    P = max(1, min(num_tiles, programs_per_image))
    P = triton.cdiv(num_tiles, triton.cdiv(num_tiles, P))  # no idle programs; counts differ by <= 1
    partials = torch.empty((N, P, 3, C), dtype=acc, device=x.device)
    int64 = needs_int64(x, t)
    lse = partials  # placeholder pointer unless the chunked softmax needs the log-sum-exp
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        if cfg.chunked and activation == "softmax":
            lcfg = launch_config(C, M, x.dtype, backward=True)
            lse = torch.empty((N, M), dtype=acc, device=x.device)
            lse_tiles = triton.cdiv(M, lcfg.block_m)
            _softmax_lse_kernel[(N * lse_tiles,)](
                x, lse, C, M, lse_tiles, *x.stride(),
                BLOCK_C=lcfg.block_c, BLOCK_M=lcfg.block_m, INT64=int64, FP64=acc == torch.float64,
                num_warps=lcfg.num_warps,
            )
        _dice_fwd_kernel[(N * P * num_chunks,)](
            x, t, lse, partials,
            C, M, num_chunks, P, num_tiles, 0 if ignore_index is None else int(ignore_index),
            *x.stride(), *stride_t,
            num_warps=cfg.num_warps, **_constexprs(C, activation, power, labels, ignore_index, cfg, int64, x.dtype),
        )
    # Fixed-shape reduction over a fixed dimension: deterministic.
    return partials.sum(dim=1)


def _grad_like(x: Tensor) -> Tensor:
    """Uninitialised tensor like x; ``torch.preserve_format`` keeps x's strides when they are dense."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def backward(grad: Tensor, x: Tensor, t: Tensor, activation: str, power: int, ignore_index: Optional[int],
             *, config: Optional[LaunchConfig] = None) -> Tensor:
    """dL/dx (N, C, M) in x's dtype (and strides when dense) for ``grad`` = dL/dstats (N, 3, C).

    With gI = grad[:, 0], gP = grad[:, 1], p = activation(x)::

        g = gI*t + gP*q*p^(q-1);   dL/dx = p*(g - sum_j p_j g_j) | g*p*(1-p) | g

    and 0 on ignored pixels.  grad[:, 2] (the target volume) gets no gradient.
    """
    N, C, M, labels, stride_t = _check(x, t, activation, power)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if grad.shape != (N, 3, C):
        raise ValueError(f"grad must be (N, 3, C) = {(N, 3, C)}, got {tuple(grad.shape)}")
    grad = grad.to(acc).contiguous()
    cfg = config or launch_config(C, M, x.dtype, backward=True)
    out = _grad_like(x)
    tiles = triton.cdiv(M, cfg.block_m)
    const = _constexprs(C, activation, power, labels, ignore_index, cfg, needs_int64(x, t, out), x.dtype)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _dice_bwd_kernel[(N * tiles,)](
            grad, x, t, out,
            C, M, tiles, 0 if ignore_index is None else int(ignore_index),
            *x.stride(), *stride_t, *out.stride(),
            num_warps=cfg.num_warps, **const,
        )
    return out

