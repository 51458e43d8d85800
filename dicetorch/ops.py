"""The ``dicetorch::dice_stats`` custom operator: per-class Dice sums with a hand-derived backward.

Every loss in :mod:`dicetorch.functional` is a small PyTorch formula on the (N, 3, C) tensor this
operator returns; the heavy lifting (activation, one-hot comparison, masking, reductions, and the
input gradient) happens here, in one of several interchangeable backends:

=============  ==========================================================================
backend        implementation
=============  ==========================================================================
"reference"    :mod:`dicetorch.reference`, plain PyTorch, any device and dtype
"triton"       :mod:`dicetorch.triton_kernels`, fused Triton kernels (CUDA tensors, or CPU
               tensors when ``TRITON_INTERPRET=1``)
"cpu"          fused C++ kernels of the ``dicetorch._C`` extension (CPU tensors)
"cuda"         fused CUDA kernels of the ``dicetorch._C`` extension (CUDA tensors)
"auto"         CUDA tensors: "triton", else "cuda", else "reference";
               CPU tensors: "cpu", else "reference"
=============  ==========================================================================

Hard activations ("argmax", "threshold"; see :mod:`dicetorch.reference`) turn the operator into an
evaluation counter: p is a 0/1 prediction made per pixel inside the kernel (no argmax or one-hot
tensor is materialized), so (I, P, T) are the hard intersection and volumes; the result never
requires grad.  The backends that compute them are listed by :func:`hard_activation_backends`
("reference", "cpu" and "cuda"; a Triton module declares its own in ``HARD_ACTIVATIONS``).

Every backend implements the same two functions on the canonical layout (see
:mod:`dicetorch.reference`): ``forward(input (N,C,M), target, activation, power, ignore_index)
-> (N,3,C)`` and ``backward(grad (N,3,C), input, target, activation, power, ignore_index) ->
grad_input``.  Channels-last inputs reach the backends as strided (N, C, M) views, not copies.
"""
from __future__ import annotations

import functools
import importlib
import math
import operator
import os
import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import reference
from .reference import HARD_ACTIVATIONS, PIXEL_LOSSES, acc_dtype, stats_rows

__all__ = ["dice_stats", "HARD_ACTIVATIONS", "hard_activation_backends", "supports_hard_activation", "dice_stats_op", "dice_stats_backward", "as_ignore_index", "available_backends", "resolve_backend", "check_target_values", "labels_checked_by_count", "check_labels_by_count", "extension_info",
           "BackendUnavailableError"]

ACTIVATIONS = ("softmax", "sigmoid", "none")  # differentiable; HARD_ACTIVATIONS are evaluation-only
BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")


class BackendUnavailableError(ValueError, RuntimeError):
    """A known ``backend`` that cannot run here: a bad argument (ValueError) about the environment."""


# ----------------------------------------------------------------------------------------------
# The compiled extension (optional).
# ----------------------------------------------------------------------------------------------
try:  # pragma: no cover - depends on how the package was installed
    # registers dicetorch::fused_forward / fused_backward for CPU (and CUDA when built with it)
    _C = importlib.import_module("dicetorch._C")

    _EXT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover
    _C = None  # noqa: N816
    _EXT_ERROR = str(exc)
    warnings.warn(
        "dicetorch: the compiled extension dicetorch._C is not available "
        f"({exc}); using the reference/Triton paths. Build it with "
        "`pip install --no-build-isolation -e .` (CUDA_HOME=/usr/local/cuda for the CUDA kernels).",
        RuntimeWarning,
        stacklevel=2,
    )


@functools.lru_cache(maxsize=None)  # fixed once the extension is loaded; asked on every call
def _ext_has(device_key: str) -> bool:
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("dicetorch::fused_forward", device_key)


def extension_info() -> dict:
    """What the compiled extension provides: {"loaded", "cpu", "cuda", "error"}."""
    return {"loaded": _C is not None, "cpu": _ext_has("CPU"), "cuda": _ext_has("CUDA"), "error": _EXT_ERROR}


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
class _Extension:
    """Backend adapter over the dicetorch::fused_* operators of the compiled extension."""

    @staticmethod
    def forward(input, target, activation, power, ignore_index, *pixel):
        return torch.ops.dicetorch.fused_forward(input, target, activation, power, ignore_index, *pixel)

    @staticmethod
    def backward(grad, input, target, activation, power, ignore_index, *pixel):
        return torch.ops.dicetorch.fused_backward(grad, input, target, activation, power, ignore_index, *pixel)

    @staticmethod
    def forward_codes(input, target, activation, power, ignore_index, *pixel):
        return torch.ops.dicetorch.fused_forward_codes(input, target, activation, power, ignore_index, *pixel)


