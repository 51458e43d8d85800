"""Property tests: every backend gives the reference's answer on hostile inputs.

Hypothesis draws the shape (N, C, 0-3 spatial dims), dtype, activation, target kind, q,
ignore_index and memory layout (contiguous, channels-last, a transposed dense permutation, sliced
with steps, expanded), and then spoils the logits: NaN, +inf, -inf, -inf-masked leading classes,
huge logits (near the dtype's range), an image whose every pixel is ignored, absent classes, and a
NaN in the upstream gradient.  For each case the operator's forward and backward on the backend
under test must equal the reference backend's:

* the same NaN pattern, the same infinities, finite values within the tolerance of
  ``tests/test_cpu_kernel.py`` (fast exp: 3e-6 per summed term in fp32; one rounding step of the
  input dtype times 4 for gradients, relative to the largest finite entry);
* exactly 0 gradient at ignored pixels, and the fake kernel's strides;
* the same under ``torch.compile(fullgraph=True)`` as in eager mode (``test_compiled_matches_eager``).

"reference" vs "cpu" run here; "triton" runs in a Triton-interpreter subprocess on small shapes.
``HYPOTHESIS_MAX_EXAMPLES`` scales the number of cases.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dicetorch as dt
from conftest import INTERPRETED, backends_under_test, interpreter_suite
from dicetorch import ops

BACKENDS = backends_under_test()
SCALE = float(os.environ.get("HYPOTHESIS_MAX_EXAMPLES_SCALE", "1"))
EXAMPLES = int((40 if INTERPRETED else 200) * SCALE)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROUNDING = {torch.float32: 2.0**-20, torch.float64: 1e-13, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
HUGE = {torch.float16: 6e4, torch.bfloat16: 1e38, torch.float32: 1e38, torch.float64: 1e300}
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced", "expanded")
SPOILERS = ("nan", "posinf", "neginf", "neginf_lead", "huge", "all_ignored", "absent", "nan_grad")

pytestmark = pytest.mark.filterwarnings("ignore:include_background=False is ignored")


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreter run")
def test_interpreter_suite():
    interpreter_suite(__file__)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as ``x`` (N, C, *spatial), laid out in memory as ``layout`` says."""
    if layout == "channels_last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "transposed":  # a dense permutation that is neither contiguous nor channels-last
        a, b = (-1, -2) if x.dim() >= 4 else (0, -1)
        return x.transpose(a, b).contiguous().transpose(a, b)
    if layout == "sliced":
        return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1).flatten(-2)[..., ::2]
    if layout == "expanded":
        return x[:1].expand(x.shape) if x.shape[0] > 1 else x.expand(x.shape)
    return x.contiguous()


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = draw(st.integers(1, 2))
    c = draw(st.sampled_from((1, 2, 3, 4, 5, 21, 130) if INTERPRETED else (1, 2, 3, 4, 5, 8, 21, 130)))
    ndim = draw(st.integers(0, 3))
    spatial = tuple(draw(st.integers(1, 4 if ndim < 3 else 3)) for _ in range(ndim))
    if c == 130:
        spatial = spatial[:1]  # interpreter time grows with C * M
    dtype = draw(st.sampled_from(DTYPES))
    activation = draw(st.sampled_from(("sigmoid", "none") if c == 1 else ("softmax", "sigmoid", "none")))
    kind = draw(st.sampled_from(("labels", "labels_1ch", "labels_i32", "labels_u8", "onehot", "soft", "bool")))
    power = draw(st.sampled_from((1, 2)))
    labels = kind.startswith("labels")
    ignore = draw(st.sampled_from(("none", "outside", "class"))) if labels else "none"
    layout = draw(st.sampled_from(LAYOUTS))
    target_layout = draw(st.sampled_from(LAYOUTS))
    spoil = draw(st.sets(st.sampled_from(SPOILERS), max_size=3))

    shape = (n, c, *spatial)
    if activation == "none":
        x = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        x = 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
        if "huge" in spoil:
            x = torch.sign(x) * HUGE[dtype] * torch.rand(shape, generator=g, dtype=torch.float64)
    numel = x.numel()
    for name, value in (("nan", float("nan")), ("posinf", float("inf")), ("neginf", float("-inf"))):
        if name in spoil:
            idx = torch.randint(0, numel, (max(1, numel // 16),), generator=g)
            x.view(-1)[idx] = value
    if "neginf_lead" in spoil and activation == "softmax":
        depth = torch.randint(0, c, (n, 1, *spatial), generator=g)  # < c: the pixel keeps a finite class
        x = x.masked_fill(torch.arange(c).view(1, c, *([1] * ndim)) < depth, float("-inf"))

    hi = 2 if c == 1 else c
    classes = torch.arange(hi)
    if "absent" in spoil and hi > 2:
        classes = classes[torch.randperm(hi, generator=g)[: hi // 2]]
    lab = classes[torch.randint(0, len(classes), (n, *spatial), generator=g)]
    ignore_index = None
    if ignore != "none":
        ignore_index = {"outside": 255 if kind == "labels_u8" else -100, "class": int(classes[0])}[ignore]
        drop = torch.rand(lab.shape, generator=g) < 0.3
        if "all_ignored" in spoil:
            drop[0] = True
        lab = torch.where(drop, torch.full_like(lab, ignore_index), lab)
    if kind in ("labels", "labels_1ch"):
        t = lab if kind == "labels" else lab.unsqueeze(1)
    elif kind == "labels_i32":
        t = lab.to(torch.int32)
    elif kind == "labels_u8":
        t = lab.to(torch.uint8)
    else:
        onehot = torch.stack([lab == (k if c > 1 else 1) for k in range(c)], dim=1)
        if kind == "bool":
            t = onehot
        elif kind == "onehot":
            t = onehot.to(dtype)
        else:
            t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
        t = _layout(t, target_layout)
    x = _layout(x.to(dtype), layout)
    grad = torch.randn((n, 3, c), generator=g, dtype=torch.float64)
    if "nan_grad" in spoil:
        grad[0, 0, 0] = float("nan")
    return dict(x=x, t=t, activation=activation, power=power, ignore_index=ignore_index, grad=grad)


def _assert_same(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, what: str):
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaN patterns differ"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], ref[inf]), f"{what}: infinities differ"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin].double(), ref[fin].double(), rtol=rtol, atol=atol, msg=what)


def check_backend(case: dict, backend: str):
    x, t = case["x"], case["t"]
    act, q, ign = case["activation"], case["power"], case["ignore_index"]
    ref = ops.dice_stats(x, t, act, q, ign, "reference")
    got = ops.dice_stats(x, t, act, q, ign, backend)
    m = max(1, x[0, 0].numel())
    double = x.dtype == torch.float64
    _assert_same(got, ref, 1e-12 if double else 1e-5, (1e-15 if double else 3e-6) * m + 1e-6, "stats")

    grad = case["grad"].to(ref.dtype)
    gref = ops.dice_stats_backward(grad, x, t, act, q, ign, "reference")
    gx = ops.dice_stats_backward(grad, x, t, act, q, ign, backend)
    assert gx.stride() == gref.stride() == torch.empty_like(x).stride()
    finite = gref[torch.isfinite(gref)]
    scale = float(finite.double().abs().max()) if finite.numel() else 0.0
    _assert_same(gx, gref, 0.0, 4 * ROUNDING[x.dtype] * scale + 1e-12, "input gradient")
    if ign is not None:
        labels = t.reshape(t.shape[0], *x.shape[2:]).long()
        ignored = (labels == ign).unsqueeze(1).expand_as(x)
        assert torch.all(gx[ignored] == 0) and torch.all(gref[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_backend_matches_reference(backend, case):
    check_backend(case, backend)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@settings(max_examples=max(4, EXAMPLES // 20), deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(), loss=st.sampled_from(("dice", "generalized", "tversky")))
def test_compiled_matches_eager(backend, case, loss):
    """Losses under torch.compile(fullgraph=True) equal eager reference, hostile inputs included."""
    x, t = case["x"], case["t"]
    if x.shape[1] == 1 and case["activation"] == "softmax":
        return
    cls = {"dice": dt.DiceLoss, "generalized": dt.GeneralizedDiceLoss, "tversky": dt.TverskyLoss}[loss]
    kw = dict(activation=case["activation"], ignore_index=case["ignore_index"])
    if loss != "tversky":
        kw["squared"] = case["power"] == 2
    torch._dynamo.reset()
    results = []
    for fn in (cls(backend="reference", **kw), torch.compile(cls(backend=backend, **kw), fullgraph=True,
                                                             backend="aot_eager", dynamic=False)):
        xi = x.detach().clone().requires_grad_()
        out = fn(xi, t)
        out.backward()
        results.append((out.detach(), xi.grad))
    (l_ref, g_ref), (l_got, g_got) = results
    double = x.dtype == torch.float64
    _assert_same(l_got, l_ref, 1e-10 if double else 1e-4, 1e-10 if double else 1e-5, "loss")
    finite = g_ref[torch.isfinite(g_ref)]
    scale = float(finite.double().abs().max()) if finite.numel() else 0.0
    _assert_same(g_got, g_ref, 0.0, 8 * ROUNDING[x.dtype] * scale + 1e-12, "input gradient")
    torch._dynamo.reset()
