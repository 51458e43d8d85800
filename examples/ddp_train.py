"""The triangle segmentation of train_triangles.py, trained data-parallel with a global batch Dice loss.

Launch one process per device (CPU cores with gloo; GPUs with NCCL when they are present)::

    torchrun --nproc_per_node=2 examples/ddp_train.py            # about 30 s on 2 CPU cores
    torchrun --nproc_per_node=2 examples/ddp_train.py --epochs 2 --min-dice 0.9
    python examples/ddp_train.py                                  # also runs alone, as a world of 1

Each rank trains on its share of every global batch (``DistributedSampler``; ``--batch-size`` is the
global batch, split over the ranks) with::

    loss_fn = dicetorch.GeneralizedDiceLoss(batch=True, distributed=True)

so the Dice sums (I, P, T), and the class volumes the generalized-Dice weights come from, are summed
over all ranks before the ratio: every rank computes the loss of the whole global batch, and DDP's
gradient averaging gives exactly the gradient of single-process training on that batch (the net uses
GroupNorm, which is per image, so the run is the single-process run, split).  Without
``distributed=True`` each rank would train on the Dice of its own slice: a different loss, which
changes with the number of processes.

After every epoch the held-out images (split over the ranks without padding) are scored with
``dicetorch.metrics.DiceScore(input_format="logits")``: raw logits in, the argmax fused in the kernel,
the per-image sums gathered from all ranks by torchmetrics.  Rank 0 shows a progress bar, prints the
global figures and writes ``triangles_ddp.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import dicetorch
from dicetorch.metrics import DiceScore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_triangles as tri  # noqa: E402  (the data, the network and the figure)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="passes over the training set")
    p.add_argument("--train-size", type=int, default=1024, help="number of training images")
    p.add_argument("--test-size", type=int, default=512, help="number of held-out images")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (split over the ranks)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (SGD, momentum 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the weights")
    p.add_argument("--out", default=os.path.join("examples", "out"), help="directory for the PNG")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: the cores divided by the local processes)")
    p.add_argument("--min-dice", type=float, default=None,
                   help="exit with status 1 if the final foreground Dice is below this")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    for name in ("epochs", "train_size", "test_size", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def init_distributed() -> tuple:
    """(rank, world size, device): from torchrun's environment, or a world of one process.

    An already initialized process group (a caller that set one up) is used as it is."""
    if dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dist.get_backend() == "nccl":
            return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank % torch.cuda.device_count())
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    if "RANK" not in os.environ:  # started with plain python: a process group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size(), device


@torch.no_grad()
def validate(model, loader, metric: DiceScore, device) -> torch.Tensor:
    """Per-class hard Dice (mean over the held-out images of all ranks), the same on every rank."""
    model.eval()
    metric.reset()
    for x, y in loader:
        metric.update(model(x.to(device)), y.to(device))  # logits straight in
    model.train()
    return metric.compute().cpu()  # gathers every rank's per-image sums


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    owns_group = not dist.is_initialized()
    rank, world, device = init_distributed()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local))
    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    start = time.perf_counter()

    # every rank makes the same images (cheap) and reads its share
    x_train, y_train = tri.make_triangles(args.train_size, torch.Generator().manual_seed(2 * args.seed))
    x_test, y_test = tri.make_triangles(args.test_size, torch.Generator().manual_seed(2 * args.seed + 1))
    train_set = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    per_rank = max(1, args.batch_size // world)
    train_loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler)
    # held-out images: rank r scores images r, r + W, ... (no padding: each image counts once)
    test_set = Subset(TensorDataset(x_test, y_test), range(rank, args.test_size, world))
    test_loader = DataLoader(test_set, batch_size=128)

    model = tri.TriangleNet(x_train.mean(0)).to(device, memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = dicetorch.GeneralizedDiceLoss(batch=True, distributed=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, math.ceil(0.75 * args.epochs)), gamma=0.1)
    metric = DiceScore(num_classes=tri.NUM_CLASSES, average="none", input_format="logits").to(device)

    history = {"train_loss": [], "test_dice": []}
    bar = tqdm(total=args.epochs * len(train_loader), desc=f"train ({world} processes)", unit="batch",
               disable=args.no_progress or rank != 0, dynamic_ncols=True, leave=False)
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        total, steps = 0.0, 0
        for x, y in train_loader:
            loss = loss_fn(ddp(x.to(device)), y.to(device))  # the loss of the global batch, on every rank
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
        sched.step()
        dice = validate(ddp, test_loader, metric, device)
        history["train_loss"].append(total / steps)
        history["test_dice"].append(dice.tolist())
        if rank == 0:
            tqdm.write(f"epoch {epoch:3d}/{args.epochs}  lr {opt.param_groups[0]['lr']:.0e}  "
                       f"train loss {total / steps:.4f}  test Dice background {dice[0]:.4f} "
                       f"triangle {dice[1]:.4f}")
    bar.close()
    seconds = time.perf_counter() - start

    fg = float(dice[1])
    ok = args.min_dice is None or fg >= args.min_dice
    figure = os.path.join(args.out, "triangles_ddp.png")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        k = min(6, args.test_size)
        model.eval()
        with torch.no_grad():
            logits = model(x_test[:k].to(device))
            per_image = dicetorch.dice_score(logits, y_test[:k].to(device), hard=True)[:, 1]
        tri.save_figure(figure, x_test[:k], y_test[:k], logits.argmax(1).cpu(), per_image.cpu())
        print(f"final: foreground (triangle) Dice {fg:.4f}, background Dice {float(dice[0]):.4f} on "
              f"{args.test_size} held-out images after {args.epochs} epochs on {world} "
              f"{dist.get_backend()} processes in {seconds:.1f} s; figure {figure}"
              + ("" if args.min_dice is None else f"; min-dice {args.min_dice}: {'ok' if ok else 'NOT reached'}"),
              flush=True)
    dist.barrier()
    if owns_group:
        dist.destroy_process_group()
    return {**history, "dice": dice.tolist(), "figure": figure, "seconds": seconds, "ok": ok}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
