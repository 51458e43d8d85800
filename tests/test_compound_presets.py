"""Differential tests of the compound presets (Dice + a pixel loss) against what they reproduce.

MONAI 1.6's ``DiceCELoss``, ``DiceFocalLoss`` and ``GeneralizedDiceFocalLoss`` are called directly;
nnU-Net v2's ``DC_and_CE_loss`` and ``DC_and_BCE_loss`` come from the transcription in
``tests/nnunet_oracle.py``.  Every case compares the loss value and the input gradient (a fixed
cotangent for unreduced losses), or checks that both sides raise the same exception type.

Tolerances.  MONAI, float64 input: the Dice part and the cross-entropy are float64 on both sides and
differ only in summation order and algebraically equal rewrites (``F64`` of tests/test_presets.py,
rtol 1e-10, leaves four orders of magnitude above the few-ulp differences).  MONAI's ``FocalLoss``
computes in float32 whatever the input (``input.float()``): each focal element and its gradient carry
float32 rounding of a few ops (relative <= 1e-6 at eps 6e-8), so cases with a focal part use rtol 1e-5
/ atol 1e-7 on these O(1) values and O(1e-2) gradients; MONAI's float32 one-hot with ``squared_pred``
(relative 6e-8 on T) and its float32 generalized-Dice weights are within that too.  nnU-Net sums the
Dice in float32: those cases run in float32 on both sides (``F32``, rtol 1e-5 / atol 1e-6 for sums of
<= 10^3 terms at eps 1.2e-7).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import dicetorch as dt
from dicetorch import ops
from dicetorch import presets as P

import monai.losses  # noqa: E402  (MONAI 1.6)

import nnunet_oracle as NN
from test_presets import F32, F64, _labels, _one_hot, _sample, _value_and_grad, assert_same

FOCAL = dict(rtol=1e-5, atol=1e-7)

_ACTS = {
    "none": {},
    "sigmoid": {"sigmoid": True},
    "softmax": {"softmax": True},
    "tanh": {"other_act": torch.tanh},
}


def assert_same_or_same_error(ours, theirs, args, tol):
    """Same value and gradient, or the same exception type from both."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _value_and_grad(theirs, args)
    except Exception as err:  # noqa: BLE001 - whatever the original raises, the preset must raise too
        with pytest.raises(type(err)):
            _value_and_grad(ours, args)
        return None
    return assert_same(ours, theirs, args, tol=tol)


def _inputs(cfg, c, gen):
    """(N, C, *spatial) float64 logits and MONAI's target: labels (N, 1, *), one-hot or soft (N, C, *)."""
    n, spatial = 2, cfg["spatial"]
    x = torch.randn(n, c, *spatial, dtype=torch.float64, generator=gen) * 2
    lab = torch.randint(0, max(c, 2), (n, 1, *spatial), generator=gen)
    if c == 1:
        lab = lab.clamp(0, 1)
    if cfg["to_onehot_y"]:
        return x, lab.double()
    if cfg["soft"]:
        return x, torch.rand(n, c, *spatial, dtype=torch.float64, generator=gen)
    return x, (lab.double() if c == 1 else _one_hot(lab[:, 0], c))


def _seed(cfg) -> torch.Generator:
    return torch.Generator().manual_seed(sum(map(ord, str(sorted(cfg.items(), key=str)))) % 2**31)


# ----------------------------------------------------------------------------------------------
# MONAI 1.6
# ----------------------------------------------------------------------------------------------
DICE_CE_SPACE = dict(
    c=[1, 3], act=list(_ACTS), to_onehot_y=[False, True], include_background=[True, False],
    squared_pred=[False, True], jaccard=[False, True], reduction=["mean", "sum"], batch=[False, True],
    weight=[None, "seq"], lambdas=[(1.0, 1.0), (0.3, 1.7)], label_smoothing=[0.0, 0.1], soft=[False, True],
    smooth=[(1e-5, 1e-5), (1.0, 0.5)], spatial=[(4, 5), (3, 2, 3), ()],
)