class _Reference:
    forward = staticmethod(reference.dice_stats_reference)
    backward = staticmethod(reference.dice_stats_backward_reference)


@functools.lru_cache(maxsize=None)
def _triton_module():
    try:
        return importlib.import_module("dicetorch.triton_kernels")
    except ImportError:
        return None


def available_backends(device: torch.device | str = "cpu") -> list:
    """Backends that can run on tensors of ``device`` in this installation."""
    device = torch.device(device)
    interpret = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    return list(_available_backends(device.type, interpret))


@functools.lru_cache(maxsize=None)  # asked twice per training step
def _available_backends(device_type: str, interpret: bool) -> tuple:
    out = ["reference"]
    if _triton_module() is not None and (device_type == "cuda" or interpret):
        out.append("triton")
    if device_type in ("cpu", "cuda") and _ext_has(device_type.upper()):
        out.append(device_type)
    return tuple(out)


# Backends whose kernels compute the hard activations / the pixel-loss rows.  The Triton module
# declares its own support in the module attributes ``HARD_ACTIVATIONS`` and ``PIXEL_LOSSES``.
_HARD_KERNELS = frozenset({"reference", "cpu", "cuda"})
_PIXEL_KERNELS = frozenset({"reference", "cpu", "cuda"})


def supports_hard_activation(backend: str, activation: str = "argmax") -> bool:
    """Whether ``backend`` computes the hard ``activation`` ("argmax" / "threshold") itself."""
    if backend == "triton":
        module = _triton_module()
        return module is not None and activation in getattr(module, "HARD_ACTIVATIONS", ())
    return backend in _HARD_KERNELS


def supports_pixel_loss(backend: str, pixel_loss: str = "ce") -> bool:
    """Whether ``backend`` computes the pixel-loss rows ("ce" / "focal") in its fused pass."""
    if pixel_loss == "none":
        return True
    if backend == "triton":
        module = _triton_module()
        return module is not None and pixel_loss in getattr(module, "PIXEL_LOSSES", ())
    return backend in _PIXEL_KERNELS


def _supports(backend: str, activation: Optional[str], pixel_loss: str) -> bool:
    hard_ok = activation not in HARD_ACTIVATIONS or supports_hard_activation(backend, activation)
    return hard_ok and supports_pixel_loss(backend, pixel_loss)


def hard_activation_backends(device: torch.device | str = "cpu", activation: str = "argmax") -> list:
    """Backends available for ``device`` that compute the hard ``activation`` (see :data:`HARD_ACTIVATIONS`)."""
    return [b for b in available_backends(device) if supports_hard_activation(b, activation)]


