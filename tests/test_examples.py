"""Smoke tests of the example scripts in examples/ (run at tiny sizes, CPU only)."""
import importlib.util
import math
import pathlib
import warnings

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def triangles():
    return _load("train_triangles")


def _run(module, tmp_path, *args):
    with warnings.catch_warnings():
        # the compiled extension may be absent; that warning is not what these tests check
        warnings.simplefilter("ignore", RuntimeWarning)
        return module.main([*args, "--out", str(tmp_path / "out"), "--no-progress", "--threads", "1"])


def test_triangle_data(triangles):
    """Every generated image has a triangle, labels are {0, 1}, and the triangle is brighter."""
    x, y = triangles.make_triangles(64, torch.Generator().manual_seed(3))
    assert x.shape == (64, 1, 32, 32) and y.shape == (64, 32, 32) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == {0, 1}
    area = y.flatten(1).sum(1)
    assert bool((area > 0).all()) and bool((area < 32 * 32).all())
    fg = (x[:, 0] * y).flatten(1).sum(1) / area
    bg = (x[:, 0] * (1 - y)).flatten(1).sum(1) / (32 * 32 - area)
    assert bool((fg > bg).all())
    # seeded: the same generator seed gives the same data
    x2, y2 = triangles.make_triangles(64, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_train_triangles_smoke(triangles, tmp_path):
    """A tiny run completes, writes a readable PNG and returns finite losses and Dice in [0, 1]."""
    res = _run(triangles, tmp_path, "--epochs", "2", "--train-size", "32", "--test-size", "8",
               "--batch-size", "16")
    png = pathlib.Path(res["figure"])
    assert png.parent == tmp_path / "out" and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.verify()  # raises on a truncated or corrupt file
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100

    assert len(res["train_loss"]) == 2 and len(res["test_loss"]) == 3 and len(res["test_dice"]) == 3
    assert all(math.isfinite(v) for v in res["train_loss"] + res["test_loss"])
    # generalized Dice loss and hard Dice both lie in [0, 1]
    assert all(0.0 <= v <= 1.0 for v in res["train_loss"] + res["test_loss"])
    assert len(res["dice"]) == 2
    assert all(0.0 <= d <= 1.0 for row in res["test_dice"] for d in row)
    assert res["ok"] is True


def test_train_triangles_min_dice(triangles, tmp_path):
    """--min-dice above what a tiny run can reach marks the run as failed (exit status 1 as a script)."""
    res = _run(triangles, tmp_path, "--epochs", "1", "--train-size", "16", "--test-size", "4",
               "--batch-size", "16", "--min-dice", "1.01")
    assert res["ok"] is False


def test_train_triangles_learns(triangles, tmp_path):
    """A short run lowers the loss and raises the held-out Dice: fails if the gradient were wrong.

    A wrong sign would raise the loss, a wrong magnitude or direction would leave the held-out loss and
    Dice near their initial values; the margins are far below what a correct gradient gives (the held-out
    loss falls from about 0.7-0.8 to below 0.2 and the triangle Dice rises above 0.85 in this setting).
    """
    res = _run(triangles, tmp_path, "--epochs", "3", "--train-size", "256", "--test-size", "64",
               "--batch-size", "32", "--seed", "1")
    tl, vl = res["train_loss"], res["test_loss"]
    assert tl[-1] < tl[0] - 0.1, tl
    assert vl[-1] < vl[0] - 0.3, vl
    assert res["test_dice"][-1][1] > res["test_dice"][0][1] + 0.3, res["test_dice"]
    assert res["dice"][1] > 0.6, res["dice"]
