"""Bad inputs raise ValueError/TypeError naming the argument; NaN propagates; compiled code skips data checks."""
from __future__ import annotations

import math

import pytest
import torch

import dicetorch as dt

FNS = (dt.dice_loss, dt.generalized_dice_loss, dt.tversky_loss)
MODS = (dt.DiceLoss, dt.GeneralizedDiceLoss, dt.TverskyLoss)


def _x(n=2, c=3, *spatial, dtype=torch.float32):
    return torch.randn(n, c, *(spatial or (4, 5)), dtype=dtype)


def _labels(n=2, c=3, *spatial):
    return torch.randint(0, c, (n, *(spatial or (4, 5))))


@pytest.mark.parametrize("fn", FNS)
def test_float_target_wrong_shape(fn):
    with pytest.raises(ValueError, match=r"float target must have the input's shape \(2, 3, 4, 5\)"):
        fn(_x(), torch.rand(2, 3, 4, 6))
    with pytest.raises(ValueError, match="float target must have the input's shape"):
        fn(_x(), torch.rand(2, 2, 4, 5))


@pytest.mark.parametrize("fn", FNS)
def test_labels_wrong_shape(fn):
    with pytest.raises(ValueError, match=r"integer target must be labels shaped \(N, \*spatial\) = \(2, 4, 5\)"):
        fn(_x(), torch.zeros(2, 4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="integer target must be labels"):
        fn(_x(), torch.zeros(3, 4, 5, dtype=torch.long))  # batch mismatch
    with pytest.raises(ValueError, match="integer target must be labels"):
        fn(_x(), torch.zeros(2, 2, 4, 5, dtype=torch.long))  # neither (N,1,...) nor one-hot


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_input_dtype(fn, dtype):
    x = torch.ones(2, 3, 4, 5, dtype=dtype)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        fn(x, _labels())


def test_target_dtype_complex():
    with pytest.raises(TypeError, match="target must be an integer .* or floating-point tensor"):
        dt.dice_loss(_x(), torch.ones(2, 3, 4, 5, dtype=torch.complex64))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="input and target must be torch.Tensor"):
        dt.dice_loss(_x().numpy(), _labels())
    with pytest.raises(TypeError, match="input and target must be torch.Tensor"):
        dt.dice_loss(_x(), [0, 1])


def test_input_rank():
    with pytest.raises(ValueError, match=r"input must have shape \(N, C, \*spatial\)"):
        dt.dice_loss(torch.randn(5), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("fn", FNS)
def test_labels_out_of_range(fn):
    bad = _labels()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\] for C=3"):
        fn(_x(), bad)
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="target labels must lie in"):
        fn(_x(), bad)
    # besides ignore_index, the rest must be valid; the ignored value itself is allowed
    with pytest.raises(ValueError, match=r"besides ignore_index=255"):
        fn(_x(), bad, ignore_index=255)
    fn(_x(), bad, ignore_index=-1)


@pytest.mark.parametrize("backend", dt.ops.available_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("fn", FNS + (dt.dice_ce_loss,))
def test_labels_checked_by_count(fn, dtype, backend, monkeypatch):
    """On the CPU without ignore_index the label check reads the forward's T row instead of the labels:
    valid labels never reach check_target_values, and one bad label anywhere (either image, either end
    of the range, the label dtype's extremes) still raises with the values found."""
    calls = []
    real = dt.ops.check_target_values
    monkeypatch.setattr(dt.ops, "check_target_values", lambda *a: calls.append(1) or real(*a))
    x, good = _x(2, 4, 3, 5), _labels(2, 4, 3, 5).to(dtype)
    fn(x.requires_grad_(), good, backend=backend).backward()
    assert calls == [] and x.grad is not None
    info = torch.iinfo(dtype)
    values = sorted(v for v in {4, info.max, -1, info.min} if info.min <= v <= info.max and not 0 <= v <= 3)
    for value in values:
        for where in [(0, 0, 0), (1, 2, 4)]:
            bad = good.clone()
            bad[where] = value
            with pytest.raises(ValueError, match=rf"must lie in \[0, 3\] for C=4 channels; found values in \[{value}, {value}\]"):
                fn(x, bad, backend=backend)
    assert len(calls) == 2 * len(values)
    # beyond 2^24 pixels per image float32 counts are no longer exact: the labels are read instead
    huge = torch.empty(1, 2, 1).expand(1, 2, 2 ** 24 + 1)
    assert dt.ops.labels_checked_by_count(huge[:, :, : 2 ** 24], torch.zeros(1, 1, dtype=torch.long).expand(1, 2 ** 24), None)
    assert not dt.ops.labels_checked_by_count(huge, torch.zeros(1, 1, dtype=torch.long).expand(1, 2 ** 24 + 1), None)
    assert not dt.ops.labels_checked_by_count(x, good, 255)  # ignored pixels count in no T


def test_binary_labels_out_of_range():
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 1\] for C=1"):
        dt.dice_loss(_x(2, 1), torch.full((2, 4, 5), 2), activation="sigmoid")