def resolve_backend(backend: str, device: torch.device, activation: Optional[str] = None,
                    pixel_loss: str = "none") -> str:
    """Turn ``backend`` (possibly "auto") into a concrete backend usable on ``device``.

    With a hard ``activation`` or a ``pixel_loss``, "auto" picks the fastest backend that implements
    it (the reference where no kernel does), and a named backend that does not implement it raises
    :class:`BackendUnavailableError`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    avail = available_backends(device)
    if backend == "auto":
        order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        return next((b for b in order if b in avail and _supports(b, activation, pixel_loss)), "reference")
    if backend in avail and not _supports(backend, activation, pixel_loss):
        what = f"the hard activation {activation!r}" if activation in HARD_ACTIVATIONS and \
            not supports_hard_activation(backend, activation) else f"pixel_loss={pixel_loss!r}"
        able = [b for b in avail if _supports(b, activation, pixel_loss)]
        raise BackendUnavailableError(
            f"backend={backend!r} does not implement {what} yet; backends that do for {device.type} tensors: "
            f"{able} (backend='auto' picks one)"
        )
    if backend not in avail:
        why = {
            "triton": "needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and an importable triton",
            "cpu": "needs CPU tensors and the compiled extension dicetorch._C",
            "cuda": "needs CUDA tensors and dicetorch._C built with CUDA kernels",
        }[backend]
        raise BackendUnavailableError(
            f"backend={backend!r} is not available for {device.type} tensors ({why}); available: {avail}"
        )
    return backend


def _impl(backend: str):
    if backend == "reference":
        return _Reference
    if backend == "triton":
        return _triton_module()
    return _Extension


# ----------------------------------------------------------------------------------------------
# Input checks and canonical layout
# ----------------------------------------------------------------------------------------------
def check_inputs(input: Tensor, target: Tensor, activation: str, power: int, ignore_index: Optional[int],
                 pixel_loss: str = "none", gamma: float = 2.0) -> None:
    """Shape/dtype/option checks that need no data (safe under torch.compile)."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input and target must be torch.Tensor")
    if pixel_loss not in PIXEL_LOSSES:
        raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {pixel_loss!r}")
    if pixel_loss != "none" and activation not in ("softmax", "sigmoid"):
        raise ValueError(f"pixel_loss={pixel_loss!r} needs activation 'softmax' or 'sigmoid' (logits), "
                         f"got activation={activation!r}")
    if not isinstance(gamma, (float, int, torch.SymFloat, torch.SymInt)) or isinstance(gamma, bool) \
            or not gamma >= 0 or gamma == math.inf:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if activation not in ACTIVATIONS and activation not in HARD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS + HARD_ACTIVATIONS}, got {activation!r}")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor (N, C, *spatial), got dtype {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *spatial), got shape {tuple(input.shape)}")
    n, c = input.shape[0], input.shape[1]
    if n == 0 or input.numel() == 0:
        raise ValueError(f"input must be non-empty (N, C, *spatial), got shape {tuple(input.shape)}")
    if activation in ("softmax", "argmax") and c == 1:
        raise ValueError(
            f"activation={activation!r} needs C >= 2 channels (over one channel it is constant 1); "
            f"use activation={'sigmoid' if activation == 'softmax' else 'threshold'!r} for binary "
            "segmentation with C == 1"
        )
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    spatial = tuple(input.shape[2:])
    if target.is_floating_point() or (target.dtype == torch.bool and tuple(target.shape) == tuple(input.shape)):
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                f"a float target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
                f" (integer labels would be (N, *spatial) = {(n, *spatial)})"
            )
        if ignore_index is not None:
            raise ValueError("ignore_index needs integer label targets; got a float target (mask it instead)")
    elif target.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        ok = (n, *spatial), (n, 1, *spatial), tuple(input.shape)
        if tuple(target.shape) not in ok:
            raise ValueError(
                f"integer target must be labels shaped (N, *spatial) = {(n, *spatial)} or (N, 1, *spatial), "
                f"or one-hot shaped like the input {tuple(input.shape)}; got {tuple(target.shape)}"
            )
        if ignore_index is not None and c > 1 and tuple(target.shape) == tuple(input.shape):
            # an integer target shaped like the input is one-hot: there is no label to compare with
            raise ValueError("ignore_index needs integer label targets; got a one-hot target shaped like the input")
    else:
        raise TypeError(f"target must be an integer (labels) or floating-point tensor, got dtype {target.dtype}")


def _is_label_target(input: Tensor, target: Tensor) -> bool:
    """Integer targets are labels unless shaped like a multi-channel input (then one-hot)."""
    if target.is_floating_point() or (target.dtype == torch.bool and target.shape == input.shape):
        return False
    return not (target.shape == input.shape and input.shape[1] > 1)


def canonical(input: Tensor, target: Tensor):
    """(N, C, M) view of ``input`` and the target as (N, M) integer labels or (N, C, M) floats."""
    n, c = input.shape[0], input.shape[1]
    x = input.reshape(n, c, -1)  # a view for contiguous and channels-last input
    if _is_label_target(input, target):
        t = target.reshape(n, -1)
        if t.dtype not in (torch.int32, torch.int64, torch.uint8):
            t = t.to(torch.int64)
    else:
        t = target.to(input.dtype).reshape(n, c, -1)
    return x, t