@pytest.mark.parametrize("cfg", _sample(DICE_CE_SPACE, 36, seed=11), ids=str)
def test_monai_dice_ce(cfg):
    c = cfg["c"]
    weight = None if cfg["weight"] is None else torch.linspace(0.5, 2.0, c, dtype=torch.float64)
    kw = dict(include_background=cfg["include_background"], to_onehot_y=cfg["to_onehot_y"],
              squared_pred=cfg["squared_pred"], jaccard=cfg["jaccard"], reduction=cfg["reduction"],
              smooth_nr=cfg["smooth"][0], smooth_dr=cfg["smooth"][1], batch=cfg["batch"], weight=weight,
              lambda_dice=cfg["lambdas"][0], lambda_ce=cfg["lambdas"][1], label_smoothing=cfg["label_smoothing"],
              **_ACTS[cfg["act"]])
    x, target = _inputs(cfg, c, _seed(cfg))
    assert_same_or_same_error(P.monai_dice_ce(**kw), monai.losses.DiceCELoss(**kw), (x, target),
                              FOCAL if cfg["squared_pred"] else F64)


FOCAL_SPACE = dict(
    c=[1, 3], act=list(_ACTS), to_onehot_y=[False, True], include_background=[True, False],
    squared_pred=[False, True], jaccard=[False, True], reduction=["mean", "sum", "none"], batch=[False, True],
    weight=[None, 0.7, "seq"], gamma=[2.0, 0.0, 1.5], alpha=[None, 0.25, 0.8, "seq"],
    lambdas=[(1.0, 1.0), (0.3, 1.7)], soft=[False, True], spatial=[(4, 5), (3, 2, 3), ()],
)


def _kept(cfg):
    c = cfg["c"]
    return c if cfg["include_background"] or c == 1 else c - 1


@pytest.mark.parametrize("cfg", _sample(FOCAL_SPACE, 36, seed=12), ids=str)
def test_monai_dice_focal(cfg):
    c = cfg["c"]
    weight = [0.5 + k for k in range(_kept(cfg))] if cfg["weight"] == "seq" else cfg["weight"]
    alpha = [0.2 + 0.3 * k for k in range(_kept(cfg))] if cfg["alpha"] == "seq" else cfg["alpha"]
    kw = dict(include_background=cfg["include_background"], to_onehot_y=cfg["to_onehot_y"],
              squared_pred=cfg["squared_pred"], jaccard=cfg["jaccard"], reduction=cfg["reduction"],
              batch=cfg["batch"], gamma=cfg["gamma"], weight=weight, alpha=alpha,
              lambda_dice=cfg["lambdas"][0], lambda_focal=cfg["lambdas"][1], **_ACTS[cfg["act"]])
    x, target = _inputs(cfg, c, _seed(cfg))
    if cfg["alpha"] == "seq" and not cfg["to_onehot_y"]:
        target = target.round()  # MONAI's per-class alpha tests t == 1: 0/1 targets
    assert_same_or_same_error(P.monai_dice_focal(**kw), monai.losses.DiceFocalLoss(**kw), (x, target), FOCAL)


GDF_SPACE = dict(
    c=[1, 3, 4], act=list(_ACTS), to_onehot_y=[False, True], include_background=[True, False],
    w_type=["square", "simple", "uniform"], reduction=["mean", "sum", "none"], batch=[False, True],
    weight=[None, 0.5, "seq"], gamma=[2.0, 0.5], lambdas=[(1.0, 1.0), (0.3, 1.7)], soft=[False, True],
    spatial=[(4, 5), (3, 2, 3), ()],
)


