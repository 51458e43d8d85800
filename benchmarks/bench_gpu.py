"""GPU benchmark of the Dice loss: dicetorch (Triton / CUDA) against the reference, MONAI and torch.compile.

For a 2D case (N=16, C=21, 512x512) and a 3D case (N=2, C=4, 128^3), in fp32 and bf16, with int64
labels and the default soft Dice (softmax, include_background, smooth 1e-5), it

1. checks every method against ``dicetorch.DiceLoss(backend="reference")`` on the same device and
   inputs -- loss and input gradient, max abs and relative error printed -- and refuses to time a
   method that disagrees beyond the dtype's tolerance (:data:`TOLERANCE`);
2. times forward, backward and forward+backward (CUDA events, medians after warmup), the same step
   replayed from a CUDA graph (the GPU's own time: an eager step of a fast loss is bound by the CPU
   issuing its kernels, which a training step's other work hides), and measures the peak memory
   above the inputs (``torch.cuda.max_memory_allocated``);
3. puts each time on a roofline: the bytes the design says must move (forward reads the logits and
   labels once; backward reads them once more and writes the gradient once: 3 x logits + 2 x labels
   for a training step) over the time, as a fraction of the device's nominal DRAM bandwidth
   (H100 SXM 3.35 TB/s, H100 PCIe 2.0, A100 1.555 / 2.039, H200 4.8, ... by device name) and of a
   large device-to-device copy measured in the same run (the practical peak).

Methods: ``dicetorch-triton`` and ``dicetorch-cuda`` (``dicetorch.DiceLoss(backend=...)``),
``reference`` (plain PyTorch, op by op), ``monai`` (``monai.losses.DiceLoss(softmax=True,
to_onehot_y=True)``), ``compiled-reference`` (``torch.compile`` of the reference statistics and the
same soft-Dice formula).  Losses (``--losses``): ``dice`` as above, and ``dicece``, the same methods
for Dice + cross-entropy (``dicetorch.DiceCELoss``, one fused pass; ``monai.losses.DiceCELoss``;
the compiled reference plus ``F.cross_entropy``).

Results go to ``benchmarks/results/`` (CSV and markdown, git-ignored) and the table is printed.
Without a CUDA device it says so and exits 0.  ``--device cpu --quick`` runs the same code on tiny
shapes on the CPU (Triton in its interpreter, torch.compile with the aot_eager backend): a test of
the script, not a measurement.

    python benchmarks/bench_gpu.py [--cases 2d,3d] [--dtypes fp32,bf16] [--losses dice,dicece] [--reps 20]
    python benchmarks/bench_gpu.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {  # name: (N, C, spatial)
    "2d": (16, 21, (512, 512)),
    "3d": (2, 4, (128, 128, 128)),
}
QUICK_CASES = {"2d": (2, 5, (16, 16)), "3d": (1, 4, (8, 8, 8))}
NOMINAL_TBPS = [  # (substring of the device name, nominal DRAM bandwidth in TB/s); first match wins
    ("H200", 4.8), ("GH200", 4.0), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H800", 3.35),
    ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("B200", 8.0), ("L40S", 0.864),
    ("L4", 0.3), ("A10", 0.6), ("RTX 5090", 1.792), ("RTX 4090", 1.008), ("RTX 3090", 0.936), ("V100", 0.9),
    ("T4", 0.32),
]
METHODS = ("dicetorch-triton", "dicetorch-cuda", "reference", "monai", "compiled-reference")
# dice: DiceLoss / monai.losses.DiceLoss; dicece: DiceCELoss / monai.losses.DiceCELoss (the Dice above
# plus F.cross_entropy, one fused pass in dicetorch)
LOSSES = ("dice", "dicece")
# Largest accepted error against the reference, relative to the reference's magnitude (the loss, or
# the largest gradient element).  Kernels compute in fp32 from the same rounded inputs (fast exp and
# division: ~1e-6); MONAI and the op-by-op reference round intermediates to bf16/fp16.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark dicetorch's fused Dice loss on a CUDA GPU.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cases", default="2d,3d", help="comma-separated subset of: " + ",".join(CASES))
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16,fp16")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of " + ",".join(LOSSES))
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (median is reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions first")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu (smoke test)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 repetitions: checks the script, measures nothing")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="output folder")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = min(args.reps, 3), min(args.warmup, 1)
    return args


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
class Timer:
    """Elapsed milliseconds of a region: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self):
        if self.cuda:
            self._a = self.torch.cuda.Event(enable_timing=True)
            self._b = self.torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._b.record()
            self._b.synchronize()
            return self._a.elapsed_time(self._b)
        return (time.perf_counter() - self._t) * 1e3


