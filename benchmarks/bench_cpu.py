"""CPU benchmark of one Dice-loss training step (forward + backward), float32, softmax, label targets.

Methods, timed side by side in one run (interleaved repetitions, medians):

* ``dicetorch-cpu``        dicetorch.DiceLoss(backend="cpu"), the fused C++ kernel
* ``dicetorch-reference``  dicetorch.DiceLoss(backend="reference"), plain PyTorch + autograd
* ``monai``                monai.losses.DiceLoss(softmax=True, to_onehot_y=True)
* ``compile``              torch.compile of a plain-PyTorch Dice loss (same formula)
* ``floor``                torch.add(x, y, out=z): two reads and one write of a logits-sized tensor,
                           the least memory traffic of a step (forward reads x, backward reads x
                           and writes the gradient)

Peak extra memory is measured in a fresh subprocess per method: the growth of the resident set
(VmHWM after resetting it) during one step, after a warm-up step, in units of the logits' size.
The gradient itself (1.0) is included.

Usage::

    python benchmarks/bench_cpu.py            # (2, 4, 96^3) and (8, 21, 256^2)
    python benchmarks/bench_cpu.py --quick    # small shapes, a few seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {"full": [(2, 4, (96, 96, 96)), (8, 21, (256, 256))], "quick": [(2, 4, (24, 24, 24)), (2, 21, (64, 64))]}
METHODS = ("dicetorch-cpu", "dicetorch-reference", "monai", "compile", "floor")


def plain_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Plain-PyTorch soft Dice (softmax, one-hot labels, per image and class, mean):
    1 - (2 sum p t + s) / (sum p + sum t + s)."""
    p = torch.softmax(logits, dim=1)
    t = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(p.dtype)
    dims = tuple(range(2, logits.dim()))
    inter = (p * t).sum(dims)
    den = p.sum(dims) + t.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (den + smooth)).mean()


def make_step(method: str, n: int, c: int, spatial: tuple):
    """A zero-argument callable running one forward + backward of ``method``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, c, *spatial), generator=g).requires_grad_()
    labels = torch.randint(0, c, (n, *spatial), generator=g)
    if method == "floor":
        a = x.detach()
        b, out = a.clone(), torch.empty_like(a)
        return lambda: torch.add(a, b, out=out), a
    if method.startswith("dicetorch"):
        import dicetorch as dt

        loss_fn = dt.DiceLoss(backend=method.split("-")[1])
        target = labels
    elif method == "monai":
        from monai.losses import DiceLoss

        loss_fn = DiceLoss(softmax=True, to_onehot_y=True)
        target = labels.unsqueeze(1)
    elif method == "compile":
        loss_fn = torch.compile(plain_dice_loss, fullgraph=True)
        target = labels
    else:
        raise ValueError(method)

    def step():
        x.grad = None
        loss_fn(x, target).backward()

    return step, x


def _rss_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(method: str, n: int, c: int, spatial: tuple) -> float:
    """Peak RSS growth of one step (after a warm-up step), in units of the logits' size."""
    step, x = make_step(method, n, c, spatial)
    step()  # warm-up: compilation, allocator caches, lazy imports
    x.grad = None
    base = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    step()
    return (_rss_hwm_bytes() - base) / (x.numel() * x.element_size())


def bench(sizes, reps: int, memory: bool):
    rows = []
    for n, c, spatial in sizes:
        steps = {m: make_step(m, n, c, spatial)[0] for m in METHODS}
        for m in METHODS:  # warm-up (and compile) before timing
            steps[m]()
            steps[m]()
        times = {m: [] for m in METHODS}
        for _ in range(reps):  # interleaved, so that all methods see the same machine state
            for m in METHODS:
                t0 = time.perf_counter()
                steps[m]()
                times[m].append(time.perf_counter() - t0)
        med = {m: 1e3 * statistics.median(v) for m, v in times.items()}
        mem = {}
        if memory:
            for m in METHODS:
                res = subprocess.run(
                    [sys.executable, __file__, "--memory", m, json.dumps([n, c, list(spatial)])],
                    capture_output=True, text=True, check=True,
                )
                mem[m] = float(res.stdout.strip().splitlines()[-1])
        rows.append(((n, c, spatial), med, mem))
    return rows


def print_table(rows, reps):
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, median of {reps} steps\n")
    print("| shape (N, C, spatial) | method | median ms | × floor | speed-up vs MONAI | speed-up vs compile "
          "| peak extra memory (× logits) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (n, c, spatial), med, mem in rows:
        shape = f"({n}, {c}, {'×'.join(map(str, spatial))})"
        for m in METHODS:
            mm = f"{mem[m]:.2f}" if m in mem else "-"
            print(f"| {shape} | {m} | {med[m]:.2f} | {med[m] / med['floor']:.2f} | "
                  f"{med['monai'] / med[m]:.2f} | {med['compile'] / med[m]:.2f} | {mm} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per method (default 15, quick 5)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--memory", nargs=2, metavar=("METHOD", "SHAPE_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory:
        n, c, spatial = json.loads(args.memory[1])
        print(measure_memory(args.memory[0], n, c, tuple(spatial)))
        return
    reps = args.reps or (5 if args.quick else 15)
    rows = bench(SIZES["quick" if args.quick else "full"], reps, not args.no_memory)
    print_table(rows, reps)


if __name__ == "__main__":
    main()
