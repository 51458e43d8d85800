"""Smoke tests of examples/digits_segmentation.py, volumes_3d.py, compile_amp.py and compare_losses.py at
tiny sizes.

Each example's ``main(argv)`` runs end to end (data, training, evaluation, figures) in a few seconds;
the tests check the figures are real PNGs and the metrics are finite and in range.  How well the
networks train is not asserted: at these sizes it means nothing.
"""
import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMON = ["--epochs", "1", "--threads", "1", "--seed", "0", "--no-progress"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_png(path) -> None:
    import matplotlib.image as mpimg

    path = Path(path)
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 100 and img.shape[1] >= 100 and img.shape[2] in (3, 4)
    assert float(img[..., :3].std()) > 0.01, f"{path} is blank"


def _assert_scores(values, length: int) -> None:
    assert len(values) == length
    for v in values:
        assert math.isfinite(v) and 0.0 <= v <= 1.0 + 1e-6, values


def test_digits_segmentation(tmp_path):
    ex = _load("digits_segmentation")
    out = ex.main(COMMON + ["--train-size", "32", "--test-size", "6", "--batch-size", "4", "--width", "4",
                            "--seed-batch-sizes", "16", "--out", str(tmp_path)])
    rows = list(ex.LOSSES) + ["keras_seed (batch 16)"]
    assert list(out["results"]) == rows
    for name, r in out["results"].items():
        _assert_scores(r["dice"], ex.NUM_CLASSES)
        for key in ("mean_digit_dice", "pixel_accuracy", "predicted_background"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert math.isfinite(r["train_loss"]) and r["train_loss"] >= -1e-6, (name, r["train_loss"])
        assert f"| {name} |" in out["table"]
    # A batch of 4 digit images lacks at least 6 of the 11 classes: each gets w = 1e5 against ~1e-3 for
    # the present ones, so the seed's ratio is < 1e-6 and its loss is 1 to float32 rounding.
    assert out["results"]["keras_seed"]["train_loss"] > 1 - 1e-5
    assert 0.0 < out["true_background"] < 1.0
    assert len(out["figures"]) == 2
    for f in out["figures"]:
        _assert_png(f)


def test_digits_labels():
    ex = _load("digits_segmentation")
    images, labels = ex.make_digit_segmentation(size=16, threshold=0.4)
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797, 16, 16)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # every image holds the background and exactly one digit class, where the ink is above threshold
    for i in range(0, 1797, 97):
        present = labels[i].unique().tolist()
        assert len(present) == 2 and present[0] == 0, present
        assert bool(((labels[i] > 0) == (images[i, 0] > 0.4)).all())


def test_volumes_3d(tmp_path):
    ex = _load("volumes_3d")
    out = ex.main(COMMON + ["--size", "12", "--train-size", "4", "--test-size", "2", "--batch-size", "2",
                            "--width", "2", "--out", str(tmp_path)])
    assert list(out["results"]) == [s[0] for s in ex.SETTINGS]
    for name, r in out["results"].items():
        _assert_scores(r["dice"], ex.NUM_CLASSES)
        assert 0.0 <= r["mean_fg_dice"] <= 1.0
        assert math.isfinite(r["final_loss"])
        assert f"| {name} |" in out["table"]
    assert abs(sum(out["fractions"]) - 1.0) < 1e-9
    _assert_png(out["figure"])


def test_volumes_classes_present():
    import torch

    ex = _load("volumes_3d")
    images, labels = ex.make_volumes(16, torch.Generator().manual_seed(0), size=24)
    assert images.shape == (16, 1, 24, 24, 24) and labels.shape == (16, 24, 24, 24)
    counts = torch.stack([(labels == k).flatten(1).sum(1) for k in range(ex.NUM_CLASSES)], 1)  # (n, C)
    assert bool((counts[:, :3] > 0).all())  # background, large and medium in every volume
    # the imbalance the example is about: large > medium > small in total volume
    total = counts.sum(0)
    assert total[1] > total[2] > total[3]


def test_compile_amp_eager(tmp_path):
    # --no-compile: the same bf16-autocast step without the compile time (the default run compiles)
    ex = _load("compile_amp")
    out = ex.main(COMMON + ["--no-compile", "--train-size", "32", "--test-size", "8", "--batch-size", "8",
                            "--width", "8", "--log-every", "2", "--out", str(tmp_path)])
    assert out["logits_dtype"] == "torch.bfloat16"
    assert out["loss_dtype"] == "torch.float32"
    assert len(out["log"]) >= 2
    for r in out["log"]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["loss64"])
    # Float32 sums over 8*32*32 pixels: rounding is ~1e-7 relative per sum (pairwise summation), the
    # ratio ~1e-6 at worst; 1e-5 leaves room and is still far below bf16's 4e-3 resolution.
    assert out["max_err_op"] < 1e-5
    _assert_scores(out["dice"], 2)
    _assert_png(out["figure"])


def test_compare_losses(tmp_path):
    # --quick: 6 steps per loss on 48 digits, a width-4 network; the curve and the table are what is checked
    ex = _load("compare_losses")
    out = ex.main(["--quick", "--threads", "1", "--seed", "0", "--no-progress", "--out", str(tmp_path)])
    assert list(out["results"]) == ["dice", "gdl", "dice_ce", "dice_focal"]
    for name, r in out["results"].items():
        assert r["steps"][0] == 0 and r["steps"][-1] == 6 and len(r["dice"]) == len(r["steps"])
        _assert_scores(r["dice"], len(r["steps"]))
        assert r["final"] == r["dice"][-1] and math.isfinite(r["final_loss"]) and r["final_loss"] >= 0.0
        row = next(line for line in out["table"].splitlines() if line.startswith(f"| {name} |"))
        final = float(row.split("|")[3])
        assert math.isfinite(final) and 0.0 <= final <= 1.0 and abs(final - r["final"]) < 1e-3, row
    assert Path(out["figure"]) == tmp_path / "compare_losses.png"
    _assert_png(out["figure"])