def measure(torch, loss_fn, x, y, timer, warmup, reps):
    """Median forward / backward / forward+backward ms and peak memory above the inputs (bytes or None)."""
    for _ in range(warmup):
        x.grad = None
        loss_fn(x, y).backward()
    times = {"fwd": [], "bwd": [], "fwd+bwd": []}
    for _ in range(reps):
        x.grad = None
        timer.sync()
        timer.start()
        loss = loss_fn(x, y)
        times["fwd"].append(timer.stop())
        timer.start()
        loss.backward()
        times["bwd"].append(timer.stop())
        x.grad = None
        timer.sync()
        timer.start()
        loss_fn(x, y).backward()
        times["fwd+bwd"].append(timer.stop())
    peak = None
    if timer.cuda:
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(x, y).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    x.grad = None
    return {k: statistics.median(v) for k, v in times.items()}, peak


def capture_step(torch, loss_fn, x, y, warmup=3):
    """(graph, loss): ``loss_fn(x, y)`` and its backward captured in a CUDA graph, after ``warmup``
    eager steps on a side stream (compilation and first allocations stay out of the capture).
    ``graph.replay()`` recomputes the loss and ``x.grad`` from the current contents of x and y."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            x.grad = None
            loss_fn(x, y).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = loss_fn(x, y)
        loss.backward()
    return graph, loss


def graph_step_ms(torch, loss_fn, x, y, timer, reps):
    """Median ms of a CUDA-graph replay of forward + backward: the GPU's own time for the step, without
    the CPU's cost of issuing it (what a step costs inside a longer, GPU-bound training step), or None
    where the method cannot be captured."""
    if not timer.cuda:
        return None
    graph = None
    try:
        graph, _ = capture_step(torch, loss_fn, x, y)
        times = []
        for _ in range(reps):
            timer.sync()
            timer.start()
            graph.replay()
            times.append(timer.stop())
        return statistics.median(times)
    except Exception as exc:  # e.g. a host synchronization inside the method
        print(f"    (no CUDA graph: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None
    finally:
        x.grad = None
        del graph
        torch.cuda.synchronize()


def copy_bandwidth(torch, device, timer, nbytes, reps=10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted): the practical peak."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(reps):
        timer.sync()
        timer.start()
        dst.copy_(src)
        ts.append(timer.stop())
    del src, dst
    return 2 * nbytes / (statistics.median(ts) * 1e-3)


def nominal_bandwidth(name: str):
    for key, tbps in NOMINAL_TBPS:
        if key in name:
            return tbps * 1e12
    return None


def must_move_bytes(x, y) -> dict:
    """Bytes the fused design moves: forward reads logits + labels; backward reads them again and
    writes the gradient (the size of the logits)."""
    xb, yb = x.numel() * x.element_size(), y.numel() * y.element_size()
    return {"fwd": xb + yb, "bwd": 2 * xb + yb, "fwd+bwd": 3 * xb + 2 * yb}


# ----------------------------------------------------------------------------------------------
# the contenders
# ----------------------------------------------------------------------------------------------
def soft_dice_plain(torch, stats_fn, with_ce=False):
    """The soft Dice epilogue (default DiceLoss: smooth 1e-5, mean over images and classes) on
    plain-PyTorch statistics, plus ``F.cross_entropy`` with ``with_ce``, for torch.compile."""
    def loss(x, y, eps=1e-5):
        n, c = x.shape[:2]
        s = stats_fn(x.reshape(n, c, -1), y.reshape(n, -1))
        dice = (2 * s[:, 0] + eps) / (s[:, 1] + s[:, 2] + eps)
        out = (1 - dice).mean()
        return out + torch.nn.functional.cross_entropy(x, y) if with_ce else out

    return loss


def reference_stats(torch, R):
    """dicetorch.reference's statistics (softmax, q = 1, no ignore_index), or the same formula inline."""
    fn = getattr(R, "dice_stats_reference", None)
    if fn is not None:
        return lambda x, y: fn(x, y, "softmax", 1, None)

    def stats(x, y):
        p = torch.softmax(x.float(), dim=1)
        t = (y.unsqueeze(1) == torch.arange(x.shape[1], device=x.device).view(1, -1, 1)).float()
        return torch.stack([(p * t).sum(-1), p.sum(-1), t.sum(-1)], dim=1)

    return stats


