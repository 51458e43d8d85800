"""The fused C++ CPU kernel (backend="cpu", ``dicetorch::fused_forward`` / ``fused_backward``)
against the plain-PyTorch reference: every option, dtype, target kind and layout; gradcheck,
opcheck, torch.compile, thread-count independence and the per-ISA copies of the kernel.

Tolerances.  Both sides compute p in fp32 (fp64 for fp64 input) from the same input values, so
they differ only by the kernel's exp (max error 20 ULP, ~2.4e-6 relative, in fp32) and by the
order of the sums.  Each summand lies in [0, 1], so a sum of M terms may differ by about
M * 3e-6 in the worst case (fp32) and by M * 1e-15 in fp64: ``stats_tol`` uses that bound.
Gradients are returned in the input dtype; both sides round the same fp32 value, so they may
differ by one rounding step of that dtype (2^-11 fp16, 2^-8 bf16) relative to the largest entry.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dicetorch as dt
from dicetorch import ops, reference

pytestmark = [
    pytest.mark.skipif(
        not ops.extension_info()["cpu"],
        reason="dicetorch._C (the C++ CPU kernel) is not built: "
        f"{ops.extension_info()['error']}; build with `pip install --no-build-isolation -e .`",
    ),
    pytest.mark.filterwarnings("ignore:include_background=False is ignored"),
]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ROUNDING = {torch.float32: 2.0**-20, torch.float64: 1e-13, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def stats_tol(dtype, m):
    """(rtol, atol) for (N, 3, C) sums of m per-pixel terms in [0, 1] (see the module docstring)."""
    if dtype == torch.float64:
        return 1e-12, 1e-15 * m + 1e-14
    return 1e-5, 3e-6 * m + 1e-6


def make(n, c, spatial, kind, activation, dtype, ignore_index=None, channels_last=False, seed=0):
    """Random (input, target) for the operator. kind: labels / labels_i32 / labels_u8 / onehot / soft."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    if activation == "none":
        x = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        x = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    hi = c + 1 if c > 1 else 3  # includes an out-of-range label value (matches no channel)
    lab = torch.randint(0, hi, (n, *spatial), generator=g)
    if ignore_index is not None:
        lab = torch.where(torch.rand(lab.shape, generator=g) < 0.3, torch.full_like(lab, ignore_index), lab)
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
    if channels_last and len(spatial) in (2, 3):
        fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        if t.is_floating_point():
            t = t.contiguous(memory_format=fmt)
    return x, t


def check_op(x, t, activation, power, ignore_index):
    """ops.dice_stats (backend="cpu") forward and backward against the reference backend."""
    m = max(1, x[0, 0].numel())
    xr = x.detach().clone().requires_grad_()
    xc = x.detach().clone().requires_grad_()
    ref = ops.dice_stats(xr, t, activation, power, ignore_index, "reference")
    got = ops.dice_stats(xc, t, activation, power, ignore_index, "cpu")
    rtol, atol = stats_tol(x.dtype, m)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    grad = torch.randn(ref.shape, dtype=ref.dtype)
    (ref * grad).sum().backward()
    (got * grad).sum().backward()
    assert xc.grad.dtype == x.dtype and xc.grad.shape == x.shape
    formats = [torch.contiguous_format] + (
        [torch.channels_last] if x.dim() == 4 else [torch.channels_last_3d] if x.dim() == 5 else [])
    if any(x.is_contiguous(memory_format=f) for f in formats):
        # layout kept (channels-last stays channels-last); strides of size-1 dims are arbitrary
        assert all(a == b for a, b, n in zip(xc.grad.stride(), x.stride(), x.shape) if n > 1)
    scale = float(xr.grad.double().abs().max()) + 1e-30
    torch.testing.assert_close(xc.grad.double(), xr.grad.double(), rtol=0,
                               atol=4 * ROUNDING[x.dtype] * scale + 1e-12)
    if ignore_index is not None and not t.is_floating_point():
        ignored = (t == ignore_index).unsqueeze(1).expand_as(x)
        assert bool((xc.grad[ignored] == 0).all())


# ------------------------------------------------------------------------------------------------
# every option x dtype x target kind
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("kind,ignore_index", [("labels", None), ("labels", 2), ("labels_i32", -1),
                                               ("labels_u8", 255), ("onehot", None), ("soft", None)])
