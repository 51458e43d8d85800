"""The GPU tier: the fused ``triton`` and ``cuda`` backends on CUDA tensors.

Every test here needs a CUDA device and is skipped, with the reason, without one (the CI machines
have none); ``bash benchmarks/gpu_check.sh`` runs this file and then the GPU benchmark.  Two
tests at the end exercise ``benchmarks/bench_gpu.py`` on the CPU, so that its code runs in CI too.

* equivalence with the ``reference`` backend on the same GPU: every (C, dtype, activation) once,
  with target kind (labels int64/int32/uint8, one-hot, soft), q, ignore_index, 0-3 spatial dims and
  layout (contiguous, channels-last, transposed, sliced) rotating so that every pair of values of
  two factors meets;
* bitwise determinism run to run; ``torch.compile(fullgraph=True)`` of ``DiceLoss``; capture of
  forward + backward in a CUDA graph and replay on new data; no host synchronization in an eager
  forward + backward (``torch.cuda.set_sync_debug_mode("error")``); peak memory above the inputs no
  more than the gradient plus O(N*C); inputs past 2**31 elements (64-bit offsets).

Tolerances.  Both sides compute from the same input values in fp32 (fp64 for fp64 input), so only
the summation order and the exp/division rounding differ.  Triton's fp32 exp is ``ex2.approx`` of
x*log2(e) and its division ``div.full``; the CUDA kernels are built with ``--use_fast_math``
(``__expf``, approximate reciprocal).  The argument rounding of x*log2(e) gives a relative error of
about |x| * 2**-24 in p (~1e-6 for the |x| <= 16 used here), so:

* stats: relative 1e-5 (fp64: 1e-12), plus an absolute 1e-6 (fp64: 1e-13) per summed pixel;
* gradient: relative 1e-5 (fp32; fp64 1e-12) or one unit in the last place of the output dtype
  (fp16 2**-10, bf16 2**-7: a gradient computed in fp32 may round to the neighbouring value), plus
  an absolute 2e-6 (fp64: 1e-13) times the largest gradient element, for elements where
  p * (g - sum_j p_j g_j) cancels.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

import dicetorch as dt
from dicetorch import ops
from dicetorch import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False); on a GPU machine run `bash benchmarks/gpu_check.sh`"
needs_gpu = pytest.mark.skipif(not CUDA, reason=NO_GPU)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STATS_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}
STATS_ATOL_PER_PIXEL = {torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6, torch.float64: 1e-13}
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 1e-12}
GRAD_ATOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6, torch.float64: 1e-13}


@pytest.fixture(params=("triton", "cuda"))
def backend(request):
    if not CUDA:
        pytest.skip(NO_GPU)
    avail = ops.available_backends("cuda")
    if request.param not in avail:
        pytest.skip(f"backend {request.param!r} is not available on CUDA tensors here (available: {avail})")
    return request.param


def assert_close_stats(a, b, dtype, pixels):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=STATS_RTOL[dtype], atol=STATS_ATOL_PER_PIXEL[dtype] * max(1, pixels))


def assert_close_grad(a, b, dtype, upstream=None):
    """``upstream``: the weights w of the stats in the loss sum(stats * w), for the cancellation bound."""
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    scale = float(b.abs().max().double()) if b.numel() else 0.0
    atol = GRAD_ATOL[dtype] * scale + 1e-30
    if upstream is not None:
        # p_k (g_k - sum_j p_j g_j) with g = w_I t + w_P q p^(q-1), |g| <= 3 max|w|: each side's error
        # is about 2 eps |g| p_k, however small the result (two close g_k at p ~ 1/2)
        atol += 12 * torch.finfo(R.acc_dtype(dtype)).eps * float(upstream.abs().max())
    torch.testing.assert_close(a, b, rtol=GRAD_RTOL[dtype], atol=atol)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
SPATIAL = {0: (), 1: (1000,), 2: (37, 29), 3: (9, 11, 13)}
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")


def make_input(N, C, spatial, dtype, layout, activation, gen):
    """(N, C, *spatial) on the GPU with the requested memory layout (values made on the CPU, so the
    same seed gives the same tensor everywhere)."""
    def values(shape):
        v = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        if activation == "none":
            v = torch.rand(shape, generator=gen, dtype=torch.float64)
        return v.to(dtype).cuda()

    shape = (N, C, *spatial)
    if layout == "contiguous":
        return values(shape)
    if layout == "channels_last":  # channels fastest
        return values((N, *spatial, C)).movedim(-1, 1)
    if layout == "transposed":  # the two last dimensions swapped in memory (N and C without spatial dims)
        if len(spatial) >= 2:
            return values((N, C, *spatial[:-2], spatial[-1], spatial[-2])).transpose(-1, -2)
        return values((C, N, *spatial)).transpose(0, 1)
    big = values((N, C, *spatial[:-1], 2 * spatial[-1]) if spatial else (N, 2 * C))  # sliced: not dense
    return big[..., ::2] if spatial else big[:, ::2]


def make_target(N, C, spatial, dtype, kind, label_dtype, ignore_index, like, gen):
    hi = 2 if C == 1 else C
    labels = torch.randint(0, hi, (N, *spatial), generator=gen)
    if ignore_index is not None and labels.numel() > 1:
        labels[torch.rand(labels.shape, generator=gen) < 0.25] = ignore_index
    if kind == "labels":
        return labels.to(label_dtype).cuda()
    if kind == "onehot" and C == 1:  # binary: the foreground indicator
        t = labels.unsqueeze(1).to(dtype)
    elif kind == "onehot":
        t = torch.nn.functional.one_hot(labels.clamp(0, C - 1), C).movedim(-1, 1).to(dtype)
    else:
        t = torch.rand((N, C, *spatial), generator=gen, dtype=torch.float64).to(dtype)
    return torch.empty_like(like).copy_(t.cuda())  # the input's strides


CHANNELS = (1, 2, 3, 4, 5, 8, 16, 21, 130)
KINDS = ("labels", "onehot", "soft")
LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _cases():
    out = []
    for k, (C, dtype) in enumerate(itertools.product(CHANNELS, DTYPES)):
        for a, act in enumerate(("softmax", "sigmoid", "none")):
            if C == 1 and act == "softmax":
                continue
            kind = KINDS[(k + a) % 3]
            label_dtype = LABEL_DTYPES[(k // 3 + a) % 3]
            q = 1 + (k // 2 + a) % 2
            ndim = (k + 2 * a) % 4
            layout = LAYOUTS[(k // 4 + a + k) % 4]
            ignore = None
            if kind == "labels":
                outside = 255 if label_dtype == torch.uint8 else -100
                ignore = (outside, min(C - 1, 2), None)[(k // 3 + k) % 3]
            out.append(pytest.param(C, dtype, act, kind, label_dtype, q, ignore, ndim, layout,
                                    id=f"C{C}-{str(dtype)[6:]}-{act}-{kind}-q{q}-ign{ignore}-d{ndim}-{layout}"))
    return out


@needs_gpu
@pytest.mark.parametrize("C,dtype,activation,kind,label_dtype,q,ignore,ndim,layout", _cases())
def test_matches_reference_on_gpu(backend, C, dtype, activation, kind, label_dtype, q, ignore, ndim, layout):
    gen = torch.Generator().manual_seed(C * 1000 + ndim * 10 + q)
    N, spatial = 2 + C % 2, SPATIAL[ndim]
    x = make_input(N, C, spatial, dtype, layout, activation, gen)
    t = make_target(N, C, spatial, dtype, kind, label_dtype, ignore, x, gen)
    ign = ignore if kind == "labels" else None
    xa, xb = x.detach().requires_grad_(True), x.detach().clone().requires_grad_(True)
    stats = ops.dice_stats(xa, t, activation, q, ign, backend=backend)
    ref = ops.dice_stats(xb, t, activation, q, ign, backend="reference")
    pixels = max(1, x[0, 0].numel())
    assert_close_stats(stats, ref, dtype, pixels)
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.dtype).cuda()
    (stats * w).sum().backward()
    (ref * w).sum().backward()
    assert_close_grad(xa.grad, xb.grad, dtype, upstream=w)
    if ign is not None:  # ignored pixels get exactly zero gradient
        dropped = (t.long() == ign).unsqueeze(1).expand_as(xa.grad)
        assert torch.all(xa.grad[dropped] == 0)


# ----------------------------------------------------------------------------------------------
# run-to-run determinism, torch.compile, CUDA graphs, host syncs, memory
# ----------------------------------------------------------------------------------------------
def _step(loss_fn, x, y):
    x = x.detach().requires_grad_(True)
    loss = loss_fn(x, y)
    loss.backward()
    return loss.detach(), x.grad


@needs_gpu
@pytest.mark.parametrize("shape,dtype,layout", [((4, 21, 128, 128), torch.float32, "contiguous"),
                                                ((2, 4, 32, 32, 32), torch.bfloat16, "channels_last")])
def test_bitwise_deterministic(backend, shape, dtype, layout):
    gen = torch.Generator().manual_seed(1)
    x = make_input(shape[0], shape[1], shape[2:], dtype, layout, "softmax", gen)
    y = make_target(shape[0], shape[1], shape[2:], dtype, "labels", torch.int64, 255, x, gen)
    loss_fn = dt.DiceLoss(backend=backend, ignore_index=255)
    runs = [_step(loss_fn, x, y) for _ in range(3)]
    stats = [ops.dice_stats(x, y, "softmax", 2, 255, backend=backend) for _ in range(3)]
    for (l0, g0), (l1, g1), s1 in zip(runs, runs[1:], stats[1:]):
        assert torch.equal(l0, l1) and torch.equal(g0, g1) and torch.equal(stats[0], s1)


@needs_gpu
@pytest.mark.parametrize("loss_cls", [dt.DiceLoss, dt.GeneralizedDiceLoss])
def test_torch_compile_fullgraph(backend, loss_cls):
    gen = torch.Generator().manual_seed(2)
    x = make_input(2, 5, (24, 20), torch.float32, "channels_last", "softmax", gen)
    y = make_target(2, 5, (24, 20), torch.float32, "labels", torch.int64, None, x, gen)
    loss_fn = loss_cls(backend=backend)
    eager = _step(loss_fn, x, y)
    compiled = _step(torch.compile(loss_fn, fullgraph=True), x, y)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-7)
    assert_close_grad(compiled[1], eager[1], torch.float32)


@needs_gpu
def test_cuda_graph_capture_and_replay(backend):
    gen = torch.Generator().manual_seed(3)
    shape = (2, 4, 32, 48)
    x = make_input(2, 4, shape[2:], torch.float32, "contiguous", "softmax", gen).requires_grad_(True)
    y = make_target(2, 4, shape[2:], torch.float32, "labels", torch.int64, 255, x, gen)
    loss_fn = dt.DiceLoss(backend=backend, ignore_index=255)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_gpu

    graph, static_loss = bench_gpu.capture_step(torch, loss_fn, x, y)  # the benchmark's own capture
    static_grad = x.grad

    new_x = make_input(2, 4, shape[2:], torch.float32, "contiguous", "softmax", gen)
    new_y = make_target(2, 4, shape[2:], torch.float32, "labels", torch.int64, 255, x, gen)
    with torch.no_grad():
        x.copy_(new_x)
        y.copy_(new_y)
    graph.replay()
    torch.cuda.synchronize()
    want_loss, want_grad = _step(loss_fn, new_x, new_y)
    torch.testing.assert_close(static_loss.detach(), want_loss, rtol=0, atol=0)
    torch.testing.assert_close(static_grad, want_grad, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("config", ["labels", "ignore_index", "class_weights", "onehot", "uint8"])
def test_no_host_sync_in_eager_forward_backward(backend, config):
    gen = torch.Generator().manual_seed(4)
    C = 6
    x = make_input(2, C, (40, 36), torch.float32, "channels_last", "softmax", gen).requires_grad_(True)
    kind = "onehot" if config == "onehot" else "labels"
    ignore = 255 if config == "ignore_index" else None
    y = make_target(2, C, (40, 36), torch.float32, kind, torch.uint8 if config == "uint8" else torch.int64,
                    ignore, x, gen)
    kwargs = dict(backend=backend, ignore_index=ignore)
    if config == "class_weights":
        kwargs["class_weights"] = torch.linspace(0.5, 2.0, C).tolist()
    loss_fn = dt.DiceLoss(**kwargs).cuda()
    loss_fn(x, y).backward()  # warm up: compilation and first-call set-up may synchronize
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_fn(x, y)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and x.grad is not None


@needs_gpu
@pytest.mark.parametrize("shape,dtype,layout", [((8, 8, 256, 256), torch.float32, "contiguous"),
                                                ((2, 4, 64, 64, 64), torch.bfloat16, "channels_last")])
def test_peak_memory_is_the_gradient(backend, shape, dtype, layout):
    """Above the inputs, a forward + backward allocates the gradient and O(N*C) more (the fused
    paths keep nothing of the logits' size but the gradient they return)."""
    gen = torch.Generator().manual_seed(5)
    N, C = shape[:2]
    x = make_input(N, C, shape[2:], dtype, layout, "softmax", gen).requires_grad_(True)
    y = make_target(N, C, shape[2:], dtype, "labels", torch.int64, None, x, gen)
    loss_fn = dt.DiceLoss(backend=backend)
    loss_fn(x, y).backward()  # warm up
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss_fn(x, y).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = x.numel() * x.element_size()
    slack = 2 * 2**20 + 1024 * N * C  # per-class sums, partials of a few programs per SM, allocator rounding
    assert extra <= grad_bytes + slack, f"peak {extra / 2**20:.1f} MiB above the inputs; gradient {grad_bytes / 2**20:.1f} MiB"


@needs_gpu
def test_past_2_to_the_31_elements(backend):
    """(1, 2, 2**30 + 64) fp16: the last element's offset passes 2**31.  Stats against the reference
    summed over pixel chunks; the gradient against the reference's on the first and last chunks."""
    M = 2**30 + 64
    need = 2 * (2 * M * 2) + M + 3 * 2**30  # input + gradient (fp16), uint8 labels, reference chunk work
    free, total = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs about {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} of {total / 2**30:.0f} "
                    "GiB are free")
    torch.manual_seed(6)
    x = torch.randn((1, 2, M), device="cuda", dtype=torch.float16).requires_grad_(True)
    y = torch.randint(0, 2, (1, M), device="cuda", dtype=torch.uint8)
    stats = ops.dice_stats(x, y, "softmax", 1, None, backend=backend)
    w = torch.tensor([[[0.5, -1.0], [0.25, 2.0], [0.0, 0.0]]], device="cuda")
    (stats * w).sum().backward()
    chunk = 2**26
    ref = sum(R.dice_stats_reference(x.detach()[:, :, s:s + chunk], y[:, s:s + chunk], "softmax", 1, None)
              for s in range(0, M, chunk))
    torch.testing.assert_close(stats, ref, rtol=1e-4, atol=1.0)
    for s in (0, M - chunk):
        want = R.dice_stats_backward_reference(w, x.detach()[:, :, s:s + chunk], y[:, s:s + chunk], "softmax", 1, None)
        assert_close_grad(x.grad[:, :, s:s + chunk], want, torch.float16)


