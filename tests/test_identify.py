"""Tests of :func:`dicetorch.presets.identify`: every preset, MONAI / smp / kornia originals and the seed
transcriptions are identified, and ``build()`` reproduces each on inputs the identification never saw.

Every check compares the loss value and the input gradient in float64 with rtol 1e-9 (the identifier's
own promise).  The fresh inputs come from another generator and another distribution than the probes
(logits N(0, 2²), another image size, batches of 2 and 5, and a class absent from an image).
"""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import dicetorch as dt
from dicetorch import presets as P

import kornia  # noqa: E402  (kornia 0.9)
import monai.losses  # noqa: E402  (MONAI 1.6)
import segmentation_models_pytorch as smp  # noqa: E402  (smp 0.6)

import test_presets as T  # the transcriptions of nnU-Net, Keras, MATLAB, V-Net and the seed posts

CL = dict(layout="channels_last", target="onehot", target_first=True)  # Keras: loss(y_true, y_pred), (N, *S, C)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _value_grad(fn, args, pos):
    args = list(args)
    args[pos] = args[pos].detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(*args)
    cot = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (grad,) = torch.autograd.grad((out * cot).sum(), args[pos])
    return out.detach(), grad


def assert_reproduces(ident, loss_fn, num_classes=4, spatial=(8, 8), seed=0, absent=True):
    """``ident.build()`` equals ``loss_fn`` on fresh inputs: value and input gradient, relative 1e-9."""
    assert ident.exact, ident.reason
    module = ident.build()
    conv = ident.convention
    gen = torch.Generator().manual_seed(12345 + seed)
    other = tuple(s + 1 for s in spatial)
    pos = 1 if conv.target_first else 0
    for n, sp, drop in ((2, spatial, False), (5, other, False), (3, spatial, absent)):
        lab = torch.randint(0, num_classes, (n, *sp), generator=gen)
        lab.view(n, -1)[:, :num_classes] = torch.arange(num_classes)  # every class in every image...
        if drop:
            lab[0][lab[0] == num_classes - 1] = 0  # ...except one class in image 0
        if ident.activation == "none":
            x = torch.rand(n, num_classes, *sp, generator=gen, dtype=torch.float64) * 0.98 + 0.01
        else:
            x = torch.randn(n, num_classes, *sp, generator=gen, dtype=torch.float64) * 2
        args = conv.args(x, lab, num_classes)
        v1, g1 = _value_grad(loss_fn, args, pos)
        v2, g2 = _value_grad(module, args, pos)
        assert v1.shape == v2.shape
        torch.testing.assert_close(v2, v1, rtol=1e-9, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-12 * float(g1.nan_to_num().abs().max()) + 1e-300,
                                   equal_nan=True)


def _named(presets, name):
    return any(p == name or p.startswith(name + "(") for p in presets)


# ----------------------------------------------------------------------------------------------
# every registered preset
# ----------------------------------------------------------------------------------------------
PRESET_CASES = {
    # name: (preset arguments, identify keywords, reproduced by a plain dicetorch loss?)
    "matlab": ((), dict(layout="matlab", target="onehot"), False),          # absent class: NaN
    "monai_dice": ((), dict(target="onehot"), True),
    "monai_generalized_dice": ((), dict(target="onehot"), False),           # float32 weights
    "monai_tversky": ((), dict(target="onehot"), True),
    "smp_dice": (("multiclass",), {}, False),                               # absent class: loss 0
    "smp_tversky": (("multiclass",), {}, False),
    "nnunet_soft_dice": ((), {}, True),
    "kornia_dice": ((), {}, True),
    "keras_dice": ((), CL, True),
    "vnet": ((), {}, True),
    "tf_dice": ((), dict(layout="channels_last", target="onehot"), True),
    "mxnet_dice": ((), dict(target="onehot"), True),
    "keras_generalized_dice_seed": ((), dict(CL, spatial=(4, 4, 3)), False),  # absent class: weight 1e5
    "keras_generalized_dice_fixed": ((), CL, False),                         # absent class: weight eps
}


def test_every_preset_has_a_case():
    assert set(PRESET_CASES) == set(P.PRESETS)