def as_ignore_index(ignore_index) -> Optional[int]:
    """``ignore_index`` as a Python int (or None): accepts int, numpy integers and 0-dim integer tensors."""
    if ignore_index is None or isinstance(ignore_index, torch.SymInt):
        return ignore_index
    bad = isinstance(ignore_index, bool) or (
        isinstance(ignore_index, Tensor)
        and (ignore_index.dim() != 0 or ignore_index.is_floating_point() or ignore_index.is_complex()
             or ignore_index.dtype == torch.bool))
    try:
        if not bad:
            return operator.index(ignore_index)
    except TypeError:
        pass
    raise TypeError(f"ignore_index must be an integer label value or None, got {ignore_index!r} "
                    f"({type(ignore_index).__name__})")


def _data_check(bad: Tensor, message) -> None:
    """Raise ``ValueError(message())`` if ``bad`` (a 0-dim bool tensor) is true.

    CPU tensors are checked on the host (no cost beyond the reduction).  CUDA tensors are checked on
    the device with ``torch._assert_async``: no host synchronization, capturable in a CUDA graph; a
    failure surfaces as a device-side assertion at the next synchronizing call.
    """
    if _checks_on_host(bad.device):
        if bool(bad):
            raise ValueError(message())
    else:
        torch._assert_async(~bad, "dicetorch: " + message(on_device=True))


def _checks_on_host(device: torch.device) -> bool:
    """Whether value checks may read their verdict on the host: only for CPU data (no sync)."""
    return device.type == "cpu"


def check_target_values(input: Tensor, target: Tensor, ignore_index: Optional[int],
                        labels_bad: Optional[Tensor] = None) -> None:
    """Eager-mode value checks of the target (skipped under ``torch.compile`` and ``torch.func``).

    * labels must lie in [0, C-1] ([0, 1] for C == 1) apart from ``ignore_index``;
    * float (soft or one-hot) and integer one-hot targets must lie in [0, 1].

    Kernels never need these for memory safety (labels are compared, not used as addresses): they
    turn a silent "matches no class" or a meaningless negative volume into a clear error.  On CUDA
    the check runs on the device (see :func:`_data_check`): the eager hot path never synchronizes.
    ``labels_bad``: the label range verdict, when it is already known (:func:`check_labels_by_count`).
    """
    if torch.compiler.is_compiling() or target.dtype == torch.bool or torch._C._are_functorch_transforms_active():
        return  # traced code and functorch transforms cannot branch on data
    c = input.shape[1]
    if _is_label_target(input, target):
        hi = 1 if c == 1 else c - 1
        info = torch.iinfo(target.dtype)
        if labels_bad is not None:
            bad = labels_bad
        elif ignore_index is not None and info.min <= ignore_index <= info.max:  # else no label equals it
            bad = (((target < 0) | (target > hi)) & (target != ignore_index)).any()
        else:
            lo_found, hi_found = torch.aminmax(target.reshape(-1))
            bad = (lo_found < 0) | (hi_found > hi)

        def message(on_device=False):
            extra = "" if ignore_index is None else f" (besides ignore_index={ignore_index})"
            if on_device:
                return f"target labels must lie in [0, {hi}] for C={c} channels{extra}"
            wrong = (target < 0) | (target > hi)
            if ignore_index is not None:
                wrong &= target.long() != ignore_index
            wrong = target[wrong]
            return (f"target labels must lie in [0, {hi}] for C={c} channels{extra}; "
                    f"found values in [{int(wrong.min())}, {int(wrong.max())}]")
    else:
        lo_found, hi_found = torch.aminmax(target.reshape(-1))
        bad = (lo_found < 0) | (hi_found > 1)

        def message(on_device=False):
            found = "" if on_device else f"; found values in [{float(lo_found)}, {float(hi_found)}]"
            return (f"a float or one-hot target must lie in [0, 1] (class probabilities){found}; "
                    f"integer labels go in shaped (N, *spatial)")
    _data_check(bad, message)


# float32 sums of 0/1 values are exact in any order while the total stays <= 2^24
_EXACT_COUNT = 2 ** 24