def build_methods(torch, dicetorch, names, device, compile_backend, loss="dice"):
    """name -> (loss_fn(x, labels) or None, reason when unavailable), for ``loss`` in :data:`LOSSES`."""
    from dicetorch import reference as R

    ce = loss == "dicece"
    ours = dicetorch.DiceCELoss if ce else dicetorch.DiceLoss
    out = {}
    avail = dicetorch.ops.available_backends(device)
    for name in names:
        if name in ("dicetorch-triton", "dicetorch-cuda"):
            b = name.split("-")[1]
            out[name] = (ours(backend=b), None) if b in avail else \
                (None, f"backend {b!r} not available on {device.type} (available: {avail})")
        elif name == "reference":
            out[name] = (ours(backend="reference"), None)
        elif name == "monai":
            try:
                from monai.losses import DiceCELoss as MonaiDiceCE, DiceLoss as MonaiDice
            except ImportError as exc:
                out[name] = (None, f"monai not installed ({exc})")
                continue
            m = (MonaiDiceCE if ce else MonaiDice)(softmax=True, to_onehot_y=True)
            out[name] = (lambda x, y, m=m: m(x, y.unsqueeze(1)), None)
        elif name == "compiled-reference":
            fn = soft_dice_plain(torch, reference_stats(torch, R), with_ce=ce)
            out[name] = (torch.compile(fn, backend=compile_backend), None)
        else:
            raise SystemExit(f"unknown method {name!r}; choose from {METHODS}")
    return out


def check_against_reference(torch, fn, ref_loss, ref_grad, x, y, tol):
    """(ok, loss error, gradient error, message): errors relative to the reference's magnitude."""
    x.grad = None
    loss = fn(x, y)
    loss.backward()
    grad, x.grad = x.grad, None
    if grad is None:
        return False, float("nan"), float("nan"), "no gradient"
    loss = loss.detach()
    le = abs(float(loss.double()) - float(ref_loss.double()))
    ge = float((grad.double() - ref_grad.double()).abs().max())
    lrel = le / max(abs(float(ref_loss.double())), 1e-30)
    grel = ge / max(float(ref_grad.double().abs().max()), 1e-30)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    ok = finite and lrel <= tol and grel <= tol
    msg = f"loss abs {le:.2e} rel {lrel:.2e}; grad max abs {ge:.2e} rel {grel:.2e}"
    return ok, lrel, grel, msg


def fmt(v, spec=".3f"):
    return "" if v is None else format(v, spec)


def run(args) -> int:
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: Triton runs interpreted
    sys.path.insert(0, ROOT)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is available, so there is nothing to measure; this benchmark "
              "needs a GPU (`--device cpu --quick` runs its code path on tiny CPU shapes). Exiting.")
        return 0
    import dicetorch

    device = torch.device(args.device)
    timer = Timer(torch, device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cases = QUICK_CASES if args.quick else CASES
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"
    names = [m for m in args.methods.split(",") if m]
    losses = [v for v in args.losses.split(",") if v]
    for v in losses:
        if v not in LOSSES:
            raise SystemExit(f"unknown loss {v!r}; choose from {LOSSES}")
    methods = {v: build_methods(torch, dicetorch, names, device, compile_backend, v) for v in losses}

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test, not a measurement)"
    copy_bw = copy_bandwidth(torch, device, timer, nbytes=(1 << 30) if device.type == "cuda" else 1 << 24)
    nominal = nominal_bandwidth(dev_name)
    peak = nominal or copy_bw
    print(f"device: {dev_name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s"
          + (f", nominal {nominal / 1e9:.0f} GB/s" if nominal else " (no nominal figure for this device)"))

    rows = []
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for case in args.cases.split(","):
        N, C, spatial = cases[case]
        for dname in args.dtypes.split(","):
            dtype, tol = dtypes[dname], TOLERANCE[dname]
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn((N, C, *spatial), device=device, dtype=dtype, generator=gen).requires_grad_(True)
            y = torch.randint(0, C, (N, *spatial), device=device, generator=gen)
            moved = must_move_bytes(x, y)
            shape = f"{N}x{C}x{'x'.join(map(str, spatial))}"
            print(f"{case} {shape} {dname}: {moved['fwd+bwd'] / 1e6:.1f} MB must move per step; "
                  f"floor {moved['fwd+bwd'] / peak * 1e3:.3f} ms at {peak / 1e12:.2f} TB/s")
            for loss in losses:
                ours = dicetorch.DiceCELoss if loss == "dicece" else dicetorch.DiceLoss
                ref_loss = ours(backend="reference")(x, y)
                ref_loss.backward()
                ref_grad, x.grad = x.grad, None
                ref_loss = ref_loss.detach()
                print(f"{case} {shape} {dname} {loss}:")
                monai_ms = monai_graph = None
                for name, (fn, why) in methods[loss].items():
                    row = dict(case=case, shape=shape, dtype=dname, loss=loss, method=name, loss_err=None,
                               grad_err=None, fwd_ms=None, bwd_ms=None, fwdbwd_ms=None, gbps=None, of_nominal=None,
                               of_copy=None, fwd_of_peak=None, bwd_of_peak=None, peak_mib=None, vs_monai=None,
                               graph_ms=None, graph_of_copy=None, graph_vs_monai=None, note=why or "")
                    if fn is not None:
                        try:
                            ok, lerr, gerr, msg = check_against_reference(torch, fn, ref_loss, ref_grad, x, y, tol)
                            row.update(loss_err=lerr, grad_err=gerr)
                            print(f"  {name:20s} vs reference: {msg}" + ("" if ok else f"  -> REFUSED (tolerance {tol:g})"))
                            if not ok:
                                row["note"] = f"not timed: disagrees with the reference ({msg})"
                            else:
                                t, mem = measure(torch, fn, x, y, timer, args.warmup, args.reps)
                                g = graph_step_ms(torch, fn, x, y, timer, args.reps)
                                row.update(graph_ms=g, graph_of_copy=g and moved["fwd+bwd"] / (g * 1e-3) / copy_bw)
                                bw = moved["fwd+bwd"] / (t["fwd+bwd"] * 1e-3)
                                row.update(fwd_ms=t["fwd"], bwd_ms=t["bwd"], fwdbwd_ms=t["fwd+bwd"], gbps=bw / 1e9,
                                           of_nominal=bw / nominal if nominal else None, of_copy=bw / copy_bw,
                                           fwd_of_peak=moved["fwd"] / (t["fwd"] * 1e-3) / peak,
                                           bwd_of_peak=moved["bwd"] / (t["bwd"] * 1e-3) / peak,
                                           peak_mib=None if mem is None else mem / 2**20)
                        except Exception as exc:  # one failing contender must not hide the rest
                            row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    if name == "monai":
                        monai_ms, monai_graph = row["fwdbwd_ms"], row["graph_ms"]
                    rows.append(row)
                    print(f"  {name:20s} fwd {fmt(row['fwd_ms']):>9} bwd {fmt(row['bwd_ms']):>9} fwd+bwd "
                          f"{fmt(row['fwdbwd_ms']):>9} ms  {fmt(row['gbps'], '.0f'):>6} GB/s  peak "
                          f"{fmt(row['peak_mib'], '.1f'):>8} MiB  {row['note']}")
                for r in rows:
                    if r["case"] == case and r["dtype"] == dname and r["loss"] == loss and monai_ms and r["fwdbwd_ms"]:
                        r["vs_monai"] = monai_ms / r["fwdbwd_ms"]
                    if r["case"] == case and r["dtype"] == dname and r["loss"] == loss and monai_graph and r["graph_ms"]:
                        r["graph_vs_monai"] = monai_graph / r["graph_ms"]
                del ref_grad
            del x, y
            write_results(args, rows, dev_name, copy_bw, nominal, stamp, final=False)  # a partial run keeps its rows
    write_results(args, rows, dev_name, copy_bw, nominal, stamp)
    return 0