@pytest.mark.parametrize("name", list(PRESET_CASES))
def test_identify_preset(name):
    args, kw, in_family = PRESET_CASES[name]
    loss_fn = P.PRESETS[name](*args)
    ident = P.identify(loss_fn, **kw)
    assert ident.exact, ident.reason
    assert ident.in_family == in_family, ident
    assert _named(ident.presets, name), ident.presets
    if not in_family:
        assert "presets." in ident.reason and "build() returns that" in ident.reason
    assert_reproduces(ident, loss_fn, spatial=kw.get("spatial", (8, 8)))


def test_identify_reads_the_choices_of_monai_dice():
    ident = P.identify(monai.losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=False),
                       target="labels_1ch")
    assert (ident.loss, ident.activation, ident.q, ident.batch, ident.include_background) == \
        ("dice", "softmax", 1, False, False)
    assert (ident.smooth_nr, ident.smooth_dr, ident.reduction, ident.scale, ident.offset) == (1e-5, 1e-5, "mean", 1, 0)
    assert ident.class_weights is None and not ident.log_loss
    assert ident.kwargs() == ("DiceLoss", dict(activation="softmax", smooth_nr=1e-5, smooth_dr=1e-5, batch=False,
                                               include_background=False, reduction="mean", squared=False))
    assert "softmax(x)" in ident.formula and "k=1..3" in ident.formula
    assert ident.presets == ["monai_dice(softmax=True, include_background=False, to_onehot_y=True)",
                             # Tversky with alpha = beta = 1/2 is Dice with half the smoothing
                             "monai_tversky(softmax=True, include_background=False, to_onehot_y=True, smooth_nr=5e-06, "
                             "smooth_dr=5e-06)"]
    assert isinstance(ident.build().loss, dt.DiceLoss)  # the fused operator, not a wrapper of MONAI


# ----------------------------------------------------------------------------------------------
# MONAI 1.6 originals over their argument grids
# ----------------------------------------------------------------------------------------------
_ACTS = [dict(softmax=True), dict(sigmoid=True), {}]