@pytest.mark.parametrize("fn", FNS)
def test_ignore_index_needs_labels(fn):
    with pytest.raises(ValueError, match="ignore_index needs integer label targets"):
        fn(_x(), torch.rand(2, 3, 4, 5), ignore_index=0)
    onehot = torch.nn.functional.one_hot(_labels(), 3).movedim(-1, 1)
    with pytest.raises(ValueError, match="ignore_index needs integer label targets"):
        fn(_x(), onehot, ignore_index=0)  # an integer one-hot target has no labels to compare


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("option,value", [("activation", "relu"), ("activation", "Softmax"), ("reduction", "avg"),
                                          ("reduction", None), ("backend", "gpu")])
def test_unknown_option_strings(fn, option, value):
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        fn(_x(), _labels(), **{option: value})


@pytest.mark.parametrize("cls", MODS)
@pytest.mark.parametrize("option,value", [("activation", "relu"), ("reduction", "avg"), ("backend", "gpu"),
                                          ("smooth_nr", -1.0), ("smooth_dr", float("nan"))])
def test_modules_validate_at_construction(cls, option, value):
    with pytest.raises(ValueError, match=option):
        cls(**{option: value})


@pytest.mark.parametrize("option,value", [("weighting", "log"), ("absent_weight", "min")])
def test_generalized_options(option, value):
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        dt.generalized_dice_loss(_x(), _labels(), **{option: value})
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        dt.GeneralizedDiceLoss(**{option: value})


@pytest.mark.parametrize("option,value,error", [
    ("alpha", -0.1, ValueError), ("beta", math.inf, ValueError), ("gamma", 0.0, ValueError),
    ("gamma", -1.0, ValueError), ("alpha", "0.5", TypeError), ("beta", True, TypeError)])
def test_tversky_options(option, value, error):
    with pytest.raises(error, match=option):
        dt.tversky_loss(_x(), _labels(), **{option: value})
    with pytest.raises(error, match=option):
        dt.TverskyLoss(**{option: value})(_x(), _labels())


def test_tversky_log_loss_needs_gamma_one():
    with pytest.raises(ValueError, match="log_loss=True is defined for gamma=1"):
        dt.tversky_loss(_x(), _labels(), log_loss=True, gamma=2.0)


@pytest.mark.parametrize("fn", FNS)
def test_class_weights(fn):
    with pytest.raises(ValueError, match=r"class_weights must be finite and >= 0"):
        fn(_x(), _labels(), class_weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"class_weights must have length 3 \(C=3\), got 2"):
        fn(_x(), _labels(), class_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"class_weights must have length 3 or 2"):
        fn(_x(), _labels(), class_weights=[1.0, 1.0, 1.0, 1.0], include_background=False)


@pytest.mark.parametrize("cls", MODS)
def test_module_class_weights(cls):
    with pytest.raises(ValueError, match="class_weights must be finite and >= 0"):
        cls(class_weights=[1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="class_weights must be 1-D"):
        cls(class_weights=[[1.0, 2.0, 1.0]])
    with pytest.raises(ValueError, match="class_weights must have length 3"):
        cls(class_weights=[1.0, 2.0])(_x(), _labels())


@pytest.mark.parametrize("fn", FNS)
def test_softmax_needs_two_channels(fn):
    with pytest.raises(ValueError, match="activation='softmax' needs C >= 2"):
        fn(_x(2, 1), torch.randint(0, 2, (2, 4, 5)))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5), (2, 0, 4, 5)])
