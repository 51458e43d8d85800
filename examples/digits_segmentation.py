"""Absent classes and generalized Dice: an 11-class segmentation of scikit-learn's 8x8 digits.

Every digit image becomes a segmentation problem: a pixel whose ink intensity (after upsampling to
``--size`` x ``--size`` and scaling to [0, 1]) is above ``--threshold`` gets the class of its digit
(digit d -> class d + 1); every other pixel is background (class 0).  So each image contains exactly
2 of the 11 classes and 9 classes are absent from it -- the situation of a well-known Keras question
about the generalized Dice loss, whose weights

    w_k = 1 / (count_k^2 + 1e-5),        count_k = number of pixels of class k in the whole batch

become 1e5 for a class absent from the batch, against about 1e-6 for a present one.  The question
reports a loss that does not move on validation data and a network that predicts a constant
(background) volume, while cross-entropy works on the same data.

The same small convolutional network is trained from the same initial weights, on the same batches,
with six losses:

    ce           torch.nn.CrossEntropyLoss
    dice         dicetorch.DiceLoss()                               (per image and class)
    gdl_max      dicetorch.GeneralizedDiceLoss(absent_weight="max")  (absent class: largest weight
                                                                      of its image, as MONAI)
    gdl_zero     dicetorch.GeneralizedDiceLoss(absent_weight="zero") (absent class: weight 0)
    keras_seed   the question's formula, batch-wide sums, w = 1/(count^2 + 1e-5), no smoothing
                 (dicetorch.presets.keras_generalized_dice_seed)
    keras_fixed  the accepted answer's fix: per image, w = 1/count^2, absent classes get 1e-6
                 (dicetorch.presets.keras_generalized_dice_fixed)

and evaluated on held-out digits with the hard (argmax) Dice per class over the whole test set,
``dicetorch.dice_score(logits, labels, hard=True, batch=True)``.  Because the question's weights are
batch-wide, how often a class is absent depends on the batch size (a digit is missing from a batch
of B images with probability ~0.9^B), so ``keras_seed`` is also trained with ``--seed-batch-sizes``.

What to expect: with absent classes in the batch, the question's ratio is dominated by
``1e5 * P_absent`` and is 1 to float32 precision; the parameter gradients are ~1e-10, below Adam's
``eps`` (1e-8; Keras uses 1e-7), so the network hardly moves from its random initialisation -- the
"constant validation loss" of the question -- rather than learning anything.  Batches with every
class present train normally.  The data ship with scikit-learn, nothing is downloaded.

Run from the repository root::

    python examples/digits_segmentation.py            # defaults: about 2 minutes on 2 CPU cores
    python examples/digits_segmentation.py --losses ce keras_seed --seed-batch-sizes 2 64

It prints a markdown table of per-class Dice and writes ``digits_dice.png`` (grouped bar chart) and
``digits_predictions.png`` (test digits, labels and each loss's prediction) to ``--out``.
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

NUM_CLASSES = 11  # background + digits 0..9
CLASS_NAMES = ["bg"] + [str(d) for d in range(10)]
LOSSES = ("ce", "dice", "gdl_max", "gdl_zero", "keras_seed", "keras_fixed")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def make_digit_segmentation(size: int = 16, threshold: float = 0.4):
    """scikit-learn's digits as an 11-class segmentation task.

    Returns ``images`` (1797, 1, size, size) float32 in [0, 1] (bilinear upsampling of the 8x8
    images divided by 16) and ``labels`` (1797, size, size) int64: ``digit + 1`` where the image is
    above ``threshold``, 0 elsewhere.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    d = torch.as_tensor(digits.target, dtype=torch.int64).view(-1, 1, 1)
    labels = torch.where(x[:, 0] > threshold, d + 1, torch.zeros_like(d))
    return x, labels


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class DigitSegNet(nn.Module):
    """A two-level U-Net: (N, 1, S, S) images -> (N, 11, S, S) logits (S divisible by 4).

    Two poolings give the bottleneck a receptive field covering the whole digit, which the net needs
    to tell which digit a stroke belongs to; one skip connection keeps the stroke outlines sharp.
    Batch normalisation matters for the Dice losses here: without it, their first Adam steps drove
    the softmax to background everywhere, where the Dice gradient (proportional to p) vanishes.
    """

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.enc1 = _block(1, width)
        self.enc2 = _block(width, 2 * width)
        self.mid = _block(2 * width, 2 * width)
        self.up2 = nn.ConvTranspose2d(2 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _block(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x - 0.5)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
def make_loss(name: str):
    """The loss function ``(logits, labels) -> scalar`` called ``name`` (one of LOSSES)."""
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "dice":
        return dicetorch.DiceLoss()
    if name == "gdl_max":
        return dicetorch.GeneralizedDiceLoss(absent_weight="max")
    if name == "gdl_zero":
        return dicetorch.GeneralizedDiceLoss(absent_weight="zero")
    # the presets take channels-last one-hot targets, as Keras does
    if name == "keras_seed":  # probabilities in, batch-wide w = 1/(count^2 + 1e-5), no smoothing
        seed = dicetorch.presets.keras_generalized_dice_seed()
        return lambda logits, labels: seed(F.one_hot(labels, NUM_CLASSES).float(), logits.softmax(1).movedim(1, -1))
    if name == "keras_fixed":  # logits in, per image, absent classes weigh 1e-6
        fixed = dicetorch.presets.keras_generalized_dice_fixed()
        return lambda logits, labels: fixed(F.one_hot(labels, NUM_CLASSES).float(), logits.movedim(1, -1))
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")


# ----------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="passes over the training set, per loss")
    p.add_argument("--size", type=int, default=16, help="image side after upsampling (multiple of 4)")
    p.add_argument("--threshold", type=float, default=0.4, help="ink level above which a pixel is digit")
    p.add_argument("--train-size", type=int, default=1400, help="training digits (rest: held out)")
    p.add_argument("--test-size", type=int, default=397, help="held-out digits")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of every loss")
    p.add_argument("--seed-batch-sizes", type=int, nargs="*", default=[64],
                   help="further batch sizes to train keras_seed with (if it is in --losses)")
    p.add_argument("--width", type=int, default=16, help="channels of the first network level")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the batches")
    p.add_argument("--out", default=os.path.join("examples", "out"), help="directory for the PNGs")
    # 16x16 convolutions gain nothing from a second thread (measured), and lose much when cores are shared
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    for name in ("epochs", "train_size", "test_size", "batch_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.seed_batch_sizes):
        p.error("--seed-batch-sizes must be >= 1")
    if args.size < 4 or args.size % 4:
        p.error("--size must be a positive multiple of 4")
    if args.train_size + args.test_size > 1797:
        p.error("--train-size + --test-size must be at most 1797 (the number of digits)")
    return args


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    model.eval()
    out = torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    model.train()
    return out


def evaluate(logits: Tensor, labels: Tensor) -> dict:
    """Hard Dice per class over the whole set (C,), and how much is predicted background."""
    dice = dicetorch.dice_score(logits, labels, hard=True, batch=True)
    pred = logits.argmax(1)
    return {
        "dice": dice.tolist(),
        "mean_digit_dice": float(dice[1:].mean()),
        "pixel_accuracy": float((pred == labels).float().mean()),
        "predicted_background": float((pred == 0).float().mean()),
    }


def markdown_table(results: dict, true_background: float) -> str:
    head = "| loss | " + " | ".join(CLASS_NAMES) + " | mean 0-9 | pred. bg | train loss |"
    rule = "|" + "---|" * (len(CLASS_NAMES) + 4)
    rows = [head, rule]
    for name, r in results.items():
        cells = " | ".join(f"{v:.3f}" for v in r["dice"])
        rows.append(f"| {name} | {cells} | {r['mean_digit_dice']:.3f} | {100 * r['predicted_background']:.1f}% "
                    f"| {r['train_loss']:.4f} |")
    rows.append(f"(held-out hard Dice per class over the test set; pred. bg: fraction of pixels predicted "
                f"background, true {100 * true_background:.1f}%; train loss: mean over the last epoch)")
    return "\n".join(rows)


def save_bar_chart(path: str, results: dict) -> None:
    """Grouped bars: per-class held-out Dice (x = class, one bar per loss)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    names = list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(11, 4))
    for j, name in enumerate(names):
        xs = [k + (j - (len(names) - 1) / 2) * width for k in range(NUM_CLASSES)]
        ax.bar(xs, results[name]["dice"], width, label=f"{name} (mean 0-9: {results[name]['mean_digit_dice']:.2f})")
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_xticklabels(["background"] + [f"digit {d}" for d in range(10)], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out Dice (hard)")
    ax.set_title("Digits as 11-class segmentation: per-class Dice by training loss", fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_predictions(path: str, images: Tensor, labels: Tensor, preds: dict) -> None:
    """Rows: image, label, one prediction per loss; columns: a few held-out digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(images)
    rows = [("image", images[:, 0], dict(cmap="gray", vmin=0, vmax=1)),
            ("label", labels, dict(cmap="tab20", vmin=0, vmax=19))]
    rows += [(name, p, dict(cmap="tab20", vmin=0, vmax=19)) for name, p in preds.items()]
    fig, axes = plt.subplots(len(rows), k, figsize=(1.1 * k + 0.8, 1.1 * len(rows)), squeeze=False)
    for r, (title, arr, kw) in enumerate(rows):
        for j in range(k):
            ax = axes[r, j]
            ax.imshow(arr[j].numpy(), interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=8)
    fig.suptitle("held-out digits: class colours (background = blue, digit d = colour d+1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def train_one(name: str, init_state: dict, x: Tensor, y: Tensor, batch_size: int, args, bar):
    """Train a fresh copy of the network (same initial weights and batch order for every loss).

    Returns the model and the mean training loss of the last epoch.
    """
    model = DigitSegNet(args.width)
    model.load_state_dict(init_state)
    loss_fn = make_loss(name)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    steps = math.ceil(len(x) / batch_size)
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x), generator=shuffle)
        total = 0.0
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            bar.update(len(idx))
            bar.set_postfix(loss=name, epoch=epoch, value=f"{loss.item():.4f}")
    return model, total / len(x)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train one network per loss and compare them on held-out digits.

    Returns ``{"results": {run: {"dice": [11 floats], "mean_digit_dice", "pixel_accuracy",
    "predicted_background", "train_loss"}}, "true_background", "table", "figures": [paths],
    "seconds"}``; a run is a loss name, or ``"keras_seed (batch B)"`` for ``--seed-batch-sizes``.
    """
    from tqdm import tqdm

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    images, labels = make_digit_segmentation(args.size, args.threshold)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    tr, te = perm[:args.train_size], perm[args.train_size:args.train_size + args.test_size]
    x_train, y_train, x_test, y_test = images[tr], labels[tr], images[te], labels[te]

    torch.manual_seed(args.seed)
    init_state = DigitSegNet(args.width).state_dict()
    runs = [(name, name, args.batch_size) for name in args.losses]
    if "keras_seed" in args.losses:
        runs += [(f"keras_seed (batch {b})", "keras_seed", b) for b in args.seed_batch_sizes if b != args.batch_size]
    bar = tqdm(total=args.train_size * args.epochs * len(runs), desc="train", unit="img",
               disable=args.no_progress, dynamic_ncols=True, leave=False)
    results, preds = {}, {}
    k = min(10, args.test_size)
    for row, name, batch_size in runs:
        model, train_loss = train_one(name, init_state, x_train, y_train, batch_size, args, bar)
        logits = predict(model, x_test)
        results[row] = {**evaluate(logits, y_test), "train_loss": train_loss}
        preds[row] = logits[:k].argmax(1)
        tqdm.write(f"{row:>24}: last-epoch train loss {train_loss:.4f}, "
                   f"mean digit Dice {results[row]['mean_digit_dice']:.3f}, "
                   f"background Dice {results[row]['dice'][0]:.3f}, "
                   f"predicted background {100 * results[row]['predicted_background']:.1f}%")
    bar.close()
    seconds = time.perf_counter() - start

    true_bg = float((y_test == 0).float().mean())
    table = markdown_table(results, true_bg)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    figures = [os.path.join(args.out, "digits_dice.png"), os.path.join(args.out, "digits_predictions.png")]
    save_bar_chart(figures[0], results)
    save_predictions(figures[1], x_test[:k], y_test[:k], preds)
    print(f"{len(runs)} runs x {args.epochs} epochs on {args.train_size} digits "
          f"({args.size}x{args.size}) in {seconds:.1f} s; figures {', '.join(figures)}")
    return {"results": results, "true_background": true_bg, "table": table, "figures": figures,
            "seconds": seconds}


if __name__ == "__main__":
    main()
    sys.exit(0)