def labels_checked_by_count(input: Tensor, target: Tensor, ignore_index: Optional[int]) -> bool:
    """Whether the label range check of :func:`check_target_values` may instead read the operator's
    T row after the forward (see :func:`check_labels_by_count`): eager data, labels, C >= 2, no
    ``ignore_index`` and at most 2^24 pixels per image.

    There every in-range label adds exactly 1 to one class's T = sum_m t^q (t in {0, 1}) and an
    out-of-range one adds nothing, so the labels are valid iff each image's T sums to M, exactly in
    float32 for M <= 2^24 whatever the order of the sums.  That spares a pass over the labels
    (``torch.aminmax``: about 7% of a 4-class 3D ``DiceLoss`` step on one CPU thread, and on an H100
    a 25 us reduction and a launch per step).
    """
    return (input.shape[1] >= 2 and ignore_index is None
            and target.dtype != torch.bool and _is_label_target(input, target)
            and math.prod(input.shape[2:]) <= _EXACT_COUNT
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active())


def check_labels_by_count(stats: Tensor, input: Tensor, target: Tensor, ignore_index: Optional[int]) -> None:
    """Where :func:`labels_checked_by_count` holds, after the forward: unless each image's T row
    (``stats[:, 2]``) sums to its pixel count, raise as :func:`check_target_values` does, naming the
    labels found (CPU), or fail a device assert (CUDA: no host synchronization)."""
    # each image's sum is at most its pixel count (a pixel adds 1 to one class or nothing), so the
    # images are all valid iff the total is N M (counts: exact as integers), one reduction
    total = stats.detach()[:, 2].sum(dtype=torch.int64)
    pixels = input.shape[0] * math.prod(input.shape[2:])
    if _checks_on_host(total.device) and total.item() == pixels:
        return  # valid labels are never read
    check_target_values(input, target, ignore_index, total != pixels)


# ----------------------------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------------------------
def _needs_reference(input: Tensor, target: Tensor) -> bool:
    """True inside torch.func transforms (grad, vjp, jvp, vmap, ...) and for forward-mode dual tensors.

    A custom operator with a hand-written backward has no forward-mode derivative, batching rule or
    functorch support; plain PyTorch has all of them.  So there the operator evaluates its reference
    formula, exact and differentiable in every mode (unfused: it materializes p).
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(input).tangent is not None


# One-byte label codes (csrc/dice_math.h, saved_code): the CPU forward saves them for its backward.
SAVED_IGNORE_INDEX = 254  # the code of an ignored pixel; 255 matches no class
_MAX_SAVED_CLASSES = 254


def _saves_label_codes(input: Tensor, target: Tensor, activation: str, backend: str) -> bool:
    """Whether the forward of ``backend`` (resolved) also returns one-byte label codes (N, M) for the
    backward: the C++ CPU kernel, a differentiable activation, label targets wider than a byte and
    2 <= C <= 254.  The backward then reads 1 byte per pixel instead of each label (8 with int64:
    half the bytes of 4-class float32 logits, in a backward bound by memory traffic).  They cost
    N*M bytes from the forward to the backward, 1/(4C) of float32 logits."""
    return (backend == "cpu" and activation not in HARD_ACTIVATIONS and target.dtype != torch.uint8
            and 2 <= input.shape[1] <= _MAX_SAVED_CLASSES and _is_label_target(input, target))


def _codes_like(input: Tensor, saved: bool) -> Tensor:
    """The codes output's shape: (N, M) where codes are saved, else (0,) (no codes)."""
    return input.new_empty((input.shape[0], math.prod(input.shape[2:])) if saved else (0,), dtype=torch.uint8)


