"""CPU benchmark of one Dice-loss training step (forward + backward), float32, softmax, label targets.

Methods, timed side by side in one run (interleaved repetitions, medians), at each thread count of
``--threads`` (default 1 and 2):

* ``dicetorch-cpu``        dicetorch.DiceLoss(backend="cpu"), the fused C++ kernel
* ``dicetorch-reference``  dicetorch.DiceLoss(backend="reference"), plain PyTorch + autograd
* ``monai``                monai.losses.DiceLoss(softmax=True, to_onehot_y=True)
* ``compile``              torch.compile of a plain-PyTorch Dice loss (same formula)
* ``dicece-cpu``           dicetorch.DiceCELoss(backend="cpu"): Dice + cross-entropy from one fused
                           operator call
* ``dice+ce``              dicetorch.DiceLoss(backend="cpu")(x, y) + F.cross_entropy(x, y): the same
                           loss the unfused way (a second pass over the logits, log-softmax stored)
* ``monai-dicece``         monai.losses.DiceCELoss(softmax=True, to_onehot_y=True)
* ``floor``                torch.add(x, y, out=z): two reads and one write of a logits-sized tensor,
                           the least memory traffic of a step (forward reads x, backward reads x
                           and writes the gradient)

The three Dice + cross-entropy methods compute the same loss; their values are compared before
timing (relative difference printed, a mismatch beyond 1e-4 stops the run).

Peak extra memory is measured in a fresh subprocess per method: the growth of the resident set
(VmHWM after resetting it) during one step, after a warm-up step, in units of the logits' size.
The gradient itself (1.0) is included.  It is measured once per shape, at the largest thread count,
under the system allocator whatever ``--allocator`` says (a caching allocator would hand the step
the blocks its warm-up freed, and the resident set would not show them).

Page faults per step (the median of the timed steps' minor faults) show what the allocator cost:
glibc's malloc hands out a block above its mmap threshold (which adapts up to 32 MiB) as fresh pages
unless its heap holds a free chunk that large, and smaller ones from a heap that other frees may
have trimmed, so under the default allocator (``--allocator system``) a step pays for the pages it
touches depending also on what the methods timed before it freed.  ``--allocator caching`` makes
glibc keep every freed block in the process (no mmap, no trimming), as a caching allocator
(jemalloc, tcmalloc, PyTorch's CUDA allocator) does: no step faults, and the times are the methods'
own work.  MONAI's many-class steps are about half page faults under the default.

A second table derives, per shape and thread count, the ratios the compound loss is judged by: the
fused DiceCELoss's speed-up over MONAI's DiceCELoss, the cross-entropy part's extra cost over
dicetorch's DiceLoss step, (DiceCE - Dice) / Dice, the unfused Dice + F.cross_entropy over the fused
step, DiceLoss's speed-up over MONAI's DiceLoss, and the DiceCE step's peak extra memory.

Usage::

    python benchmarks/bench_cpu.py                        # (2, 4, 96^3) and (8, 21, 256^2), 1 and 2 threads
    python benchmarks/bench_cpu.py --quick --no-memory    # small shapes, well under a minute
    python benchmarks/bench_cpu.py --threads 2            # one thread count
    python benchmarks/bench_cpu.py --allocator caching    # no page faults in the timed steps
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {"full": [(2, 4, (96, 96, 96)), (8, 21, (256, 256))], "quick": [(2, 4, (24, 24, 24)), (2, 21, (64, 64))]}
METHODS = ("dicetorch-cpu", "dicetorch-reference", "monai", "compile", "dicece-cpu", "dice+ce", "monai-dicece",
           "floor")
LABELS = {
    "dicetorch-cpu": "dicetorch DiceLoss `cpu`",
    "dicetorch-reference": "dicetorch DiceLoss `reference`",
    "monai": "MONAI DiceLoss",
    "compile": "torch.compile(reference)",
    "dicece-cpu": "dicetorch DiceCELoss `cpu` (fused)",
    "dice+ce": "dicetorch DiceLoss `cpu` + F.cross_entropy",
    "monai-dicece": "MONAI DiceCELoss",
    "floor": "floor (x + y → z)",
}
DICECE = ("dicece-cpu", "dice+ce", "monai-dicece")  # the same loss three ways
# the MONAI method each one is compared with, and whether the compile column applies
MONAI_OF = {m: ("monai-dicece" if m in DICECE else "monai") for m in METHODS}
TARGETS = (  # (column, comparison, bound) of the derived table
    ("DiceCELoss speed-up vs MONAI DiceCELoss", ">=", 5.0),
    ("CE part's extra cost (DiceCE − Dice) / Dice", "<=", 0.25),
    ("DiceLoss speed-up vs MONAI DiceLoss", ">=", 4.0),
    ("DiceCE step's peak extra memory (× logits)", "<=", 1.1),
)


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
    elif method == "dicece-cpu":
        import dicetorch as dt

        loss_fn = dt.DiceCELoss(backend="cpu")
        target = labels
    elif method == "dice+ce":
        import dicetorch as dt

        dice = dt.DiceLoss(backend="cpu")

        def loss_fn(input, target):
            return dice(input, target) + F.cross_entropy(input, target)

        target = labels
    elif method == "monai-dicece":
        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
        target = labels.unsqueeze(1)
    else:
        raise ValueError(method)

    def step():
        x.grad = None
        loss = loss_fn(x, target)
        loss.backward()
        return loss

    return step, x


def use_caching_allocator():
    """glibc's malloc as a caching allocator: no block from mmap (M_MMAP_MAX = 0) and no trimming
    of the heap (M_TRIM_THRESHOLD at its largest), so every freed block stays for the next step."""
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4
    if not hasattr(libc, "mallopt") or not (libc.mallopt(m_mmap_max, 0) and
                                            libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("--allocator caching needs glibc's mallopt")


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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


def check_dicece(steps) -> float:
    """Largest relative difference between the loss values of the Dice + cross-entropy methods."""
    values = {m: float(steps[m]().detach()) for m in DICECE}
    ref = values["monai-dicece"]
    err = max(abs(v - ref) / abs(ref) for v in values.values())
    if err > 1e-4:
        raise SystemExit(f"the Dice + cross-entropy methods disagree: {values}")
    return err


def _memory(method: str, n: int, c: int, spatial: tuple, threads: int) -> float:
    res = subprocess.run(  # the system allocator: a caching one keeps the freed gradient, and RSS shows no step
        [sys.executable, __file__, "--threads", str(threads), "--memory", method, json.dumps([n, c, list(spatial)])],
        capture_output=True, text=True, check=True,
    )
    return float(res.stdout.strip().splitlines()[-1])


def bench(sizes, reps: int, memory: bool, threads_list):
    rows = []
    saved = torch.get_num_threads()
    for n, c, spatial in sizes:
        for threads in threads_list:
            torch.set_num_threads(threads)
            torch._dynamo.reset()  # compiled CPU kernels specialize on the thread count
            steps = {m: make_step(m, n, c, spatial)[0] for m in METHODS}
            err = check_dicece(steps)
            for m in METHODS:  # warm-up (and compile) before timing
                steps[m]()
                steps[m]()
            times = {m: [] for m in METHODS}
            faults = {m: [] for m in METHODS}
            for _ in range(reps):  # interleaved, so that all methods see the same machine state
                for m in METHODS:
                    f0 = _minor_faults()
                    t0 = time.perf_counter()
                    steps[m]()
                    times[m].append(time.perf_counter() - t0)
                    faults[m].append(_minor_faults() - f0)
            med = {m: 1e3 * statistics.median(v) for m, v in times.items()}
            flt = {m: statistics.median(v) for m, v in faults.items()}
            rows.append(((n, c, spatial), threads, med, {}, err, flt))
            del steps
        if memory:  # once per shape, at the largest thread count, one fresh process per method
            # two processes at a time: each measures its own resident set, and imports dominate their time
            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                futures = {m: pool.submit(_memory, m, n, c, spatial, max(threads_list)) for m in METHODS}
                mem = {m: f.result() for m, f in futures.items()}
            for row in rows:
                if row[0] == (n, c, spatial):
                    row[3].update(mem)
    torch.set_num_threads(saved)
    return rows


def _shape(n, c, spatial) -> str:
    return f"({n}, {c}, {'×'.join(map(str, spatial))})"


def derived(med, mem) -> list:
    """The four judged ratios of one (shape, threads) row, as in ``TARGETS`` (None: not measured)."""
    return [
        med["monai-dicece"] / med["dicece-cpu"],
        (med["dicece-cpu"] - med["dicetorch-cpu"]) / med["dicetorch-cpu"],
        med["monai"] / med["dicetorch-cpu"],
        mem.get("dicece-cpu"),
    ]


def _ratio(v: float, bound: float, ok: bool, percent: bool) -> str:
    """``v`` rounded, with more digits where rounding would show a missed target as met (3.997 is not 4.00)."""
    for digits in range(2, 6):
        text = f"{v:+.{digits - 2}%}" if percent else f"{v:.{digits}f}"
        if ok or float(text.rstrip("%")) / (100 if percent else 1) != bound:
            return text
    return text


def _bound(op: str, bound: float, percent: bool) -> str:
    return f"{'≥' if op == '>=' else '≤'} {f'{bound:.0%}' if percent else f'{bound:g}×'}"


def print_table(rows, reps, allocator="system"):
    threads = sorted({r[1] for r in rows})
    print(f"\ntorch {torch.__version__}, {'/'.join(map(str, threads))} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, allocator {allocator}, median of {reps} "
          f"steps; Dice + CE values agree to {max(r[4] for r in rows):.1e} (relative)\n")
    print("| shape (N, C, spatial) | threads | method | median ms | × floor | speed-up vs MONAI (same loss) "
          "| speed-up vs compile | page faults / step | peak extra memory (× logits) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for (n, c, spatial), t, med, mem, _, flt in rows:
        for m in METHODS:
            mm = f"{mem[m]:.2f}" if m in mem else "-"
            vs_compile = "-" if m in DICECE else f"{med['compile'] / med[m]:.2f}"
            vs_monai = "-" if m == "floor" else f"{med[MONAI_OF[m]] / med[m]:.2f}"
            print(f"| {_shape(n, c, spatial)} | {t} | {LABELS[m]} | {med[m]:.2f} | {med[m] / med['floor']:.2f} | "
                  f"{vs_monai} | {vs_compile} | {flt[m]:.0f} | {mm} |")

    print("\nDerived ratios (targets in the header):\n")
    head = [f"{name} (target {_bound(op, bound, i == 1)})" for i, (name, op, bound) in enumerate(TARGETS)]
    print("| shape (N, C, spatial) | threads | " + " | ".join(head[:2]) + " | unfused Dice + F.cross_entropy "
          "over fused DiceCELoss | " + " | ".join(head[2:]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    met = [[] for _ in TARGETS]
    for (n, c, spatial), t, med, mem, *_ in rows:
        vals = derived(med, mem)
        cells = []
        for i, ((_, op, bound), v) in enumerate(zip(TARGETS, vals)):
            if v is None:
                cells.append("-")
                continue
            ok = v >= bound if op == ">=" else v <= bound
            met[i].append(ok)
            text = _ratio(v, bound, ok, percent=i == 1)
            cells.append(f"{text}{'' if ok else ' ✗'}")
        unfused = f"{med['dice+ce'] / med['dicece-cpu']:.2f}"
        print(f"| {_shape(n, c, spatial)} | {t} | {cells[0]} | {cells[1]} | {unfused} | {cells[2]} | {cells[3]} |")
    print("\n✗: target not met in that row.")
    for i, ((name, op, bound), oks) in enumerate(zip(TARGETS, met)):
        verdict = "not measured" if not oks else f"met in {sum(oks)} of {len(oks)} rows"
        print(f"target {name} {_bound(op, bound, i == 1)}: {verdict}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per method (default 15, quick 5)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated torch thread counts, each timed in turn (default 1,2)")
    ap.add_argument("--allocator", choices=("system", "caching"), default="system",
                    help="system: glibc's malloc as it is (default); caching: every freed block kept, no page "
                         "faults in the timed steps")
    ap.add_argument("--memory", nargs=2, metavar=("METHOD", "SHAPE_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allocator == "caching":  # before the first large block
        use_caching_allocator()
    threads = [int(t) for t in args.threads.split(",")]
    if not threads or min(threads) < 1:
        ap.error("--threads takes positive integers, e.g. 1,2")
    if args.memory:
        torch.set_num_threads(max(threads))
        n, c, spatial = json.loads(args.memory[1])
        print(measure_memory(args.memory[0], n, c, tuple(spatial)))
        return
    reps = args.reps or (5 if args.quick else 15)
    rows = bench(SIZES["quick" if args.quick else "full"], reps, not args.no_memory, threads)
    print_table(rows, reps, args.allocator)


if __name__ == "__main__":
    main()
