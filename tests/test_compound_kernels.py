"""The pixel-loss rows of the fused kernels (``dice_stats(..., pixel_loss="ce" | "focal", gamma)``,
rows X = sum_m t e and L = sum_m e of compound Dice + CE / focal losses) against the reference.

Every kernel backend listed in PIXEL_KERNELS is compared with the reference: "cpu" in this process;
"triton" in a Triton-interpreter subprocess, through tests/conftest.py ``backends_under_test`` / ``interpreter_suite``.

The oracle is the reference evaluated in float64 on the same input values (``x.double()``), so each
comparison measures the kernel's own error, not the sum of two fp32 computations' errors.

Tolerances.  fp16/bf16/fp32 input is computed in fp32 by the kernels, fp64 in fp64.
* Dice rows I, P, T: terms in [0, 1]; as tests/test_cpu_kernel.py: the fast exp (20 ULP, ~2.4e-6
  relative) per term plus summation, ``3e-6 * M`` absolute (fp64: ``1e-15 * M``).
* Pixel rows X, L: sums of M terms e >= 0 of size up to ~|logit| (tens here).  Each term carries an
  absolute error of ~3e-6 from the exps inside log s / softplus (a 20-ULP exp moves log by 2.4e-6)
  and a relative error of a few ULP from log1p / pow (Sleef, 1 ULP) and the products; the fp32 sums
  add ~M/V * 2^-24 relative (V lanes summed apart).  So ``atol = 4e-6 * M`` and ``rtol = 2e-5``
  (fp64: ``1e-15 * M`` and ``1e-12``).
* Gradients: both sides round one value to the input dtype; the kernel's fp32 value carries the same
  few-ULP errors, so one rounding step of the dtype (2^-11 fp16, 2^-8 bf16, ~2^-22 fp32) relative
  to the largest entry, times 4, as in tests/test_cpu_kernel.py.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from conftest import INTERPRETED, backends_under_test, interpreter_suite
from dicetorch import ops, reference

# Kernel backends that compute the pixel rows in their fused pass ("cuda" works on CUDA tensors only:
# tests/test_gpu.py and, on the CPU, tests/test_cuda_emulation.py compare it with the reference).
PIXEL_KERNELS = ["cpu", "triton", "cuda"]

BACKENDS = [b for b in backends_under_test() if b in PIXEL_KERNELS]
pytestmark = pytest.mark.skipif(
    not BACKENDS and INTERPRETED, reason="no interpreted kernel backend with pixel-loss rows yet")

NEG_INF = float("-inf")


@pytest.mark.skipif(INTERPRETED or "triton" not in PIXEL_KERNELS, reason="no Triton pixel-loss rows yet"
                    if not INTERPRETED else "this is the parent of the interpreter run")
def test_interpreter_suite():
    interpreter_suite(__file__)


@pytest.mark.skipif(INTERPRETED, reason="backend independent")
def test_pixel_kernels_list_is_complete():
    """Every available kernel backend that claims the pixel rows is tested here, and vice versa
    (Triton always, in the interpreter run)."""
    for device in ("cpu", "cuda"):
        for b in {*ops.available_backends(device), "triton"} - {"reference"}:
            for pixel_loss in ("ce", "focal"):
                assert ops.supports_pixel_loss(b, pixel_loss) == (b in PIXEL_KERNELS), (b, pixel_loss)


ROUNDING = {torch.float32: 2.0**-20, torch.float64: 1e-13, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# the kernels' paths: 0, 1, 2 as products; whole and half-whole (0.5, 3, 3.5) as products and a sqrt;
# any other (1.3) through pow
GAMMAS = (0.0, 0.5, 1.0, 1.3, 2.0, 3.0, 3.5)
# target kinds: (kind, ignore_index); ignore_index inside the class range (1) and outside it
TARGETS = (("labels", None), ("labels_i32", -1), ("labels_u8", 255), ("labels", 1), ("onehot", None),
           ("soft", None), ("labels_i32", None), ("labels_u8", 1))
SPATIAL = ((), (37,), (9, 7), (4, 5, 3))
CHANNELS = (2, 3, 5, 21, 1)
LAYOUTS = ("contiguous", "channels_last", "transposed")


def make(n, c, spatial, kind, dtype, ignore_index=None, layout="contiguous", seed=0, scale=3.0):
    """Random (logits, target) in the user's layout.  kind: labels / labels_i32 / labels_u8 / onehot / soft."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    x = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    hi = c + 1 if c > 1 else 3  # an out-of-range label value too (matches no channel)
    lab = torch.randint(0, hi, (n, *spatial), generator=g)
    if ignore_index is not None:
        ign = torch.rand(lab.shape, generator=g) < 0.3
        lab = torch.where(ign, torch.full_like(lab, ignore_index), lab)
    if kind == "labels":
        t = lab
    elif kind == "labels_i32":
        t = lab.to(torch.int32)
    elif kind == "labels_u8":
        t = lab.to(torch.uint8)
    elif kind == "onehot":
        t = reference.one_hot(lab.reshape(n, -1), c, dtype).reshape(shape)
    elif kind == "soft":
        t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        raise AssertionError(kind)
    x = x.to(dtype)
    if layout == "channels_last" and len(spatial) in (2, 3):
        fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        if t.is_floating_point():
            t = t.contiguous(memory_format=fmt)
    elif layout == "transposed" and len(spatial) >= 2:
        # same values, the two last spatial dims' strides swapped (neither planar nor channels-last)
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x, t