@pytest.mark.parametrize("cfg", _sample(GDF_SPACE, 28, seed=13), ids=str)
def test_monai_generalized_dice_focal(cfg):
    c = cfg["c"]
    weight = [0.5 + k for k in range(_kept(cfg))] if cfg["weight"] == "seq" else cfg["weight"]
    kw = dict(include_background=cfg["include_background"], to_onehot_y=cfg["to_onehot_y"], w_type=cfg["w_type"],
              reduction=cfg["reduction"], batch=cfg["batch"], gamma=cfg["gamma"], weight=weight,
              lambda_gdl=cfg["lambdas"][0], lambda_focal=cfg["lambdas"][1], **_ACTS[cfg["act"]])
    if not cfg["spatial"]:
        kw["batch"] = True  # without spatial dims MONAI's GeneralizedDiceLoss needs batch=True (see the errors test)
    x, target = _inputs(cfg, c, _seed(cfg))
    assert_same_or_same_error(P.monai_generalized_dice_focal(**kw), monai.losses.GeneralizedDiceFocalLoss(**kw),
                              (x, target), FOCAL)


def test_monai_compound_common_configurations():
    # what MONAI's tutorials train with, on labels with a class absent from an image
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    lab = _labels(3, 4, (6, 5)).unsqueeze(1).double()
    for kw in (dict(softmax=True, to_onehot_y=True), dict(softmax=True, to_onehot_y=True, include_background=False),
               dict(softmax=True, to_onehot_y=True, batch=True, lambda_ce=0.5)):
        assert_same(P.monai_dice_ce(**kw), monai.losses.DiceCELoss(**kw), (x, lab))
    for kw in (dict(sigmoid=True, to_onehot_y=True), dict(softmax=True, to_onehot_y=True, gamma=1.0, alpha=0.25)):
        assert_same(P.monai_dice_focal(**kw), monai.losses.DiceFocalLoss(**kw), (x, lab), tol=FOCAL)
        kw.pop("alpha", None)
        assert_same(P.monai_generalized_dice_focal(**kw), monai.losses.GeneralizedDiceFocalLoss(**kw), (x, lab),
                    tol=FOCAL)
    # float32 input: MONAI computes in float32 throughout
    x32 = x.float()
    kw = dict(softmax=True, to_onehot_y=True)
    assert_same(P.monai_dice_ce(**kw), monai.losses.DiceCELoss(**kw), (x32, lab.float()), tol=F32)
    assert_same(P.monai_dice_focal(sigmoid=True, to_onehot_y=True),
                monai.losses.DiceFocalLoss(sigmoid=True, to_onehot_y=True), (x32, lab.float()), tol=F32)