def dice_stats(
    input: Tensor,
    target: Tensor,
    activation: str = "softmax",
    power: int = 1,
    ignore_index: Optional[int] = None,
    backend: str = "auto",
    pixel_loss: str = "none",
    gamma: float = 2.0,
) -> Tensor:
    """Per-class Dice statistics of ``input`` against ``target`` (and of a pixel loss, fused).

    Args:
        input: (N, C, *spatial) logits (or probabilities with ``activation="none"``), any float dtype,
            contiguous, channels-last or any other strides.
        target: integer labels (N, *spatial) or (N, 1, *spatial); or a float/bool target shaped like
            ``input`` (one-hot or soft).  With C == 1, label 1 is the foreground.
        activation: "softmax" (over C), "sigmoid" or "none"; or a hard activation for evaluation:
            "argmax" (p = one-hot of the argmax over C, torch.argmax's ties and NaN rules) or
            "threshold" (p = 1 where input > 0, i.e. sigmoid(input) > 0.5).  With a hard activation
            the result never requires grad.
        power: q in {1, 2}; 2 gives the squared (V-Net) volumes.
        ignore_index: label value whose pixels count nowhere (integer targets only).
        backend: "auto" | "reference" | "triton" | "cpu" | "cuda".
        pixel_loss: "none", or "ce" / "focal" for the rows of a compound loss (softmax or sigmoid).
        gamma: the focal exponent (``pixel_loss="focal"``).

    Returns:
        (N, 3, C) float32 (float64 for float64 input), (N, 5, C) with a pixel loss::

            [:, 0] = I = sum_m p*t,   [:, 1] = P = sum_m p^q,   [:, 2] = T = sum_m t^q
            [:, 3] = X = sum_m t*e,   [:, 4] = L = sum_m e     (e: the pixel loss's element term,
                                                                 see :mod:`dicetorch.reference`)

    Differentiable in ``input`` through a hand-derived backward (see
    :func:`dicetorch.reference.dice_stats_backward_reference`); the target gets no gradient.
    Double backward, ``torch.func`` transforms and forward-mode AD evaluate the reference formula
    (exact, not fused).  This function validates shapes and options; the custom operator itself is
    :data:`dice_stats_op` (``torch.ops.dicetorch.dice_stats``).
    """
    ignore_index = as_ignore_index(ignore_index)
    if isinstance(gamma, (int, float)) and not isinstance(gamma, bool):
        gamma = float(gamma)
    check_inputs(input, target, activation, power, ignore_index, pixel_loss, gamma)
    if activation in HARD_ACTIVATIONS:
        input = input.detach()  # a step function: no gradient, and the result never requires grad
    if _needs_reference(input, target):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if target.requires_grad:
            raise ValueError("target requires grad, but dice_stats gives no gradient to the target; "
                             "pass target.detach()")
        x, t = canonical(input, target)
        return reference.dice_stats_reference(x, t, activation, power, ignore_index, pixel_loss, gamma)
    args = (input, target, activation, power, ignore_index, backend, pixel_loss, gamma)
    return (_EagerDiceStats.apply(*args) if _plain_eager(input, target) else dice_stats_op(*args))[0]


