"""The CUDA kernels, run on the CPU by an emulation of the CUDA features they use.

``csrc/cuda/dice_kernels.cuh`` holds the device code and the launch orchestration of the CUDA
backend; ``tests/cuda_emu/emu_ext.cpp`` compiles that very header with a host compiler against
``tests/cuda_emu/emu_cuda.h`` (blocks of 256 cooperative fibers; __syncthreads and
__shfl_xor_sync must be reached by every thread of the block / warp from the same line; every
global load and store is checked against the bounds and the alignment of the buffers; grid.y is
capped at 2 so that the kernels' image loop runs) and runs forward and backward against the
plain-PyTorch reference: every channel-count regime (one lane per pixel, lanes within a warp, a
pixel over several warps, chunked launches for huge C), dtypes, target kinds, options, layouts,
misaligned and strided views, NaN / -inf / ignored-garbage semantics and persistent-grid sizes;
the compound losses' kernels (pixel-loss rows ce / focal, forward and backward against the float64
reference) and the hard activations (argmax with ties and NaN, threshold; exact counts).

This checks indices, masks, reductions and barriers, not speed or the GPU's own arithmetic (the
emulation's exp is the host's).  Set DICETORCH_SKIP_CUDA_EMULATION=1 to skip (it compiles the
kernels for the host first, about two minutes).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import INTERPRETED
from dicetorch import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    INTERPRETED or os.environ.get("DICETORCH_SKIP_CUDA_EMULATION") == "1" or not sys.platform.startswith("linux"),
    reason="CUDA emulation skipped (interpreter run, DICETORCH_SKIP_CUDA_EMULATION=1, or not Linux)",
)

inf, nan = float("inf"), float("nan")
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension

    build = os.path.join(ROOT, "build", "cuda_emu")
    os.makedirs(build, exist_ok=True)
    return cpp_extension.load(
        "dicetorch_cuda_emu",
        [os.path.join(ROOT, "tests", "cuda_emu", "emu_ext.cpp")],
        extra_cflags=["-O1", "-g0", "-DDICETORCH_MAX_GRID_Y=2"],
        build_directory=build,
        verbose=False,
    )


def make(n, c, spatial, kind, act, dtype, ignore_index=None, channels_last=False, seed=0):
    """(N, C, M) input and target; channels_last: the memory layout of a channels-last image."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    x = torch.rand(shape, generator=g, dtype=F64) if act == "none" else 3 * torch.randn(shape, generator=g, dtype=F64)
    lab = torch.randint(0, c + 1 if c > 1 else 3, (n, *spatial), generator=g)  # includes a no-match label
    if ignore_index is not None:
        lab = torch.where(torch.rand(lab.shape, generator=g) < 0.3, torch.full_like(lab, ignore_index), lab)
    t = {
        "labels": lambda: lab,
        "i32": lambda: lab.int(),
        "u8": lambda: lab.to(torch.uint8),
        "onehot": lambda: R.one_hot(lab.reshape(n, -1), c, dtype).reshape(shape),
        "soft": lambda: torch.rand(shape, generator=g, dtype=F64).to(dtype),
    }[kind]()
    x = x.to(dtype)
    if channels_last:
        fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        if t.is_floating_point():
            t = t.contiguous(memory_format=fmt)
    x = x.reshape(n, c, -1)
    t = t.reshape(n, -1) if not t.is_floating_point() else t.reshape(n, c, -1)
    return x, t


def tolerance(dtype):
    return {F64: 1e-10, F32: 1e-5}.get(dtype, 2e-3)


def check(emu, x, t, act="softmax", power=1, ignore_index=None, resident=5):
    """Emulated forward and backward against the reference: values, NaN patterns, gradient strides."""
    stats = emu.forward(x, t, act, power, ignore_index, resident)
    ref = R.dice_stats_reference(x, t, act, power, ignore_index)
    tol = tolerance(x.dtype)
    assert torch.equal(torch.isnan(stats), torch.isnan(ref)), "NaN patterns differ (forward)"
    torch.testing.assert_close(stats, ref, rtol=tol, atol=tol * max(1, x.shape[2]), equal_nan=True)
    grad = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    gx = emu.backward(grad, x, t, act, power, ignore_index, resident)
    gref = R.dice_stats_backward_reference(grad, x, t, act, power, ignore_index)
    assert torch.equal(torch.isnan(gx), torch.isnan(gref)), "NaN patterns differ (backward)"
    scale = float(gref.double().abs().nan_to_num(posinf=0, neginf=0).max()) + 1e-30
    torch.testing.assert_close(gx.double() / scale, gref.double() / scale, rtol=0, atol=5 * tol, equal_nan=True)
    if torch.empty_like(x).stride() == x.stride():  # dense: the gradient keeps the input's strides
        assert gx.stride() == gref.stride()
    return stats, gx