def _monai_cases(count=26, seed=7):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        kw = dict(rng.choice(_ACTS), include_background=rng.random() < 0.5, to_onehot_y=rng.random() < 0.5,
                  squared_pred=rng.random() < 0.4, jaccard=rng.random() < 0.3, batch=rng.random() < 0.5,
                  reduction=rng.choice(["mean", "sum", "none"]))
        kw["smooth_nr"], kw["smooth_dr"] = rng.choice([(1e-5, 1e-5), (0.0, 1e-3), (1.0, 1.0), (1e-6, 0.1)])
        if rng.random() < 0.3:
            kw["weight"] = [0.5 + k for k in range(4 if kw["include_background"] else 3)]
        cases.append(("DiceLoss", kw))
    for _ in range(count // 3):
        kw = dict(rng.choice(_ACTS), include_background=rng.random() < 0.5, to_onehot_y=rng.random() < 0.5,
                  w_type=rng.choice(["square", "simple", "uniform"]), batch=rng.random() < 0.5,
                  reduction=rng.choice(["mean", "sum", "none"]))
        cases.append(("GeneralizedDiceLoss", kw))
    for _ in range(count // 3):
        ab = rng.choice([(0.5, 0.5), (0.3, 0.7), (1.0, 1.0), (0.0, 2.0), (0.8, 0.2)])
        kw = dict(rng.choice(_ACTS), include_background=rng.random() < 0.5, to_onehot_y=rng.random() < 0.5,
                  alpha=ab[0], beta=ab[1], batch=rng.random() < 0.5, reduction=rng.choice(["mean", "sum", "none"]),
                  smooth_nr=rng.choice([1e-5, 0.0, 1.0]), smooth_dr=rng.choice([1e-5, 1.0, 0.01]))
        cases.append(("TverskyLoss", kw))
    return cases


@pytest.mark.parametrize("cls,kw", _monai_cases(), ids=lambda v: str(v))
def test_identify_monai(cls, kw):
    loss_fn = getattr(monai.losses, cls)(**kw)
    ident = P.identify(loss_fn, target="labels_1ch" if kw["to_onehot_y"] else "onehot")
    preset = {"DiceLoss": "monai_dice", "GeneralizedDiceLoss": "monai_generalized_dice",
              "TverskyLoss": "monai_tversky"}[cls]
    if kw.get("squared_pred") and kw["to_onehot_y"]:
        # MONAI's one-hot is float32 and its squared path takes the norm of it in float32: T is rounded
        assert not ident.exact
        assert "float32" in ident.reason or "squared sums" in ident.reason, ident.reason
        return
    assert ident.exact, ident.reason
    if kw.get("squared_pred") and kw.get("jaccard"):
        assert not ident.in_family and "squared sums" in ident.reason  # no squared Tversky in dicetorch
    elif cls == "GeneralizedDiceLoss" and kw["w_type"] != "uniform":
        # MONAI computes the weights in float32: its preset reproduces that, float64 weights do not
        assert not ident.in_family and "float32" in ident.reason and "c_k/T^" in ident.reason
    else:
        assert ident.in_family, ident.reason
    assert any(p.startswith("monai_") for p in ident.presets), ident.presets
    if cls != "TverskyLoss" or not (kw["alpha"] == kw["beta"] == 1.0):
        assert any(p.startswith(preset) for p in ident.presets), ident.presets
    assert_reproduces(ident, loss_fn)


# ----------------------------------------------------------------------------------------------
# segmentation_models_pytorch 0.6 and kornia 0.9 originals
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,kw,preset,in_family", [
    (lambda: smp.losses.DiceLoss("multiclass"), {}, "smp_dice('multiclass')", False),
    (lambda: smp.losses.DiceLoss("multiclass", log_loss=True, smooth=1.0), {},
     "smp_dice('multiclass', log_loss=True, smooth=1.0)", False),
    (lambda: smp.losses.DiceLoss("multilabel"), dict(target="onehot"), "smp_dice('multilabel')", False),
    (lambda: smp.losses.DiceLoss("multiclass", classes=[1, 2, 3]), {}, "smp_dice('multiclass', classes=[1, 2, 3])",
     False),
    (lambda: smp.losses.TverskyLoss("multiclass", alpha=0.3, beta=0.7), {},
     "smp_tversky('multiclass', alpha=0.3, beta=0.7)", False),
    (lambda: kornia.losses.DiceLoss(), {}, "kornia_dice()", True),
    (lambda: kornia.losses.DiceLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)), {},
     "kornia_dice(weight=", True),
    (lambda: kornia.losses.DiceLoss(average="macro"), {}, "kornia_dice('macro')", False),
])
def test_identify_smp_and_kornia(make, kw, preset, in_family):
    loss_fn = make()
    ident = P.identify(loss_fn, **kw)
    assert ident.exact and ident.in_family == in_family, ident
    assert any(p.startswith(preset) for p in ident.presets), ident.presets
    assert_reproduces(ident, loss_fn)


def test_smp_focal_tversky_is_outside_the_family():
    # smp raises the class *mean* to gamma: not a per-class focal Tversky, and no preset argument makes it one
    ident = P.identify(smp.losses.TverskyLoss("multiclass", alpha=0.3, beta=0.7, gamma=2.0))
    assert not ident.exact and ident.reason
    with pytest.raises(ValueError, match="nothing to build"):
        ident.build()


# ----------------------------------------------------------------------------------------------
# The transcriptions of the originals that do not install here (tests/test_presets.py)
# ----------------------------------------------------------------------------------------------
def _nnunet(**kw):
    return lambda x, y: T.nnunet_memory_efficient_soft_dice(x, y, apply_nonlin=T.NNUNET_NONLIN["softmax"], **kw)


@pytest.mark.parametrize("loss_fn,kw,preset", [
    (T.keras_dice_fn, CL, "keras_dice()"),
    (T.matlab_forward_loss, dict(layout="matlab", target="onehot"), "matlab(layout='NKHW')"),
    (T.tf_dice_loss, dict(layout="channels_last", target="onehot"), "tf_dice()"),
    (lambda a, b: T.tf_dice_loss(a, b, True, True), dict(layout="channels_last", target="onehot"),
     "tf_dice(ignore_background=True, square=True)"),
    (T.mxnet_dice_loss, dict(target="onehot"), "mxnet_dice()"),
    (T.keras_generalized_dice_loss_w, dict(CL, spatial=(4, 4, 3)), "keras_generalized_dice_seed()"),
    (T.keras_gen_dice_fixed, CL, "keras_generalized_dice_fixed()"),
    (lambda a, b: T.keras_gen_dice_fixed(a, b, 0.1), CL, "keras_generalized_dice_fixed(eps=0.1)"),
])
def test_identify_transcriptions(loss_fn, kw, preset):
    ident = P.identify(loss_fn, **kw)
    assert ident.exact, ident.reason
    assert preset in ident.presets, ident.presets
    assert_reproduces(ident, loss_fn, spatial=kw.get("spatial", (8, 8)))


