"""dicetorch.metrics against torchmetrics.segmentation (1.9): exactly equal values over a grid of
arguments and input formats, "logits" input (fused argmax) equal to torchmetrics on the same logits,
ignore_index equal to torchmetrics on the counted pixels only, and the optional-dependency error.

Synchronization across ranks is tested on 2 gloo processes in tests/test_distributed.py.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import warnings

import pytest
import torch

tm_seg = pytest.importorskip("torchmetrics.segmentation")

from dicetorch import metrics as dm  # noqa: E402
from dicetorch import ops  # noqa: E402

NAN = float("nan")
KINDS = ("dice", "generalized", "iou")
TM = {"dice": tm_seg.DiceScore, "generalized": tm_seg.GeneralizedDiceScore, "iou": tm_seg.MeanIoU}
DM = {"dice": dm.DiceScore, "generalized": dm.GeneralizedDiceScore, "iou": dm.MeanIoU}
ARGS = {
    "dice": [dict(average=a, aggregation_level=g, include_background=b)
             for a, g, b in itertools.product(["micro", "macro", "weighted", "none", None], ["samplewise", "global"],
                                              [True, False])],
    "generalized": [dict(per_class=p, weight_type=w, include_background=b)
                    for p, w, b in itertools.product([False, True], ["square", "simple", "linear"], [True, False])],
    "iou": [dict(per_class=p, include_background=b, given=g)
            for p, b, g in itertools.product([False, True], [True, False], [True, False])],
}
BACKENDS = [b for b in ops.hard_activation_backends("cpu") if b != "triton"]


def batches(c=4, spatial=(9, 10), sizes=(3, 2), seed=0, absent=True, dtype=torch.float32):
    """Updates of (logits, labels); some classes absent from some images (NaN / absent-weight paths)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        x = (3 * torch.randn(n, c, *spatial, generator=g, dtype=torch.float64)).to(dtype)
        y = torch.randint(0, c, (n, *spatial), generator=g)
        if absent:
            y[0] = y[0].clamp_max(c - 2)  # the last class absent from image 0's target
            x[0, c - 1] -= 100.0  # ... and from its prediction (0 / 0)
            if n > 1:
                y[1] = torch.where(y[1] == 1, 0, y[1])  # class 1 absent from image 1's target
        out.append((x, y))
    return out


def onehot(y, c):
    return torch.nn.functional.one_hot(y, c).movedim(-1, 1)


def make_pair(kind, args, c, fmt):
    """(torchmetrics metric, dicetorch metric) with the same arguments."""
    args = dict(args)
    given = args.pop("given", True)
    num = c if given else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm_fmt = {"logits": "mixed"}.get(fmt, fmt)
        if kind == "iou":
            a = TM[kind](num_classes=num if tm_fmt != "index" else c, input_format=tm_fmt, **args)
            b = DM[kind](num_classes=num if fmt != "index" else c, input_format=fmt, **args)
        else:
            a = TM[kind](num_classes=c, input_format=tm_fmt, **args)
            b = DM[kind](num_classes=c, input_format=fmt, **args)
    return a, b


# each variant: (dicetorch format, torchmetrics format, how to make (preds, target) for each from (x, y))
VARIANTS = {
    "index": ("index", "index", lambda x, y, c: (x.argmax(1), y)),
    "one-hot int": ("one-hot", "one-hot", lambda x, y, c: (onehot(x.argmax(1), c), onehot(y, c))),
    "one-hot bool": ("one-hot", "one-hot", lambda x, y, c: (onehot(x.argmax(1), c).bool(), onehot(y, c).bool())),
    "one-hot float preds": ("one-hot", "one-hot", lambda x, y, c: (x, onehot(y, c))),
    "one-hot float both": ("one-hot", "one-hot", lambda x, y, c: (x, onehot(y, c).float())),
    "mixed onehot-index": ("mixed", "mixed", lambda x, y, c: (onehot(x.argmax(1), c), y)),
    "mixed index-onehot": ("mixed", "mixed", lambda x, y, c: (x.argmax(1), onehot(y, c))),
    "mixed float-index": ("mixed", "mixed", lambda x, y, c: (x, y)),
}


