"""CPU benchmark of one segmentation-metric update on logits: torchmetrics vs dicetorch.metrics.

Methods, timed side by side (interleaved repetitions, medians of the time of one ``update``):

* ``torchmetrics``        torchmetrics.segmentation.DiceScore(input_format="mixed"): float logits and
                          integer labels; it takes logits.argmax(1) and one-hot tensors of both
* ``dicetorch-logits``    dicetorch.metrics.DiceScore(input_format="logits"): the argmax fused in the
                          C++ kernel, one read of the logits, integer counts
* ``argmax``              logits.argmax(1) alone: the part of torchmetrics' update before the one-hots

Both metrics are checked to give the same value on the data before timing.  Each update appends the
batch's per-image sums to the metric state (as in an evaluation loop); the states are reset between
repetitions.

Usage::

    python benchmarks/bench_metrics.py                 # (2, 5, 64^3) float32 at 1 and 2 threads, medians of 21
    python benchmarks/bench_metrics.py --quick         # small shape, a few seconds
    python benchmarks/bench_metrics.py --shape 4 3 128 128 --threads 1 2 --reps 21
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dicetorch import metrics as dm  # noqa: E402
from dicetorch import ops  # noqa: E402

METHODS = ("torchmetrics", "dicetorch-logits", "argmax")


def make_update(method: str, logits: torch.Tensor, labels: torch.Tensor):
    c = logits.shape[1]
    if method == "argmax":
        return lambda: logits.argmax(1), None
    if method == "torchmetrics":
        from torchmetrics.segmentation import DiceScore
        metric = DiceScore(num_classes=c, input_format="mixed", average="none")
    else:
        metric = dm.DiceScore(num_classes=c, input_format="logits", average="none")

    def update():
        metric.reset()
        metric.update(logits, labels)

    return update, metric


def bench(shape, threads_list, reps):
    n, c, *spatial = shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, *spatial, generator=g)
    labels = torch.randint(0, c, (n, *spatial), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        updates = {m: make_update(m, logits, labels) for m in METHODS}
        for m in ("torchmetrics", "dicetorch-logits"):
            updates[m][0]()
        want, got = updates["torchmetrics"][1].compute(), updates["dicetorch-logits"][1].compute()
    assert torch.equal(got, want), (got, want)
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        times = {m: [] for m in METHODS}
        for m in METHODS:  # warm-up
            updates[m][0]()
        for _ in range(reps):
            for m in METHODS:
                fn = updates[m][0]
                t0 = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t0)
        med = {m: 1e3 * statistics.median(v) for m, v in times.items()}
        for m in METHODS:
            rows.append((threads, m, med[m], med["torchmetrics"] / med[m]))
    return rows, want


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs="+", default=None, help="N C *spatial (default 2 5 64 64 64)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--quick", action="store_true", help="(2, 5, 16^3), 5 repetitions")
    args = p.parse_args(argv)
    shape = tuple(args.shape) if args.shape else ((2, 5, 16, 16, 16) if args.quick else (2, 5, 64, 64, 64))
    reps = 5 if args.quick else args.reps
    backend = ops.resolve_backend("auto", torch.device("cpu"), "argmax")
    print(f"DiceScore update on float32 logits {shape} + int64 labels; dicetorch backend {backend!r}; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; "
          f"medians of {reps}\n")
    rows, value = bench(shape, args.threads, reps)
    print("| threads | method | median ms per update | speed-up vs torchmetrics |")
    print("|---:|---|---:|---:|")
    for threads, m, ms, speedup in rows:
        print(f"| {threads} | {m} | {ms:.2f} | {speedup:.1f}× |")
    print(f"\nsame value from both metrics: {value.tolist()}")


if __name__ == "__main__":
    main()