def _as64(t):
    return t.double() if t.is_floating_point() else t


def tolerances(dtype, m):
    """(rtol, atol) of the Dice rows and of the pixel rows for sums of m pixels (module docstring)."""
    if dtype == torch.float64:
        return (1e-12, 1e-15 * m + 1e-14), (1e-12, 1e-15 * m + 1e-14)
    return (1e-5, 3e-6 * m + 1e-6), (2e-5, 4e-6 * m + 1e-6)


def assert_stats_close(got, ref, dtype, m):
    (r1, a1), (r2, a2) = tolerances(dtype, m)
    assert got.shape == ref.shape and got.dtype == reference.acc_dtype(dtype)
    torch.testing.assert_close(got[:, :3].double(), ref[:, :3], rtol=r1, atol=a1, equal_nan=True)
    torch.testing.assert_close(got[:, 3:].double(), ref[:, 3:], rtol=r2, atol=a2, equal_nan=True)


def check(backend, x, t, activation, power, ignore_index, pixel_loss, gamma, nan_grad=False, seed=0):
    """Forward (5 rows) and backward of ``backend`` against the float64 reference on the same values."""
    m = max(1, x[0, 0].numel())
    xk = x.detach().clone().requires_grad_()
    xr = x.detach().double().requires_grad_()
    got = ops.dice_stats(xk, t, activation, power, ignore_index, backend, pixel_loss, gamma)
    ref = ops.dice_stats(xr, _as64(t), activation, power, ignore_index, "reference", pixel_loss, gamma)
    assert got.shape == (x.shape[0], 5, x.shape[1])
    assert_stats_close(got, ref, x.dtype, m)

    gen = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(got.dtype)
    if nan_grad:  # NaN in one entry of the last image: it spreads through that image only
        grad[-1, int(torch.randint(0, 5, (1,), generator=gen)), int(torch.randint(0, x.shape[1], (1,), generator=gen))] = float("nan")
    (got * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    gk, gr = xk.grad, xr.grad
    assert gk.dtype == x.dtype and gk.shape == x.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else
                                            torch.channels_last_3d if x.dim() == 5 else torch.contiguous_format):
        # the gradient keeps the input's layout (strides of size-1 dims are arbitrary)
        assert all(a == b for a, b, n in zip(gk.stride(), x.stride(), x.shape) if n > 1)
    finite = gr[torch.isfinite(gr)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(gk.double(), gr, rtol=0, atol=4 * ROUNDING[x.dtype] * scale + 1e-12, equal_nan=True)
    if nan_grad and x.shape[0] > 1:
        assert bool(torch.isfinite(gk[:-1]).all())
    if ignore_index is not None:
        ignored = (t.long() == ignore_index).unsqueeze(1).expand_as(x)
        assert bool((gk[ignored] == 0).all())  # exactly 0, even where grad holds NaN
    return got


# ------------------------------------------------------------------------------------------------
# the matrix: every dtype x activation x pixel loss, the other axes spread over the cases
# ------------------------------------------------------------------------------------------------
def _cases():
    cases = []
    core = list(itertools.product(DTYPES, ("softmax", "sigmoid"), ("ce", "focal")))
    for i, (dtype, activation, pixel_loss) in enumerate(core * 3):
        j = i * 7 + i // len(core)  # strides coprime with the axis lengths: the axes vary independently
        c = CHANNELS[j % len(CHANNELS)]
        if c == 1 and activation == "softmax":
            c = 3  # one channel: sigmoid only
        kind, ignore_index = TARGETS[j % len(TARGETS)]
        spatial = SPATIAL[(j // 2) % len(SPATIAL)]
        layout = LAYOUTS[(j // 3) % len(LAYOUTS)]
        if layout != "contiguous" and len(spatial) < 2:
            spatial = (6, 5)
        gamma = GAMMAS[(j // 5 + i) % len(GAMMAS)]
        power = 1 + (j // 4) % 2
        nan_grad = i % 3 == 2  # once per (dtype, activation, pixel loss)
        cases.append(pytest.param(dtype, activation, pixel_loss, gamma, kind, ignore_index, layout, power,
                                  (2, c, spatial), nan_grad,
                                  id=f"{str(dtype)[6:]}-{activation}-{pixel_loss}-g{gamma}-{kind}-ign{ignore_index}-"
                                     f"{layout}-q{power}-C{c}-{'x'.join(map(str, spatial)) or 'M1'}"
                                     + ("-nangrad" if nan_grad else "")))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,activation,pixel_loss,gamma,kind,ignore_index,layout,power,shape,nan_grad", _cases())
def test_matches_reference(backend, dtype, activation, pixel_loss, gamma, kind, ignore_index, layout, power, shape,
                           nan_grad):
    n, c, spatial = shape
    x, t = make(n, c, spatial, kind, dtype, ignore_index, layout)
    check(backend, x, t, activation, power, ignore_index, pixel_loss, gamma, nan_grad=nan_grad)


# The cpu kernel has one copy per channel count for float32 label targets with C <= 8 (tiles held in
# registers) and a general copy; C = 9 is the general copy's smallest, and from C = 129 its softmax
# cross-entropy leaves the running log products for a log per pixel.  Each (activation, pixel loss)
# meets a tail vector, channels-last or transposed input (the staged paths), or several pixel chunks.
# (The power of case i is 1 + i % 2.)
CHANNEL_COUNT_CASES = [("softmax", "ce", 0.0, "labels", None, "contiguous", (5, 13)),
                       ("softmax", "focal", 2.0, "labels_u8", 2, "channels_last", (3, 4, 7)),
                       ("sigmoid", "ce", 0.0, "labels_i32", -1, "contiguous", (4101,)),
                       ("sigmoid", "focal", 0.5, "labels", 255, "transposed", (6, 5)),
                       # the softmax cross-entropy's own fixed-C loop over many vectors, ignored pixels, q = 1, 2
                       ("softmax", "ce", 0.0, "labels", 0, "contiguous", (37, 5)),
                       ("softmax", "ce", 0.0, "labels_i32", -1, "contiguous", (37, 5))]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu kernel's channel-count copies")
@pytest.mark.parametrize("c", [*range(1, 10), 128, 129])
def test_every_channel_count(c):
    for i, (activation, pixel_loss, gamma, kind, ignore_index, layout, spatial) in enumerate(CHANNEL_COUNT_CASES):
        if c == 1 and activation == "softmax":
            continue  # one channel: sigmoid only
        x, t = make(2, c, spatial, kind, torch.float32, ignore_index, layout, seed=c)
        check("cpu", x, t, activation, 1 + i % 2, ignore_index, pixel_loss, gamma, seed=c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("activation,kind", [("softmax", "labels"), ("sigmoid", "labels"), ("sigmoid", "onehot"),
                                             ("sigmoid", "soft"), ("softmax", "soft")])
def test_gammas(backend, gamma, activation, kind):
    """Every gamma on every code path (products, products and a sqrt, pow); binary and soft targets."""
    x, t = make(2, 4, (11, 13), kind, torch.float32, 2 if kind == "labels" else None)
    check(backend, x, t, activation, 2, 2 if kind == "labels" else None, "focal", gamma)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("c", [3, 21])  # the cpu kernel's fixed-C and general copies
def test_large_image_chunks(backend, activation, c):
    """More pixels than one CPU chunk (4096): partial sums of 5 rows reduced in a fixed order."""
    x, t = make(2, c, (70, 71), "labels", torch.float32, 0)
    check(backend, x, t, activation, 1, 0, "focal", 2.0)
    check(backend, x, t, activation, 2, 0, "ce", 2.0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu kernel's running products of s")
@pytest.mark.parametrize("c", [2, 3, 4, 5, 8, 9, 21, 128])
def test_log_products_at_their_bound(c):
    """Equal logits: s = C at every pixel, the largest factor the cpu kernel's running products of
    the softmax sums take (C^n between two logs, n = 120 // ceil(log2 C)).  Over a whole chunk of
    many vectors X_k and L_k are count * log C; an overflowing product would make them inf (with
    n = 140 // ceil(log2 C) this fails for C = 2, 4, 8 and 128, where C^n reaches 2^140)."""
    x = torch.zeros(2, c, 64, 64)
    # each lane of a vector keeps its class (vectors of 8 or 16 pixels start at multiples of 16
    # here), so the class products take a factor at every vector too; column 5 is ignored, outside
    # every product
    lab = (torch.arange(64) % 16 % c).expand(2, 64, 64).clone()
    lab[..., 5] = 255
    got = ops.dice_stats(x, lab, "softmax", 1, 255, "cpu", "ce", 2.0)
    ref = ops.dice_stats(x.double(), lab, "softmax", 1, 255, "reference", "ce", 2.0)
    counts = torch.stack([(lab == k).sum((1, 2)) for k in range(c)], 1).double()
    counted = (lab != 255).sum((1, 2)).double()
    log_c = torch.log(torch.tensor(float(c), dtype=torch.float64))
    torch.testing.assert_close(ref[:, 3], counts * log_c)
    assert_stats_close(got, ref, torch.float32, 64 * 64)
    torch.testing.assert_close(got[:, 4].double(), counted[:, None].expand(2, c) * log_c, rtol=2e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# properties of the fused pass
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation,kind", [("softmax", "labels"), ("sigmoid", "onehot"), ("sigmoid", "soft")])
def test_dice_rows_unchanged_and_focal_zero_is_ce(backend, dtype, activation, kind):
    """The Dice rows come from the same p with or without pixel rows (equal up to the compiler's
    choice of fused multiply-adds in the sums: an ulp), and the focal term with gamma = 0 is the
    cross-entropy term."""
    x, t = make(2, 5, (13, 9), kind, dtype, 3 if kind == "labels" else None)
    ign = 3 if kind == "labels" else None
    dice = ops.dice_stats(x, t, activation, 2, ign, backend)
    ce = ops.dice_stats(x, t, activation, 2, ign, backend, "ce")
    focal0 = ops.dice_stats(x, t, activation, 2, ign, backend, "focal", 0.0)
    ulp = torch.finfo(dice.dtype).eps
    torch.testing.assert_close(ce[:, :3], dice, rtol=4 * ulp, atol=0)
    torch.testing.assert_close(focal0[:, :3], dice, rtol=4 * ulp, atol=0)
    torch.testing.assert_close(focal0, ce, rtol=8 * ulp, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pixel_loss,gamma", [("ce", 2.0), ("focal", 0.0), ("focal", 0.5), ("focal", 1.0),
                                              ("focal", 1.3), ("focal", 2.0), ("focal", 3.5)])
def test_confident_and_masked_channels_stay_finite(backend, dtype, pixel_loss, gamma):
    """Softmax: logit gaps of 40 (p rounds to 1 in fp32) and leading channels masked with -inf.

    A masked channel has p = 0: its Dice rows are 0, X = 0 (no pixel is of that class: t log p -> 0),
    L = +inf (-log 0, the true value), and every gradient is finite (gamma p log p -> 0 at p -> 0 and
    the focal slope -> 0 at p -> 1, also for gamma < 1).  The other channels equal the problem without
    the masked ones.  (Where the masked channels' L gets gradient, L is infinite anyway: gL is 0 here.)
    """
    n, c, mask = 2, 5, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c, 8, 9, generator=g, dtype=torch.float64)
    winner = torch.randint(mask, c, (n, 8, 9), generator=g)
    x = x + 40.0 * torch.nn.functional.one_hot(winner, c).permute(0, 3, 1, 2)  # gap of ~40
    x[:, :mask] = NEG_INF
    labels = torch.randint(mask, c, (n, 8, 9), generator=g)
    labels[:, 0] = winner[:, 0]  # some pixels right, most wrong with p ~ e^-40
    x = x.to(dtype)
    xk = x.clone().requires_grad_()
    got = ops.dice_stats(xk, labels, "softmax", 1, None, backend, pixel_loss, gamma)
    assert bool(torch.isfinite(got[:, :4]).all()) and bool(torch.isfinite(got[:, 4, mask:]).all())
    assert bool((got[:, :4, :mask] == 0).all()) and bool((got[:, 4, :mask] == float("inf")).all())
    x_rest = x[:, mask:].double().requires_grad_()
    ref = ops.dice_stats(x_rest, labels - mask, "softmax", 1, None, "reference", pixel_loss, gamma)
    assert_stats_close(got[:, :, mask:], ref, dtype, 72)
    grad = torch.randn(n, 5, c, generator=g, dtype=torch.float64)
    grad[:, 4, :mask] = 0.0
    (got * grad.to(got.dtype)).sum().backward()
    (ref * grad[:, :, mask:]).sum().backward()
    assert bool(torch.isfinite(xk.grad).all())
    assert bool((xk.grad[:, :mask] == 0).all())
    scale = float(x_rest.grad.abs().max())
    torch.testing.assert_close(xk.grad[:, mask:].double(), x_rest.grad, rtol=0, atol=4 * ROUNDING[dtype] * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pixel_loss,gamma", [("ce", 2.0), ("focal", 0.5), ("focal", 1.3), ("focal", 2.0),
                                              ("focal", 3.5)])
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_sigmoid_confident_logits(backend, dtype, pixel_loss, gamma, kind):
    """Sigmoid logits of +-40 (p rounds to 0 / 1 in fp32) and beyond: softplus without overflow."""
    x, t = make(2, 3, (7, 6), kind, dtype, scale=1.0)
    x = x + torch.tensor([-40.0, 40.0, 90.0], dtype=dtype).view(1, 3, 1, 1)
    got = check(backend, x, t, "sigmoid", 1, None, pixel_loss, gamma)
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,kind", [("softmax", "labels"), ("softmax", "soft"), ("sigmoid", "labels"),
                                             ("sigmoid", "soft")])
@pytest.mark.parametrize("pixel_loss", ["ce", "focal"])
def test_nan_input_propagates(backend, activation, kind, pixel_loss):
    """NaN in -> NaN out where the reference has it; ignored pixels holding NaN change nothing."""
    x, t = make(2, 3, (5, 6), kind, torch.float32, 1 if kind == "labels" else None)
    x[0, 1, 2, 3] = float("nan")
    if kind == "labels":
        t[0, 2, 3] = 0  # a counted pixel
    got = ops.dice_stats(x, t, activation, 1, 1 if kind == "labels" else None, backend, pixel_loss, 1.5)
    ref = ops.dice_stats(x.double(), _as64(t), activation, 1, 1 if kind == "labels" else None, "reference",
                         pixel_loss, 1.5)
    assert torch.equal(got.isnan(), ref.isnan()) and bool(got[0].isnan().any())
    xk = x.clone().requires_grad_()
    xr = x.double().requires_grad_()
    grad = torch.randn(2, 5, 3, dtype=torch.float64)
    (ops.dice_stats(xk, t, activation, 1, 1 if kind == "labels" else None, backend, pixel_loss, 1.5)
     * grad.float()).sum().backward()
    (ops.dice_stats(xr, _as64(t), activation, 1, 1 if kind == "labels" else None, "reference", pixel_loss, 1.5)
     * grad).sum().backward()
    assert torch.equal(xk.grad.isnan(), xr.grad.isnan())
    if kind == "labels":  # a NaN logit on an ignored pixel is selected away
        x2, t2 = x.clone(), t.clone()
        x2[0, 1, 2, 3] = 3.0
        t2[0, 2, 3] = 1
        base = ops.dice_stats(x2, t2, activation, 1, 1, backend, pixel_loss, 1.5)
        x2[0, :, 2, 3] = float("nan")
        assert torch.equal(ops.dice_stats(x2, t2, activation, 1, 1, backend, pixel_loss, 1.5), base)


# ------------------------------------------------------------------------------------------------
# autograd and the operator contract
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,pixel_loss,gamma,kind,ignore_index,power", [
    ("softmax", "ce", 2.0, "labels", 1, 1),
    ("softmax", "focal", 2.0, "soft", None, 2),
    ("softmax", "focal", 0.5, "labels", None, 1),
    ("softmax", "focal", 1.3, "labels", 2, 2),
    ("softmax", "focal", 3.5, "onehot", None, 2),
    ("sigmoid", "ce", 2.0, "soft", None, 1),
    ("sigmoid", "focal", 2.0, "labels", 0, 2),
    ("sigmoid", "focal", 0.5, "soft", None, 1),
    ("sigmoid", "focal", 0.75, "labels", None, 2),
    ("sigmoid", "focal", 1.0, "onehot", None, 1),
])
def test_gradcheck_float64(backend, activation, pixel_loss, gamma, kind, ignore_index, power):
    x, t = make(2, 3, (3, 4), kind, torch.float64, ignore_index, scale=1.5)
    x.requires_grad_()
    # Triton runs interpreted: the fast mode (random projections of the Jacobian, a few evaluations
    # instead of one per input element) keeps this to seconds
    assert torch.autograd.gradcheck(
        lambda a: ops.dice_stats(a, t, activation, power, ignore_index, backend, pixel_loss, gamma), (x,),
        fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,pixel_loss,kind", [("softmax", "ce", "labels"), ("softmax", "focal", "soft"),
                                                        ("sigmoid", "focal", "labels"), ("sigmoid", "ce", "soft")])
def test_opcheck(backend, activation, pixel_loss, kind):
    x, t = make(2, 3, (4, 5), kind, torch.float32)
    x.requires_grad_()
    torch.library.opcheck(ops.dice_stats_op, (x, t, activation, 1, None, backend, pixel_loss, 1.5))


# ------------------------------------------------------------------------------------------------
# the C++ CPU kernel: determinism, argument checks, the per-ISA copies
# ------------------------------------------------------------------------------------------------
cpu_only = pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU kernel is not built (build with "
                              "`pip install --no-build-isolation -e .`)" if not INTERPRETED else "not interpreted")


@cpu_only
@pytest.mark.parametrize("activation,kind,pixel_loss,gamma", [("softmax", "labels", "ce", 2.0),
                                                              ("softmax", "soft", "focal", 0.5),
                                                              ("sigmoid", "labels", "focal", 2.0),
                                                              ("sigmoid", "soft", "focal", 3.5)])
def test_thread_count_independent(activation, kind, pixel_loss, gamma):
    """Fixed 4096-pixel chunks reduced in chunk order: 1 and 2 threads give identical bits (5 rows)."""
    x, t = make(2, 5, (150, 150), kind, torch.float32, layout="channels_last")  # 6 chunks per image
    xv, tv = ops.canonical(x, t)
    g = torch.randn(2, 5, 5)
    old = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            s = torch.ops.dicetorch.fused_forward(xv, tv, activation, 2, None, pixel_loss, gamma)
            gx = torch.ops.dicetorch.fused_backward(g, xv, tv, activation, 2, None, pixel_loss, gamma)
            out.append((s, gx))
    finally:
        torch.set_num_threads(old)
    assert out[0][0].shape == (2, 5, 5)
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


@cpu_only
@pytest.mark.parametrize("call,match", [
    (lambda x, t, g: torch.ops.dicetorch.fused_forward(x, t, "none", 1, None, "ce", 2.0), "needs activation"),
    (lambda x, t, g: torch.ops.dicetorch.fused_forward(x, t, "argmax", 1, None, "focal", 2.0), "needs activation"),
    (lambda x, t, g: torch.ops.dicetorch.fused_forward(x, t, "softmax", 1, None, "dice", 2.0), "pixel_loss must be"),
    (lambda x, t, g: torch.ops.dicetorch.fused_forward(x, t, "softmax", 1, None, "focal", -1.0), "gamma"),
    (lambda x, t, g: torch.ops.dicetorch.fused_forward(x, t, "softmax", 1, None, "focal", float("nan")), "gamma"),
    (lambda x, t, g: torch.ops.dicetorch.fused_backward(g[:, :3], x, t, "softmax", 1, None, "ce", 2.0),
     r"grad must be \(N, 5, C\)"),
    (lambda x, t, g: torch.ops.dicetorch.fused_backward(g, x, t, "softmax", 1, None), r"grad must be \(N, 3, C\)"),
])
def test_checks(call, match):
    x, t = torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=match):
        call(x, t, torch.randn(2, 5, 3))


@cpu_only
def test_schema_defaults():
    """The pixel arguments default to the three-row operator."""
    x, t = torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4))
    assert torch.equal(torch.ops.dicetorch.fused_forward(x, t, "softmax", 1, None),
                       torch.ops.dicetorch.fused_forward(x, t, "softmax", 1, None, "none", 2.0))
    assert torch.ops.dicetorch.fused_forward(x, t, "softmax", 1, None, "focal").shape == (2, 5, 3)


