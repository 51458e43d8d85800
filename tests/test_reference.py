"""The (N, 3, C) statistics of ``dice_stats`` against explicit float64 loops (tests/naive_dice.py).

Covers the label semantics of the backend contract: channel k matches label k (C == 1: label 1),
out-of-range labels match no channel but still count in P, ``ignore_index`` pixels count nowhere;
float / int / bool one-hot and soft targets; 0 to 3 spatial dims; strided and channels-last inputs.
Runs on the reference backend and on "auto" (the compiled CPU kernel when it is built).
float64 input: the sums differ only in order, rtol 1e-12.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import dicetorch as dt
import naive_dice as naive
from dicetorch import reference
from test_losses import SPATIAL, TARGET_KINDS, make_case

TOL = dict(rtol=1e-12, atol=1e-12)
BACKENDS = ("reference", "auto")


def naive_stats(x, t, activation, power, ignore_index=None):
    i_, p_, t_, _ = naive.stats(x, t, activation, power, ignore_index)
    return torch.from_numpy(np.stack([i_, p_, t_], axis=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
@pytest.mark.parametrize("c", [1, 2, 5])
def test_stats_against_loops(backend, kind, ndim, c):
    seed = zlib.crc32(f"{kind}{ndim}{c}".encode())
    for activation in ("softmax", "sigmoid", "none"):
        if activation == "softmax" and c == 1:
            continue
        ii = None
        if kind in ("labels", "labels1", "labels_i32"):
            ii = -1
        elif kind == "labels_u8":
            ii = 255
        x, t = make_case(seed, n=3, c=c, spatial=SPATIAL[ndim], kind=kind, activation=activation,
                         ignore_index=ii)
        for power in (1, 2):
            got = dt.ops.dice_stats(x, t, activation, power, ii, backend)
            assert got.shape == (3, 3, c) and got.dtype == torch.float64
            torch.testing.assert_close(got, naive_stats(x, t, activation, power, ii), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_match_no_channel(backend):
    """The operator compares labels: 7, -3 and 2**32 + 1 match no channel (no wrap to int32), yet count in P."""
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    lab = torch.tensor([[0, 1, 2, 7, -3, 2**32 + 1]])
    s = dt.ops.dice_stats(x, lab, "softmax", 1, None, backend)
    p = torch.softmax(x, 1)[0]
    torch.testing.assert_close(s[0, 1], p.sum(-1), **TOL)  # P over all six pixels
    torch.testing.assert_close(s[0, 2], torch.ones(3, dtype=torch.float64), **TOL)  # one pixel per class
    torch.testing.assert_close(s[0, 0], torch.stack([p[0, 0], p[1, 1], p[2, 2]]), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_single_channel(backend):
    """C == 1: the channel is the foreground, label 1; label 0 is background; ignore_index still applies."""
    x = torch.randn(2, 1, 5, dtype=torch.float64)
    lab = torch.tensor([[0, 1, 1, 0, 255], [1, 0, 0, 0, 0]])
    s = dt.ops.dice_stats(x, lab, "sigmoid", 2, 255, backend)
    p = torch.sigmoid(x)[:, 0]
    fg = (lab == 1).double()
    valid = (lab != 255).double()
    want = torch.stack([(p * fg).sum(-1), (p * p * valid).sum(-1), fg.sum(-1)], dim=1).unsqueeze(-1)
    torch.testing.assert_close(s, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [0, 2, -100, 255])
def test_ignore_index_excluded_from_all_sums(backend, ignore_index):
    x, t = make_case(3, c=3, spatial=(6, 7), ignore_index=ignore_index)
    s = dt.ops.dice_stats(x, t, "softmax", 1, ignore_index, backend)
    keep = t != ignore_index
    # the same as dropping the ignored pixels altogether, image by image
    for n in range(2):
        xs = x[n].reshape(3, -1)[:, keep[n].reshape(-1)].unsqueeze(0)
        ts = t[n].reshape(-1)[keep[n].reshape(-1)].unsqueeze(0)
        torch.testing.assert_close(s[n:n + 1], reference.dice_stats_reference(xs, ts, "softmax", 1, None), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_channels_last_inputs(backend):
    base = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 4, 5))
    x = base[:, :, ::2, ::2]  # non-contiguous, not channels-last
    want = naive_stats(x, t, "softmax", 2)
    torch.testing.assert_close(dt.ops.dice_stats(x, t, "softmax", 2, None, backend), want, **TOL)
    xl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dt.ops.dice_stats(xl, t, "softmax", 2, None, backend), want, **TOL)
    # a float target laid out differently from the input
    oh = torch.nn.functional.one_hot(t, 3).movedim(-1, 1).double()
    torch.testing.assert_close(dt.ops.dice_stats(xl, oh, "softmax", 2, None, backend), want, **TOL)
    tt = t.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous labels
    torch.testing.assert_close(dt.ops.dice_stats(x, tt, "softmax", 2, None, backend), want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_dtype_conversions(backend):
    x, lab = make_case(4, c=3, spatial=(4, 4))
    want = naive_stats(x, lab, "softmax", 1)
    for t in (lab.to(torch.int16), lab.to(torch.int8), lab.to(torch.uint8), lab.unsqueeze(1).to(torch.int32)):
        torch.testing.assert_close(dt.ops.dice_stats(x, t, "softmax", 1, None, backend), want, **TOL)
    oh32 = torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).float()  # float32 target, float64 input
    torch.testing.assert_close(dt.ops.dice_stats(x, oh32, "softmax", 1, None, backend), want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_labels(backend):
    """Bool targets: labels (N, *) / (N, 1, *) (values 0/1), or a one-hot shaped like the input."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    b = torch.rand(2, 4, 5) < 0.5
    want = naive_stats(x, b.long(), "softmax", 1)
    torch.testing.assert_close(dt.ops.dice_stats(x, b, "softmax", 1, None, backend), want, **TOL)
    torch.testing.assert_close(dt.ops.dice_stats(x, b.unsqueeze(1), "softmax", 1, None, backend), want, **TOL)
    oh = torch.nn.functional.one_hot(b.long(), 3).movedim(-1, 1).bool()
    torch.testing.assert_close(dt.ops.dice_stats(x, oh, "softmax", 1, None, backend), want, **TOL)


def test_reference_activation_precision():
    """fp16/bf16 inputs are activated and summed in float32 (not in the input format)."""
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    t = torch.randint(0, 3, (2, 64))
    got = reference.dice_stats_reference(x, t, "softmax", 2, None)
    want = reference.dice_stats_reference(x.float(), t, "softmax", 2, None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_soft_target_squared_sums():
    """T = sum t^q for soft targets (q = 2 is not sum t)."""
    x, t = make_case(5, c=3, spatial=(5,), kind="soft")
    s = dt.ops.dice_stats(x, t, "softmax", 2, None, "reference")
    torch.testing.assert_close(s[:, 2], (t * t).sum(-1), **TOL)
    assert not torch.allclose(s[:, 2], t.sum(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_compared_by_value(backend):
    """ignore_index=-1 never equals a uint8 label (255 is not -1), and an ignore_index beyond the
    label dtype's range is simply never met (no wrap-around, no overflow error)."""
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    lab = torch.tensor([[0, 1, 255, 2]])
    want = naive_stats(x, lab, "softmax", 1)  # 255 matches no class and is not ignored
    torch.testing.assert_close(dt.ops.dice_stats(x, lab.to(torch.uint8), "softmax", 1, -1, backend), want, **TOL)
    torch.testing.assert_close(dt.ops.dice_stats(x, lab.to(torch.int32), "softmax", 1, 2**40, backend), want,
                               **TOL)