# ---------------------------------------------------------------------------------------------
# Channel-count regimes x dtypes x layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=str)
@pytest.mark.parametrize("c", [1, 2, 3, 5, 8, 16, 21, 33])
def test_channels(emu, c, dtype, channels_last):
    act = "sigmoid" if c == 1 else "softmax"
    x, t = make(2, c, (5, 7), "labels", act, dtype, channels_last=channels_last, seed=c)
    check(emu, x, t, act, power=2)


@pytest.mark.parametrize(
    "c,dtype,kind,channels_last",
    [
        (300, F32, "labels", False),  # a pixel over two warps
        (300, F32, "labels", True),
        (130, BF16, "soft", False),
        (700, F16, "i32", False),  # the whole block on one pixel group
        (1100, BF16, "labels", False),  # chunked launches (more than 256 lanes x 4 slots)
        (1100, F32, "onehot", False),
        (2100, F32, "labels", True),
        (600, BF16, "soft", True),
        (2100, F64, "u8", False),
    ],
)
@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_many_channels(emu, c, dtype, kind, channels_last, act):
    x, t = make(2, c, (2, 3), kind, act, dtype, channels_last=channels_last, seed=c)
    check(emu, x, t, act, power=2 if kind == "soft" else 1, ignore_index=None)


# ---------------------------------------------------------------------------------------------
# Target kinds and options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("kind", ["labels", "i32", "u8", "onehot", "soft"])
@pytest.mark.parametrize("act", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("power", [1, 2])
def test_options(emu, kind, act, power, channels_last):
    ignore = -1 if kind in ("labels", "i32") else (0 if kind == "u8" else None)
    dtype = BF16 if channels_last else F32
    x, t = make(3, 6, (3, 3, 3) if channels_last else (3, 11), kind, act, dtype, ignore, channels_last)
    check(emu, x, t, act, power, ignore)


@pytest.mark.parametrize("resident", [1, 2, 64])
@pytest.mark.parametrize("n", [1, 7])
def test_grid_sizes(emu, resident, n):
    """Programs per image from 1 to more than the block steps; 7 images over grid.y = 2."""
    x, t = make(n, 4, (17, 9), "labels", "softmax", F32)
    check(emu, x, t, resident=resident)
    x, t = make(n, 4, (17, 9), "labels", "softmax", F16, channels_last=True)
    check(emu, x, t, resident=resident)


# ---------------------------------------------------------------------------------------------
# Semantics: -inf, NaN, ignored pixels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("c", [3, 4, 21, 300, 1100])
def test_special_values(emu, c, dtype, channels_last):
    x, t = make(2, c, (4, 6), "labels", "softmax", dtype, channels_last=channels_last)
    x[0, : c - 1, 3] = -inf  # leading -inf channels: finite
    x[1, :, 5] = -inf
    x[1, c - 1, 5] = 2.0
    stats, gx = check(emu, x, t, power=2)
    assert torch.isfinite(stats).all() and torch.isfinite(gx).all()
    x2 = x.clone()
    x2[0, 1, 7] = nan  # NaN in -> NaN out (image 0 only)
    stats, _ = check(emu, x2, t)
    assert torch.isnan(stats[0]).any() and not torch.isnan(stats[1]).any()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("c", [3, 21, 300])
def test_ignored_garbage(emu, c, channels_last):
    """Garbage at ignored pixels changes no sum, bit for bit; their gradient is exactly 0."""
    x, t = make(2, c, (4, 6), "labels", "softmax", F32, channels_last=channels_last)
    t = t.clone()
    t[:, ::3] = -1
    t[1] = -1  # an image with every pixel ignored
    keep = (t != -1).unsqueeze(1)
    clean = torch.where(keep, x, torch.zeros(()))
    dirty = clean.clone()
    bad = (~keep).expand_as(dirty)
    dirty[bad] = torch.tensor([nan, inf, -inf, 1e30])[torch.arange(int(bad.sum())) % 4]
    s_clean = emu.forward(clean, t, "softmax", 1, -1, 5)
    s_dirty = emu.forward(dirty, t, "softmax", 1, -1, 5)
    assert torch.equal(s_clean, s_dirty)
    assert torch.equal(s_dirty[1], torch.zeros_like(s_dirty[1]))
    nan_grad = torch.full_like(s_dirty, nan)
    gx = emu.backward(nan_grad, dirty, t, "softmax", 1, -1, 5)
    assert torch.all(gx[bad] == 0) and torch.isnan(gx[~bad]).all()


# ---------------------------------------------------------------------------------------------
# Vector paths: what aligned, dense input really takes
# ---------------------------------------------------------------------------------------------
# (dtype, C, channels_last, target kind): contiguous input, and channels-last input whose pixels
# make whole 16-byte groups (C a power of two up to 16, or C * element size a multiple of 16):
# one lane per pixel, lanes within a warp, several warps, chunked launches (pixel_norm_kernel),
# and channels-last pixels packed 2 or 4 to a vector (fp32 C = 2, fp16/bf16 C = 2 and 4).
VECTOR_CASES = [
    (F32, 1, False, "labels"), (F32, 3, False, "labels"), (F32, 8, False, "i32"), (F16, 4, False, "labels"),
    (BF16, 2, False, "soft"), (F64, 4, False, "labels"), (F32, 300, False, "labels"), (BF16, 1100, False, "u8"),
    (F32, 2, True, "labels"), (F32, 4, True, "soft"), (F32, 8, True, "labels"), (F32, 12, True, "labels"),
    (F32, 16, True, "labels"), (F16, 2, True, "labels"), (F16, 4, True, "labels"), (BF16, 4, True, "soft"),
    (F16, 8, True, "labels"), (F16, 16, True, "u8"), (BF16, 24, True, "labels"), (F64, 2, True, "labels"),
    (F64, 4, True, "soft"), (F32, 300, True, "labels"), (F32, 2100, True, "labels"),
]


@pytest.mark.parametrize("dtype,c,channels_last,kind", VECTOR_CASES,
                         ids=[f"{str(d)[6:]}-C{c}-{'cl' if cl else 'nchw'}-{k}" for d, c, cl, k in VECTOR_CASES])
def test_vector_paths(emu, dtype, c, channels_last, kind):
    """Every logits load, float-target load and gradient store is 128 bits wide (M = 128 pixels:
    no tails), and the results are right."""
    act = "sigmoid" if c == 1 else "softmax"
    x, t = make(2, c, (8, 16), kind, act, dtype, channels_last=channels_last, seed=c)
    check(emu, x, t, act, power=2)
    emu.forward(x, t, act, 2, None, 5)
    fwd = {"logits": emu.accesses(x)[0], "target": emu.accesses(t)[0] if t.is_floating_point() else {16: 1}}
    grad = torch.ones(x.shape[0], 3, c, dtype=F64 if dtype == F64 else F32)
    gx = emu.backward(grad, x, t, act, 2, None, 5)
    bwd = {"logits": emu.accesses(x)[0], "gradient": emu.accesses(gx)[1]}
    for what, widths in [*(("forward " + k, v) for k, v in fwd.items()), *(("backward " + k, v) for k, v in bwd.items())]:
        assert widths and set(widths) == {16}, f"{what}: accesses by width in bytes {widths}"


@pytest.mark.parametrize("kind", ["labels", "u8", "soft"])
@pytest.mark.parametrize("dtype,c", [(F16, 2), (F16, 4), (BF16, 4), (F32, 2)], ids=["f16-C2", "f16-C4", "bf16-C4", "f32-C2"])
def test_packed_pixels(emu, dtype, c, kind):
    """Channels-last pixels narrower than 16 bytes, packed 2 or 4 to a vector: a single image whose
    last vector crosses M (scalar tail), and images whose runs stay whole."""
    act = "softmax"
    x, t = make(1, c, (5, 7), kind, act, dtype, ignore_index=None, channels_last=True, seed=c)
    check(emu, x, t, act, power=2)
    loads = emu.accesses(x)[0]
    assert loads.get(16, 0) > 0 and set(loads) == {16, x.element_size()}, loads  # vectors, then the tail
    x, t = make(3, c, (4, 6), kind, act, dtype, channels_last=True, seed=c + 1)
    ignore = 0 if kind == "u8" else None
    check(emu, x, t, act, power=1, ignore_index=ignore)
    assert set(emu.accesses(x)[0]) == {16}


# ---------------------------------------------------------------------------------------------
# Strides and alignment: the scalar fallbacks of the vector paths
# ---------------------------------------------------------------------------------------------
def test_misaligned_and_strided(emu):
    x, t = make(2, 5, (8, 9), "labels", "softmax", F32)
    check(emu, x[:, :, 1:], t[:, 1:])  # one element off 16-byte alignment
    xb, tb = make(2, 5, (8, 9), "labels", "softmax", BF16)
    check(emu, xb[:, :, 3:], tb[:, 3:], power=2, ignore_index=2)
    check(emu, x[:, :, ::2], t[:, ::2], "sigmoid")  # pixel stride 2
    check(emu, x.transpose(0, 2).contiguous().transpose(0, 2), t)  # image stride 1
    check(emu, torch.randn(1, 4, 1).expand(3, 4, 50), torch.randint(0, 4, (3, 50)))  # expanded
    xl, tl = make(2, 8, (6, 7), "labels", "softmax", F32, channels_last=True)
    check(emu, xl[:, :, 1:], tl[:, 1:])  # channels-last, misaligned pixels
    check(emu, xl[:, :6], tl)  # channels-last, pixel stride 8 for 6 channels
    xs, ts = make(2, 6, (5, 7), "soft", "softmax", F16, channels_last=True)
    check(emu, xs, ts.contiguous(), power=2)  # channels-last input, NCHW float target
    check(emu, xs.contiguous(), ts)  # the other way round


def test_no_spatial_dims(emu):
    x, t = make(3, 7, (), "labels", "softmax", F32)
    check(emu, x, t)
    x, t = make(5, 1, (9,), "u8", "sigmoid", F16, ignore_index=0)
    check(emu, x, t, "sigmoid", ignore_index=0)


# ---------------------------------------------------------------------------------------------
# Compound losses: the pixel-loss rows X = sum t e, L = sum e and their gradient
# ---------------------------------------------------------------------------------------------
# Tolerances as tests/test_compound_kernels.py justifies them: the oracle is the float64 reference on
# the same input values, so only the kernel's own fp32 (fp64) rounding is measured: sums of m pixels
# to (rtol, 3e-6 m) for the Dice rows and (2 rtol, 4e-6 m) for the pixel rows (log1p / pow per
# element), the gradient to 4 roundings of the output dtype relative to its largest entry.
ROUNDING = {F32: 2.0**-20, F64: 1e-13, F16: 2.0**-10, BF16: 2.0**-7}


def compound_tolerances(dtype, m):
    if dtype == F64:
        return (1e-12, 1e-15 * m + 1e-14), (1e-12, 1e-15 * m + 1e-14)
    return (1e-5, 3e-6 * m + 1e-6), (2e-5, 4e-6 * m + 1e-6)


def _as64(t):
    return t.double() if t.is_floating_point() else t


def check_compound(emu, x, t, act, pixel_loss, gamma, power=1, ignore_index=None, resident=5, grad=None):
    """Emulated forward (5 rows) and backward against the float64 reference on the same values."""
    m = x.shape[2]
    stats = emu.forward(x, t, act, power, ignore_index, resident, pixel_loss, gamma)
    ref = R.dice_stats_reference(x.double(), _as64(t), act, power, ignore_index, pixel_loss, gamma)
    assert stats.shape == ref.shape == (x.shape[0], 5, x.shape[1])
    assert stats.dtype == (F64 if x.dtype == F64 else F32)
    assert torch.equal(stats.isnan(), ref.isnan()), "NaN patterns differ (forward)"
    (r1, a1), (r2, a2) = compound_tolerances(x.dtype, m)
    torch.testing.assert_close(stats[:, :3].double(), ref[:, :3], rtol=r1, atol=a1, equal_nan=True)
    torch.testing.assert_close(stats[:, 3:].double(), ref[:, 3:], rtol=r2, atol=a2, equal_nan=True)
    if grad is None:
        grad = torch.randn(ref.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    gx = emu.backward(grad.to(stats.dtype).contiguous(), x, t, act, power, ignore_index, resident, pixel_loss, gamma)
    gref = R.dice_stats_backward_reference(grad.to(stats.dtype).double(), x.double(), _as64(t), act, power,
                                           ignore_index, pixel_loss, gamma)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    assert torch.equal(gx.isnan(), gref.isnan()), "NaN patterns differ (backward)"
    finite = gref[torch.isfinite(gref)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(gx.double(), gref, rtol=0, atol=4 * ROUNDING[x.dtype] * scale + 1e-12, equal_nan=True)
    if torch.empty_like(x).stride() == x.stride():  # dense: the gradient keeps the input's strides
        assert gx.stride() == torch.empty_like(x).stride()
    if ignore_index is not None:
        ignored = (t.long() == ignore_index).unsqueeze(1).expand_as(x)
        assert bool((gx[ignored] == 0).all())
    return stats, gx


def _compound_cases():
    """C in {1, 3, 21, 300, 1100} x layout x activation, the other axes rotating: dtype (fp32, bf16,
    fp64), target kind (labels with and without ignore_index, one-hot, soft), pixel loss and gamma."""
    dtypes = (F32, BF16, F64, F32, BF16)
    targets = (("labels", -1), ("soft", None), ("labels", None), ("onehot", None), ("i32", 2), ("u8", 0))
    losses = (("ce", 2.0), ("focal", 2.0), ("focal", 0.5), ("focal", 1.3), ("focal", 0.0))
    cases, i = [], 0
    for c in (1, 3, 21, 300, 1100):
        for cl in (False, True):
            for act in ("softmax", "sigmoid"):
                if c == 1 and (act == "softmax" or cl) or (c == 1100 and cl and act == "sigmoid"):
                    continue  # (sigmoid needs no normaliser pass: one chunked sigmoid case is enough)
                dtype = dtypes[i % len(dtypes)]
                kind, ign = targets[i % len(targets)]
                pixel_loss, gamma = losses[(i // 2) % len(losses)]
                power = 1 + i % 2
                cases.append(pytest.param(c, cl, act, dtype, kind, ign, pixel_loss, gamma, power,
                                          id=f"C{c}-{'cl' if cl else 'nchw'}-{act}-{str(dtype)[6:]}-{kind}-ign{ign}-"
                                             f"{pixel_loss}{gamma:g}-q{power}"))
                i += 1
    return cases


@pytest.mark.parametrize("c,channels_last,act,dtype,kind,ignore_index,pixel_loss,gamma,power", _compound_cases())
def test_compound_channels(emu, c, channels_last, act, dtype, kind, ignore_index, pixel_loss, gamma, power):
    """Every channel-count regime (one lane, lanes within a warp, a pixel over several warps, chunked
    launches with pixel_norm_kernel) of the pixel-loss kernels, NCHW and channels-last."""
    spatial = (5, 7) if c <= 21 else (2, 3)
    x, t = make(2, c, spatial, kind, act, dtype, ignore_index, channels_last, seed=c)
    if c > 1 and channels_last:
        assert emu.plan(x, t, 1)[0]
    check_compound(emu, x, t, act, pixel_loss, gamma, power, ignore_index)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 1.3, 2.0, 3.5])
@pytest.mark.parametrize("act,kind", [("softmax", "labels"), ("softmax", "soft"), ("sigmoid", "labels"),
                                      ("sigmoid", "onehot"), ("sigmoid", "soft")])
def test_compound_gammas(emu, gamma, act, kind):
    """Every focal exponent path (products, products and a sqrt, pow) with binary and soft targets."""
    ign = 2 if kind == "labels" else None
    x, t = make(2, 4, (6, 7), kind, act, F32, ign, seed=int(10 * gamma))
    check_compound(emu, x, t, act, "focal", gamma, 2, ign)


@pytest.mark.parametrize("dtype", [F32, F16, F64], ids=str)
def test_compound_ce_dtypes(emu, dtype):
    x, t = make(2, 5, (4, 9), "labels", "softmax", dtype, 1, channels_last=True)
    check_compound(emu, x, t, "softmax", "ce", 2.0, 2, 1)
    x, t = make(2, 5, (4, 9), "soft", "sigmoid", dtype)
    check_compound(emu, x, t, "sigmoid", "ce", 2.0, 1)


def test_compound_slots_and_dice_rows(emu):
    """The pixel-loss kernels hold at most 16 values a tile (two more accumulators a slot, and the
    softmax's exps next to the logits): NCHW 2 slots, channels-last 4; their Dice rows equal the Dice
    kernels' (to the fused multiply-adds of the sums), and focal with gamma = 0 is the cross-entropy."""
    for c, cl, dtype, slots in ((2, True, F32, 4), (8, True, F16, 4), (8, False, F32, 2), (32, False, BF16, 2),
                                (300, True, F32, 4), (1100, False, F32, 2), (5, False, F64, 4)):
        x, t = make(1, c, (4, 4), "labels", "softmax", dtype, channels_last=cl)
        assert emu.plan(x, t, 1)[2] == slots, (c, cl, dtype)
    x, t = make(2, 8, (8, 16), "labels", "softmax", F32, 3, channels_last=True)
    for act in ("softmax", "sigmoid"):
        dice = emu.forward(x, t, act, 2, 3, 5)
        ce = emu.forward(x, t, act, 2, 3, 5, "ce", 2.0)
        focal0 = emu.forward(x, t, act, 2, 3, 5, "focal", 0.0)
        ulp = torch.finfo(F32).eps
        torch.testing.assert_close(ce[:, :3], dice, rtol=4 * ulp, atol=0)
        torch.testing.assert_close(focal0, ce, rtol=8 * ulp, atol=0)


@pytest.mark.parametrize("c,channels_last,pixel_loss,gamma", [
    *((5, cl, loss, gamma) for cl in (False, True) for loss, gamma in (("ce", 2.0), ("focal", 0.5), ("focal", 1.3),
                                                                       ("focal", 2.0))),
    (300, False, "focal", 0.5), (300, True, "ce", 2.0), (1100, False, "focal", 1.3)])
def test_compound_confident_and_masked(emu, c, channels_last, pixel_loss, gamma):
    """tests/test_compound_kernels.py::test_confident_and_masked_channels_stay_finite on the CUDA
    kernels: logit gaps of 40 (p rounds to 1) and leading channels masked with -inf give X = 0 and
    L = +inf on the masked channels, finite everywhere else, and finite gradients (0 on the masked
    channels); the other channels equal the problem without the masked ones."""
    mask, n = 2, 2
    g = torch.Generator().manual_seed(3)
    spatial = (8, 9) if c < 100 else (2, 3)
    m = spatial[0] * spatial[1]
    x = torch.randn(n, c, *spatial, generator=g, dtype=F64)
    winner = torch.randint(mask, c, (n, *spatial), generator=g)
    x = x + 40.0 * torch.nn.functional.one_hot(winner, c).movedim(-1, 1)
    x[:, :mask] = -inf
    labels = torch.randint(mask, c, (n, *spatial), generator=g)
    labels.view(n, -1)[:, ::3] = winner.view(n, -1)[:, ::3]  # some pixels right, most wrong with p ~ e^-40
    x = x.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, t = x.reshape(n, c, m), labels.reshape(n, m)
    got = emu.forward(x, t, "softmax", 1, None, 5, pixel_loss, gamma)
    assert bool(torch.isfinite(got[:, :4]).all()) and bool(torch.isfinite(got[:, 4, mask:]).all())
    assert bool((got[:, :4, :mask] == 0).all()) and bool((got[:, 4, :mask] == inf).all())
    xr = x[:, mask:].double()
    ref = R.dice_stats_reference(xr, t - mask, "softmax", 1, None, pixel_loss, gamma)
    (r1, a1), (r2, a2) = compound_tolerances(F32, m)
    torch.testing.assert_close(got[:, :3, mask:].double(), ref[:, :3], rtol=r1, atol=a1)
    torch.testing.assert_close(got[:, 3:, mask:].double(), ref[:, 3:], rtol=r2, atol=a2)
    grad = torch.randn(n, 5, c, generator=g, dtype=F64)
    grad[:, 4, :mask] = 0.0
    gx = emu.backward(grad.float(), x, t, "softmax", 1, None, 5, pixel_loss, gamma)
    gref = R.dice_stats_backward_reference(grad[:, :, mask:], xr, t - mask, "softmax", 1, None, pixel_loss, gamma)
    assert bool(torch.isfinite(gx).all()) and bool((gx[:, :mask] == 0).all())
    scale = float(gref.abs().max())
    torch.testing.assert_close(gx[:, mask:].double(), gref, rtol=0, atol=4 * ROUNDING[F32] * scale)


@pytest.mark.parametrize("c,act,kind", [(3, "softmax", "labels"), (300, "softmax", "labels"), (3, "sigmoid", "labels"),
                                        (21, "sigmoid", "labels"), (3, "sigmoid", "soft")])
def test_compound_nan_and_ignored(emu, c, act, kind):
    """NaN in -> NaN out where the reference has it (forward and backward); NaN, inf and garbage at
    ignored pixels change no row, bit for bit, and get exactly 0 gradient."""
    ign = 1 if kind == "labels" else None
    x, t = make(2, c, (4, 6) if c < 100 else (2, 5), kind, act, F32, ign, seed=c)
    x[0, 1, 7] = nan
    if kind == "labels":
        t[0, 7] = 0  # a counted pixel
    check_compound(emu, x, t, act, "focal", 1.5, 1, ign)
    if kind == "labels":
        t = t.clone()
        t[:, ::3] = ign
        keep = (t != ign).unsqueeze(1)
        clean = torch.where(keep, x, torch.zeros(()))
        dirty = clean.clone()
        bad = (~keep).expand_as(dirty)
        dirty[bad] = torch.tensor([nan, inf, -inf, 1e30])[torch.arange(int(bad.sum())) % 4]
        for pixel_loss in ("ce", "focal"):
            s_clean = emu.forward(clean, t, act, 1, ign, 5, pixel_loss, 1.3)
            s_dirty = emu.forward(dirty, t, act, 1, ign, 5, pixel_loss, 1.3)
            assert torch.equal(s_clean.nan_to_num(7.0), s_dirty.nan_to_num(7.0))
            gx = emu.backward(torch.full_like(s_dirty, nan), dirty, t, act, 1, ign, 5, pixel_loss, 1.3)
            assert torch.all(gx[bad] == 0) and torch.isnan(gx[~bad]).all()


@pytest.mark.parametrize("resident", [1, 64])
def test_compound_grid_sizes(emu, resident):
    x, t = make(7, 4, (17, 9), "labels", "softmax", F32, -1)
    check_compound(emu, x, t, "softmax", "focal", 2.0, 1, -1, resident=resident)
    x, t = make(3, 4, (17, 9), "soft", "sigmoid", F16, channels_last=True)
    check_compound(emu, x, t, "sigmoid", "ce", 2.0, 2, resident=resident)


COMPOUND_VECTOR_CASES = [(F32, 3, False, "labels"), (F32, 8, True, "labels"), (BF16, 4, True, "soft"),
                         (F16, 4, True, "labels"), (F32, 300, False, "labels"), (F64, 4, True, "labels")]


@pytest.mark.parametrize("dtype,c,channels_last,kind", COMPOUND_VECTOR_CASES,
                         ids=[f"{str(d)[6:]}-C{c}-{'cl' if cl else 'nchw'}-{k}" for d, c, cl, k in COMPOUND_VECTOR_CASES])
def test_compound_vector_paths(emu, dtype, c, channels_last, kind):
    """The pixel-loss kernels keep 128-bit logits and float-target loads and gradient stores."""
    x, t = make(2, c, (8, 16), kind, "softmax", dtype, channels_last=channels_last, seed=c)
    emu.forward(x, t, "softmax", 2, None, 5, "focal", 2.0)
    fwd = {"logits": emu.accesses(x)[0], "target": emu.accesses(t)[0] if t.is_floating_point() else {16: 1}}
    grad = torch.ones(x.shape[0], 5, c, dtype=F64 if dtype == F64 else F32)
    gx = emu.backward(grad, x, t, "softmax", 2, None, 5, "focal", 2.0)
    bwd = {"logits": emu.accesses(x)[0], "gradient": emu.accesses(gx)[1]}
    for what, widths in [*(("forward " + k, v) for k, v in fwd.items()), *(("backward " + k, v) for k, v in bwd.items())]:
        assert widths and set(widths) == {16}, f"{what}: accesses by width in bytes {widths}"


# ---------------------------------------------------------------------------------------------
# Hard activations (forward only): argmax and threshold
# ---------------------------------------------------------------------------------------------
def hard_input(n, c, spatial, dtype, channels_last, seed=0):
    """Logits with many ties (small integers), NaN pixels (one and several NaN channels), all -inf
    and all +inf pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, c, *spatial), generator=g).to(F64)
    flat = x.view(n, c, -1)
    m = flat.shape[2]
    flat[0, :, 0] = -inf
    flat[0, :, 1 % m] = inf
    if c > 1:
        flat[0, c - 1, 2 % m] = nan
        flat[-1, c // 2, 3 % m] = nan
        flat[-1, c - 1, 3 % m] = nan
        flat[-1, 0, 4 % m] = nan
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.reshape(n, c, -1)


HARD_CASES = [(1, F32, False), (2, F16, False), (2, F16, True), (3, F32, False), (3, F32, True), (4, BF16, True),
              (8, F32, False), (8, F32, True), (21, BF16, False), (21, BF16, True), (33, F32, True), (5, F64, False),
              (5, F64, True), (300, F32, False), (300, BF16, True), (1100, BF16, False), (2100, F32, True)]


@pytest.mark.parametrize("c,dtype,channels_last", HARD_CASES,
                         ids=[f"C{c}-{str(d)[6:]}-{'cl' if cl else 'nchw'}" for c, d, cl in HARD_CASES])
@pytest.mark.parametrize("act", ["argmax", "threshold"])
def test_hard_activations(emu, act, c, dtype, channels_last):
    """The hard activations against the reference, exactly (the sums are counts): torch.argmax's ties
    (lowest channel), NaN (the first NaN channel wins), all -inf / +inf pixels (channel 0); threshold
    x > 0 (NaN: 0).  Every channel regime, chunked launches included (argmax_kernel)."""
    spatial = (2, 3) if c >= 300 else (5, 7)
    if c == 2100 and act == "threshold":
        pytest.skip("threshold needs no argmax pass: chunked launches are covered at C = 1100")
    x = hard_input(2, c, spatial, dtype, channels_last, seed=c)
    lab = torch.randint(0, c + 1 if c > 1 else 3, (2, x.shape[2]), generator=torch.Generator().manual_seed(c))
    targets = ((lab, None), (lab.to(torch.uint8), 0), (R.one_hot(lab, c, dtype), None))
    for t, ign in targets[:1] if c >= 300 else targets:
        stats = emu.forward(x, t, act, 1, ign, 5, "none", 2.0)
        ref = R.dice_stats_reference(x, t, act, 1, ign)
        assert stats.shape == ref.shape and torch.equal(stats, ref.to(stats.dtype)), (stats - ref).abs().max()
    if c < 300:
        stats = emu.forward(x, lab, act, 2, -1, 3)  # the default pixel-loss arguments
        assert torch.equal(stats, R.dice_stats_reference(x, lab, act, 2, -1).to(stats.dtype))


def test_hard_soft_targets_and_vectors(emu):
    """Soft targets (sums of products: to summation rounding) and the 128-bit paths."""
    x, t = make(2, 8, (8, 16), "soft", "softmax", F32, channels_last=True)
    for act in ("argmax", "threshold"):
        stats = emu.forward(x, t, act, 2, None, 5)
        torch.testing.assert_close(stats.double(), R.dice_stats_reference(x.double(), t.double(), act, 2, None),
                                   rtol=1e-5, atol=1e-4)
        assert set(emu.accesses(x)[0]) == {16} and set(emu.accesses(t)[0]) == {16}
    x, t = make(2, 3, (8, 16), "labels", "softmax", BF16)
    emu.forward(x, t, "argmax", 1, None, 5)
    assert set(emu.accesses(x)[0]) == {16}


def test_hard_has_no_backward(emu):
    x, t = make(1, 3, (4,), "labels", "softmax", F32)
    with pytest.raises(RuntimeError, match="no backward"):
        emu.backward(torch.zeros(1, 3, 3), x, t, "argmax", 1, None, 5)