def test_identify_vnet_transcription():
    # the paper's loss uses the foreground channel only: with three classes, class 2 weighs nothing
    ident = P.identify(T.vnet_dice_loss, num_classes=3)
    assert (ident.loss, ident.activation, ident.q, ident.include_background) == ("dice", "softmax", 2, False)
    assert (ident.smooth_nr, ident.smooth_dr) == (0.0, 0.0)
    assert ident.class_weights == (2.0, 0.0) and ident.reduction == "mean"  # mean over 2 classes, one of them 0
    assert_reproduces(ident, T.vnet_dice_loss, num_classes=3)


def test_nnunet_transcription_sums_in_float32():
    kw = dict(batch_dice=True, do_bg=False, smooth=1.0)
    ident = P.identify(_nnunet(**kw))  # float64 probes: nnU-Net's float32 sums show
    assert not ident.exact and "float32" in ident.reason
    ident = P.identify(_nnunet(**kw), dtype=torch.float32)  # float32 probes: exact to float32 rounding
    assert ident.exact, ident.reason
    assert (ident.loss, ident.batch, ident.include_background, ident.offset) == ("dice", True, False, -1.0)
    assert "nnunet_soft_dice(batch_dice=True, do_bg=False)" in ident.presets


# ----------------------------------------------------------------------------------------------
# Unusual choices are found with the right numbers; losses outside the family are refused
# ----------------------------------------------------------------------------------------------
def _onehot(t, c):
    return F.one_hot(t, c).movedim(-1, 1).to(torch.float64)


def unusual_dice(x, t):
    """sigmoid, squared sums, smooth in the denominator only, batch sums, class weights, summed over classes."""
    p, t = torch.sigmoid(x), _onehot(t, x.shape[1])
    dims = (0, *range(2, x.dim()))
    d = 1 - 2 * (p * t).sum(dims) / ((p * p).sum(dims) + (t * t).sum(dims) + 0.5)
    return (torch.tensor([0.0, 1.0, 2.0, 0.5], dtype=x.dtype) * d).sum()


def test_unusual_dice_is_found_with_its_numbers():
    ident = P.identify(unusual_dice)
    assert (ident.loss, ident.activation, ident.q, ident.batch, ident.include_background) == \
        ("dice", "sigmoid", 2, True, False)
    assert (ident.smooth_nr, ident.smooth_dr, ident.scale, ident.offset) == (0.0, 0.5, 1.0, 0.0)
    per_class = torch.tensor(ident.class_weights, dtype=torch.float64) / (3 if ident.reduction == "mean" else 1)
    torch.testing.assert_close(per_class, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), rtol=1e-12, atol=0)
    assert_reproduces(ident, unusual_dice)


def focal_tversky(x, t):
    p, t = x.softmax(1)[:, 1:], _onehot(t, x.shape[1])[:, 1:]
    dims = tuple(range(2, x.dim()))
    tp, fp, fn = (p * t).sum(dims), (p * (1 - t)).sum(dims), ((1 - p) * t).sum(dims)
    return ((1 - (tp + 1e-6) / (tp + 0.7 * fn + 0.3 * fp + 1e-6)) ** 0.75).mean()


def log_dice_per_batch(x, t):
    p, t = x.softmax(1), _onehot(t, x.shape[1])
    dims = (0, *range(2, x.dim()))
    return -torch.log((2 * (p * t).sum(dims) + 1) / (p.sum(dims) + t.sum(dims) + 1)).sum()


def dice_score(x, t):  # a score, not a loss
    p, t = x.softmax(1), _onehot(t, x.shape[1])
    dims = tuple(range(2, x.dim()))
    return ((2 * (p * t).sum(dims) + 1e-5) / (p.sum(dims) + t.sum(dims) + 1e-5)).mean()