@torch.library.custom_op("dicetorch::dice_stats", mutates_args=())
def dice_stats_op(
    input: Tensor,
    target: Tensor,
    activation: str,
    power: int,
    ignore_index: Optional[int],
    backend: str,
    pixel_loss: str = "none",
    gamma: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """The custom operator behind :func:`dice_stats` (same arguments, no coercion).

    Returns ``(stats, codes)``: the stats of :func:`dice_stats`, and for the backward either the
    one-byte label codes (N, M) uint8 (see :func:`_saves_label_codes`) or an empty (0,) tensor.
    """
    return _forward_impl(input, target, activation, power, ignore_index, backend, pixel_loss, gamma)


def _forward_impl(input, target, activation, power, ignore_index, backend, pixel_loss, gamma, checked=False):
    if not checked:  # (dice_stats has checked them)
        check_inputs(input, target, activation, power, ignore_index, pixel_loss, gamma)
    x, t = canonical(input, target)
    name = resolve_backend(backend, input.device, activation, pixel_loss)
    impl = _impl(name)
    args = (x, t, activation, power, ignore_index)
    if pixel_loss != "none":  # the three-row signature every backend has
        args += (pixel_loss, gamma)
    if _saves_label_codes(input, target, activation, name):
        return impl.forward_codes(*args)
    return impl.forward(*args), _codes_like(input, False)


@dice_stats_op.register_fake
def _(input, target, activation, power, ignore_index, backend, pixel_loss="none", gamma=2.0):
    check_inputs(input, target, activation, power, ignore_index, pixel_loss, gamma)
    stats = input.new_empty((input.shape[0], stats_rows(pixel_loss), input.shape[1]), dtype=acc_dtype(input.dtype))
    saved = _saves_label_codes(input, target, activation, resolve_backend(backend, input.device, activation, pixel_loss))
    return stats, _codes_like(input, saved)


def _like_input(g: Tensor, input: Tensor) -> Tensor:
    """The (N, C, M) gradient ``g`` as a tensor with exactly ``torch.empty_like(input)``'s strides.

    The fake kernel promises those strides (torch.compile relies on it).  Backends write contiguous
    or channels-last gradients, which already match for such inputs; other dense permutations
    (e.g. ``x.transpose(2, 3)``) get one copy.
    """
    g = g.view(input.shape)
    if g.stride() == input.stride():
        return g
    if g.stride() == torch.empty_like(input, device="meta").stride():
        return g
    return torch.empty_like(input).copy_(g)


@torch.library.custom_op("dicetorch::dice_stats_backward", mutates_args=())
def dice_stats_backward(
    grad: Tensor,
    input: Tensor,
    target: Tensor,
    activation: str,
    power: int,
    ignore_index: Optional[int],
    backend: str,
    pixel_loss: str = "none",
    gamma: float = 2.0,
) -> Tensor:
    """Input gradient of :func:`dice_stats` for ``grad`` = dL/dstats (N, 3 or 5, C); like ``torch.empty_like(input)``."""
    return _backward_impl(grad, input, target, activation, power, ignore_index, backend, pixel_loss, gamma)


def _backward_impl(grad, input, target, activation, power, ignore_index, backend, pixel_loss, gamma):
    if activation in HARD_ACTIVATIONS:
        raise RuntimeError(reference.hard_backward_message(activation))
    x, t = canonical(input, target)
    impl = _impl(resolve_backend(backend, input.device, activation, pixel_loss))
    if pixel_loss == "none":
        g = impl.backward(grad.contiguous(), x, t, activation, power, ignore_index)
    else:
        g = impl.backward(grad.contiguous(), x, t, activation, power, ignore_index, pixel_loss, gamma)
    return _like_input(g, input)


@dice_stats_backward.register_fake
def _(grad, input, target, activation, power, ignore_index, backend, pixel_loss="none", gamma=2.0):
    return torch.empty_like(input)


def _setup_context(ctx, inputs, output):
    input, target, activation, power, ignore_index, backend, pixel_loss, gamma = inputs
    if isinstance(target, Tensor) and target.requires_grad:
        raise ValueError(
            "target requires grad, but dice_stats gives no gradient to the target; pass target.detach()"
        )
    codes = output[1]
    if codes.dim() == 2:  # the forward saved one-byte label codes: the backward reads them instead
        target, ignore_index = codes, SAVED_IGNORE_INDEX
    ctx.set_materialize_grads(False)  # the codes get no gradient, not an (N, M) tensor of zeros
    ctx.save_for_backward(input, target)
    ctx.args = (activation, power, ignore_index, backend, pixel_loss, gamma)


def _backward(ctx, grad, _codes_grad=None):
    if grad is None:  # grads are not materialized: the stats were not used
        return None, None, None, None, None, None, None, None
    input, target = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0] and ctx.args[0] in HARD_ACTIVATIONS:
        raise RuntimeError(reference.hard_backward_message(ctx.args[0]))
    if ctx.needs_input_grad[0]:
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the reference backward is plain PyTorch, so
            # autograd differentiates it again.  (Under torch.compile grad mode is off here.)
            activation, power, ignore_index, _, pixel_loss, gamma = ctx.args
            x, t = canonical(input, target)
            grad_input = _like_input(reference.dice_stats_backward_reference(
                grad, x, t, activation, power, ignore_index, pixel_loss, gamma), input)
        else:
            backward = _backward_impl if _plain_eager(grad, input) else dice_stats_backward
            grad_input = backward(grad, input, target, *ctx.args)
    return grad_input, None, None, None, None, None, None, None


dice_stats_op.register_autograd(_backward, setup_context=_setup_context)


def _plain_eager(*tensors: Tensor) -> bool:
    """Whether the operator may run as :class:`_EagerDiceStats`: eager mode with plain tensors, no
    torch.compile / export / jit tracing and no dispatch or function mode (FakeTensorMode, opcheck's,
    ``with torch.device(...)``), which all see the registered operator."""
    return (all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._len_torch_dispatch_stack() and not torch._C._len_torch_function_stack())


class _EagerDiceStats(torch.autograd.Function):
    """:data:`dice_stats_op` in plain eager mode: the operator's own implementation, setup and
    backward, called without the Python layers that the dispatcher wraps around a Python custom
    operator (two more Python kernels each way and their graph-break guards).  Same results; it
    saves about 0.4 ms per training step when the caches are cold, as they are after a network's
    step (measured on a 2-core CPU VM, ~7 % of a 4-class (2, 96^3) step with two threads)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs, checked=True)
        ctx.mark_non_differentiable(output[1])
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)