def test_empty(fn, shape):
    x = torch.randn(shape)
    t = torch.zeros(shape[0], *shape[2:], dtype=torch.long)
    with pytest.raises(ValueError, match="input must be non-empty"):
        fn(x, t, activation="sigmoid")


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("name", ["smooth_nr", "smooth_dr"])
@pytest.mark.parametrize("value", [-1e-5, float("nan"), math.inf, "1e-5", True, torch.ones(2)])
def test_bad_smoothing(fn, name, value):
    numeric = isinstance(value, float)
    with pytest.raises(ValueError if numeric else TypeError,
                       match=f"{name} must be a finite number >= 0" if numeric else f"{name} must be a real number"):
        fn(_x(), _labels(), **{name: value})


def test_unavailable_backend():
    # "cuda" never runs CPU tensors; "cpu"/"triton" depend on the installation and environment
    missing = [b for b in ("cuda", "cpu", "triton") if b not in dt.ops.available_backends("cpu")]
    assert "cuda" in missing
    for backend in missing:
        with pytest.raises(ValueError, match=f"backend='{backend}' is not available for cpu tensors"):
            dt.dice_loss(_x(), _labels(), backend=backend)
        # it is also a RuntimeError (an environment problem), for callers that catch that
        with pytest.raises(RuntimeError, match="is not available"):
            dt.ops.dice_stats(_x(), _labels(), "softmax", 1, None, backend)


def test_operator_power():
    with pytest.raises(ValueError, match="power must be 1 or 2"):
        dt.ops.dice_stats(_x(), _labels(), "softmax", 3, None, "reference")


def test_target_on_another_device():
    with pytest.raises(ValueError, match="target is on meta but input is on cpu"):
        dt.dice_loss(_x(), _labels().to("meta"))


def test_single_channel_include_background_warns():
    with pytest.warns(UserWarning, match="include_background=False is ignored for single-channel input"):
        dt.dice_loss(_x(2, 1), torch.randint(0, 2, (2, 4, 5)), activation="sigmoid", include_background=False)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_nan_input_gives_nan_loss(fn, activation):
    x = torch.rand(2, 3, 4, 5)
    x[0, 1, 2, 3] = float("nan")
    x.requires_grad_()
    loss = fn(x, _labels(), activation=activation, backend="reference")
    assert torch.isnan(loss)
    loss.backward()  # no exception; the gradient is NaN too
    assert torch.isnan(x.grad).any()


@pytest.mark.parametrize("cls", MODS)
def test_compiled_loss_skips_data_checks(cls):
    """Under torch.compile(fullgraph=True) valid inputs compile; the label-range check (data-dependent,
    a graph break) is skipped, and an out-of-range label then matches no class, as in the kernels."""
    torch._dynamo.reset()
    fn = torch.compile(cls(backend="reference"), fullgraph=True, backend="aot_eager")
    x, t = _x(), _labels()
    torch.testing.assert_close(fn(x, t), cls(backend="reference")(x, t), rtol=1e-6, atol=1e-7)
    bad = t.clone()
    bad[0, 0, 0] = 7
    out = fn(x, bad)  # no exception
    # equals the loss with that pixel's target row all zero (float one-hot target)
    onehot = torch.nn.functional.one_hot(t, 3).movedim(-1, 1).float()
    onehot[0, :, 0, 0] = 0
    torch.testing.assert_close(out, cls(backend="reference")(x, onehot), rtol=1e-6, atol=1e-7)


def test_uint8_labels_with_negative_ignore_index():
    """255 in uint8 labels is an out-of-range label, not the ignored value -1."""
    t = torch.zeros(2, 4, 5, dtype=torch.uint8)
    t[0, 0, 0] = 255
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\] .*besides ignore_index=-1"):
        dt.dice_loss(_x(), t, ignore_index=-1)
    dt.dice_loss(_x(), t, ignore_index=255)
