"""Fused Triton kernels of the ``dice_stats`` operator (backend "triton").

Both entry points work on the canonical layout of :mod:`dicetorch.reference`:

* ``x`` -- (N, C, M) float logits/probabilities (fp16/bf16/fp32/fp64), any strides: contiguous
  input has strides (C*M, M, 1), channels-last input (M*C, 1, C); both are read in place.
* ``t`` -- (N, M) integer labels (int32/int64/uint8) or (N, C, M) float target (x's dtype).

Two families of kernels (see their modules):

* :mod:`._tile` (C <= 128): a tile of pixels x all channels per step, channels in one thread's
  registers (or a few lanes of one warp), 128-bit logits/gradient access for contiguous and
  channels-last input, labels loaded in the logits' register layout, one exp per element and
  direction, no shared memory or barrier inside the tile loop.
* :mod:`._chunked` (C > 128): channel chunks with a -inf-safe online softmax, so register use does
  not grow with C.

Forward: a persistent grid whose size comes from the occupancy of the compiled kernel (its
registers and shared memory against the device's limits, :func:`occupancy`): every program is
resident at once, in one wave.  Each program writes one row of a small (N, P, 3, C) partials
buffer, summed by ``torch.sum`` over a fixed dimension of a fixed shape: no float atomics,
bit-identical results from run to run on a given device.  Backward: one program per (image,
tile), dL/dx written in x's dtype and strides::

    g     = gI * t + gP * q * p^(q-1)
    dL/dx = p * (g - sum_j p_j g_j)   (softmax)  |  g * p * (1 - p)  (sigmoid)  |  g  (none)

and 0 on ignored pixels.  Offsets are 32-bit unless an addressed span reaches 2**31 elements
(``INT64`` constexpr).

On CPU tensors the kernels run in the Triton interpreter when ``TRITON_INTERPRET=1`` was set
before ``triton`` was first imported (``triton.language`` decorates its own helpers at import).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import struct
from typing import Optional

import torch
import triton
from torch import Tensor

from ._chunked import _argmax_kernel, _dice_bwd_kernel, _dice_fwd_kernel, _softmax_lse_kernel
from ._tile import _tile_bwd_kernel, _tile_fwd_kernel

__all__ = ["forward", "backward", "launch_config", "LaunchConfig", "needs_int64", "occupancy"]

SOFTMAX, SIGMOID, NONE, ARGMAX, THRESHOLD = 0, 1, 2, 3, 4  # values of the ACTIVATION constexpr
_ACT_CODE = {"softmax": SOFTMAX, "sigmoid": SIGMOID, "none": NONE, "argmax": ARGMAX, "threshold": THRESHOLD}
HARD_ACTIVATIONS = ("argmax", "threshold")  # evaluation-only (forward) activations these kernels compute
PIXEL_LOSSES = ("ce", "focal")  # pixel-loss rows (compound losses) these kernels compute
_PIXEL_CODE = {"none": 0, "ce": 1, "focal": 2}

MAX_TILE_C = 128  # beyond this many channels, the chunked kernels
CHUNK_BLOCK_C = 64
CHUNK_TILE_ELEMS = 2048  # chunked backward / log-sum-exp tile (the chunked forward uses half)
TILE_VALUES = 64  # 32-bit logits values a thread holds per tile (the rest of 255 registers: math)
PREFETCH_VALUES = 16  # the forward double-buffers its tile when a thread holds at most this many
DEFAULT_RESIDENT = 4  # programs per SM assumed where no compiled kernel can be asked (interpreter)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and launch parameters (see :func:`launch_config`)."""

    block_c: int
    block_m: int
    chunked: bool
    num_warps: int
    px: int = 1  # tile kernels: consecutive pixels per thread run (one 16-byte vector)
    prefetch: bool = False  # tile forward: double-buffer the next tile in registers
    mode: str = "strided"  # tile kernels: how the logits are addressed (see _tile.MODES)


MODES = {"strided": 0, "cl": 1, "flat": 2, "gather": 3}  # the MODE constexprs of _tile


def layout_of(a: Tensor) -> str:
    """"contiguous" (pixel stride 1), "channels_last" (channel stride 1, pixel stride C) or "strided"."""
    C, M = a.shape[1], a.shape[2]
    if M > 1 and a.stride(2) == 1:
        return "contiguous"
    if C > 1 and M > 1 and a.stride(1) == 1 and a.stride(2) == C:
        return "channels_last"
    return "strided"


