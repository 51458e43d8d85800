"""torch.compile + bfloat16 autocast on the CPU: the Dice loss stays float32-accurate.

The triangle segmentation of ``train_triangles.py`` (32x32 images with one bright triangle, the
MATLAB example's conv/ReLU/max-pool/conv/ReLU/transposed-conv/1x1-conv network, 2 classes) is
trained with the model and the loss under ``torch.compile`` and
``torch.autocast("cpu", dtype=torch.bfloat16)``: the convolutions run in bf16 and hand bf16 logits
to the loss.  ``dicetorch.ops.dice_stats`` reads those logits, computes the softmax in float32 and
returns float32 sums, so the loss is a float32 number even though its input is bf16.

Every ``--log-every`` steps the example recomputes the loss on the *same* bf16 logits in float64
(eager, reference backend) and prints

    |loss - loss64|      the float32 loss from the compiled bf16 step, against float64
    |naive - loss64|     a loss computed entirely in bf16 (softmax and sums in bf16), for contrast

Only the model + loss forward is compiled (AOTAutograd compiles its backward too); the optimizer
step stays eager, which keeps the compile time to a few tens of seconds on 2 cores.

Run from the repository root::

    python examples/compile_amp.py                    # defaults: 1-3 minutes on 2 CPU cores, mostly compiling
    python examples/compile_amp.py --loss dice --no-compile --epochs 3

It prints the comparison per logged step and a summary, and writes ``compile_amp.png`` (the loss
error against float64 per logged step, and a few held-out predictions) to ``--out``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch
from torch import Tensor

import dicetorch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_triangles import TriangleNet, make_triangles  # noqa: E402  (the data and the network)

LOSSES = {
    "gdl": dicetorch.generalized_dice_loss,
    "dice": dicetorch.dice_loss,
}


def naive_bf16_loss(name: str, logits: Tensor, labels: Tensor) -> Tensor:
    """The same loss written with every intermediate in bf16 (what plain autocast code would do).

    ``logits`` (N, C, H, W) bf16, ``labels`` (N, H, W).  I, P, T are bf16 sums (8 significant
    bits), so the ratio is only good to ~1e-2 -- the contrast to the fused operator's float32 sums.
    """
    p = torch.softmax(logits, 1)  # bf16 in, bf16 out
    t = torch.nn.functional.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    i, ps, ts = (p * t).sum((2, 3)), p.sum((2, 3)), t.sum((2, 3))
    if name == "gdl":
        w = (ts * ts).reciprocal()
        w = torch.where(torch.isinf(w), w.masked_fill(torch.isinf(w), 0).amax(1, keepdim=True), w)
        score = (2 * (w * i).sum(1) + 1e-5) / ((w * (ps + ts)).sum(1) + 1e-5)
    else:
        score = (2 * i + 1e-5) / (ps + ts + 1e-5)
    return (1 - score).mean()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    p.add_argument("--train-size", type=int, default=1024, help="number of training images")
    p.add_argument("--test-size", type=int, default=256, help="number of held-out images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32, help="channels of TriangleNet (MATLAB: 64)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--loss", choices=sorted(LOSSES), default="gdl",
                   help="gdl: generalized_dice_loss, dice: dice_loss (softmax, defaults)")
    p.add_argument("--log-every", type=int, default=8, help="steps between float64 comparisons")
    p.add_argument("--no-compile", action="store_true", help="run eagerly (still under bf16 autocast)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the weights")
    p.add_argument("--out", default=os.path.join("examples", "out"), help="directory for the PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    for name in ("epochs", "train_size", "test_size", "batch_size", "width", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def save_figure(path: str, log: list, images: Tensor, labels: Tensor, preds: Tensor) -> None:
    """Left: |loss - loss64| and |naive - loss64| per logged step (log scale); right: predictions."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    k = len(images)
    fig = plt.figure(figsize=(4.5 + 1.3 * k, 3.6))
    grid = fig.add_gridspec(3, 1 + k, width_ratios=[3.5] + [1] * k)
    ax = fig.add_subplot(grid[:, 0])
    steps = [r["step"] for r in log]
    floor = 1e-12  # an exact match would vanish from a log plot
    ax.semilogy(steps, [max(r["err_op"], floor) for r in log], "o-", label="dicetorch (bf16 logits, f32 sums)")
    ax.semilogy(steps, [max(r["err_naive"], floor) for r in log], "s--", label="naive all-bf16 loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("|loss - float64 loss|")
    ax.set_title("loss error on the same bf16 logits", fontsize=9)
    ax.legend(fontsize=7)
    for j in range(k):
        for row, (arr, title, kw) in enumerate((
            (images[j, 0], "image", dict(cmap="gray", vmin=0, vmax=1)),
            (labels[j], "label", dict(cmap="viridis", vmin=0, vmax=1)),
            (preds[j], "prediction", dict(cmap="viridis", vmin=0, vmax=1)),
        )):
            a = fig.add_subplot(grid[row, 1 + j])
            a.imshow(arr.numpy(), interpolation="nearest", **kw)
            a.set_xticks([])
            a.set_yticks([])
            if j == 0:
                a.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train under torch.compile + bf16 autocast and compare the loss with float64 recomputations.

    Returns ``{"log": [{"step", "loss", "loss64", "err_op", "err_naive"}], "max_err_op",
    "max_err_naive", "loss_dtype", "logits_dtype", "dice" (held-out per-class hard Dice),
    "first_step_s" (includes compilation), "step_s" (mean of the later steps), "figure", "seconds"}``.
    """
    from tqdm import tqdm

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    x_train, y_train = make_triangles(args.train_size, torch.Generator().manual_seed(2 * args.seed))
    x_test, y_test = make_triangles(args.test_size, torch.Generator().manual_seed(2 * args.seed + 1))
    model = TriangleNet(x_train.mean(0), width=args.width)
    loss_fn = LOSSES[args.loss]

    def forward_loss(x: Tensor, y: Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)  # bf16
            return logits, loss_fn(logits, y)  # the operator returns float32 sums: a float32 loss

    step_fn = forward_loss if args.no_compile else torch.compile(forward_loss)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    shuffle = torch.Generator().manual_seed(args.seed + 12345)
    steps = math.ceil(args.train_size / args.batch_size)
    log, times = [], []
    bar = tqdm(total=args.epochs * steps, desc="train", unit="step", disable=args.no_progress,
               dynamic_ncols=True, leave=False)
    step = 0
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(args.train_size, generator=shuffle)
        for i in range(steps):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = x_train[idx], y_train[idx]
            t0 = time.perf_counter()
            logits, loss = step_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            if step % args.log_every == 0 or step == args.epochs * steps - 1:
                with torch.no_grad():
                    lg = logits.detach()
                    loss64 = loss_fn(lg.to(torch.float64), y, backend="reference")
                    naive = naive_bf16_loss(args.loss, lg, y)
                rec = {"step": step, "loss": loss.item(), "loss64": loss64.item(),
                       "err_op": abs(loss.item() - loss64.item()), "err_naive": abs(naive.item() - loss64.item())}
                log.append(rec)
                tqdm.write(f"step {step:4d}  logits {str(lg.dtype):>14}  loss {str(loss.dtype)} {rec['loss']:.7f}  "
                           f"float64 {rec['loss64']:.7f}  |diff| {rec['err_op']:.1e}  "
                           f"(naive bf16 |diff| {rec['err_naive']:.1e})")
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            step += 1
    bar.close()
    loss_dtype, logits_dtype = str(loss.dtype), str(logits.dtype)

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        test_logits = model(x_test)  # eager: evaluation mode would recompile
    dice = dicetorch.dice_score(test_logits, y_test, hard=True, batch=True)
    seconds = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    figure = os.path.join(args.out, "compile_amp.png")
    k = min(4, args.test_size)
    save_figure(figure, log, x_test[:k], y_test[:k], test_logits[:k].argmax(1))

    result = {
        "log": log,
        "max_err_op": max(r["err_op"] for r in log),
        "max_err_naive": max(r["err_naive"] for r in log),
        "loss_dtype": loss_dtype,
        "logits_dtype": logits_dtype,
        "dice": dice.tolist(),
        "first_step_s": times[0],
        "step_s": sum(times[1:]) / max(1, len(times) - 1),
        "figure": figure,
        "seconds": seconds,
    }
    print(f"{'eager' if args.no_compile else 'compiled'} {args.loss}: logits {logits_dtype}, loss {loss_dtype}; "
          f"max |loss - float64| {result['max_err_op']:.1e} (naive bf16: {result['max_err_naive']:.1e}) over "
          f"{len(log)} logged steps; held-out Dice background {dice[0]:.3f} triangle {dice[1]:.3f}; "
          f"first step {times[0]:.1f} s, later steps {1000 * result['step_s']:.0f} ms; total {seconds:.1f} s; "
          f"figure {figure}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
