"""Forward values of every loss and option against independent float64 formulas (tests/naive_dice.py).

Inputs are float64 so the library's float64 path must match the NumPy loops to rounding
(rtol 1e-10: sums of at most a few hundred terms in float64 lose ~1e-14 relative); a separate
test runs the float32 path against the same float64 oracle with a float32 tolerance.
"""
from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dicetorch as dt
import naive_dice as naive

FN = {"dice": dt.dice_loss, "generalized": dt.generalized_dice_loss, "tversky": dt.tversky_loss}
MOD = {"dice": dt.DiceLoss, "generalized": dt.GeneralizedDiceLoss, "tversky": dt.TverskyLoss}
pytestmark = pytest.mark.filterwarnings("ignore:include_background=False is ignored")

NAIVE = {"dice": naive.dice_loss, "generalized": naive.generalized_dice_loss, "tversky": naive.tversky_loss}
SPATIAL = {0: (), 1: (7,), 2: (3, 4), 3: (2, 3, 2)}
LABEL_KINDS = ("labels", "labels1", "labels_u8", "labels_i32")
TARGET_KINDS = LABEL_KINDS + ("onehot", "onehot_int", "onehot_bool", "soft")


def make_case(seed, *, n=2, c=3, spatial=(3, 4), kind="labels", activation="softmax", dtype=torch.float64,
              ignore_index=None, classes=None):
    """Random (input, target). ``classes``: the label values drawn (default all), to make classes absent."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    if activation == "none":
        x = 0.02 + 0.96 * torch.rand(shape, generator=g, dtype=torch.float64)  # probabilities
    else:
        x = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.as_tensor(classes if classes is not None else (range(c) if c > 1 else (0, 1)))
    lab = values[torch.randint(0, len(values), (n, *spatial), generator=g)]
    if ignore_index is not None:
        lab = torch.where(torch.rand(lab.shape, generator=g) < 0.25, torch.full_like(lab, ignore_index), lab)
    onehot = torch.stack([lab == (k if c > 1 else 1) for k in range(c)], dim=1)
    if kind == "labels":
        t = lab
    elif kind == "labels1":
        t = lab.unsqueeze(1)
    elif kind == "labels_u8":
        t = lab.to(torch.uint8)
    elif kind == "labels_i32":
        t = lab.to(torch.int32)
    elif kind == "onehot":
        t = onehot.to(dtype)
    elif kind == "onehot_int":
        t = onehot.long()
    elif kind == "onehot_bool":
        t = onehot
    elif kind == "soft":
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        if activation == "softmax":
            t = t / t.sum(1, keepdim=True)
        t = t.to(dtype)
    else:
        raise AssertionError(kind)
    return x.to(dtype), t


def check(loss, x, t, opts, *, module=False, rtol=1e-10, atol=1e-12):
    with np.errstate(divide="ignore", invalid="ignore"):  # -log(0) = inf is a valid expectation
        expected = NAIVE[loss](x, t, **opts)
    if module:
        got = MOD[loss](**opts, backend="reference")(x, t)
    else:
        got = FN[loss](x, t, **opts, backend="reference")
    assert got.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert tuple(got.shape) == expected.shape
    torch.testing.assert_close(got.double(), torch.from_numpy(np.asarray(expected, dtype=np.float64)),
                               rtol=rtol, atol=atol, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# deterministic grids: every target kind x spatial rank x activation, C in {1, 3}
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", list(FN))
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
@pytest.mark.parametrize("c", [1, 3])
def test_target_kinds_and_spatial_ranks(loss, kind, ndim, c):
    seed = zlib.crc32(f"{loss}{kind}{ndim}{c}".encode())
    for activation in ("softmax", "sigmoid", "none"):
        if activation == "softmax" and c == 1:
            continue
        x, t = make_case(seed, c=c, spatial=SPATIAL[ndim], kind=kind, activation=activation)
        opts = dict(activation=activation)
        if loss != "tversky":
            opts["squared"] = True
        check(loss, x, t, opts)
        check(loss, x, t, {**opts, "batch": True})


@pytest.mark.parametrize("loss", list(FN))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_reduction_shapes(loss, reduction, batch, include_background):
    """none: (N, C') for Dice/Tversky ((C',) with batch); (N,) for generalized (0-dim with batch)."""
    n, c = 3, 4
    x, t = make_case(1, n=n, c=c)
    out = FN[loss](x, t, reduction=reduction, batch=batch, include_background=include_background,
                   backend="reference")
    kept = c if include_background else c - 1
    if reduction != "none":
        want = ()
    elif loss == "generalized":
        want = () if batch else (n,)
    else:
        want = (kept,) if batch else (n, kept)
    assert tuple(out.shape) == want
    check(loss, x, t, dict(reduction=reduction, batch=batch, include_background=include_background))


@pytest.mark.parametrize("loss", list(FN))
@pytest.mark.parametrize("ignore_index", [255, -1, 0, 2])
@pytest.mark.parametrize("kind", ["labels", "labels1", "labels_i32"])
def test_ignore_index(loss, ignore_index, kind):
    # 0 and 2 are class values: their pixels leave every sum, so class 0/2 has T = 0 (absent)
    x, t = make_case(7, c=3, kind=kind, spatial=(4, 5), ignore_index=ignore_index)
    check(loss, x, t, dict(ignore_index=ignore_index))
    check(loss, x, t, dict(ignore_index=ignore_index, batch=True, include_background=False))


def test_ignore_index_uint8():
    x, t = make_case(8, c=3, kind="labels_u8", spatial=(4, 5), ignore_index=255)
    for loss in FN:
        check(loss, x, t, dict(ignore_index=255))


def test_ignored_pixels_do_not_matter():
    """Changing the logits of ignored pixels changes neither the loss nor (being zero) their gradient."""
    x, t = make_case(9, c=3, spatial=(5, 5), ignore_index=-1)
    x2 = torch.where((t == -1).unsqueeze(1), torch.randn_like(x) * 10, x)
    for loss, fn in FN.items():
        a = x.clone().requires_grad_()
        la = fn(a, t, ignore_index=-1, backend="reference")
        la.backward()
        lb = fn(x2, t, ignore_index=-1, backend="reference")
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
        assert torch.all(a.grad.masked_select((t == -1).unsqueeze(1)) == 0)


@pytest.mark.parametrize("loss", list(FN))
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_class_weights(loss, include_background, as_tensor):
    x, t = make_case(11, c=4, spatial=(3, 5))
    for cw in ([0.5, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0]):
        if len(cw) == 3 and include_background:
            continue  # length C-1 is only accepted without the background
        w = torch.tensor(cw) if as_tensor else cw
        for batch in (False, True):
            check(loss, x, t, dict(class_weights=w, include_background=include_background, batch=batch))
            check(loss, x, t, dict(class_weights=w, include_background=include_background, batch=batch),
                  module=True)


@pytest.mark.parametrize("weighting", ["square", "simple", "uniform"])
@pytest.mark.parametrize("absent_weight", ["max", "zero"])
@pytest.mark.parametrize("batch", [False, True])
def test_generalized_weighting_and_absent_classes(weighting, absent_weight, batch):
    # classes 1 and 3 never occur: their weight follows absent_weight
    for squared, kind in itertools.product((False, True), ("labels", "onehot", "soft")):
        x, t = make_case(12, n=3, c=4, spatial=(4, 4), classes=(0, 2), kind=kind)
        check("generalized", x, t, dict(weighting=weighting, absent_weight=absent_weight, batch=batch,
                                        squared=squared))


def test_generalized_absent_weight_policies_differ():
    """The option is not a no-op: with absent classes, "max" and "zero" give different losses."""
    x, t = make_case(13, n=2, c=3, spatial=(4, 4), classes=(0, 1))
    a = dt.generalized_dice_loss(x, t, absent_weight="max", backend="reference")
    b = dt.generalized_dice_loss(x, t, absent_weight="zero", backend="reference")
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("alpha,beta,gamma", [(0.5, 0.5, 1.0), (0.3, 0.7, 1.0), (1.0, 1.0, 1.0),
                                              (0.7, 0.3, 0.75), (0.5, 0.5, 2.0), (0.0, 1.0, 4 / 3)])
@pytest.mark.parametrize("batch", [False, True])
def test_tversky_alpha_beta_gamma(alpha, beta, gamma, batch):
    for kind, act in (("labels", "softmax"), ("soft", "sigmoid"), ("onehot", "none")):
        x, t = make_case(14, c=3, spatial=(6,), kind=kind, activation=act)
        check("tversky", x, t, dict(activation=act, alpha=alpha, beta=beta, gamma=gamma, batch=batch))


def test_tversky_half_half_is_dice():
    x, t = make_case(15, c=3, spatial=(4, 4))
    torch.testing.assert_close(dt.tversky_loss(x, t, smooth_nr=0.0, smooth_dr=0.0, backend="reference"),
                               dt.dice_loss(x, t, smooth_nr=0.0, smooth_dr=0.0, backend="reference"),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss", list(FN))
@pytest.mark.parametrize("smooth_nr,smooth_dr", [(0.0, 0.0), (1e-5, 1e-5), (1.0, 0.0), (0.0, 2.0), (1.0, 1.0)])
@pytest.mark.parametrize("log_loss", [False, True])
def test_smoothing_and_log_loss(loss, smooth_nr, smooth_dr, log_loss):
    x, t = make_case(16, c=3, spatial=(3, 3))
    check(loss, x, t, dict(smooth_nr=smooth_nr, smooth_dr=smooth_dr, log_loss=log_loss))


def test_dice_score_matches_one_minus_loss():
    x, t = make_case(17, c=3, spatial=(4, 4))
    for batch in (False, True):
        score = dt.dice_score(x, t, batch=batch, backend="reference")
        loss = dt.dice_loss(x, t, batch=batch, reduction="none", backend="reference")
        torch.testing.assert_close(score, 1 - loss, rtol=1e-12, atol=1e-12)


def test_dice_score_hard():
    """hard=True scores the one-hot argmax prediction (the evaluation metric)."""
    x, t = make_case(18, c=3, spatial=(5, 5))
    pred = torch.nn.functional.one_hot(x.argmax(1), 3).movedim(-1, 1).double()
    expected = naive.stats(pred, t, "none", 1)
    i_, p_, t_ = expected[0], expected[1], expected[2]
    want = (2 * i_ + 1e-5) / (p_ + t_ + 1e-5)
    got = dt.dice_score(x, t, hard=True, backend="reference")
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", list(FN))
def test_perfect_prediction_gives_zero_loss(loss):
    """A one-hot prediction equal to the target scores Dice 1 (all classes present, no smoothing)."""
    lab = torch.arange(12).reshape(1, 3, 4) % 3
    pred = torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).double()
    out = FN[loss](pred, lab, activation="none", smooth_nr=0.0, smooth_dr=0.0, backend="reference")
    torch.testing.assert_close(out, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-15)


def test_auto_backend_equals_reference():
    x, t = make_case(19, c=3, spatial=(4, 4), dtype=torch.float32)
    for loss, fn in FN.items():
        torch.testing.assert_close(fn(x, t), fn(x, t, backend="reference"), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(MOD[loss]()(x, t), fn(x, t, backend="reference"), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("loss", list(FN))
def test_float32_against_float64_oracle(loss):
    # float32 sums of <= 60 terms in [0, 1]: relative rounding error < 60 * 2^-24 ~ 4e-6, and the
    # O(N*C) epilogue adds a few ulps more; rtol 1e-5 is a safe bound that still catches wrong formulas.
    for kind, act in (("labels", "softmax"), ("soft", "sigmoid"), ("onehot", "none")):
        x, t = make_case(20, c=3, spatial=(4, 5), kind=kind, activation=act, dtype=torch.float32)
        check(loss, x, t, dict(activation=act), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# property test: random combinations of all options
# ------------------------------------------------------------------------------------------------
@st.composite
def configs(draw):
    loss = draw(st.sampled_from(list(FN)))
    c = draw(st.sampled_from([1, 2, 3, 4]))
    n = draw(st.integers(1, 3))
    ndim = draw(st.integers(0, 3))
    kind = draw(st.sampled_from(TARGET_KINDS))
    activation = draw(st.sampled_from(["sigmoid", "none"] if c == 1 else ["softmax", "sigmoid", "none"]))
    ignore_index = None
    if kind in LABEL_KINDS and draw(st.booleans()):
        ignore_index = 255 if kind == "labels_u8" else draw(st.sampled_from([-1, 255, 0, c - 1]))
    include_background = draw(st.booleans())
    opts = dict(
        activation=activation,
        smooth_nr=draw(st.sampled_from([0.0, 1e-5, 0.5])),
        smooth_dr=draw(st.sampled_from([1e-5, 0.5, 2.0])),
        batch=draw(st.booleans()),
        include_background=include_background,
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    if draw(st.booleans()):
        kept = c if include_background or c == 1 else c - 1
        length = draw(st.sampled_from(sorted({c, kept})))
        # values exact in float32: the modules keep class_weights as a float32 buffer
        opts["class_weights"] = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 3.0]),
                                              min_size=length, max_size=length))
    if loss == "tversky":
        opts.update(alpha=draw(st.sampled_from([0.3, 0.5, 1.0])), beta=draw(st.sampled_from([0.5, 0.7, 1.0])),
                    gamma=draw(st.sampled_from([1.0, 0.75, 2.0])))
        opts["log_loss"] = opts["gamma"] == 1.0 and draw(st.booleans())
    else:
        opts["squared"] = draw(st.booleans())
        opts["log_loss"] = draw(st.booleans())
    if loss == "generalized":
        opts.update(weighting=draw(st.sampled_from(["square", "simple", "uniform"])),
                    absent_weight=draw(st.sampled_from(["max", "zero"])))
    classes = None
    if kind != "soft" and c > 2 and draw(st.booleans()):
        classes = (0, c - 1)  # absent middle classes
    seed = draw(st.integers(0, 2**31 - 1))
    module = draw(st.booleans())
    return loss, dict(seed=seed, n=n, c=c, spatial=SPATIAL[ndim], kind=kind, activation=activation,
                      ignore_index=ignore_index, classes=classes), opts, module


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_configurations(cfg):
    loss, case, opts, module = cfg
    seed = case.pop("seed")
    x, t = make_case(seed, **case)
    check(loss, x, t, opts, module=module)