def generalized_simple_zero(x, t):
    """1/T weights, an absent class weighs 0, smooth 1e-3 in the denominator only, summed over images."""
    p, t = x.softmax(1), _onehot(t, x.shape[1])
    dims = tuple(range(2, x.dim()))
    vol = t.sum(dims)
    w = torch.where(vol > 0, 1 / vol.clamp_min(1), torch.zeros_like(vol))
    return (1 - 2 * (w * (p * t).sum(dims)).sum(1) / ((w * (p.sum(dims) + vol)).sum(1) + 1e-3)).sum()


@pytest.mark.parametrize("loss_fn,expect", [
    (focal_tversky, dict(loss="tversky", alpha=0.3, beta=0.7, gamma=0.75, smooth_nr=1e-6, smooth_dr=1e-6,
                         include_background=False, reduction="mean")),
    (log_dice_per_batch, dict(loss="dice", log_loss=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)),
    (dice_score, dict(loss="dice", scale=-1.0, offset=1.0, smooth_nr=1e-5, smooth_dr=1e-5)),
    (generalized_simple_zero, dict(loss="generalized_dice", weighting="simple", absent_weight="zero",
                                   smooth_nr=0.0, smooth_dr=1e-3, reduction="sum", batch=False)),
])
def test_hand_written_losses(loss_fn, expect):
    ident = P.identify(loss_fn)
    assert ident.exact and ident.in_family, ident
    for k, v in expect.items():
        assert getattr(ident, k) == v, (k, getattr(ident, k), ident)
    assert_reproduces(ident, loss_fn)


def mse(x, t):
    return F.mse_loss(x.softmax(1), _onehot(t, x.shape[1]))


def pixel_weighted_dice(x, t):
    p, t = x.softmax(1), _onehot(t, x.shape[1])
    w = torch.linspace(0.5, 1.5, p.shape[-1], dtype=p.dtype)
    return 1 - 2 * (w * p * t).sum() / (w * (p + t)).sum()


def hard_dice(x, t):
    p, t = _onehot(x.argmax(1), x.shape[1]) + 0 * x, _onehot(t, x.shape[1])
    return 1 - 2 * (p * t).sum() / (p.sum() + t.sum())


@pytest.mark.parametrize("loss_fn,words", [
    (F.cross_entropy, "not a function of per-class sums"),
    (mse, "linear in the sums"),
    (pixel_weighted_dice, "not a function of per-class sums"),
    (hard_dice, "no gradient"),
    (lambda x, t: dt.dice_loss(x, t[:, :4]), "raised"),
])
def test_not_a_dice_loss(loss_fn, words):
    ident = P.identify(loss_fn)
    assert not ident.exact and words in ident.reason, ident.reason
    assert ident.presets == []
    with pytest.raises(ValueError, match="nothing to build"):
        ident.build()


def test_argument_checks():
    with pytest.raises(ValueError, match="layout"):
        P.identify(dt.DiceLoss(), layout="NHWC")
    with pytest.raises(ValueError, match="target"):
        P.identify(dt.DiceLoss(), target="soft")
    with pytest.raises(ValueError, match="too few pixels"):
        P.identify(dt.DiceLoss(), spatial=(2,))


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def test_cli(capsys):
    rc = P._main(["identify", "monai.losses:DiceLoss(softmax=True, to_onehot_y=True)", "--target", "labels_1ch"])
    out = capsys.readouterr().out
    assert rc == 0 and "exact: True" in out and "monai_dice(softmax=True, to_onehot_y=True)" in out
    assert "formula: loss = mean_{n, k=0..3}" in out
    rc = P._main(["identify", "dicetorch.presets:vnet"])  # a factory, called with no arguments
    assert rc == 0 and "vnet()" in capsys.readouterr().out
    rc = P._main(["identify", "kornia.losses:DiceLoss"])  # a class, instantiated with no arguments
    assert rc == 0 and "kornia_dice()" in capsys.readouterr().out
    rc = P._main(["identify", "torch.nn.functional:cross_entropy"])
    out = capsys.readouterr().out
    assert rc == 1 and "exact: False" in out and "reason:" in out