def test_monai_compound_errors():
    x = torch.randn(2, 3, 4, 4)
    lab = torch.randint(0, 3, (2, 1, 4, 4))
    for bad in (dict(reduction="none"), dict(lambda_ce=-1.0), dict(lambda_dice=-0.5), dict(sigmoid=True, softmax=True),
                dict(other_act=3)):
        with pytest.raises(Exception) as theirs:
            monai.losses.DiceCELoss(**bad)
        with pytest.raises(type(theirs.value)):
            P.monai_dice_ce(**bad)
    with pytest.raises(ValueError, match="lambda_focal"):
        P.monai_dice_focal(lambda_focal=-1.0)
    with pytest.raises(ValueError, match="lambda_gdl"):
        P.monai_generalized_dice_focal(lambda_gdl=-1.0)
    # MONAI accepts a negative gamma; the operator's focal term needs gamma >= 0: a clear error
    with pytest.raises(ValueError, match="gamma"):
        P.monai_dice_focal(gamma=-1.0)
    for fn in (P.monai_dice_ce, P.monai_dice_focal, P.monai_generalized_dice_focal):
        with pytest.raises(ValueError, match="number of dimensions"):
            fn(softmax=True, to_onehot_y=True)(x, lab[:, 0])
        with pytest.raises(ValueError, match="number of channels"):
            fn(softmax=True)(x, torch.zeros(2, 2, 4, 4))
        with pytest.raises(AssertionError):
            fn(softmax=True)(x, lab)  # labels without to_onehot_y: shapes differ, as in MONAI
    with pytest.raises(IndexError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai.losses.GeneralizedDiceFocalLoss(sigmoid=True)(x[..., 0, 0], _one_hot(lab[:, 0, 0, 0], 3, torch.float32))
    with pytest.raises(IndexError, match="spatial dims or batch=True"):
        P.monai_generalized_dice_focal(sigmoid=True)(x[..., 0, 0], _one_hot(lab[:, 0, 0, 0], 3, torch.float32))
    with pytest.raises(ValueError, match="weight"):  # wrong length: the Dice part raises first, as in MONAI
        P.monai_dice_focal(sigmoid=True, weight=[1.0, 2.0])(x, _one_hot(lab[:, 0], 3, torch.float32))


def test_fused_configurations_call_the_operator_once(monkeypatch):
    calls = []
    real = ops.dice_stats

    def spy(*args, **kwargs):  # records the pixel loss of each operator call
        calls.append(args[6] if len(args) > 6 else kwargs.get("pixel_loss", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "dice_stats", spy)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 1, 4, 4))
    regions = (torch.rand(2, 4, 4, 4) > 0.5).double()
    cases = [
        (P.monai_dice_ce(softmax=True, to_onehot_y=True), (x, lab), ["ce"]),
        (P.monai_dice_focal(sigmoid=True, to_onehot_y=True), (x, lab), ["focal"]),
        (P.monai_generalized_dice_focal(sigmoid=True, to_onehot_y=True), (x, lab), ["focal"]),
        (P.nnunet_dc_and_ce({}, {}, ignore_label=2), (x, lab), ["ce"]),
        (P.nnunet_dc_and_bce({}, {}, use_ignore_label=True), (x, regions), ["ce"]),
        # MONAI's DiceFocalLoss with softmax=True: softmax Dice, sigmoid focal: two calls
        (P.monai_dice_focal(softmax=True, to_onehot_y=True), (x, lab), ["none", "focal"]),
        (P.monai_dice_ce(to_onehot_y=True), (x, lab), ["none", "ce"]),
    ]
    for loss, args, expected in cases:
        calls.clear()
        loss(*args)
        assert calls == expected, (loss, calls)


# ----------------------------------------------------------------------------------------------
# nnU-Net v2 (tests/nnunet_oracle.py)
# ----------------------------------------------------------------------------------------------
NNUNET_CE_SPACE = dict(
    dice_class=["SoftDiceLoss", "MemoryEfficientSoftDiceLoss"], batch_dice=[False, True], do_bg=[True, False],
    smooth=[1e-5, 1.0, 0.0], ignore_label=[None, 3, 1], weights=[(1, 1), (0.5, 2.0), (0, 1), (1, 0)],
    ce_kwargs=[{}, {"weight": "w"}, {"label_smoothing": 0.1}, {"reduction": "sum"}], target=["float", "long"],
    clip_tp=[None, 0.5], spatial=[(4, 5), (3, 3, 2)],
)


def _nnunet_labels(cfg, n, c, spatial, gen):
    lab = torch.randint(0, c, (n, 1, *spatial), generator=gen)
    ii = cfg["ignore_label"]
    if ii is not None:
        lab[torch.rand(lab.shape, generator=gen) < 0.3] = ii
    return lab.float() if cfg["target"] == "float" else lab


@pytest.mark.parametrize("cfg", _sample(NNUNET_CE_SPACE, 32, seed=14), ids=str)
def test_nnunet_dc_and_ce(cfg):
    n, c, spatial = 2, 3, cfg["spatial"]
    gen = _seed(cfg)
    x = torch.randn(n, c, *spatial, generator=gen)  # float32: nnU-Net sums the Dice in float32
    y = _nnunet_labels(cfg, n, c, spatial, gen)
    soft = dict(batch_dice=cfg["batch_dice"], do_bg=cfg["do_bg"], smooth=cfg["smooth"], ddp=False)
    if cfg["dice_class"] == "SoftDiceLoss" and cfg["clip_tp"] is not None:
        soft["clip_tp"] = cfg["clip_tp"]
    ce_kwargs = {k: (torch.tensor([0.5, 1.0, 2.0]) if v == "w" else v) for k, v in cfg["ce_kwargs"].items()}
    weight_ce, weight_dice = cfg["weights"]
    ours = P.nnunet_dc_and_ce(soft, ce_kwargs, weight_ce, weight_dice, cfg["ignore_label"], cfg["dice_class"])
    theirs = NN.DC_and_CE_loss(dict(soft), dict(ce_kwargs), weight_ce, weight_dice, cfg["ignore_label"],
                               getattr(NN, cfg["dice_class"]))
    assert_same(ours, theirs, (x, y), tol=F32)