def test_options_match_reference(dtype, activation, power, kind, ignore_index):
    x, t = make(2, 3, (9, 7), kind, activation, dtype, ignore_index)
    check_op(x, t, activation, power, ignore_index)


SHAPES = [
    # (n, c, spatial, channels_last)
    (2, 4, (), False),             # zero spatial dims: M = 1
    (3, 1, (5, 6), False),         # C = 1: binary labels (label 1 is the foreground)
    (1, 1024, (3, 5), False),      # large C: per-chunk buffers, not fixed register arrays
    (2, 5, (17, 19), False),       # odd sizes: vector tails
    (1, 3, (61, 73), False),       # > one 4096-pixel chunk
    (2, 3, (4, 5, 6), False),      # 3-D
    (2, 6, (13, 11), True),        # channels-last (NHWC)
    (1, 4, (5, 6, 7), True),       # channels-last 3-D (NDHWC)
    (1, 1024, (2, 3), True),       # channels-last, large C
]


@pytest.mark.parametrize("n,c,spatial,channels_last", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_shapes_and_layouts(n, c, spatial, channels_last, dtype, kind):
    activation = "sigmoid" if c == 1 else "softmax"
    ignore_index = 0 if kind == "labels" and c > 1 else None
    x, t = make(n, c, spatial, kind, activation, dtype, ignore_index, channels_last=channels_last)
    check_op(x, t, activation, 2, ignore_index)


def test_strided_input_and_target():
    """Neither pixel- nor channel-contiguous (sliced) operands go through the general path."""
    x, t = make(2, 3, (8, 10), "soft", "softmax", torch.float32)
    xs, ts = x[..., ::2], t[..., ::2].transpose(-1, -2)
    xs = xs.transpose(-1, -2)
    check_op(xs, ts, "softmax", 1, None)
    lab = torch.randint(0, 3, (2, 10, 8))[:, ::2].transpose(-1, -2)  # strided labels
    xl = torch.randn(2, 3, 8, 5)
    check_op(xl, lab, "softmax", 2, None)
    lab1 = torch.randint(0, 3, (2, 40))[:, ::2]  # (N, M) labels with pixel stride 2 reach the kernel
    assert ops.canonical(torch.randn(2, 3, 20), lab1)[1].stride(1) == 2
    check_op(torch.randn(2, 3, 20), lab1, "softmax", 1, None)


def test_fused_ops_directly():
    """The dispatcher operators on the canonical (N, C, M) layout, including a channels-last view."""
    x, t = make(2, 5, (6, 7), "labels", "softmax", torch.float32, ignore_index=1, channels_last=True)
    xv, tv = ops.canonical(x, t)
    assert xv.stride(1) == 1  # channels-last reaches the kernel as a view
    got = torch.ops.dicetorch.fused_forward(xv, tv, "softmax", 1, 1)
    ref = reference.dice_stats_reference(xv, tv, "softmax", 1, 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    g = torch.randn(2, 3, 5)
    gx = torch.ops.dicetorch.fused_backward(g, xv, tv, "softmax", 1, 1)
    assert gx.stride() == xv.stride()  # channels-last stays channels-last
    torch.testing.assert_close(gx, reference.dice_stats_backward_reference(g, xv, tv, "softmax", 1, 1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c,channels_last", [(4, False), (11, True)])  # a register copy; the general copy
@pytest.mark.parametrize("activation,pixel_loss", [("softmax", "none"), ("sigmoid", "none"), ("softmax", "ce"),
                                                    ("sigmoid", "focal")])
def test_saved_label_codes(c, channels_last, activation, pixel_loss):
    """The training forward saves each pixel's code as a byte; the backward reads those instead of
    the labels and gives bit for bit the gradient that the same labels as uint8 (read directly) give."""
    x, t = make(2, c, (5, 4101), "labels", activation, torch.float32, ignore_index=2, channels_last=channels_last)
    stats, codes = ops.dice_stats_op(x, t, activation, 1, 2, "cpu", pixel_loss, 1.5)
    lab = t.reshape(2, -1)
    want = torch.where(lab == 2, 254, torch.where(lab < c, lab, 255)).to(torch.uint8)  # make() has labels 0..c
    assert codes.dtype == torch.uint8 and torch.equal(codes, want)
    g = torch.randn(stats.shape)
    grads = []
    for target in (t, t.to(torch.uint8)):  # uint8 labels: no codes saved, the labels are read
        xx = x.clone().requires_grad_()
        s, saved = ops.dice_stats_op(xx, target, activation, 1, 2, "cpu", pixel_loss, 1.5)
        assert saved.dim() == (2 if target.dtype == torch.int64 else 1)
        assert torch.equal(s, stats)
        (s * g).sum().backward()
        grads.append(xx.grad)
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(torch.ops.dicetorch.fused_backward(g, *ops.canonical(x, codes), activation, 1,
                                                          ops.SAVED_IGNORE_INDEX, pixel_loss, 1.5),
                       grads[0].reshape(2, c, -1))


@pytest.mark.parametrize("c", [1, 2, 4, 9, 254, 255, 300])
def test_every_byte_label(c):
    """uint8 labels take 32-bit arithmetic in the kernel (int32/int64 take 64-bit): every byte value,
    with ignore_index inside, at the edges of and outside the byte range, counts as the reference
    counts it (hard activation: exact integer sums)."""
    lab = torch.arange(256, dtype=torch.uint8).repeat(2).reshape(2, 256)
    x = torch.randn(2, c, 256, generator=torch.Generator().manual_seed(c))
    activation = "threshold" if c == 1 else "argmax"
    for ignore_index in (None, 0, 3, 253, 254, 255, -1, -100, 256, 1000):
        for t in (lab, lab.long()):
            got = torch.ops.dicetorch.fused_forward(x, t, activation, 1, ignore_index)
            ref = reference.dice_stats_reference(x, t, activation, 1, ignore_index)
            assert torch.equal(got, ref), (c, ignore_index, t.dtype)


def test_label_codes_get_no_zero_gradient():
    """The codes are not differentiable: the backward builds no (N, M) gradient of zeros for them
    (autograd's default for an output without a gradient; it cost a fifth of a millisecond per step
    at (2, 4, 96^3))."""
    x = torch.randn(2, 3, 40, 50, requires_grad=True)
    t = torch.randint(0, 3, (2, 40, 50))
    with torch.profiler.profile(record_shapes=True) as prof:
        dt.DiceLoss(backend="cpu")(x, t).backward()
    filled = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::zero_", "aten::fill_") and e.input_shapes]
    assert [2, 2000] not in [list(s) for s in filled], filled
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_label_codes_only_where_they_save_reads():
    """Codes for the C++ kernel's differentiable activations on labels wider than a byte, 2 <= C <= 254."""
    x = torch.randn(2, 3, 6)
    lab = torch.randint(0, 3, (2, 6))
    assert ops.dice_stats_op(x, lab, "softmax", 1, None, "cpu")[1].shape == (2, 6)
    assert ops.dice_stats_op(x, lab.int(), "softmax", 1, None, "cpu")[1].shape == (2, 6)
    for args in ((x, lab.to(torch.uint8), "softmax", "cpu"), (x, lab, "softmax", "reference"),
                 (x, lab, "argmax", "cpu"), (x[:, :1], lab.clamp(max=1), "sigmoid", "cpu"),
                 (x, torch.rand(2, 3, 6), "softmax", "cpu"), (torch.randn(1, 255, 4), lab[:1, :4], "softmax", "cpu")):
        assert ops.dice_stats_op(args[0], args[1], args[2], 1, None, args[3])[1].shape == (0,), args[2:]
    with pytest.raises(RuntimeError, match="integer label targets"):
        torch.ops.dicetorch.fused_forward_codes(x, torch.rand(2, 3, 6), "softmax", 1, None)
    with pytest.raises(RuntimeError, match="2 <= C <= 254"):
        torch.ops.dicetorch.fused_forward_codes(x[:, :1], lab, "sigmoid", 1, None)


# The kernel has one copy per channel count for float32 label targets with C <= 8 (tiles held in
# registers) and a general copy; C = 9 is the general copy's smallest channel count.  Each case:
# a tail vector, channels-last input (the staged path), and more than one pixel chunk (4101 pixels).
FIXED_C_CASES = [("labels", None, False, (5, 13)), ("labels_u8", 2, True, (3, 4, 7)), ("labels_i32", -1, False, (4101,))]


def _channel_counts(activations):
    """(activation, C) for C = 1 .. 9; softmax and argmax need C >= 2."""
    return [(a, c) for a in activations for c in range(1, 10) if c > 1 or a not in ("softmax", "argmax")]


@pytest.mark.parametrize("activation,c", _channel_counts(["softmax", "sigmoid", "none"]))
def test_every_channel_count(activation, c):
    for kind, ignore_index, channels_last, spatial in FIXED_C_CASES:
        x, t = make(2, c, spatial, kind, activation, torch.float32, ignore_index, channels_last, seed=c)
        for power in (1, 2):  # q is a compile-time constant of the two-vector loops
            check_op(x, t, activation, power, ignore_index)


@pytest.mark.parametrize("activation,c", _channel_counts(["argmax", "threshold"]))
def test_every_channel_count_hard(activation, c):
    """The hard activations count whole pixels: the sums are exact integers on both sides."""
    for i, (kind, ignore_index, channels_last, spatial) in enumerate(FIXED_C_CASES):
        x, t = make(2, c, spatial, kind, "softmax", torch.float32, ignore_index, channels_last, seed=c)
        got = ops.dice_stats(x, t, activation, 1 + i % 2, ignore_index, "cpu")
        ref = ops.dice_stats(x, t, activation, 1 + i % 2, ignore_index, "reference")
        torch.testing.assert_close(got, ref, rtol=0, atol=0)



def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="no transparent huge pages on this system")
@pytest.mark.parametrize("mib", [40, 8])  # above and below glibc's 32 MiB mmap-threshold ceiling
def test_large_gradient_asks_for_huge_pages(mib):
    """A gradient of 4 MiB or more (fresh pages whenever glibc mmaps it or has trimmed its heap) is
    advised MADV_HUGEPAGE, so the backward's first writes fault once per 2 MiB instead of once per
    4 KiB: its mapping is THP-eligible in /proc/self/smaps (with THP in "madvise" mode, only through
    that advice)."""
    m = (mib << 20) // 8  # (1, 2, m) float32
    x = torch.zeros(1, 2, m)
    t = torch.zeros(1, m, dtype=torch.long)
    gx = torch.ops.dicetorch.fused_backward(torch.zeros(1, 3, 2), x, t, "softmax", 1, None)
    huge = 2 << 20
    addr = (gx.data_ptr() + huge - 1) // huge * huge  # the first byte of the advised, aligned interior
    assert addr + huge <= gx.data_ptr() + gx.nbytes
    eligible = None
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "THPeligible:":
                eligible = int(line.split()[1])
    assert eligible == 1, f"the gradient's mapping is not THP-eligible ({eligible})"
    assert (gx == 0).all()


@pytest.mark.parametrize("c", [2, 12])  # a fixed-C copy and the general copy
def test_softmax_exp_over_its_whole_range(c):
    """The softmax's exp, pixel by pixel, for every d = z - max from 0 down past ln(FLT_MIN) ~ -87.34.

    Logits (0, d, -inf, ...) with label 0 and dL/dI = (1, 0, ...) give dL/dz_1 = p_1 (0 - p_0) =
    -e / (1 + e)^2 with e = exp(d), a product without cancellation (dL/dz_0 = p_0 (1 - p_0) has
    one): each entry is one exp, to within the fp32 exp's 20 ULP (2.4e-6) and a few roundings; near
    and below ln(FLT_MIN) the exp flushes to 0, within 2 FLT_MIN of the true value.  The -inf
    channels must give exactly 0.
    """
    d = torch.cat([torch.linspace(-90.0, 0.0, 20001), torch.tensor([-87.3365, -87.3366, -1e-30, 0.0])])
    x = torch.full((1, c, d.numel()), float("-inf"))
    x[0, 0], x[0, 1] = 0.0, d
    t = torch.zeros(1, d.numel(), dtype=torch.long)
    g = torch.zeros(1, 3, c)
    g[0, 0, 0] = 1.0
    gx = torch.ops.dicetorch.fused_backward(g, x, t, "softmax", 1, None)
    e = d.double().exp()
    tiny = torch.finfo(torch.float32).tiny
    torch.testing.assert_close(gx[0, 1].double(), -e / (1 + e) ** 2, rtol=4e-6, atol=2 * tiny)
    assert (gx[0, 2:] == 0).all()

@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), "relu", 1, None), "activation"),
        ((torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), "softmax", 3, None), "power"),
        ((torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.int16), "softmax", 1, None), "int64, int32 or uint8"),
        ((torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long), "softmax", 1, None), r"\(N, M\)"),
        ((torch.randn(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float64), "softmax", 1, None), "dtype"),
        ((torch.randn(2, 3, 4), torch.zeros(2, 3, 4), "softmax", 1, 0), "ignore_index"),
        ((torch.randn(2, 3), torch.zeros(2, dtype=torch.long), "softmax", 1, None), "dims"),
        ((torch.randint(0, 3, (2, 3, 4)), torch.zeros(2, 4, dtype=torch.long), "softmax", 1, None), "float"),
    ],
)
def test_checks(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dicetorch.fused_forward(*args)


# ------------------------------------------------------------------------------------------------
# through the losses
# ------------------------------------------------------------------------------------------------
LOSS_CASES = [
    (dt.DiceLoss, dict(include_background=False, ignore_index=255)),
    (dt.DiceLoss, dict(squared=True, batch=True, log_loss=True)),
    (dt.DiceLoss, dict(activation="sigmoid", class_weights=[1.0, 2.0, 0.5, 1.0])),
    (dt.GeneralizedDiceLoss, dict()),
    (dt.GeneralizedDiceLoss, dict(weighting="simple", squared=True, ignore_index=255)),
    (dt.TverskyLoss, dict(alpha=0.3, beta=0.7)),
    (dt.TverskyLoss, dict(alpha=0.7, beta=0.3, gamma=0.75, ignore_index=255)),
]


@pytest.mark.parametrize("loss_cls,opts", LOSS_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_losses_match_reference(loss_cls, opts, channels_last):
    x, t = make(2, 4, (10, 9), "labels", opts.get("activation", "softmax"), torch.float32,
                opts.get("ignore_index"), channels_last=channels_last)
    t = torch.where(t == 4, torch.zeros_like(t), t)  # losses validate label ranges
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    lr = loss_cls(**opts, backend="reference")(xr, t)
    lc = loss_cls(**opts, backend="cpu")(xc, t)
    lr.backward()
    lc.backward()
    # a loss is an O(1) function of sums of <= 90 pixels: fp32 rounding ~1e-6
    torch.testing.assert_close(lc, lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-4, atol=1e-7)


def test_auto_picks_cpu():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "cpu"


# ------------------------------------------------------------------------------------------------
# autograd, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,power,kind,ignore_index",
                         [("softmax", 1, "labels", 1), ("softmax", 2, "soft", None),
                          ("sigmoid", 2, "labels", None), ("none", 1, "onehot", None)])
def test_gradcheck_float64(activation, power, kind, ignore_index):
    x, t = make(2, 3, (3, 4), kind, activation, torch.float64, ignore_index)
    if activation == "none":
        x = x.clamp(0.05, 0.95)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ops.dice_stats(a, t, activation, power, ignore_index, "cpu"), (x,))