def run(metric, updates):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p, t in updates:
            metric.update(p, t)
        return metric.compute()


def assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_formats_equal_torchmetrics(kind, variant):
    """Every torchmetrics input format, every argument combination: bit-identical results."""
    fmt, tm_fmt, make = VARIANTS[variant]
    c = 4
    data = batches(c)
    for args in ARGS[kind]:
        a, b = make_pair(kind, args, c, fmt)
        want = run(a, [make(x, y, c) for x, y in data])
        got = run(b, [make(x, y, c) for x, y in data])
        assert_same(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["labels", "onehot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_logits_equal_torchmetrics(kind, target, dtype):
    """input_format="logits": raw scores in, the argmax fused; equal to torchmetrics on the same logits."""
    c = 5
    data = batches(c, spatial=(6, 5, 4), sizes=(2, 3, 1), seed=1, dtype=dtype)
    for backend in BACKENDS:
        for args in ARGS[kind]:
            a, b = make_pair(kind, args, c, "logits")
            b.backend = backend
            if target == "onehot":
                a.input_format = "one-hot"
            tt = (lambda y: y) if target == "labels" else (lambda y: onehot(y, c))
            want = run(a, [(x, tt(y)) for x, y in data])
            got = run(b, [(x, tt(y)) for x, y in data])
            assert_same(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_nan_inf_ties_channels_last(kind):
    """NaN / inf / tied logits and channels-last input: the fused argmax is torch.argmax."""
    c = 3
    data = batches(c, spatial=(8, 9), sizes=(2, 3), seed=2, absent=False)
    x0 = data[0][0]
    x0[0, :, 0, :4] = NAN
    x0[0, 1, 1, :5] = NAN
    x0[1, :, 2] = 1.0  # ties
    x0[1, :, 3] = -float("inf")
    x0[1, 2, 4] = float("inf")
    data = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in data]
    for args in ARGS[kind]:
        a, b = make_pair(kind, args, c, "logits")
        assert_same(run(b, data), run(a, data))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_torchmetrics(kind):
    """forward(): the batch value, and the accumulated state, update after update."""
    c = 4
    data = batches(c, spatial=(6, 7), sizes=(3, 2, 1), seed=9)
    for args in ARGS[kind]:
        a, b = make_pair(kind, args, c, "logits")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for x, y in data:
                assert_same(b(x, y), a(x, y))
            assert_same(b.compute(), a.compute())


def kept_pixels(x, y, ignore):
    """Per image: (1, C, K, 1) logits and (1, K, 1) labels of the counted pixels only (3-D labels:
    MeanIoU reads 2-D label input as one (H, W) image)."""
    out = []
    for n in range(x.shape[0]):
        keep = y[n] != ignore
        out.append((x[n][:, keep].reshape(1, x.shape[1], -1, 1), y[n][keep].reshape(1, -1, 1)))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["logits", "index", "mixed"])
@pytest.mark.parametrize("ignore_index", [255, -1])
def test_ignore_index_equals_torchmetrics_on_counted_pixels(kind, fmt, ignore_index):
    """Ignored pixels count nowhere: the same as torchmetrics on the counted pixels alone (per image)."""
    c = 4
    g = torch.Generator().manual_seed(3)
    data = batches(c, spatial=(7, 8), sizes=(3, 2), seed=4)
    updates_dm, updates_tm = [], []
    for x, y in data:
        y = torch.where(torch.rand(y.shape, generator=g) < 0.3, ignore_index, y)
        if ignore_index == 255:
            y = y.to(torch.uint8)
        x[y.unsqueeze(1).expand_as(x) == ignore_index] = NAN  # garbage there changes nothing
        for n in range(x.shape[0]):  # one image per update on both sides (the generalized-Dice fill rule)
            xn, yn = x[n:n + 1], y[n:n + 1]
            preds = {"logits": xn, "index": xn.argmax(1), "mixed": onehot(xn.argmax(1), c)}[fmt]
            updates_dm.append((preds, yn))
        for xk, yk in kept_pixels(x, y, ignore_index):
            yk = yk.long()
            preds = {"logits": xk, "index": xk.argmax(1), "mixed": onehot(xk.argmax(1), c)}[fmt]
            updates_tm.append((preds, yk))
    for args in ARGS[kind]:
        a, b = make_pair(kind, args, c, fmt)
        b.ignore_index = ignore_index
        assert_same(run(b, updates_dm), run(a, updates_tm))


def test_counts_are_exact_beyond_fp32_range(monkeypatch):
    """Images larger than fp32 can count exactly are counted in pieces (exercised with a small piece)."""
    monkeypatch.setattr(dm, "_EXACT_PIXELS", 7)
    x, y = batches(3, spatial=(5, 9), sizes=(2,), seed=5)[0]
    got = dm.hard_counts(x, y, num_classes=3, input_format="logits", ignore_index=None)
    monkeypatch.setattr(dm, "_EXACT_PIXELS", 2**24 - 1)
    want = dm.hard_counts(x.argmax(1), y, num_classes=3, input_format="index")
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.int64 and torch.equal(g_, w_)


def test_hard_counts_formats_agree():
    x, y = batches(4, sizes=(3,), seed=6)[0]
    ref = dm.hard_counts(x.argmax(1), y, num_classes=4, input_format="index")
    for fmt, p, t in (("logits", x, y), ("logits", x, onehot(y, 4)), ("one-hot", x, onehot(y, 4)),
                      ("one-hot", onehot(x.argmax(1), 4), onehot(y, 4)), ("mixed", x, y),
                      ("mixed", x.argmax(1), onehot(y, 4))):
        for got, want in zip(dm.hard_counts(p, t, num_classes=4, input_format=fmt), ref):
            assert torch.equal(got, want), fmt


def test_errors():
    x, y = batches(3, sizes=(2,), seed=7)[0]
    with pytest.raises(ValueError, match="input_format must be one of"):
        dm.DiceScore(num_classes=3, input_format="probabilities")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        dm.DiceScore(num_classes=0)
    with pytest.raises(ValueError, match="num_classes must be given when input_format='index'"):
        dm.MeanIoU(input_format="index")
    with pytest.raises(ValueError, match="ignore_index needs an integer label target"):
        dm.DiceScore(num_classes=3, input_format="logits", ignore_index=0).update(x, onehot(y, 3))
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\]"):
        dm.DiceScore(num_classes=3, input_format="logits").update(x, y + 1)
    with pytest.raises(ValueError, match=r"preds labels must lie in \[0, 2\]"):
        dm.DiceScore(num_classes=3, input_format="index").update(x.argmax(1) + 1, y)
    with pytest.raises(ValueError, match="3 channels but num_classes=4"):
        dm.DiceScore(num_classes=4, input_format="logits").update(x, y)
    with pytest.raises(TypeError, match="float preds"):
        dm.DiceScore(num_classes=3, input_format="logits").update(y, y)


def test_logits_metric_runs_fused_and_without_grad():
    x, y = batches(3, sizes=(2,), seed=8)[0]
    x.requires_grad_()
    m = dm.DiceScore(num_classes=3, input_format="logits")
    out = m(x, y)  # forward: the batch value, and accumulates
    assert not out.requires_grad
    assert "cpu" in BACKENDS or BACKENDS == ["reference"]


def test_missing_torchmetrics_names_the_extra():
    code = ("import sys; sys.modules['torchmetrics'] = None\n"
            "try:\n    import dicetorch.metrics\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ImportError:" in res.stdout and "dicetorch[metrics]" in res.stdout, res.stdout + res.stderr