def test_nnunet_dc_and_ce_trainer_configuration_and_ignored_batch():
    # nnUNetTrainer._build_loss: MemoryEfficientSoftDiceLoss, smooth 1e-5, no background, ignore label C
    x = torch.randn(2, 4, 6, 5)
    y = _labels(2, 4, (6, 5)).unsqueeze(1).float()
    y[:, :, :2] = 4
    soft = dict(batch_dice=True, smooth=1e-5, do_bg=False, ddp=False)
    kw = dict(ignore_label=4)
    ours = P.nnunet_dc_and_ce(soft, {}, dice_class="MemoryEfficientSoftDiceLoss", **kw)
    theirs = NN.DC_and_CE_loss(dict(soft), {}, dice_class=NN.MemoryEfficientSoftDiceLoss, **kw)
    assert_same(ours, theirs, (x, y), tol=F32)
    # every pixel ignored: nnU-Net skips the cross-entropy (num_fg == 0); the gradient stays finite
    y_all = torch.full_like(y, 4)
    v, g = assert_same(ours, theirs, (x, y_all), tol=F32)
    assert torch.isfinite(v) and torch.isfinite(g).all()
    # nnU-Net's class itself is accepted as dice_class
    assert_same(P.nnunet_dc_and_ce(soft, {}, dice_class=NN.MemoryEfficientSoftDiceLoss, **kw), theirs, (x, y), tol=F32)


NNUNET_BCE_SPACE = dict(
    dice_class=["SoftDiceLoss", "MemoryEfficientSoftDiceLoss"], batch_dice=[False, True], do_bg=[True, False],
    smooth=[1e-5, 1.0], use_ignore_label=[False, True], target=["float", "bool"], weights=[(1, 1), (0.5, 2.0)],
    reduction=["mean", "sum"], spatial=[(4, 5), (3, 3, 2)],
)


@pytest.mark.parametrize("cfg", _sample(NNUNET_BCE_SPACE, 20, seed=15), ids=str)
def test_nnunet_dc_and_bce(cfg):
    n, r, spatial = 2, 3, cfg["spatial"]
    gen = _seed(cfg)
    x = torch.randn(n, r, *spatial, generator=gen)
    regions = torch.rand(n, r + cfg["use_ignore_label"], *spatial, generator=gen) > 0.5
    y = regions if cfg["target"] == "bool" else regions.float()
    soft = dict(batch_dice=cfg["batch_dice"], do_bg=cfg["do_bg"], smooth=cfg["smooth"], ddp=False)
    bce = {} if cfg["use_ignore_label"] else {"reduction": cfg["reduction"]}
    weight_ce, weight_dice = cfg["weights"]
    ours = P.nnunet_dc_and_bce(bce, soft, weight_ce, weight_dice, cfg["use_ignore_label"], cfg["dice_class"])
    theirs = NN.DC_and_BCE_loss(dict(bce), dict(soft), weight_ce, weight_dice, cfg["use_ignore_label"],
                                getattr(NN, cfg["dice_class"]))
    v, g = assert_same(ours, theirs, (x, y), tol=F32)
    if cfg["use_ignore_label"]:
        assert not g[~(~regions[:, -1:]).expand_as(g)].any()  # ignored pixels get no gradient