@functools.lru_cache(maxsize=4096)  # on the hot path of every call: a pure function of its arguments
def launch_config(C: int, M: int, dtype: torch.dtype, backward: bool = False, layout: str = "contiguous",
                  pixel_loss: bool = False) -> LaunchConfig:
    """Heuristic tile shape for C channels, M pixels per image, input ``dtype`` and ``layout``.

    Tile kernels (C <= 128), BLOCK_C = next_power_of_2(C), vec = 16 bytes / element:

    * contiguous ("strided" mode, pixel stride 1): a thread holds runs of px = vec pixels of up to
      TILE_VALUES / px channels (fp64 values count twice); more channels are split over tpw_c
      lanes.  tpw_c == 1: 4 warps, all along the pixels (BLOCK_M = px*32*4); tpw_c > 1: one warp,
      so a pixel's lanes stay within it (BLOCK_M = px*32/tpw_c).
    * channels-last, C*element a multiple of 16 bytes ("cl"): a pixel's channels are 16-byte vectors
      on C*element/16 lanes; 4 warps along the pixels.
    * channels-last, C a power of two with C*element < 16 bytes ("flat"): a thread holds px =
      16 / (C*element) whole pixels, one 16-byte vector.
    * any other layout with C <= 16 ("gather"): one pixel per thread, channels loaded one by one;
      with C > 16, "strided" 2-D addresses (channels-last: "cl").
    * small images: warps, then px (not in "flat"), are reduced, and BLOCK_M capped at
      max(16, next_power_of_2(M)).
    * the forward prefetches the next tile when a thread holds <= PREFETCH_VALUES 32-bit values
      of whole pixels.
    * with ``pixel_loss`` (two more accumulators and the pixel loss's temporaries) a thread holds
      half as many channels, and the forward does not prefetch.

    Chunked kernels (C > 128): BLOCK_C = 64, tiles of CHUNK_TILE_ELEMS (half in the forward; a
    quarter of that for fp64), num_warps from 16 (backward) / 8 (forward) 32-bit words per thread
    (8 / 4 fp64).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    wide = 2 if dtype == torch.float64 else 1
    if C > MAX_TILE_C:
        tile = CHUNK_TILE_ELEMS if backward else CHUNK_TILE_ELEMS // 2
        tile //= wide * wide  # fp64: a quarter (ptxas spills fp64 online-softmax tiles of 64 x 16)
        block_m = max(16 // wide, min(1024, tile // CHUNK_BLOCK_C, triton.next_power_of_2(M)))
        per_thread = (16 if backward else 8) // wide  # 32-bit words per thread and tensor
        num_warps = max(1, min(8, CHUNK_BLOCK_C * block_m * wide // (32 * per_thread)))
        return LaunchConfig(block_c=CHUNK_BLOCK_C, block_m=block_m, chunked=True, num_warps=num_warps)
    block_c = triton.next_power_of_2(C)
    vec = 16 // elem
    num_warps, lanes = 4, 1
    tile_values = TILE_VALUES // 2 if pixel_loss else TILE_VALUES
    if layout == "contiguous":
        mode, px = "strided", vec
        lanes = max(1, block_c // max(1, tile_values // (px * wide)))
        num_warps = 4 if lanes == 1 else 1
    elif layout == "channels_last" and (C * elem) % 16 == 0:
        mode, px = "cl", 1
        lanes = min(32, C * elem // 16)
    elif layout == "channels_last" and C == block_c and C * elem < 16:
        mode, px = "flat", 16 // (C * elem)
    elif block_c <= 16:
        mode, px = "gather", 1
    else:
        mode, px = ("cl" if layout == "channels_last" else "strided"), 1
        lanes = min(32, max(1, block_c * elem // 16))
    block_m = px * (32 // lanes) * num_warps
    values = px * block_c // lanes * wide
    cap = max(16, triton.next_power_of_2(M))
    while block_m > cap and num_warps > 1:
        num_warps //= 2
        block_m //= 2
    if mode != "flat":  # flat keeps its 16-byte runs (the tile is C*BLOCK_M contiguous elements)
        while block_m > cap and px > 1:
            px //= 2
            block_m //= 2
    block_m = max(px, min(block_m, cap))
    # prefetching doubles the register tile: only small tiles, and not where a pixel spans lanes
    prefetch = not backward and not pixel_loss and values <= PREFETCH_VALUES and lanes == 1
    return LaunchConfig(block_c=block_c, block_m=block_m, chunked=False, num_warps=num_warps, px=px,
                        prefetch=prefetch, mode=mode)


def label_vector(px: int, label_bytes: int) -> int:
    """Labels per 16-byte load within a run of px pixels (a power of two dividing px)."""
    return max(1, min(px, 16 // label_bytes))


def needs_int64(*tensors: Tensor) -> bool:
    """True when some element offset of one of ``tensors`` (largest index times stride) reaches 2**31."""
    for t in tensors:
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if span >= 2**31 - 1:
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Occupancy and persistent grids
# ----------------------------------------------------------------------------------------------
# Most thread blocks resident on one SM, by compute capability (CUDA programming guide, table of
# technical specifications); other limits come from the device properties.
_MAX_BLOCKS_PER_SM = {(7, 5): 16, (8, 0): 32, (8, 6): 16, (8, 7): 16, (8, 9): 24, (9, 0): 32, (10, 0): 32,
                      (12, 0): 32}


def occupancy(regs: int, shared: int, num_warps: int, *, major: int, minor: int, regs_per_sm: int = 65536,
              threads_per_sm: int = 2048, shared_per_sm: int = 233472) -> int:
    """Thread blocks of ``num_warps`` warps resident per SM for a kernel using ``regs`` registers per
    thread and ``shared`` bytes of shared memory.

    Registers are allocated per warp in units of 256; each block also reserves 1 KiB of shared
    memory (sm_80 and later).
    """
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (regs_per_sm // max(per_warp, 1)) // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    by_shared = shared_per_sm // (shared + 1024) if major >= 8 else shared_per_sm // max(shared, 1)
    by_blocks = _MAX_BLOCKS_PER_SM.get((major, minor), 16)
    return max(1, min(by_regs, by_threads, by_shared, by_blocks))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: few programs is fastest


_RESIDENT: dict = {}


def _resident_programs(kernel, make_args, dtypes: tuple, constexprs: dict, num_warps: int,
                       device: torch.device) -> int:
    """Programs of ``kernel`` resident per SM, from the compiled kernel's registers and shared memory.

    Compiles the specialization (``warmup`` of ``make_args()``: the launch that follows reuses it)
    once per kernel, constexprs, tensor dtypes and device; DEFAULT_RESIDENT off the GPU.
    """
    if device.type != "cuda":
        return DEFAULT_RESIDENT
    key = (kernel, device.index, num_warps, tuple(sorted(constexprs.items())), dtypes)
    if key not in _RESIDENT:
        compiled = kernel.warmup(*make_args(), grid=(1,), num_warps=num_warps, **constexprs)
        compiled._init_handles()
        props = torch.cuda.get_device_properties(device)
        _RESIDENT[key] = occupancy(compiled.n_regs, compiled.metadata.shared, num_warps, major=props.major,
                                   minor=props.minor, regs_per_sm=props.regs_per_multiprocessor,
                                   threads_per_sm=props.max_threads_per_multi_processor,
                                   shared_per_sm=props.shared_memory_per_multiprocessor)
    return _RESIDENT[key]


def persistent_programs(rows: int, num_tiles: int, resident_per_sm: int, num_sms: int) -> int:
    """Programs per row (image, or image x channel chunk) of a persistent grid.

    The grid is at most one wave (rows * P <= resident_per_sm * num_sms, rounding down: a second,
    nearly empty wave would double the run time), and the tiles are spread evenly (every program
    walks the same number of tiles, or one fewer).
    """
    P = max(1, min(num_tiles, (resident_per_sm * num_sms) // rows))
    return triton.cdiv(num_tiles, triton.cdiv(num_tiles, P))


# ----------------------------------------------------------------------------------------------
# Backend entry points
# ----------------------------------------------------------------------------------------------
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


def _config(x: Tensor, backward: bool, pixel_loss: str = "none") -> LaunchConfig:
    N, C, M = x.shape
    return launch_config(C, M, x.dtype, backward=backward, layout=layout_of(x), pixel_loss=pixel_loss != "none")


def _common_constexprs(C: int, activation: str, power: int, labels: bool, ignore_index, int64: bool,
                       dtype: torch.dtype, pixel_loss: str, gamma: float) -> dict:
    # the focal exponents 0, 1 and 2 are products in the kernels; others the run-time gamma
    gamma_code = int(gamma) if pixel_loss == "focal" and gamma in (0.0, 1.0, 2.0) else \
        (-1 if pixel_loss == "focal" else 0)
    return dict(ACTIVATION=_ACT_CODE[activation], POWER=power, LABELS=labels,
                HAS_IGNORE=labels and ignore_index is not None, LABEL_OFFSET=1 if C == 1 else 0, INT64=int64,
                FP64=dtype == torch.float64, PIXEL=_PIXEL_CODE[pixel_loss], GAMMA=gamma_code)


def _operand_mode(a: Tensor, cfg: LaunchConfig) -> int:
    """MODE constexpr of an operand: the logits' mode if it has the logits' layout, else a safe one."""
    want = {"strided": "contiguous", "cl": "channels_last", "flat": "channels_last", "gather": None}[cfg.mode]
    if cfg.mode == "gather" or layout_of(a) == want:
        return MODES[cfg.mode]
    return MODES["gather"] if cfg.block_c <= 16 else MODES["strided"]


def _tile_constexprs(x: Tensor, t: Tensor, labels: bool, cfg: LaunchConfig) -> dict:
    return dict(C=x.shape[1], BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m, PX=cfg.px,
                LV=label_vector(cfg.px, t.element_size()) if labels else 1,
                X_MODE=MODES[cfg.mode], T_MODE=MODES["strided"] if labels else _operand_mode(t, cfg))


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def split_gamma(gamma: float) -> tuple:
    """(hi, lo): float32 ``hi`` nearest ``gamma`` and the rest, so that hi + lo is ``gamma`` to about
    2**-48 in a float64 kernel (a float argument reaches a compiled Triton kernel as float32)."""
    gamma = float(gamma)
    try:
        hi = struct.unpack("f", struct.pack("f", gamma))[0]
    except OverflowError:
        hi = math.inf
    if math.isinf(hi):  # beyond float32: the float32 kernels see inf either way
        return gamma, 0.0
    return hi, gamma - hi


def forward(x: Tensor, t: Tensor, activation: str, power: int, ignore_index: Optional[int],
            pixel_loss: str = "none", gamma: float = 2.0, *, config: Optional[LaunchConfig] = None,
            programs_per_image: Optional[int] = None) -> Tensor:
    """Per-class sums (N, 3, C): [:,0] = sum_m p*t, [:,1] = sum_m p^q, [:,2] = sum_m t^q; with a
    pixel loss (N, 5, C): also [:,3] = sum_m t*e, [:,4] = sum_m e (see dicetorch.reference).

    Args:
        x: (N, C, M) float tensor, any strides.
        t: (N, M) int32/int64/uint8 labels or (N, C, M) float target of x's dtype.
        activation: "softmax" | "sigmoid" | "none"; power: q in {1, 2}.
        ignore_index: label value excluded from all sums (labels only), or None.
        pixel_loss, gamma: "none" | "ce" | "focal" and the focal exponent.
        config, programs_per_image: override the launch heuristic (tests and benchmarks).

    Returns:
        float32 (float64 for float64 x) tensor (N, 3 or 5, C), deterministic.
    """
    N, C, M, labels, stride_t = _check(x, t, activation, power)
    cfg = config or _config(x, backward=False, pixel_loss=pixel_loss)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    num_tiles = triton.cdiv(M, cfg.block_m)
    const = _common_constexprs(C, activation, power, labels, ignore_index, needs_int64(x, t), x.dtype, pixel_loss,
                               gamma)
    rows = 3 if pixel_loss == "none" else 5
    ign = 0 if ignore_index is None else int(ignore_index)
    with _device_ctx(x):
        if not cfg.chunked:
            const.update(_tile_constexprs(x, t, labels, cfg), PREFETCH=cfg.prefetch)
            kernel, programs = _tile_fwd_kernel, N
        else:
            const.update(BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m)
            kernel, programs = _dice_fwd_kernel, N * triton.cdiv(C, cfg.block_c)
        lse = None  # chunked: per-pixel log-sum-exp (softmax) or argmax index, from a first pass
        if cfg.chunked and activation in ("softmax", "argmax"):
            lcfg = launch_config(C, M, x.dtype, backward=True)
            lse = torch.empty((N, M), dtype=acc, device=x.device)
            lse_tiles = triton.cdiv(M, lcfg.block_m)
            (_softmax_lse_kernel if activation == "softmax" else _argmax_kernel)[(N * lse_tiles,)](
                x, lse, C, M, lse_tiles, *x.stride(),
                BLOCK_C=lcfg.block_c, BLOCK_M=lcfg.block_m, INT64=const["INT64"], FP64=acc == torch.float64,
                num_warps=lcfg.num_warps,
            )

        gammas = split_gamma(gamma)

        def args(P, partials):
            if not cfg.chunked:
                return (x, t, partials, M, P, num_tiles, ign, *gammas, *x.stride(), *stride_t)
            return (x, t, partials if lse is None else lse, partials, C, M, programs // N, P, num_tiles, ign,
                    *gammas, *x.stride(), *stride_t)

        if programs_per_image is None:
            def probe_args():  # for the one compile per specialization (shapes do not matter there)
                return args(1, torch.empty((programs, rows, C), dtype=acc, device=x.device))
            resident = _resident_programs(kernel, probe_args, (x.dtype, t.dtype, acc), const, cfg.num_warps,
                                          x.device)
            programs_per_image = persistent_programs(programs, num_tiles, resident, _num_sms(x.device))
        P = max(1, min(num_tiles, programs_per_image))
        P = triton.cdiv(num_tiles, triton.cdiv(num_tiles, P))  # no idle programs; counts differ by <= 1
        partials = torch.empty((N, P, rows, C), dtype=acc, device=x.device)
        kernel[(programs * P,)](*args(P, partials), num_warps=cfg.num_warps, **const)
    # Fixed-shape reduction over a fixed dimension: deterministic.
    return partials.sum(dim=1)


def _grad_like(x: Tensor) -> Tensor:
    """Uninitialised tensor like x; ``torch.preserve_format`` keeps x's strides when they are dense."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def backward(grad: Tensor, x: Tensor, t: Tensor, activation: str, power: int, ignore_index: Optional[int],
             pixel_loss: str = "none", gamma: float = 2.0, *, config: Optional[LaunchConfig] = None) -> Tensor:
    """dL/dx (N, C, M) in x's dtype (and strides when dense) for ``grad`` = dL/dstats (N, 3, C).

    With gI = grad[:, 0], gP = grad[:, 1], p = activation(x)::

        g = gI*t + gP*q*p^(q-1);   dL/dx = p*(g - sum_j p_j g_j) | g*p*(1-p) | g

    and 0 on ignored pixels.  grad[:, 2] (the target volume) gets no gradient.
    """
    if activation in HARD_ACTIVATIONS:
        from ..reference import hard_backward_message

        raise RuntimeError(hard_backward_message(activation))
    N, C, M, labels, stride_t = _check(x, t, activation, power)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = 3 if pixel_loss == "none" else 5
    if grad.shape != (N, rows, C):
        raise ValueError(f"grad must be (N, {rows}, C) = {(N, rows, C)}, got {tuple(grad.shape)}")
    grad = grad.to(acc).contiguous()
    cfg = config or _config(x, backward=True, pixel_loss=pixel_loss)
    out = _grad_like(x)
    tiles = triton.cdiv(M, cfg.block_m)
    const = _common_constexprs(C, activation, power, labels, ignore_index, needs_int64(x, t, out), x.dtype,
                               pixel_loss, gamma)
    const.update(BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m)
    ign = 0 if ignore_index is None else int(ignore_index)
    with _device_ctx(x):
        if not cfg.chunked:
            const.update(_tile_constexprs(x, t, labels, cfg), O_MODE=_operand_mode(out, cfg))
            _tile_bwd_kernel[(N * tiles,)](
                grad, x, t, out, M, tiles, ign, *split_gamma(gamma), *x.stride(), *stride_t, *out.stride(),
                num_warps=cfg.num_warps, **const,
            )
        else:
            _dice_bwd_kernel[(N * tiles,)](
                grad, x, t, out, C, M, tiles, ign, *split_gamma(gamma), *x.stride(), *stride_t, *out.stride(),
                num_warps=cfg.num_warps, **const,
            )
    return out
