"""GPU benchmark of the Dice loss: dicetorch (Triton / CUDA) against the reference, MONAI and torch.compile.

For a 3D case (N=2, C=4, 128^3) and a 2D case (N=16, C=21, 512^2), in fp32 and bf16, it measures
forward, backward and forward+backward median times (CUDA events, after warmup) and the peak memory
above the inputs (``torch.cuda.max_memory_allocated``) of:

* ``dicetorch-triton``  -- ``dicetorch.DiceLoss(backend="triton")``
* ``dicetorch-cuda``    -- ``dicetorch.DiceLoss(backend="cuda")`` (when the extension has CUDA kernels)
* ``reference``         -- ``dicetorch.DiceLoss(backend="reference")`` (plain PyTorch op by op)
* ``monai``             -- ``monai.losses.DiceLoss(softmax=True, to_onehot_y=True)``
* ``compiled-reference``-- ``torch.compile`` of the plain-PyTorch soft Dice (reference stats + epilogue)

and the achieved bandwidth of dicetorch as a fraction of the device's peak.  The bytes that must
move for forward+backward are: logits read twice, labels read twice, gradient written once.  The
peak is measured in the same run with a large device-to-device copy (read + write); a nominal
table value is shown too when the device is known.

Results go to ``benchmarks/results/`` (CSV and markdown; git-ignored) and the table is printed.
On a machine without CUDA it prints a message and exits 0; ``--smoke`` instead runs tiny shapes on
the CPU (Triton interpreter, wall-clock timers) to check that the script itself works.

    python benchmarks/bench_gpu.py [--reps 20] [--warmup 5] [--dtypes fp32,bf16] [--cases 3d,2d]
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
    "3d": (2, 4, (128, 128, 128)),
    "2d": (16, 21, (512, 512)),
}
SMOKE_CASES = {"3d": (1, 4, (8, 8, 8)), "2d": (2, 5, (16, 16))}
NOMINAL_TBPS = [  # (substring of the device name, nominal DRAM bandwidth in TB/s)
    ("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("GH200", 4.0), ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("L40S", 0.864), ("L4", 0.3), ("A10", 0.6),
    ("RTX 4090", 1.008), ("RTX 3090", 0.936), ("V100", 0.9), ("T4", 0.32),
]
METHODS = ("dicetorch-triton", "dicetorch-cuda", "reference", "monai", "compiled-reference")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark dicetorch's fused Dice loss on a CUDA GPU.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cases", default="3d,2d", help="comma-separated subset of: " + ",".join(CASES))
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16,fp16")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (median is reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed repetitions first")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="output folder")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (Triton interpreter), to test the script without a GPU")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# timing helpers
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
    """Median forward / backward / forward+backward ms and peak extra memory (bytes, or None)."""
    def fwd():
        return loss_fn(x, y)

    for _ in range(warmup):
        x.grad = None
        fwd().backward()
    times = {"fwd": [], "bwd": [], "fwd+bwd": []}
    for _ in range(reps):
        x.grad = None
        timer.sync()
        timer.start()
        loss = fwd()
        times["fwd"].append(timer.stop())
        timer.start()
        loss.backward()
        times["bwd"].append(timer.stop())
        x.grad = None
        timer.sync()
        timer.start()
        fwd().backward()
        times["fwd+bwd"].append(timer.stop())
    peak = None
    if timer.cuda:
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        x.grad = None
    return {k: statistics.median(v) for k, v in times.items()}, peak


def copy_bandwidth(torch, device, timer, nbytes=1 << 30, reps=10) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
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


# ----------------------------------------------------------------------------------------------
# the contenders
# ----------------------------------------------------------------------------------------------
def build_methods(torch, dicetorch, names, device):
    """name -> (loss_fn(x, labels) or None, reason when unavailable)."""
    from dicetorch import reference as R

    out = {}
    avail = dicetorch.ops.available_backends(device)
    for name in names:
        if name == "dicetorch-triton":
            out[name] = (dicetorch.DiceLoss(backend="triton"), None) if "triton" in avail else \
                (None, "triton backend not available")
        elif name == "dicetorch-cuda":
            out[name] = (dicetorch.DiceLoss(backend="cuda"), None) if "cuda" in avail else \
                (None, "dicetorch._C has no CUDA kernels")
        elif name == "reference":
            out[name] = (dicetorch.DiceLoss(backend="reference"), None)
        elif name == "monai":
            try:
                from monai.losses import DiceLoss as MonaiDice

                m = MonaiDice(softmax=True, to_onehot_y=True)
                out[name] = (lambda x, y, m=m: m(x, y.unsqueeze(1)), None)
            except ImportError as exc:
                out[name] = (None, f"monai not installed ({exc})")
        elif name == "compiled-reference":
            def soft_dice(x, y, eps=1e-5):
                # the plain-PyTorch reference stats and the soft Dice epilogue, fused by torch.compile
                n, c = x.shape[:2]
                s = R.dice_stats_reference(x.reshape(n, c, -1), y.reshape(n, -1), "softmax", 1, None)
                dice = (2 * s[:, 0] + eps) / (s[:, 1] + s[:, 2] + eps)
                return (1 - dice).mean()

            out[name] = (torch.compile(soft_dice), None)
        else:
            raise SystemExit(f"unknown method {name!r}; choose from {METHODS}")
    return out


def must_move_bytes(x, y) -> int:
    """Logits read twice (forward, backward), labels read twice, gradient written once."""
    xb = x.numel() * x.element_size()
    return 3 * xb + 2 * y.numel() * y.element_size()


def fmt_ms(v):
    return "" if v is None else f"{v:.3f}"


def fmt_mb(v):
    return "n/a" if v is None else f"{v / 2**20:.1f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    sys.path.insert(0, ROOT)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is available; this benchmark needs a GPU "
              "(use --smoke to run tiny shapes on the CPU instead). Nothing to do.")
        return 0
    import dicetorch

    device = torch.device("cpu" if args.smoke else "cuda")
    timer = Timer(torch, device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cases = SMOKE_CASES if args.smoke else CASES
    methods = build_methods(torch, dicetorch, [m for m in args.methods.split(",") if m], device)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)"
    measured_bw = copy_bandwidth(torch, device, timer, nbytes=(1 << 30) if device.type == "cuda" else 1 << 24)
    nominal_bw = nominal_bandwidth(dev_name)
    print(f"device: {dev_name}; measured copy bandwidth {measured_bw / 1e9:.0f} GB/s"
          + (f", nominal {nominal_bw / 1e9:.0f} GB/s" if nominal_bw else ""))

    rows = []
    for case in args.cases.split(","):
        N, C, spatial = cases[case]
        for dname in args.dtypes.split(","):
            dtype = dtypes[dname]
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn((N, C, *spatial), device=device, dtype=dtype, generator=gen).requires_grad_(True)
            y = torch.randint(0, C, (N, *spatial), device=device, generator=gen)
            moved = must_move_bytes(x, y)
            for name, (fn, why) in methods.items():
                row = dict(case=case, shape=f"{N}x{C}x{'x'.join(map(str, spatial))}", dtype=dname, method=name,
                           fwd_ms=None, bwd_ms=None, fwdbwd_ms=None, peak_mem_mb="n/a", achieved_gbps="",
                           frac_measured_peak="", frac_nominal_peak="", note=why or "")
                if fn is not None:
                    try:
                        t, peak = measure(torch, fn, x, y, timer, args.warmup, args.reps)
                        row.update(fwd_ms=t["fwd"], bwd_ms=t["bwd"], fwdbwd_ms=t["fwd+bwd"], peak_mem_mb=fmt_mb(peak))
                        if name.startswith("dicetorch"):
                            bw = moved / (t["fwd+bwd"] * 1e-3)
                            row.update(achieved_gbps=f"{bw / 1e9:.0f}", frac_measured_peak=f"{bw / measured_bw:.2f}",
                                       frac_nominal_peak=f"{bw / nominal_bw:.2f}" if nominal_bw else "")
                    except Exception as exc:  # keep going: one failing contender must not hide the rest
                        row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(f"  {case} {dname} {name:20s} fwd {fmt_ms(row['fwd_ms']):>9} bwd {fmt_ms(row['bwd_ms']):>9} "
                      f"fwd+bwd {fmt_ms(row['fwdbwd_ms']):>9} ms  peak {row['peak_mem_mb']:>8} MiB  {row['note']}")
            del x, y

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"bench_gpu_{'smoke_' if args.smoke else ''}{stamp}")
    fields = list(rows[0].keys()) if rows else []
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (fmt_ms(v) if k.endswith("_ms") else v) for k, v in r.items()})
    head = ["case", "shape", "dtype", "method", "fwd ms", "bwd ms", "fwd+bwd ms", "peak MiB", "GB/s",
            "of measured peak", "of nominal peak", "note"]
    lines = [f"Device: {dev_name}. Copy bandwidth measured {measured_bw / 1e9:.0f} GB/s"
             + (f", nominal {nominal_bw / 1e9:.0f} GB/s" if nominal_bw else "")
             + f". Medians of {args.reps} reps after {args.warmup} warmup; peak memory above the inputs.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["case"], r["shape"], r["dtype"], r["method"], fmt_ms(r["fwd_ms"]),
                                        fmt_ms(r["bwd_ms"]), fmt_ms(r["fwdbwd_ms"]), r["peak_mem_mb"],
                                        r["achieved_gbps"], r["frac_measured_peak"], r["frac_nominal_peak"],
                                        r["note"]]) + " |")
    table = "\n".join(lines)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    print(f"\nwrote {base}.csv and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