@needs_gpu
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_bad_labels_fail_on_the_device(backend, ignore_index):
    """Out-of-range labels on CUDA tensors fail a device-side assert (from the T row's count without
    ``ignore_index``, from a pass over the labels with it) at the next synchronization, and valid
    ones pass.  In a subprocess: a device-side assert ends the process's CUDA context."""
    code = ("import sys, torch, dicetorch as dt\n"
            "x = torch.randn(2, 4, 8, 8, device='cuda', requires_grad=True)\n"
            "y = torch.zeros(2, 8, 8, dtype=torch.long, device='cuda')\n"
            "y[1, 3, 3] = int(sys.argv[1])\n"
            f"dt.dice_loss(x, y, backend={backend!r}, ignore_index={ignore_index!r}).backward()\n"
            "torch.cuda.synchronize()\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = [subprocess.run([sys.executable, "-c", code, label], env=env, capture_output=True, text=True, timeout=300)
           for label in ("3", "7")]
    assert run[0].returncode == 0, run[0].stderr[-2000:]
    assert run[1].returncode != 0 and "assert" in run[1].stderr.lower(), run[1].stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# compound losses (pixel-loss rows) and hard activations, against the float64 reference
# ----------------------------------------------------------------------------------------------
# The oracle is the reference evaluated in float64 on the same input values: only the kernel's own
# rounding is measured (tests/test_compound_kernels.py).  The pixel rows add a log1p per pixel and,
# for focal, a power per element (``__powf`` with --use_fast_math): relative 5e-5, 4e-6 per pixel.
def _compound_cases():
    out = []
    losses = (("ce", 2.0), ("focal", 2.0), ("focal", 0.5), ("focal", 1.3), ("focal", 0.0))
    for k, (C, dtype) in enumerate(itertools.product((1, 3, 8, 21, 130, 1100), DTYPES)):
        for a, act in enumerate(("softmax", "sigmoid")):
            if C == 1 and act == "softmax":
                continue
            pixel_loss, gamma = losses[(k + a) % len(losses)]
            kind = KINDS[(k + a) % 3]
            label_dtype = LABEL_DTYPES[(k // 3 + a) % 3]
            ndim = 2 if C >= 130 else (k + 2 * a) % 4
            layout = LAYOUTS[(k // 4 + a + k) % 4]
            ignore = None
            if kind == "labels":
                outside = 255 if label_dtype == torch.uint8 else -100
                ignore = (outside, min(C - 1, 2), None)[(k // 3 + k) % 3]
            out.append(pytest.param(C, dtype, act, pixel_loss, gamma, kind, label_dtype, ignore, ndim, layout,
                                    id=f"C{C}-{str(dtype)[6:]}-{act}-{pixel_loss}{gamma:g}-{kind}-ign{ignore}-"
                                       f"d{ndim}-{layout}"))
    return out


@needs_gpu
@pytest.mark.parametrize("C,dtype,activation,pixel_loss,gamma,kind,label_dtype,ignore,ndim,layout", _compound_cases())
def test_compound_matches_reference_on_gpu(backend, C, dtype, activation, pixel_loss, gamma, kind, label_dtype,
                                           ignore, ndim, layout):
    if not ops.supports_pixel_loss(backend, pixel_loss):
        pytest.skip(f"backend {backend!r} does not compute pixel_loss={pixel_loss!r}")
    gen = torch.Generator().manual_seed(C * 1000 + ndim * 10 + 7)
    N, spatial = 2, SPATIAL[ndim] if C < 130 else (12, 11)
    x = make_input(N, C, spatial, dtype, layout, activation, gen)
    t = make_target(N, C, spatial, dtype, kind, label_dtype, ignore, x, gen)
    ign = ignore if kind == "labels" else None
    t64 = t.double() if t.is_floating_point() else t
    xa, xb = x.detach().requires_grad_(True), x.detach().double().requires_grad_(True)
    stats = ops.dice_stats(xa, t, activation, 1, ign, backend, pixel_loss, gamma)
    ref = ops.dice_stats(xb, t64, activation, 1, ign, "reference", pixel_loss, gamma)
    assert stats.shape == (N, 5, C) and stats.dtype == R.acc_dtype(dtype)
    pixels = max(1, x[0, 0].numel())
    f64 = dtype == torch.float64
    torch.testing.assert_close(stats[:, :3].double(), ref[:, :3], rtol=STATS_RTOL[dtype],
                               atol=STATS_ATOL_PER_PIXEL[dtype] * pixels)
    torch.testing.assert_close(stats[:, 3:].double(), ref[:, 3:], rtol=1e-12 if f64 else 5e-5,
                               atol=(1e-13 if f64 else 4e-6) * pixels)
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64).cuda()
    (stats * w.to(stats.dtype)).sum().backward()
    (ref * w).sum().backward()
    scale = float(xb.grad.abs().max())
    torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=GRAD_RTOL[dtype],
                               atol=(1e-13 if f64 else 4e-6) * scale + 1e-30)
    if ign is not None:  # ignored pixels get exactly zero gradient
        dropped = (t.long() == ign).unsqueeze(1).expand_as(xa.grad)
        assert torch.all(xa.grad[dropped] == 0)


@needs_gpu
@pytest.mark.parametrize("pixel_loss,gamma", [("ce", 2.0), ("focal", 0.5), ("focal", 2.0)])
def test_compound_confident_and_masked_on_gpu(backend, pixel_loss, gamma):
    """Logit gaps of 40 and channels masked with -inf: X = 0 and L = +inf there, finite elsewhere,
    finite gradients (tests/test_compound_kernels.py::test_confident_and_masked_channels_stay_finite)."""
    if not ops.supports_pixel_loss(backend, pixel_loss):
        pytest.skip(f"backend {backend!r} does not compute pixel_loss={pixel_loss!r}")
    g = torch.Generator().manual_seed(3)
    for c, layout in ((5, "contiguous"), (21, "channels_last"), (1100, "contiguous")):
        x = torch.randn(2, c, 8, 9, generator=g, dtype=torch.float64)
        winner = torch.randint(2, c, (2, 8, 9), generator=g)
        x = x + 40.0 * torch.nn.functional.one_hot(winner, c).movedim(-1, 1)
        x[:, :2] = float("-inf")
        labels = torch.randint(2, c, (2, 8, 9), generator=g)
        xk = x.float().cuda()
        if layout == "channels_last":
            xk = xk.contiguous(memory_format=torch.channels_last)
        xk.requires_grad_(True)
        got = ops.dice_stats(xk, labels.cuda(), "softmax", 1, None, backend, pixel_loss, gamma)
        assert bool(torch.isfinite(got[:, :4]).all()) and bool(torch.isfinite(got[:, 4, 2:]).all())
        assert bool((got[:, :4, :2] == 0).all()) and bool((got[:, 4, :2] == float("inf")).all())
        grad = torch.randn(2, 5, c, generator=g, dtype=torch.float64)
        grad[:, 4, :2] = 0.0
        (got * grad.float().cuda()).sum().backward()
        assert bool(torch.isfinite(xk.grad).all()) and bool((xk.grad[:, :2] == 0).all())


@needs_gpu
@pytest.mark.parametrize("C", [1, 2, 3, 8, 21, 130, 1100, 2100])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("activation", ["argmax", "threshold"])
def test_hard_activation_matches_reference_on_gpu(backend, activation, C, layout):
    """Exact counts (labels and one-hot targets): torch.argmax's ties (lowest channel) and NaN (the
    first NaN wins), all -inf pixels (channel 0); threshold x > 0 (NaN: 0)."""
    if not ops.supports_hard_activation(backend, activation):
        pytest.skip(f"backend {backend!r} does not compute activation={activation!r}")
    gen = torch.Generator().manual_seed(C)
    if activation == "argmax" and C == 1:  # constant over one channel: refused, as on the CPU
        x = make_input(2, 1, (4, 5), torch.float32, layout, "softmax", gen)
        with pytest.raises(ValueError, match="argmax.*C >= 2"):
            ops.dice_stats(x, torch.zeros(2, 4, 5, dtype=torch.long, device="cuda"), activation, 1, None, backend)
        return
    spatial = (6, 7) if C >= 130 else (19, 23)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = make_input(2, C, spatial, dtype, layout, "softmax", gen)
        x.copy_(x.round())  # many ties (in place: the layout stays)
        x[0, :, 0, 0] = float("-inf")
        if C > 1:
            x[1, C - 1, 0, 1] = float("nan")
            x[1, C // 2, 0, 2] = float("nan")
            x[1, C - 1, 0, 2] = float("nan")
        t = make_target(2, C, spatial, dtype, "labels", torch.int64, None, x, gen)
        stats = ops.dice_stats(x, t, activation, 1, None, backend)
        ref = ops.dice_stats(x, t, activation, 1, None, "reference")
        assert torch.equal(stats, ref), (dtype, (stats - ref).abs().max())
        oh = make_target(2, C, spatial, dtype, "onehot", torch.int64, None, x, gen)
        assert torch.equal(ops.dice_stats(x, oh, activation, 2, None, backend),
                           ops.dice_stats(x, oh, activation, 2, None, "reference"))


@needs_gpu
def test_compound_bitwise_deterministic(backend):
    if not ops.supports_pixel_loss(backend, "focal"):
        pytest.skip(f"backend {backend!r} does not compute the pixel rows")
    gen = torch.Generator().manual_seed(5)
    x = make_input(4, 21, (96, 96), torch.float32, "channels_last", "softmax", gen)
    y = make_target(4, 21, (96, 96), torch.float32, "labels", torch.int64, 255, x, gen)
    grad = torch.randn(4, 5, 21, generator=gen).cuda()
    runs = []
    for _ in range(3):
        xa = x.detach().requires_grad_(True)
        s = ops.dice_stats(xa, y, "softmax", 1, 255, backend, "focal", 1.3)
        (s * grad).sum().backward()
        runs.append((s.detach(), xa.grad))
    for s, g in runs[1:]:
        assert torch.equal(s, runs[0][0]) and torch.equal(g, runs[0][1])


# ----------------------------------------------------------------------------------------------
# the GPU benchmark's code, on the CPU (runs in CI)
# ----------------------------------------------------------------------------------------------
def test_bench_gpu_runs_on_cpu(tmp_path):
    """``bench_gpu.py --device cpu --quick``: every method checked against the reference, timed,
    put on the roofline and written out (Triton in its interpreter, torch.compile with aot_eager)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--device", "cpu", "--quick",
           "--cases", "2d", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "REFUSED" not in out and "failed:" not in out, out[-3000:]
    md = list(tmp_path.glob("bench_gpu_quick_cpu_*.md"))
    assert len(md) == 1 and len(list(tmp_path.glob("bench_gpu_quick_cpu_*.csv"))) == 1
    table = md[0].read_text()
    for dtype, loss in itertools.product(("fp32", "bf16"), ("dice", "dicece")):
        for method in ("dicetorch-triton", "reference", "compiled-reference") + (("monai",) if "monai |" in table else ()):
            row = next(line for line in table.splitlines()
                       if line.startswith(f"| 2d | 2x5x16x16 | {dtype} | {loss} | {method} |"))
            assert row.split("|")[7].strip(), f"{method} {loss} {dtype} was not timed: {row}"


def test_bench_gpu_refuses_a_wrong_method():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_gpu

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 8, 8, generator=gen).requires_grad_(True)
    y = torch.randint(0, 3, (2, 8, 8), generator=gen)
    ref_fn = dt.DiceLoss(backend="reference")
    ref = ref_fn(x, y)
    ref.backward()
    ref_grad, x.grad = x.grad, None
    ok, *_ = bench_gpu.check_against_reference(torch, ref_fn, ref.detach(), ref_grad, x, y, 1e-4)
    assert ok
    wrong = dt.DiceLoss(backend="reference", squared=True)  # a different loss
    ok, lerr, gerr, msg = bench_gpu.check_against_reference(torch, wrong, ref.detach(), ref_grad, x, y, 1e-4)
    assert not ok and max(lerr, gerr) > 1e-4, msg
    assert bench_gpu.nominal_bandwidth("NVIDIA H100 80GB HBM3") == pytest.approx(3.35e12)
    assert bench_gpu.nominal_bandwidth("NVIDIA H100 PCIe") == pytest.approx(2.0e12)
    assert bench_gpu.nominal_bandwidth("NVIDIA A100-SXM4-80GB") == pytest.approx(2.039e12)
    assert bench_gpu.nominal_bandwidth("NVIDIA A100-SXM4-40GB") == pytest.approx(1.555e12)
    assert bench_gpu.nominal_bandwidth("NVIDIA H200") == pytest.approx(4.8e12)