def write_results(args, rows, dev_name, copy_bw, nominal, stamp, final=True):
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"bench_gpu_{'quick_' if args.quick else ''}{args.device}_{stamp}")
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)
    head = ["case", "shape", "dtype", "loss", "method", "err loss / grad", "fwd ms", "bwd ms", "fwd+bwd ms", "GB/s",
            "of nominal", "of copy", "fwd / bwd of peak", "peak MiB", "× MONAI", "graph ms", "graph of copy",
            "graph × MONAI", "note"]
    lines = [f"Device: {dev_name}. Copy bandwidth {copy_bw / 1e9:.0f} GB/s"
             + (f", nominal {nominal / 1e9:.0f} GB/s" if nominal else "")
             + f". Medians of {args.reps} repetitions after {args.warmup} warmup; GB/s counts the bytes that must "
             "move (3 x logits + 2 x labels per step); peak memory above the inputs; graph: a CUDA-graph replay of the "
             "step, the GPU's own time without the CPU's cost of issuing it.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        err = "" if r["loss_err"] is None else f"{r['loss_err']:.1e} / {r['grad_err']:.1e}"
        pct = (lambda v: "" if v is None else f"{v:.0%}")
        lines.append("| " + " | ".join([
            r["case"], r["shape"], r["dtype"], r["loss"], r["method"], err, fmt(r["fwd_ms"]), fmt(r["bwd_ms"]),
            fmt(r["fwdbwd_ms"]), fmt(r["gbps"], ".0f"), pct(r["of_nominal"]), pct(r["of_copy"]),
            "" if r["fwd_of_peak"] is None else f"{r['fwd_of_peak']:.0%} / {r['bwd_of_peak']:.0%}",
            fmt(r["peak_mib"], ".1f"), fmt(r["vs_monai"], ".2f"), fmt(r["graph_ms"]), pct(r["graph_of_copy"]),
            fmt(r["graph_vs_monai"], ".2f"), r["note"].replace("|", "/")]) + " |")
    table = "\n".join(lines)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    if not final:
        return
    print()
    print(table)
    print(f"\nwrote {base}.csv and {base}.md")


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