@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_opcheck(kind):
    x, y = make(2, 3, (4, 5), kind, "softmax", torch.float32)
    x.requires_grad_()
    torch.library.opcheck(ops.dice_stats_op, (x, y, "softmax", 1, None, "cpu"))


def test_compile_fullgraph_equals_eager():
    x, t = make(2, 4, (8, 8), "labels", "softmax", torch.float32, ignore_index=3)
    t = torch.where(t == 4, torch.zeros_like(t), t)  # the loss validates label ranges
    loss_fn = dt.DiceLoss(ignore_index=3, backend="cpu")

    def step(a):
        return loss_fn(a, t)

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le = step(xe)
    le.backward()
    torch._dynamo.reset()
    lc = torch.compile(step, fullgraph=True, backend="aot_eager")(xc)
    lc.backward()
    # same kernel on the same data: only the epilogue may be fused differently
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,channels_last", [("labels", False), ("soft", True)])
def test_thread_count_independent(kind, channels_last):
    """Fixed 4096-pixel chunks reduced in chunk order: 1 and 2 threads give identical bits."""
    x, t = make(2, 5, (150, 150), kind, "softmax", torch.float32, channels_last=channels_last)  # 6 chunks/image
    xv, tv = ops.canonical(x, t)
    g = torch.randn(2, 3, 5)
    old = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            s = torch.ops.dicetorch.fused_forward(xv, tv, "softmax", 2, None)
            gx = torch.ops.dicetorch.fused_backward(g, xv, tv, "softmax", 2, None)
            out.append((s, gx))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("act,rows,pixel", [("softmax", 3, ()), ("sigmoid", 3, ()), ("softmax", 5, ("ce", 2.0)),
                                             ("softmax", 5, ("focal", 1.5))])
