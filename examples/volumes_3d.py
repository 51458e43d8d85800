"""Per-image versus batch Dice, with and without background, on synthetic 3D volumes.

Each volume (``--size``^3 voxels) holds three randomly rotated ellipsoids painted in order:

    class 1  large    (radii ~ 0.21-0.33 x size)   intensity 0.45
    class 2  medium   (radii ~ 0.10-0.17 x size)   intensity 0.70
    class 3  small    (radii ~ 0.08-0.12 x size)   intensity 0.95, present in only 60% of volumes

on a background of intensity 0.10, plus Gaussian noise, so the classes are strongly imbalanced
(class 3 is ~0.3% of the voxels, and absent from 40% of the volumes).  The same small 3D network is
trained from the same initial weights with ``dicetorch.DiceLoss`` in four settings:

    batch=False / True             one Dice per volume and class, or one per class over the batch
    include_background=True/False  whether class 0 enters the loss (it always enters the softmax)

and evaluated with the hard Dice per class over the whole test set
(``dicetorch.dice_score(logits, labels, hard=True, batch=True)``).

Two corners to look for in the results:

* Per-volume Dice: when class 3 is absent from a volume its Dice is ``smooth_nr / (P + smooth_dr)``,
  which is ~0 (loss ~1, gradient ~0) as soon as the predicted class-3 mass P is well above
  ``smooth_dr``; batch Dice instead compares P with the class-3 volume of the whole batch, and
  weighs every voxel of a class equally whichever volume it lies in.
* ``include_background=False`` with a softmax: no term of the loss rewards the background channel,
  so nothing stops the softmax from handing background voxels to a foreground class whose loss
  term is already saturated (typically the small one); the foreground Dice of the other classes can
  stay high while the argmax map is wrong almost everywhere.

Run from the repository root::

    python examples/volumes_3d.py                  # defaults: about 2 minutes on 2 CPU cores
    python examples/volumes_3d.py --size 32 --epochs 20

It prints a markdown table of per-class Dice per setting and writes ``volumes_3d.png`` (a slice of a
few test volumes: image, label, prediction of each setting) to ``--out``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dicetorch

NUM_CLASSES = 4
CLASS_NAMES = ["background", "large", "medium", "small"]
# (radius range as a fraction of the side, intensity, probability of being present)
SHAPES = [((0.21, 0.33), 0.45, 1.0), ((0.10, 0.17), 0.70, 1.0), ((0.08, 0.12), 0.95, 0.6)]
SETTINGS = [  # (name, batch, include_background)
    ("image, with bg", False, True),
    ("batch, with bg", True, True),
    ("image, no bg", False, False),
    ("batch, no bg", True, False),
]


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def make_volumes(n: int, generator: torch.Generator, size: int = 24, noise: float = 0.12):
    """Synthetic volumes with ellipsoids of ``NUM_CLASSES - 1`` classes (see the module docstring).

    Returns ``images`` (n, 1, size, size, size) float32 and ``labels`` (n, size, size, size) int64.
    A voxel belongs to an ellipsoid when ``|R^T (x - c) / r|^2 <= 1`` (centre c, radii r, rotation R).
    """
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(coords, coords, coords, indexing="ij"), -1).view(1, -1, 3)  # (1,M,3)
    labels = torch.zeros(n, size ** 3, dtype=torch.int64)
    images = torch.full((n, size ** 3), 0.10)
    for k, ((rlo, rhi), level, prob) in enumerate(SHAPES, start=1):
        radii = (rlo + (rhi - rlo) * torch.rand(n, 1, 3, generator=generator)) * size
        margin = radii.amax(-1, keepdim=True)
        centre = margin + (size - 2 * margin) * torch.rand(n, 1, 3, generator=generator)
        rot, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator))  # random orthogonal
        local = torch.bmm(grid.expand(n, -1, -1) - centre, rot) / radii
        inside = (local.square().sum(-1) <= 1.0) & (torch.rand(n, 1, generator=generator) < prob)
        labels[inside] = k
        images[inside] = level
    images = images + noise * torch.randn(n, size ** 3, generator=generator)
    return images.view(n, 1, size, size, size), labels.view(n, size, size, size)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class VolumeNet(nn.Module):
    """A one-level 3D U-Net: (N, 1, D, H, W) -> (N, 4, D, H, W) logits (even D, H, W).

    Batch normalisation keeps the first Adam steps from saturating the softmax on the background,
    where a Dice loss (gradient proportional to p) cannot pull it back.
    """

    def __init__(self, width: int = 8, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.enc = _block(1, width)
        self.mid = _block(width, 2 * width)
        self.up = nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.dec = _block(2 * width, width)
        self.head = nn.Conv3d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e = self.enc(x - 0.3)
        m = self.mid(F.max_pool3d(e, 2))
        return self.head(self.dec(torch.cat([self.up(m), e], 1)))


# ----------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=12, help="passes over the training set, per setting")
    p.add_argument("--size", type=int, default=24, help="volume side in voxels (even)")
    p.add_argument("--train-size", type=int, default=96, help="training volumes")
    p.add_argument("--test-size", type=int, default=32, help="held-out volumes")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=8, help="channels of the first network level")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the batches")
    p.add_argument("--out", default=os.path.join("examples", "out"), help="directory for the PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    for name in ("epochs", "train_size", "test_size", "batch_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.size < 8 or args.size % 2:
        p.error("--size must be an even number >= 8")
    return args


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 16) -> Tensor:
    model.eval()
    out = torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    model.train()
    return out


def markdown_table(results: dict, fractions: Sequence[float]) -> str:
    head = "| setting (DiceLoss) | " + " | ".join(CLASS_NAMES) + " | mean fg |"
    rows = [head, "|" + "---|" * (len(CLASS_NAMES) + 2)]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["dice"]) + f" | {r['mean_fg_dice']:.3f} |")
    rows.append("(held-out hard Dice per class over the test set; voxel fractions "
                + ", ".join(f"{c} {100 * f:.2f}%" for c, f in zip(CLASS_NAMES, fractions)) + ")")
    return "\n".join(rows)


def save_slices(path: str, images: Tensor, labels: Tensor, preds: dict) -> None:
    """One row per volume: image, label and each setting's prediction on one axial slice.

    The slice is the one with the most medium- and small-class voxels (the small ones counted 10x).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = ["#222244", "#4a90d9", "#3cb44b", "#ffd92f"]  # background, large, medium, small
    cmap = ListedColormap(colors)
    score = ((labels == 2).float() + 10 * (labels == 3).float()).flatten(2).sum(-1)  # (n, D)
    zs = [int(s.argmax()) for s in score]
    lab = dict(cmap=cmap, vmin=-0.5, vmax=NUM_CLASSES - 0.5)
    cols = [("image", images[:, 0], dict(cmap="gray", vmin=0, vmax=1.1)), ("label", labels, lab)]
    cols += [(name, p, lab) for name, p in preds.items()]
    n = len(images)
    fig, axes = plt.subplots(n, len(cols), figsize=(1.7 * len(cols), 1.8 * n + 0.8), squeeze=False)
    for i in range(n):
        for j, (title, arr, kw) in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(arr[i, zs[i]].numpy(), interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
        axes[i, 0].set_ylabel(f"volume {i}, z={zs[i]}", fontsize=8)
    fig.legend(handles=[Patch(color=c, label=f"{k} {name}") for k, (c, name) in enumerate(zip(colors, CLASS_NAMES))],
               loc="lower center", ncol=NUM_CLASSES, fontsize=8, frameon=False)
    fig.suptitle("axial slices of held-out volumes: label and prediction of each DiceLoss setting", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train one network per DiceLoss setting and compare per-class held-out Dice.

    Returns ``{"results": {setting: {"dice": [4 floats], "mean_fg_dice", "final_loss"}},
    "fractions": [voxel fraction per class], "table", "figure", "seconds"}``.
    """
    from tqdm import tqdm

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    x_train, y_train = make_volumes(args.train_size, torch.Generator().manual_seed(2 * args.seed), args.size)
    x_test, y_test = make_volumes(args.test_size, torch.Generator().manual_seed(2 * args.seed + 1), args.size)
    fractions = torch.bincount(y_test.flatten(), minlength=NUM_CLASSES).double() / y_test.numel()

    torch.manual_seed(args.seed)
    init_state = VolumeNet(args.width).state_dict()
    steps = math.ceil(args.train_size / args.batch_size)
    bar = tqdm(total=steps * args.epochs * len(SETTINGS), desc="train", unit="batch",
               disable=args.no_progress, dynamic_ncols=True, leave=False)
    results, preds = {}, {}
    k = min(3, args.test_size)
    for name, batch, include_background in SETTINGS:
        model = VolumeNet(args.width)
        model.load_state_dict(init_state)
        loss_fn = dicetorch.DiceLoss(batch=batch, include_background=include_background)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        shuffle = torch.Generator().manual_seed(args.seed + 1)  # same batches for every setting
        for epoch in range(1, args.epochs + 1):
            perm = torch.randperm(args.train_size, generator=shuffle)
            for i in range(steps):
                idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(setting=name, epoch=epoch, loss=f"{loss.item():.4f}")
        logits = predict(model, x_test)
        dice = dicetorch.dice_score(logits, y_test, hard=True, batch=True)
        results[name] = {"dice": dice.tolist(), "mean_fg_dice": float(dice[1:].mean()), "final_loss": loss.item()}
        preds[name] = logits[:k].argmax(1)
        tqdm.write(f"{name:>15}: Dice " + ", ".join(f"{c} {v:.3f}" for c, v in zip(CLASS_NAMES, dice.tolist())))
    bar.close()
    seconds = time.perf_counter() - start

    table = markdown_table(results, fractions.tolist())
    print(table)
    os.makedirs(args.out, exist_ok=True)
    figure = os.path.join(args.out, "volumes_3d.png")
    save_slices(figure, x_test[:k], y_test[:k], preds)
    print(f"{len(SETTINGS)} settings x {args.epochs} epochs on {args.train_size} volumes of {args.size}^3 "
          f"in {seconds:.1f} s; figure {figure}")
    return {"results": results, "fractions": fractions.tolist(), "table": table, "figure": figure,
            "seconds": seconds}


if __name__ == "__main__":
    main()
    sys.exit(0)