_ISA_SCRIPT = r"""
import torch
from dicetorch import reference
assert torch.backends.cpu.get_cpu_capability() == "{cap}", torch.backends.cpu.get_cpu_capability()
torch.manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for act, pl, gamma, kind in (("softmax", "ce", 2.0, "labels"), ("softmax", "focal", 0.5, "soft"),
                                 ("sigmoid", "focal", 2.0, "labels"), ("sigmoid", "focal", 3.5, "soft"),
                                 ("sigmoid", "ce", 1.0, "onehot"), ("softmax", "focal", 2.0, "onehot"),
                                 ("softmax", "focal", 1.3, "labels"), ("sigmoid", "focal", 0.7, "onehot")):
        x = 3 * torch.randn(2, 5, 143, dtype=dtype)
        x[:, 0, :9] = float("-inf") if act == "softmax" else -50.0
        lab = torch.randint(1, 6, (2, 143))
        t = lab if kind == "labels" else reference.one_hot(lab, 5, dtype) if kind == "onehot" else \
            torch.rand(2, 5, 143, dtype=dtype)
        t64 = t if kind == "labels" else t.double()
        g = torch.randn(2, 5, 5, dtype=torch.float64)
        g[:, 4, 0] = 0.0
        s = torch.ops.dicetorch.fused_forward(x, t, act, 2, None, pl, gamma).double()
        r = reference.dice_stats_reference(x.double(), t64, act, 2, None, pl, gamma)
        gx = torch.ops.dicetorch.fused_backward(g.to(s.dtype if dtype == torch.float64 else torch.float32), x, t,
                                                act, 2, None, pl, gamma).double()
        gr = reference.dice_stats_backward_reference(g, x.double(), t64, act, 2, None, pl, gamma)
        fin = torch.isfinite(r)
        assert torch.isfinite(gx).all(), (dtype, act, pl)
        worst = max(worst, float(((s - r).abs()[fin] / (1 + r.abs()[fin])).max()),
                    float((gx - gr).abs()[torch.isfinite(gr)].max() / gr.abs()[torch.isfinite(gr)].max()))
print(worst)
"""


@cpu_only
@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2", "AVX512"])
def test_isa_copies(cap):
    """The pixel rows of each per-ISA copy of the kernel (chosen through ATEN_CPU_CAPABILITY)."""
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if best not in order or order.index(cap) > order.index(best):
        pytest.skip(f"this CPU ({best}) cannot run the {cap} copy")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.replace("{cap}", cap)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # stats: fp32 sums of 143 terms; gradients: one bf16 rounding step (2^-8) relative to the largest
    assert float(res.stdout.strip().splitlines()[-1]) < 8e-3
