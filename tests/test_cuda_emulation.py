"""The CUDA kernels, run on the CPU by an emulation of the CUDA features they use.

``csrc/cuda/dice_kernels.cuh`` holds the device code and the launch orchestration of the CUDA
backend; ``tests/cuda_emu/emu_ext.cpp`` compiles that very header with a host compiler against
``tests/cuda_emu/emu_cuda.h`` (blocks of 256 cooperative fibers; __syncthreads and
__shfl_xor_sync must be reached by every thread of the block / warp from the same line; every
global load and store is checked against the bounds and the alignment of the buffers; grid.y is
capped at 2 so that the kernels' image loop runs) and runs forward and backward against the
plain-PyTorch reference: every channel-count regime (one lane per pixel, lanes within a warp, a
pixel over several warps, chunked launches for huge C), dtypes, target kinds, options, layouts,
misaligned and strided views, NaN / -inf / ignored-garbage semantics and persistent-grid sizes.

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