def test_nnunet_compound_errors():
    x = torch.randn(2, 3, 4, 4)
    lab = torch.randint(0, 3, (2, 1, 4, 4)).float()
    with pytest.raises(ValueError, match="label map"):
        P.nnunet_dc_and_ce({}, {})(x, _one_hot(lab[:, 0], 3, torch.float32))
    with pytest.raises(AssertionError, match="ignore label"):
        P.nnunet_dc_and_ce({}, {}, ignore_label=3)(x, _one_hot(lab[:, 0], 3, torch.float32))
    with pytest.raises(TypeError, match="clip_tp"):
        P.nnunet_dc_and_ce({"clip_tp": 0.5}, {}, dice_class="MemoryEfficientSoftDiceLoss")
    with pytest.raises(TypeError, match="apply_nonlin"):
        P.nnunet_dc_and_ce({"apply_nonlin": None}, {})
    with pytest.raises(ValueError, match="dice_class"):
        P.nnunet_dc_and_ce({}, {}, dice_class="TverskyLoss")
    with pytest.raises(ValueError, match="reduction"):
        P.nnunet_dc_and_ce({}, {"reduction": "none"})
    with pytest.raises(ValueError, match="ignore_index"):
        P.nnunet_dc_and_ce({}, {"ignore_index": 1})(x, lab)
    with pytest.raises(ValueError, match="pos_weight"):
        P.nnunet_dc_and_bce({"pos_weight": torch.ones(3)}, {})
    with pytest.raises(ValueError, match="one-hot region"):
        P.nnunet_dc_and_bce({}, {})(x, lab)


# ----------------------------------------------------------------------------------------------
# the table's claims and the registry
# ----------------------------------------------------------------------------------------------
def _equivalence_case(name):
    """(preset args, function mapping them to the dicetorch call's args)."""
    n, c, spatial = 2, 3, (4, 5)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(n, c, *spatial, dtype=torch.float64, generator=gen)
    lab = _labels(n, c, spatial, gen=gen).unsqueeze(1)
    if name == "monai_dice_ce":
        return (logits, lab.double()), lambda x, t: (x, t.long())
    if name in ("monai_dice_focal", "monai_generalized_dice_focal"):
        return (logits, _one_hot(lab[:, 0], c)), lambda x, t: (x, t)
    if name == "nnunet_dc_and_ce":
        return (logits, lab.double()), lambda x, t: (x, t.long())
    if name == "nnunet_dc_and_bce":
        return (logits, (torch.rand(logits.shape, generator=gen) > 0.5).double()), lambda x, t: (x, t)
    raise KeyError(name)


def _preset(name, **kw):
    eq = P.COMPOUND_PRESETS[name].info.equivalent
    return P.COMPOUND_PRESETS[name](*eq.preset_args, **eq.preset_kwargs, **kw)


@pytest.mark.parametrize("name", list(P.COMPOUND_PRESETS))
def test_table_equivalents(name):
    eq = P.COMPOUND_PRESETS[name].info.equivalent
    args, adapt = _equivalence_case(name)
    generic = getattr(dt, eq.cls)(**eq.kwargs)
    # MONAI's generalized Dice weights are float32 (relative 6e-8)
    tol = dict(rtol=1e-6, atol=1e-8) if name == "monai_generalized_dice_focal" else F64
    assert eq.exact
    assert_same(_preset(name), lambda *a: generic(*adapt(*a)) + eq.offset, args, tol=tol)


def test_every_compound_preset_is_documented_and_calls_the_operator(monkeypatch):
    calls = []
    real = ops.dice_stats

    def spy(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "dice_stats", spy)
    assert not set(P.COMPOUND_PRESETS) & set(P.PRESETS)  # identify() matches the Dice family only
    for name, fn in P.COMPOUND_PRESETS.items():
        assert fn.__doc__ and fn.info.name == name and fn.info.pixel_loss
        assert f"`{name}`" in P.which_dice_markdown()
        calls.clear()
        args, _ = _equivalence_case(name)
        v_ref, g_ref = _value_and_grad(_preset(name, backend="reference"), args)
        assert calls == ["reference"], (name, calls)
        v, g = _value_and_grad(_preset(name), args)
        torch.testing.assert_close(v, v_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
