"""The hard activations of the operator ("argmax", "threshold"): evaluation counts without a gradient.

p is a 0/1 prediction made per pixel inside the kernel (no argmax or one-hot tensor), so I, P, T are
the hard intersection and volumes.  Semantics (dicetorch.reference):

* "argmax":    p = one-hot of torch.argmax(x, dim=1): lowest index among equal maxima, the first NaN
  of a pixel wins over any number, all -inf picks channel 0;
* "threshold": p = (x > 0), i.e. sigmoid(x) > 0.5; NaN gives 0.

Kernels are compared with the reference bit for bit where the sums are counts (label and one-hot
targets: sums of 0/1 values are exact in fp32 below 2^24), and to summation rounding for soft targets.
``HARD_KERNELS`` lists the kernel backends that implement the hard activations; a kernel backend
that gains them is added there (``test_hard_kernels_list_is_complete`` fails until it is).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dicetorch as dt
from conftest import INTERPRETED, backends_under_test, interpreter_suite
from dicetorch import ops, reference

# Kernel backends that implement the hard activations ("cuda" works on CUDA tensors only:
# tests/test_gpu.py and, on the CPU, tests/test_cuda_emulation.py compare it with the reference).
HARD_KERNELS = ["cpu", "triton", "cuda"]

BACKENDS = [b for b in backends_under_test() if b in HARD_KERNELS]
if not INTERPRETED:
    BACKENDS = ["reference"] + BACKENDS
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HARD = ("argmax", "threshold")


@pytest.mark.skipif(INTERPRETED or "triton" not in HARD_KERNELS, reason="no Triton hard activation yet"
                    if not INTERPRETED else "this is the parent of the interpreter run")
def test_interpreter_suite():
    interpreter_suite(__file__)


@pytest.mark.skipif(INTERPRETED, reason="backend independent")
def test_hard_kernels_list_is_complete():
    """Every available kernel backend that claims the hard activations is tested here, and vice versa."""
    for device in ("cpu", "cuda"):
        for b in ops.available_backends(device):
            if b != "reference":
                assert ops.supports_hard_activation(b) == (b in HARD_KERNELS), b


def make(n, c, spatial, kind, dtype, *, ignore_index=None, channels_last=False, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    hi = c + 1 if c > 1 else 3  # includes an out-of-range label (matches no channel)
    lab = torch.randint(0, hi, (n, *spatial), generator=g)
    if ignore_index is not None:
        lab = torch.where(torch.rand(lab.shape, generator=g) < 0.3, torch.full_like(lab, ignore_index), lab)
    if kind == "labels":
        t = lab
    elif kind == "labels_u8":
        t = lab.to(torch.uint8)
    elif kind == "onehot":
        t = reference.one_hot(lab.reshape(n, -1), c, dtype).reshape(shape)
    elif kind == "soft":
        t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        raise AssertionError(kind)
    if channels_last and len(spatial) in (2, 3):
        fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x, t


def independent_stats(x, t, activation, power, ignore_index):
    """(N, 3, C) in float64 from torch.argmax / torch.sigmoid and explicit one-hot tensors."""
    n, c = x.shape[:2]
    xf = x.reshape(n, c, -1)
    if activation == "argmax":
        p = torch.nn.functional.one_hot(xf.argmax(1), c).movedim(-1, 1).double()
    else:
        p = (torch.sigmoid(xf.double()) > 0.5).double()
    if t.is_floating_point():
        tt, keep = t.reshape(n, c, -1).double(), torch.ones(n, 1, xf.shape[-1], dtype=torch.bool)
    else:
        lab = t.reshape(n, -1).long()
        tt = reference.one_hot(lab, c, torch.float64)
        keep = (lab != ignore_index).unsqueeze(1) if ignore_index is not None else torch.ones_like(lab, dtype=torch.bool).unsqueeze(1)
    p, tt = p * keep, tt * keep
    return torch.stack([(p * tt).sum(-1), (p ** power).sum(-1), (tt ** power).sum(-1)], 1)


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", HARD)
@pytest.mark.parametrize("kind,ignore_index", [("labels", None), ("labels", 2), ("labels_u8", 255), ("onehot", None),
                                               ("soft", None)])
@pytest.mark.parametrize("power", [1, 2])
def test_matches_independent_formula(backend, dtype, activation, kind, ignore_index, power):
    x, t = make(2, 4, (9, 11), kind, dtype, ignore_index=ignore_index)
    got = ops.dice_stats(x, t, activation, power, ignore_index, backend=backend)
    assert got.dtype == reference.acc_dtype(dtype) and not got.requires_grad
    want = independent_stats(x, t, activation, power, ignore_index)
    if kind == "soft":
        torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-4)
    else:
        assert torch.equal(got.double(), want)  # counts: exact


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("n,c,spatial", [(1, 2, (1,)), (3, 3, ()), (2, 5, (17,)), (2, 3, (4, 5, 3)), (1, 130, (7, 5)),
                                         (2, 21, (64, 67))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", HARD)
def test_shapes_and_layouts_bitwise(backend, n, c, spatial, channels_last, activation):
    """Kernel == reference bit for bit: shapes (tails of a vector, several chunks), C up to 130, layouts."""
    if INTERPRETED and spatial == (64, 67):
        spatial = (33, 35)  # many Triton programs still; the interpreter takes ~1 ms per program
    for kind in ("labels", "onehot"):
        x, t = make(n, c, spatial, kind, torch.float32, channels_last=channels_last, seed=c)
        got = ops.dice_stats(x, t, activation, 1, None, backend=backend)
        assert torch.equal(got, ops.dice_stats(x, t, activation, 1, None, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input(backend):
    x, t = make(2, 6, (8, 10), "labels", torch.float32)
    xs = x.transpose(2, 3)  # neither contiguous nor channels-last
    ts = t.transpose(1, 2)
    for act in HARD:
        assert torch.equal(ops.dice_stats(xs, ts, act, 1, None, backend=backend),
                           independent_stats(xs, ts, act, 1, None).float())


# ----------------------------------------------------------------------------------------------
# ties, infinities and NaN: torch.argmax's rules
# ----------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
PIXELS = [  # one pixel per row, 4 channels
    [1.0, 1.0, 1.0, 1.0],  # all tied: 0
    [0.0, 2.0, 2.0, 1.0],  # tie between 1 and 2: 1
    [-INF, -INF, -INF, -INF],  # all -inf: 0
    [-INF, -INF, 3.0, -INF],  # leading -inf: 2
    [1.0, INF, 2.0, INF],  # +inf twice: 1
    [NAN, 5.0, 1.0, 0.0],  # NaN first: 0
    [1.0, 5.0, NAN, 0.0],  # NaN beats a larger number: 2
    [1.0, NAN, 9.0, NAN],  # two NaN: the first, 1
    [NAN, NAN, NAN, NAN],  # all NaN: 0
    [INF, NAN, 0.0, 0.0],  # NaN beats +inf: 1
    [-0.0, 0.0, -1.0, -2.0],  # -0 == +0: 0
    [1e-45, -1e-30, 0.0, 2e-45],  # tiny values (fp32 subnormals; 1e-45 rounds to 2^-149 = 1.4e-45): 3 in fp64
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_argmax_ties_inf_nan_match_torch_argmax(backend, dtype):
    rows = torch.tensor(PIXELS, dtype=torch.float64)
    # the special pixels scattered among ordinary ones, so they land in different vector lanes
    x = torch.randn(2, 4, 40, dtype=torch.float64)
    pos = torch.tensor([0, 3, 8, 9, 15, 16, 22, 31, 33, 38, 39, 17])
    x[1, :, pos] = rows.T
    x[0, :, pos[:6]] = rows[6:].T
    x = x.to(dtype)
    lab = torch.randint(0, 4, (2, 40))
    pred = x.argmax(1)  # torch.argmax on the same dtype
    if dtype == torch.float64:
        assert pred[1, pos].tolist() == [0, 1, 0, 2, 1, 0, 2, 1, 0, 1, 0, 3]  # as commented above
    got = ops.dice_stats(x, lab, "argmax", 1, None, backend=backend)
    p = torch.nn.functional.one_hot(pred, 4).movedim(-1, 1).double()
    t = torch.nn.functional.one_hot(lab, 4).movedim(-1, 1).double()
    want = torch.stack([(p * t).sum(-1), p.sum(-1), t.sum(-1)], 1)
    assert torch.equal(got.double(), want)
    assert bool(torch.isfinite(got).all())  # counts: NaN logits choose a class, they do not poison sums


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_nan_inf_zero(backend):
    """p = (x > 0): NaN and +-0 give 0, +inf 1; tiny positive x gives 1 (where a rounded sigmoid is 0.5)."""
    x = torch.tensor([[[NAN, INF, -INF, 0.0, -0.0, 1e-30, -1e-30, 2.0]]]).expand(1, 3, 8).contiguous()
    x[0, 1] = -x[0, 1]
    lab = torch.zeros(1, 8, dtype=torch.long)
    got = ops.dice_stats(x, lab, "threshold", 1, None, backend=backend)
    assert got[0, 1].tolist() == [3.0, 2.0, 3.0]
    y = torch.randn(2, 3, 50)  # away from 0, x > 0 is exactly torch.sigmoid(x) > 0.5
    y = torch.where(y.abs() < 1e-6, torch.ones_like(y), y)
    assert torch.equal(ops.dice_stats(y, torch.zeros(2, 50, dtype=torch.long), "threshold", 1, None, backend=backend)[:, 1],
                       (torch.sigmoid(y) > 0.5).sum(-1).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_pixels_count_nowhere(backend):
    x, t = make(2, 3, (6, 7), "labels", torch.float32, ignore_index=-1)
    x = x.clone()
    x[t.unsqueeze(1).expand_as(x) == -1] = NAN  # garbage where ignored changes nothing
    for act in HARD:
        got = ops.dice_stats(x, t, act, 1, -1, backend=backend)
        assert torch.equal(got.double(), independent_stats(x, t, act, 1, -1))
        if act == "argmax":  # every counted pixel predicts exactly one class
            assert torch.equal(got[:, 1].sum(-1), (t != -1).sum((1, 2)).float())


# ----------------------------------------------------------------------------------------------
# no gradient, clear refusals
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", HARD)
def test_result_never_requires_grad(activation):
    x, t = make(2, 3, (5, 5), "labels", torch.float32)
    t = t.clamp_max(2)  # dice_score checks the labels
    x.requires_grad_()
    for backend in BACKENDS:
        assert not ops.dice_stats(x, t, activation, 1, None, backend=backend).requires_grad
        assert not dt.dice_score(x, t, activation=activation, backend=backend).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_raises_clearly(backend):
    x, t = make(2, 3, (5, 5), "labels", torch.float32)
    x.requires_grad_()
    out = ops.dice_stats_op(x, t, "argmax", 1, None, backend)[0]  # the raw operator keeps the graph
    with pytest.raises(RuntimeError, match="'argmax' .*no gradient"):
        out.sum().backward()
    xc, tc = ops.canonical(x.detach(), t)
    with pytest.raises(RuntimeError, match="no gradient"):
        ops._impl(backend).backward(torch.zeros(2, 3, 3), xc, tc, "threshold", 1, None)


@pytest.mark.skipif(INTERPRETED, reason="backend independent")
@pytest.mark.parametrize("fn,cls", [(dt.dice_loss, dt.DiceLoss), (dt.generalized_dice_loss, dt.GeneralizedDiceLoss),
                                    (dt.tversky_loss, dt.TverskyLoss)])
@pytest.mark.parametrize("activation", HARD)
def test_losses_refuse_hard_activation(fn, cls, activation):
    x, t = make(2, 3, (5, 5), "labels", torch.float32)
    with pytest.raises(ValueError, match="hard .*no gradient"):
        fn(x, t, activation=activation)
    with pytest.raises(ValueError, match="hard .*no gradient"):
        cls(activation=activation)


@pytest.mark.skipif(INTERPRETED, reason="backend independent")
def test_argmax_needs_two_channels():
    with pytest.raises(ValueError, match="'argmax' needs C >= 2.*'threshold'"):
        ops.dice_stats(torch.randn(2, 1, 4), torch.randint(0, 2, (2, 4)), "argmax")
    ops.dice_stats(torch.randn(2, 1, 4), torch.randint(0, 2, (2, 4)), "threshold")  # binary: fine


@pytest.mark.skipif(INTERPRETED, reason="backend independent")
def test_kernels_without_hard_activation_refuse_clearly():
    """triton / cuda: a named backend that lacks the hard activations raises; "auto" falls back."""
    dev = torch.device("cuda")  # resolution looks at the device type only: no GPU needed
    for b in ("triton", "cuda"):
        if b in ops.available_backends(dev) and not ops.supports_hard_activation(b):
            with pytest.raises(ops.BackendUnavailableError, match="does not implement the hard activation 'argmax'"):
                ops.resolve_backend(b, dev, "argmax")
    auto = ops.resolve_backend("auto", dev, "argmax")
    assert auto == "reference" or ops.supports_hard_activation(auto)
    assert ops.resolve_backend("auto", torch.device("cpu"), "threshold") in ("cpu", "reference")


# ----------------------------------------------------------------------------------------------
# dice_score(hard=True) now runs fused
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETED, reason="backend independent")
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_dice_score_hard_equals_materialized(activation):
    x, t = make(3, 4, (6, 7), "labels", torch.float64, seed=5)
    t = t.clamp_max(3)
    if activation == "none":
        x = torch.sigmoid(x)
    for backend in ops.available_backends("cpu"):
        if backend == "triton":
            continue
        got = dt.dice_score(x, t, activation=activation, hard=True, batch=True, backend=backend)
        if activation == "softmax":
            pred = torch.nn.functional.one_hot(x.argmax(1), 4).movedim(-1, 1).double()
        else:
            pred = ((torch.sigmoid(x) if activation == "sigmoid" else x) > 0.5).double()
        want = dt.dice_score(pred, t, activation="none", batch=True, backend="reference")
        assert torch.equal(got, want)


@pytest.mark.skipif(INTERPRETED, reason="backend independent")
def test_opcheck_hard():
    x, t = make(2, 3, (4, 5), "labels", torch.float32)
    for backend in [b for b in BACKENDS if b != "triton"]:
        torch.library.opcheck(ops.dice_stats_op, (x, t, "argmax", 1, None, backend),
                              test_utils=("test_schema", "test_faketensor"))


_ISA_SCRIPT = r"""
import torch
from dicetorch import ops
assert torch.backends.cpu.get_cpu_capability() == "{cap}", torch.backends.cpu.get_cpu_capability()
g = torch.Generator().manual_seed(0)
x = 3 * torch.randn(2, 5, 13, 11, generator=g)
x[0, :, 0, :5] = float("nan"); x[1, 2, 3] = float("inf"); x[1, :, 4] = 1.0
t = torch.randint(0, 6, (2, 13, 11), generator=g)
for act in ("argmax", "threshold"):
    for xx in (x, x.contiguous(memory_format=torch.channels_last), x.half()):
        a = ops.dice_stats(xx, t, act, 1, 3, backend="cpu")
        b = ops.dice_stats(xx, t, act, 1, 3, backend="reference")
        assert torch.equal(a, b), (act, xx.dtype, (a - b).abs().max())
print("ok")
"""


@pytest.mark.skipif(INTERPRETED or not ops.extension_info()["cpu"], reason="needs the C++ extension")
@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2"])
def test_isa_copies(cap):
    """The portable and AVX2 copies of the kernel (ATEN_CPU_CAPABILITY picks them) give the same counts."""
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if best not in order or order.index(cap) > order.index(best):
        pytest.skip(f"this CPU ({best}) cannot run the {cap} copy")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.replace("{cap}", cap)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