def test_streamed_gradient_is_the_cached_one(act, rows, pixel):
    """A float32 gradient of 4 MiB or more is written with non-temporal stores (whole aligned vectors,
    plain stores elsewhere): the same bits as the cached stores that each half (2.1 MB) gets.  The
    image's plane starts are not all 64-byte aligned (M = 363 * 365), so both kinds of store run."""
    x, t = torch.randn(2, 4, 363 * 365), torch.randint(0, 4, (2, 363 * 365))
    assert x.nbytes >= 4 << 20 > x[:1].nbytes
    g = torch.randn(2, rows, 4)
    whole = torch.ops.dicetorch.fused_backward(g, x, t, act, 1, None, *pixel)
    halves = [torch.ops.dicetorch.fused_backward(g[i:i + 1], x[i:i + 1], t[i:i + 1], act, 1, None, *pixel)
              for i in (0, 1)]
    assert torch.equal(whole, torch.cat(halves))
    ref = reference.dice_stats_backward_reference(g.double(), x.double(), t, act, 1, None, *pixel)
    torch.testing.assert_close(whole.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


# ------------------------------------------------------------------------------------------------
# the per-ISA copies of the kernel (the CI machine runs only its best one in-process)
# ------------------------------------------------------------------------------------------------
_ISA_SCRIPT = r"""
import torch, dicetorch
from dicetorch import reference
torch.manual_seed(0)
assert torch.backends.cpu.get_cpu_capability() == "{cap}", torch.backends.cpu.get_cpu_capability()
worst = 0.0
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for act, q, ign, cl in (("softmax", 1, 2, False), ("sigmoid", 2, None, True), ("none", 2, None, False)):
        x = torch.randn(2, 5, 13, 11, dtype=dtype)
        if act == "none":
            x = x.sigmoid()
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        xv = x.reshape(2, 5, -1)
        t = torch.randint(0, 6, (2, 143))
        g = torch.randn(2, 3, 5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        s = torch.ops.dicetorch.fused_forward(xv, t, act, q, ign)
        r = reference.dice_stats_reference(xv, t, act, q, ign)
        gx = torch.ops.dicetorch.fused_backward(g, xv, t, act, q, ign)
        s2, codes = torch.ops.dicetorch.fused_forward_codes(xv, t, act, q, ign)
        assert torch.equal(s2, s) and torch.equal(torch.ops.dicetorch.fused_backward(g, xv, codes, act, q, 254), gx)
        gx = gx.double()
        gr = reference.dice_stats_backward_reference(g, xv, t, act, q, ign).double()
        worst = max(worst, float(((s - r).abs() / (1 + r.abs())).max()),
                    float((gx - gr).abs().max() / gr.abs().max()))
# a float32 gradient of 4 MiB or more is stored non-temporally: bit for bit the cached stores' one
x, t = torch.randn(2, 4, 363 * 365), torch.randint(0, 4, (2, 363 * 365))
for act, rows, pixel in (("softmax", 3, ()), ("sigmoid", 3, ()), ("softmax", 5, ("ce", 2.0))):
    g = torch.randn(2, rows, 4)
    whole = torch.ops.dicetorch.fused_backward(g, x, t, act, 1, None, *pixel)
    halves = [torch.ops.dicetorch.fused_backward(g[i:i + 1], x[i:i + 1], t[i:i + 1], act, 1, None, *pixel) for i in (0, 1)]
    assert torch.equal(whole, torch.cat(halves)), act
print(worst)
"""


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2"])
def test_isa_copies(cap):
    """The portable and AVX2 copies (chosen through ATEN_CPU_CAPABILITY, which the kernel honours)."""
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if best not in order or order.index(cap) > order.index(best):
        pytest.skip(f"this CPU ({best}) cannot run the {cap} copy")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.replace("{cap}", cap)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    # stats: fp32 sums of 143 terms (~1e-5 relative); gradients: one bf16 rounding step (2^-8)
    assert float(res.stdout.strip().splitlines()[-1]) < 8e-3
