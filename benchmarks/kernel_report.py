"""Kernel report: what the compiled Triton and CUDA kernels do, per architecture, without a GPU.

Triton.  The specializations come from the kernel module itself: the report *calls* the entry
points of ``dicetorch.triton_kernels`` (``forward``/``backward``) on tensors of the ``meta`` device
with the JIT launch intercepted, so it compiles exactly the kernels, arguments, constexprs and
``num_warps`` the module would launch on a GPU of that architecture (its SM count patched in);
Triton's own binder specializes the arguments as the JIT does (1 becomes a constant, multiples
of 16 get a divisibility hint), and ``triton.compile(..., target=GPUTarget("cuda", cc, 32))``
lowers them to PTX and a cubin.  The ``rules`` group is every input dtype x channel count x layout
the launch heuristic tells apart (channel counts 1, 2, 3, 4, 8, 16, 21, 128, 1024; 512x512 images;
softmax, q = 2, int64 labels with ignore_index, the heaviest options); ``cover`` adds every
(activation, q, target kind) with label dtypes, 64-bit offsets and layouts rotating.

CUDA.  ``csrc/cuda/dice_cuda.cu`` is compiled by nvcc (device code only, setup.py's nvcc flags and
torch's extension flags) to PTX and a cubin per architecture; every template instantiation the
launchers make is a row (C and layout are run-time arguments there: "any").  The main kernels come in
three kinds (template argument ``kind``, options column): the Dice rows of the soft activations, the
compound losses' kernels with the pixel-loss rows ("pixel"), and the hard activations ("hard",
forward only, no exp at all).

Per kernel (see ``benchmarks/ptx_stats.py`` for how each figure is read):

  regs / spill / smem   ``cuobjdump -res-usage`` (spill = stack + local bytes); shared memory from
                        Triton's metadata or the cubin
  occ                   theoretical occupancy, resident warps / maximum warps per SM, from registers,
                        shared memory and the block size with the architecture's limits
  ld / st               bits of the narrowest logits load / gradient store of the main loop
                        (128 = ``ld.global.v4.b32``); addresses traced back to the kernel parameters
  bar loop/all          ``bar.sync`` inside the tile loop (the whole kernel if it has no loop) / total
  exp/el                exps (``ex2.approx``) per logits element per loop iteration and thread, summed
                        over the loops that read logits ("+": more than one such loop; an upper bound
                        when nvcc splits a run-time channel loop into an unrolled body and a remainder)
  waves                 persistent grids only: programs / (SMs x resident blocks), worst batch size

``--check`` exits 1 when a rule of DESIGN.md section 4 is broken (see :func:`rules`): no spills;
C <= 8: no barrier in the forward's tile loop nor anywhere in the backward; 128-bit logits and
gradient access for contiguous input, and for channels-last input whose pixels make whole 16-byte
groups; C <= 16 (not fp64): one exp per element and direction (a Triton register tile pads C to a
power of two: padding channels cost an exp, never a load) -- for the CUDA pixel-loss kernels, whose
activation and loss are run-time arguments, at most the activation's exp, the focal power's for a gamma
that is not whole or half-whole, and (float targets) the soft-target sigmoid focal loss's second
exp along the heaviest path --, occupancy >= 50 % -- or, for a kernel
that registers limit below it, at least MIN_IN_FLIGHT bytes of loads in flight per SM (resident
threads x bytes of logits and labels loaded per tile iteration: latency is hidden by independent
loads per thread instead of by warps); persistent grids without a partial extra wave (their size comes from
the compiled kernel's occupancy, traced here through the module's resident-programs hook).
Without ``--check`` it exits 1 only if a kernel fails to compile.

    python benchmarks/kernel_report.py                       # sm_80 and sm_90, Triton and CUDA
    python benchmarks/kernel_report.py --check               # exit 1 when a rule is broken
    python benchmarks/kernel_report.py --arch 90 --dtypes fp32,bf16 --markdown   # README table
    python benchmarks/kernel_report.py --dump /tmp/ptx       # PTX of every specialization
    python benchmarks/kernel_report.py --backends triton --groups rules,cover --lowering-arch 75 86 89 100 120
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import kernel_build as kb  # noqa: E402
import ptx_stats as ps  # noqa: E402

# ==============================================================================================
# Kernel-specific knowledge: the only part to edit when the kernels change.
# ==============================================================================================
TRITON_MODULE = "dicetorch.triton_kernels"
TRITON_SM_HOOK = "_num_sms"  # module function(device) -> SM count; patched to the target's while tracing
# module function(kernel, args, constexprs, num_warps, device) -> programs resident per SM, which
# sizes persistent grids; patched to compile the kernel for the target and compute its occupancy
TRITON_RESIDENT_HOOK = "_resident_programs"
TRITON_ROLES = {"x_ptr": "logits", "out_ptr": "grad", "t_ptr": "target"}  # pointer argument -> role
TRITON_MAIN = {"fwd": ("tile_fwd_kernel", "dice_fwd_kernel"),  # the kernels that stream the logits
               "bwd": ("tile_bwd_kernel", "dice_bwd_kernel")}  # (C <= 128: tile; more: chunked)


def triton_entry_points(tk, x, t, grad, spec):
    """direction -> call of the module's entry point on canonical (N, C, M) tensors."""
    calls = {
        "fwd": lambda: tk.forward(x, t, spec.act, spec.q, 255 if spec.ignore else None, spec.pixel, spec.gamma),
        "bwd": lambda: tk.backward(grad, x, t, spec.act, spec.q, 255 if spec.ignore else None, spec.pixel,
                                   spec.gamma),
    }
    if spec.act in getattr(tk, "HARD_ACTIVATIONS", ()):  # evaluation-only: no backward
        del calls["bwd"]
    return calls


CUDA_SOURCE = "csrc/cuda/dice_cuda.cu"
CUDA_KERNELS = {  # __global__ name -> (direction, {pointer parameter position: role}, template argument names)
    "forward_partial_kernel": ("fwd", {0: "logits", 1: "target"},
                               ("dtype", "labels", "acc", "slots", "cl", "wide", "kind")),
    "reduce_partial_kernel": ("fwd", {}, ("acc",)),
    "pixel_norm_kernel": ("fwd", {0: "logits"}, ("dtype", "acc", "cl")),
    "argmax_kernel": ("fwd", {0: "logits"}, ("dtype", "acc", "cl")),
    "backward_kernel": ("bwd", {1: "logits", 2: "target", 3: "grad"},
                        ("dtype", "labels", "acc", "slots", "cl", "wide", "kind")),
}
# The "kind" template argument of the main kernels (dice_kernels.cuh kKind*): the Dice rows of the
# soft activations, + the pixel-loss rows of the compound losses, or the hard activations.  Their
# rows' "act": any (softmax / sigmoid / none at run time), "pixel" (ce / focal with softmax / sigmoid)
# and "hard" (argmax / threshold: no exp at all).
CUDA_KIND_ACT = {"0": "any", "1": "pixel", "2": "hard"}
# "cl" (true: channels-last) sets the layout; "wide" kernels (a pixel's channel group spans warps,
# reductions through shared memory) serve C > 256 only, so the small-C rules do not apply to them;
# nor to CUDA_WIDE_ONLY kernels.  The label dtype is a run-time argument ("labels" false: float
# target).  The CUDA kernels pick 128-bit or scalar accesses at run time (alignment, tails), so
# their rows report the widest logits load and gradient store: the aligned path.
CUDA_WIDE_ONLY = {"pixel_norm_kernel", "argmax_kernel"}

# ==============================================================================================
DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp64": 64}
TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
CXX_DTYPE = {"float": "fp32", "double": "fp64", "c10::Half": "fp16", "c10::BFloat16": "bf16",
             "long": "int64", "int": "int32", "unsigned char": "uint8"}
DEFAULT_ARCHS = (80, 90)
ALL_ARCHS = tuple(ps.ARCH_LIMITS)  # what Triton 3.8 and nvcc 13 compile for here
M_2D = 512 * 512  # pixels per image of the traced launches
BARRIER_FREE_MAX_C = 8  # C <= this: no barrier in the tile loop / the backward
SMALL_C = 16  # C <= this: channels in registers, one exp per element, >= 50 % occupancy
MIN_OCCUPANCY = 0.5
# A register-limited kernel may stay below MIN_OCCUPANCY if each thread keeps enough independent
# loads (logits and labels) in flight: by Little's law an H100 SM needs about 3.35 TB/s x ~1 us /
# 132 SMs = 25 KiB.
MIN_IN_FLIGHT = 32 * 1024
WAVE_N = (1, 2, 3, 5, 7, 16)  # batch sizes at which persistent grids are checked for a partial wave
SASS = os.environ.get("KERNEL_REPORT_SASS") == "1"  # --sass: also count SASS instructions (slow)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One input configuration of the Triton kernels."""
    dtype: str  # fp32 | fp16 | bf16 | fp64
    C: int
    layout: str  # contig | cl
    act: str = "softmax"
    q: int = 2
    target: str = "int64"  # int64 | int32 | uint8 labels, or float
    ignore: bool = True
    int64: bool = False  # offsets past 2**31 elements
    pixel: str = "none"  # the compound loss's pixel-loss rows: none | ce | focal
    gamma: float = 2.0  # the focal exponent
    group: str = "rules"  # rules (the report's matrix) | cover (option combinations) | arch (other archs)

    @property
    def name(self) -> str:
        extra = "" if (self.act, self.q, self.target, self.ignore, self.int64) == ("softmax", 2, "int64", True, False) \
            else f"_{self.act}_q{self.q}_{self.target}{'_ign' if self.ignore else ''}{'_i64' if self.int64 else ''}"
        if self.C == 1 and (self.act, self.q, self.target, self.ignore, self.int64) == ("sigmoid", 2, "int64", True, False):
            extra = ""
        if self.pixel != "none":
            extra += f"_{self.pixel}" + (f"{self.gamma:g}" if self.pixel == "focal" else "")
        return f"{self.dtype}_C{self.C}_{self.layout}{extra}"


RULE_CHANNELS = (1, 2, 3, 4, 8, 16, 21, 128, 1024)


def rule_specs():
    """Every dtype x channel count x layout, with the heaviest options (softmax, q=2, labels,
    ignore_index); C = 1 is binary sigmoid.  fp64 for a few channel counts."""
    out = []
    for dtype, C in itertools.product(("fp32", "fp16", "bf16"), RULE_CHANNELS):
        for layout in (("contig",) if C == 1 else ("contig", "cl")):
            out.append(Spec(dtype, C, layout, act="sigmoid" if C == 1 else "softmax"))
    out += [Spec("fp64", C, layout) for C in (4, 21, 1024) for layout in ("contig", "cl")]
    return out


def cover_specs():
    """Every (activation, q, target kind) once, the other factors rotating so that each dtype,
    channel bucket, layout, label dtype and offset width meets each of them."""
    out = []
    combos = itertools.product(("softmax", "sigmoid", "none"), (1, 2), (("int64", False), ("int64", True), ("float", False)))
    dtypes, chans, labs = ("fp32", "fp16", "bf16", "fp64"), (2, 4, 8, 16, 32, 64, 128, 1024), ("int64", "int32", "uint8")
    n_labels = 0
    for i, (act, q, (target, ignore)) in enumerate(combos):
        if target != "float":
            target, n_labels = labs[n_labels % 3], n_labels + 1
        out.append(Spec(dtypes[i % 4], chans[(3 * i) % len(chans)], ("contig", "cl")[(i // 2) % 2], act, q, target,
                        ignore, int64=(i % 3 == 1), group="cover"))
    return out


def compound_specs():
    """The pixel-loss rows of the compound losses: cross-entropy and focal (gamma 2 and a general one)."""
    return [Spec("fp32", 4, "contig", pixel="ce", group="cover"), Spec("bf16", 21, "cl", pixel="ce", group="cover"),
            Spec("fp16", 8, "contig", "sigmoid", pixel="focal", group="cover"),
            Spec("fp32", 3, "cl", pixel="focal", gamma=0.5, group="cover"),
            Spec("fp32", 1024, "contig", pixel="focal", group="cover"),
            Spec("bf16", 300, "cl", "sigmoid", 1, "float", False, pixel="ce", group="cover")]


def hard_specs():
    """The hard (evaluation) activations: forward only, small C, channels-last and chunked C."""
    return [Spec("fp32", 4, "contig", "argmax", 1, group="cover"), Spec("bf16", 8, "cl", "argmax", 1, group="cover"),
            Spec("fp16", 3, "contig", "threshold", 1, "uint8", group="cover"),
            Spec("fp32", 1024, "contig", "argmax", 1, group="cover")]


def arch_specs():
    """A representative subset for the other architectures: lowering and spills."""
    return [Spec("fp32", 4, "cl", group="arch"), Spec("fp16", 4, "contig", group="arch"),
            Spec("bf16", 21, "cl", group="arch"), Spec("fp32", 128, "contig", group="arch"),
            Spec("bf16", 1024, "contig", group="arch"), Spec("fp64", 21, "cl", group="arch"),
            Spec("fp16", 8, "cl", "sigmoid", 1, "float", False, int64=True, group="arch")]


# ----------------------------------------------------------------------------------------------
# Triton: trace the module's launches on meta tensors, compile them, analyse them
# ----------------------------------------------------------------------------------------------
def _meta_inputs(torch, spec: Spec, N: int, M: int | None = None):
    if M is None:
        M = M_2D
        if spec.int64:  # make the largest element offset reach 2**31
            M = -(-(2**31) // (N * spec.C) // 16) * 16 + 16
    dt = getattr(torch, TORCH_DTYPE[spec.dtype])
    acc = torch.float64 if spec.dtype == "fp64" else torch.float32

    def like_x():
        if spec.layout == "cl":
            return torch.empty((N, M, spec.C), dtype=dt, device="meta").permute(0, 2, 1)
        return torch.empty((N, spec.C, M), dtype=dt, device="meta")

    x = like_x()
    t = like_x() if spec.target == "float" else torch.empty((N, M), dtype=getattr(torch, spec.target), device="meta")
    return x, t, torch.empty((N, 3 if spec.pixel == "none" else 5, spec.C), dtype=acc, device="meta")


_RESIDENT_CACHE: dict = {}


def _resident_on(arch: int):
    """Stand-in for the module's resident-programs hook: compile for ``arch``, apply its limits."""
    def resident(kernel, make_args, dtypes, constexprs, num_warps, device):
        args = make_args()
        kwargs = dict(constexprs, num_warps=num_warps)
        key = kb.compile_key(kernel, args, kwargs, arch)
        if key not in _RESIDENT_CACHE:
            k, _, _, opts = kb.compile_launch(kernel, args, kwargs, arch)
            regs = next(iter(ps.res_usage(k.asm["cubin"]).values()))["regs"]
            _RESIDENT_CACHE[key] = ps.occupancy(arch, regs, k.metadata.shared, 32 * opts.num_warps)["blocks"]
        return _RESIDENT_CACHE[key]
    return resident


def trace(spec: Spec, arch: int, N: int = 2, M: int | None = None) -> list:
    """[(direction, JITFunction, args, kwargs, grid)] the module launches for ``spec`` on ``arch``."""
    import torch

    x, t, grad = _meta_inputs(torch, spec, N, M)
    hooks = {TRITON_SM_HOOK: lambda device: ps.ARCH_LIMITS[arch]["sms"], TRITON_RESIDENT_HOOK: _resident_on(arch)}
    return kb.trace_launches(TRITON_MODULE, lambda tk: triton_entry_points(tk, x, t, grad, spec), hooks)


def _compile_key(job):
    spec, arch, i = job
    _, fn, args, kwargs, _ = trace(spec, arch)[i]
    return kb.compile_key(fn, args, kwargs, arch)


def compile_triton(job, dump_dir=None) -> dict:
    """Compile and analyse launch ``i`` of ``trace(spec, arch)``; a result row."""
    spec, arch, i = job
    direction, fn, args, kwargs, grid = trace(spec, arch)[i]
    row = dict(backend="triton", kernel=fn.__name__.lstrip("_"), direction=direction, arch=arch,
               **dataclasses.asdict(spec), grid=kb.grid_size(grid))
    try:
        k, sig, const, opts = kb.compile_launch(fn, args, kwargs, arch)
        row["tile"] = ",".join(f"{n}={v}" for n, v in kb.constexpr_values(sig, const).items() if n.startswith("BLOCK"))
        row["num_warps"] = opts.num_warps
        ptx, cubin = k.asm["ptx"], k.asm["cubin"]
        res = next(iter(ps.res_usage(cubin).values()))
        ptx_params = [n for n in sig if sig[n] != "constexpr"]
        roles = {ptx_params.index(n): r for n, r in TRITON_ROLES.items() if n in ptx_params}
        entry = next(iter(ps.split_entries(ptx).values()))
        threads = ps.threads_per_block(entry) or 32 * opts.num_warps
        row.update(ok=True, regs=res["regs"], spill=res["stack"] + res["local"], smem=k.metadata.shared,
                   threads=threads, **ps.occupancy(arch, res["regs"], k.metadata.shared, threads),
                   **_analysis(entry, roles, DTYPE_BITS[spec.dtype]))
        if SASS:
            row["sass"] = next(iter(ps.sass_counts(cubin).values()), {})
        if dump_dir:
            row["_ptx"] = ptx
    except Exception as exc:  # reported as a failed row
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    return row


def _analysis(entry, roles, bits) -> dict:
    a = ps.analyze_ptx(entry, roles, bits)
    a.pop("pass_detail")
    return a


def _dump(dump_dir, row, name, ptx):
    """``{fwd|bwd}_{dtype}_C{C}_{contig|cl}_sm{arch}.ptx`` (Triton; helper kernels get ``__name``),
    ``cuda_{fwd|bwd}_{dtype}_{target}_sm{arch}__{kernel}.ptx`` (CUDA)."""
    os.makedirs(dump_dir, exist_ok=True)
    if row["backend"] == "cuda":
        fname = f"cuda_{row['direction']}_{name}_{row['tile'] or '-'}_sm{row['arch']}__{row['kernel']}.ptx"
    else:
        suffix = "" if row["kernel"] in TRITON_MAIN.get(row["direction"], ()) else f"__{row['kernel']}"
        fname = f"{row['direction']}_{name}_sm{row['arch']}{suffix}.ptx"
    with open(os.path.join(dump_dir, fname), "w") as f:
        f.write(ptx)


def _waves(rows_by_job, jobs):
    """Programs / resident capacity at each batch size of WAVE_N, for persistent grids (those
    that do not grow with the image size); ``waves`` is the worst."""
    for job in jobs:
        spec, arch, i = job
        row = rows_by_job[job]
        if not row.get("ok"):
            continue
        try:
            if kb.grid_size(trace(spec, arch, 2, 4 * M_2D)[i][4]) != row["grid"]:
                continue  # grows with the image: not persistent
            cap = ps.ARCH_LIMITS[arch]["sms"] * row["blocks"]
            row["waves_by_n"] = {n: kb.grid_size(trace(spec, arch, n)[i][4]) / cap if cap else float("inf")
                                 for n in WAVE_N}
            row["waves"] = max(row["waves_by_n"].values())
        except Exception as exc:  # the module could not be traced at another size
            row["waves_error"] = str(exc)[:200]


def triton_rows(specs_by_arch: dict, workers: int, dump_dir=None) -> list:
    jobs = [(s, a, i) for a, specs in specs_by_arch.items() for s in specs for i in range(len(trace(s, a)))]
    keys = {job: _compile_key(job) for job in jobs}
    unique = {}
    for job in jobs:
        unique.setdefault(keys[job], job)
    ujobs = list(unique.values())
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = dict(zip(ujobs, pool.map(compile_triton, ujobs, [dump_dir] * len(ujobs), chunksize=2)))
    rows_by_job = {}
    for job in jobs:
        row = dict(results[unique[keys[job]]], **dataclasses.asdict(job[0]))
        ptx = row.pop("_ptx", None)
        if dump_dir and ptx:
            _dump(dump_dir, row, job[0].name, ptx)
        rows_by_job[job] = row
    _waves(rows_by_job, jobs)
    return list(rows_by_job.values())


# ----------------------------------------------------------------------------------------------
# CUDA: nvcc to PTX + cubin per architecture
# ----------------------------------------------------------------------------------------------
def compile_cuda(arch: int, dump_dir=None) -> list:
    """Rows for every kernel instantiation in the CUDA source, compiled for ``arch``."""
    try:
        ptx, cubin, seconds = kb.compile_cu(CUDA_SOURCE, arch)
    except RuntimeError as exc:
        return [dict(backend="cuda", kernel="(nvcc)", direction="", arch=arch, ok=False, error=str(exc))]
    entries = ps.split_entries(ptx)
    res, sass = ps.res_usage(cubin), ps.sass_counts(cubin) if SASS else {}
    rows = []
    for mangled, pretty in zip(entries, kb.demangle(list(entries))):
        base = re.sub(r"<.*", "", pretty).split("::")[-1]
        if base not in CUDA_KERNELS:
            continue
        direction, roles, names = CUDA_KERNELS[base]
        targs = dict(zip(names, kb.template_args(pretty)))
        dtype = CXX_DTYPE.get(targs.get("dtype", targs.get("acc", "")), targs.get("dtype", "?"))
        target = "float" if targs.get("labels") == "false" else "labels"
        C = "wide" if targs.get("wide") == "true" or base in CUDA_WIDE_ONLY else "any"
        r = res.get(mangled, dict(regs=0, stack=0, local=0, shared_static=0))
        threads = ps.threads_per_block(entries[mangled]) or 256
        row = dict(backend="cuda", kernel=base, direction=direction, arch=arch, dtype=dtype, C=C,
                   layout={"true": "cl", "false": "contig"}.get(targs.get("cl"), "any"),
                   act="hard" if base == "argmax_kernel" else CUDA_KIND_ACT.get(targs.get("kind", "0"), "any"), q="any",
                   target=target if roles else "-",
                   ignore=None, int64=True, group="rules" if target in ("labels", "-") else "cover",
                   tile=",".join(f"{k}={v}" for k, v in targs.items()
                                 if k not in ("dtype", "target", "labels", "acc", "kind")),
                   num_warps=threads // 32, threads=threads, ok=True, regs=r["regs"], spill=r["stack"] + r["local"],
                   smem=r["shared_static"], grid=None, nvcc_seconds=round(seconds, 1),
                   **ps.occupancy(arch, r["regs"], r["shared_static"], threads),
                   **_analysis(entries[mangled], roles, DTYPE_BITS.get(dtype, 32)))
        widths = row["mem_widths"]
        row["logits_ld_bits"] = max(widths.get("ld:logits", [0])) or None
        row["grad_st_bits"] = max(widths.get("st:grad", [0])) or None
        if sass:
            row["sass"] = sass.get(mangled, {})
        rows.append(row)
        if dump_dir and roles:
            _dump(dump_dir, row, f"{dtype}_{target}", entries[mangled])
    return rows


def cuda_rows(archs, workers, dump_dir=None) -> list:
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        return [r for rows in pool.map(lambda a: compile_cuda(a, dump_dir), archs) for r in rows]


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------
def _needs_128(row) -> bool:
    """Contiguous input, or channels-last whose pixel rows make whole 16-byte groups (C a power of
    two up to SMALL_C, or C * element size a multiple of 16 bytes)."""
    if row["layout"] in ("contig", "any"):
        return True
    C, nbytes = row["C"], DTYPE_BITS[row["dtype"]] // 8
    if not isinstance(C, int):  # a C-generic CUDA kernel: its vector path serves C*element % 16 == 0
        return True
    return C == 1 or (C <= SMALL_C and C & (C - 1) == 0) or (C * nbytes) % 16 == 0


def _small(row, limit) -> bool:
    return row["C"] == "any" or (isinstance(row["C"], int) and row["C"] <= limit)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _bytes_in_flight(row) -> int:
    """Bytes one SM's resident threads load per tile iteration (logits and labels, issued before use)."""
    return int(row.get("warps", 0) * 32 * row.get("ld_bytes_per_iter", 0))


def rules(row, direction_exps=None) -> list:
    """[(rule, passed: bool, detail)] for one row; rules that do not apply are left out."""
    if not row.get("ok"):
        return [("compiles", False, row.get("error", "").splitlines()[0][:100] if row.get("error") else "")]
    out = [("no spills", row["spill"] == 0, f"{row['spill']} B")]
    loads_logits = row["passes"] > 0
    if not loads_logits:
        return out
    if _small(row, BARRIER_FREE_MAX_C):
        n = row["barriers_in_loop"] if row["direction"] == "fwd" else row["barriers_total"]
        where = "in the tile loop" if row["direction"] == "fwd" else "in the backward"
        out.append(("no barriers (C<=8)", n == 0, f"{n} bar.sync {where}"))
    if _needs_128(row):
        ld, st = row["logits_ld_bits"], row["grad_st_bits"]
        ok = (ld or 0) >= 128 and (row["direction"] != "bwd" or (st or 0) >= 128)
        out.append(("128-bit access", ok, f"logits ld {ld}" + (f", grad st {st}" if row["direction"] == "bwd" else "")))
    if row["act"] in ("softmax", "sigmoid", "any") and _small(row, SMALL_C) and row["dtype"] != "fp64":
        e = direction_exps if direction_exps is not None else row["exps_per_elem"]
        # a register tile pads C to a power of two; a padding channel costs an exp but no load
        pad = _next_pow2(row["C"]) / row["C"] if isinstance(row["C"], int) and row["backend"] == "triton" else 1.0
        ok = e is not None and row["passes"] == 1 and e <= pad + 1e-9
        detail = f"{e:.2f} exp/element" if e is not None else "no ex2"
        if row["passes"] > 1:
            detail += f", logits read in {row['passes']} loops"
        out.append(("one exp per element", ok, detail))
    if row["act"] == "pixel" and _small(row, SMALL_C) and row["dtype"] != "fp64":
        # the compound losses' kernels (CUDA kind 1, softmax and sigmoid at run time): the
        # activation's exp, plus exp(gamma log q) of the focal power for a gamma that is not whole or
        # half-whole, plus (float targets) the second exp of the sigmoid focal loss with a soft
        # target (dice_math.h): the heaviest path through the loop
        e = direction_exps if direction_exps is not None else row["exps_per_elem"]
        allowed = 2 + (row["target"] == "float")
        ok = e is not None and row["passes"] == 1 and e <= allowed + 1e-9
        detail = f"{e:.2f} exp/element (at most {allowed})" if e is not None else "no ex2"
        out.append(("pixel-loss exps per element", ok, detail))
    if _small(row, SMALL_C) and row["dtype"] != "fp64":
        inflight = _bytes_in_flight(row)
        ok = row["occupancy"] >= MIN_OCCUPANCY - 1e-9 or (row["limiter"] == "registers" and inflight >= MIN_IN_FLIGHT)
        out.append(("occupancy >= 50%", ok, f"{row['occupancy']:.0%} ({row['limiter']}-limited, {row['regs']} regs,"
                                            f" {inflight / 1024:.0f} KiB of loads in flight per SM)"))
    if row.get("waves") is not None:
        w = row["waves"]
        ok = w <= 1.0 + 1e-9 or (w % 1.0) >= 0.5 or (w % 1.0) == 0
        out.append(("no partial extra wave", ok, f"{w:.2f} waves"))
    return out


def attach_rules(rows):
    """Rules per row; the exp count is summed over the kernels of one direction and input."""
    totals: dict = {}

    def key(r):
        # a C-generic CUDA instantiation serves its own range of C: it is its direction's only kernel
        own = r["tile"] if r["backend"] == "cuda" and r["C"] == "any" else ""
        # a compound loss's kernels (pixel rows) are another input than the Dice-only ones
        return (r["backend"], r["arch"], r["dtype"], r["C"], r["layout"], r["act"], r["q"], r["target"],
                r["ignore"], r["int64"], r["direction"], own, r.get("pixel", "none"), r.get("gamma"))

    for r in rows:
        if r.get("ok") and r.get("exps_per_elem") is not None:
            totals[key(r)] = totals.get(key(r), 0.0) + r["exps_per_elem"]
    for r in rows:
        r["rules"] = rules(r, totals.get(key(r)) if r.get("ok") else None)
        r["fails"] = [name for name, ok, _ in r["rules"] if not ok]


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
COLUMNS = ("backend", "kernel", "arch", "dtype", "C", "layout", "options", "tile", "w", "regs", "spill", "smem",
           "occ", "ld", "st", "bar loop/all", "exp/el", "waves", "fails")


def _tile(r) -> str:
    """The BLOCK_* constexprs, e.g. "4x256" for BLOCK_C=4, BLOCK_M=256."""
    return "x".join(v.split("=")[1] for v in r.get("tile", "").split(",") if "=" in v)


def _cells(r) -> list:
    opts = "" if r["backend"] == "cuda" else f"{r['act'][:4]} q{r['q']} {r['target']}{'+ign' if r['ignore'] else ''}" \
        f"{' i64' if r['int64'] else ''}"
    if r["backend"] == "cuda":
        opts = f"target {r['target']}" + ("" if r.get("act") in ("any", None) else f" {r['act']}")
    if not r.get("ok"):
        return [r["backend"], r["kernel"], f"sm_{r['arch']}", r.get("dtype", ""), str(r.get("C", "")),
                r.get("layout", ""), opts, "", "", "", "", "", "", "", "", "", "", "",
                "FAILED: " + r.get("error", "").splitlines()[0][:60] if r.get("error") else "FAILED"]
    e = r["exps_per_elem"]
    exp = "-" if e is None else f"{e:.2f}" + ("+" if r["passes"] > 1 else "")
    tile = _tile(r)
    return [r["backend"], r["kernel"], f"sm_{r['arch']}", r["dtype"], str(r["C"]), r["layout"], opts, tile,
            str(r["num_warps"]), str(r["regs"]), str(r["spill"]), str(r["smem"]),
            f"{r['occupancy']:.0%}", str(r["logits_ld_bits"] or "-"), str(r["grad_st_bits"] or "-"),
            f"{r['barriers_in_loop']}/{r['barriers_total']}", exp,
            "" if r.get("waves") is None else f"{r['waves']:.2f}", ", ".join(r["fails"])]


def format_text(rows) -> str:
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def format_markdown(rows) -> str:
    """One line per input configuration, forward and backward side by side (all kernels of a
    direction: the largest register count, the lowest occupancy, exps summed)."""
    groups: dict = {}
    for r in rows:
        if r.get("ok") and not r.get("passes") and not r.get("fails"):
            continue  # helper kernels that read no logits (final reductions)
        key = (r["backend"], r["arch"], r.get("dtype"), r.get("C"), r.get("layout"), r.get("act"), r.get("q"),
               r.get("target"))
        groups.setdefault(key, []).append(r)
    head = ["backend", "arch", "dtype", "C", "layout", "fwd tile, warps", "fwd regs / occ", "fwd ld",
            "fwd bar", "fwd exp/el", "bwd regs / occ", "bwd ld / st", "bwd bar", "bwd exp/el", "rules failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    kinds = {"pixel": " +CE/focal", "hard": " argmax/threshold"}  # the CUDA kernels' kind argument
    for (backend, arch, dtype, C, layout, act, *_), rs in groups.items():
        cells = [backend, f"sm_{arch}", dtype, str(C) + (kinds.get(act, "") if backend == "cuda" else ""), layout]
        fails = []
        for d in ("fwd", "bwd"):
            ds = [r for r in rs if r.get("direction") == d and r.get("ok") and r.get("passes", 0) > 0]
            if not ds:
                cells += ["-"] * (5 if d == "fwd" else 4)
                continue
            main = max(ds, key=lambda r: r["elems_per_iter"])
            exps = [r["exps_per_elem"] for r in ds if r["exps_per_elem"] is not None]
            passes = sum(r["passes"] for r in ds)
            exp = f"{sum(exps):.2f}" + ("+" if passes > 1 else "") if exps else "-"
            regs = f"{max(r['regs'] for r in ds)} / {min(r['occupancy'] for r in ds):.0%}"
            bars = main["barriers_in_loop"] if d == "fwd" else sum(r["barriers_total"] for r in ds)
            if d == "fwd":
                tile = _tile(main) if backend == "triton" else \
                    " ".join(f"{v.split('=')[1]} slots" for v in main.get("tile", "").split(",") if v.startswith("slots="))
                cells += [f"{tile} {main['num_warps']}w".strip(), regs, str(main["logits_ld_bits"]), str(bars), exp]
            else:
                cells += [regs, f"{main['logits_ld_bits']} / {main['grad_st_bits']}", str(bars), exp]
        for r in rs:
            fails += [f for f in r.get("fails", []) if f not in fails]
        lines.append("| " + " | ".join(cells + [", ".join(fails) or "none"]) + " |")
    return "\n".join(lines)


def summary(rows) -> str:
    out, by_rule = [], {}
    for r in rows:
        for name, ok, detail in r.get("rules", []):
            s = by_rule.setdefault(name, dict(n=0, bad=[]))
            s["n"] += 1
            if not ok:
                s["bad"].append((r, detail))
    for name, s in by_rule.items():
        if not s["bad"]:
            out.append(f"  PASS  {name}: all {s['n']} kernels")
            continue
        out.append(f"  FAIL  {name}: {len(s['bad'])} of {s['n']} kernels, e.g.")
        seen = set()
        for r, detail in s["bad"]:
            k = (r["backend"], r["kernel"], r["dtype"], r.get("layout"))
            if k in seen:
                continue
            seen.add(k)
            out.append(f"          {r['backend']} {r['kernel']} sm_{r['arch']} {r.get('dtype')} C={r.get('C')} "
                       f"{r.get('layout')}: {detail}")
            if len(seen) == 6:
                break
    return "\n".join(out)


def _sort_key(r):
    return (r["backend"] != "triton", r["arch"], r.get("group", ""), r.get("dtype", ""),
            r["C"] if isinstance(r.get("C"), int) else 10**9, r.get("layout", ""), str(r.get("act")), str(r.get("q")),
            str(r.get("target")), r.get("direction", ""), r["kernel"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), choices=ALL_ARCHS,
                    help="architectures of the full report (default: 80 90)")
    ap.add_argument("--lowering-arch", type=int, nargs="*", default=[], choices=ALL_ARCHS,
                    help="further architectures: a representative subset, for lowering and spills")
    ap.add_argument("--backends", default="triton,cuda", help="comma-separated subset of triton,cuda")
    ap.add_argument("--groups", default="rules", help="Triton specializations: rules (every dtype x channel "
                    "bucket x layout the launch heuristic tells apart; default), cover (every option combination)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16,fp64", help="input dtypes to compile (default: all)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a rule is broken")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table (rule matrix rows only)")
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--from-json", metavar="FILE", help="print a report saved with --json (filtered by --arch, "
                    "--backends, --dtypes) instead of compiling")
    ap.add_argument("--dump", metavar="DIR", help="write each specialization's PTX to DIR")
    ap.add_argument("--sass", action="store_true", help="also count MUFU.EX2/BAR/LDG/STG in the SASS (JSON only)")
    ap.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_report: unset TRITON_INTERPRET (the kernels are compiled, not interpreted)", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    if args.sass:
        os.environ["KERNEL_REPORT_SASS"] = "1"  # read by the compile workers
        globals()["SASS"] = True
    backends = [b for b in args.backends.split(",") if b]
    groups, dtypes = set(args.groups.split(",")), set(args.dtypes.split(","))
    t0 = time.time()
    rows, notes = [], []
    if args.from_json:
        with open(args.from_json) as f:
            rows = [r for r in json.load(f) if r["backend"] in backends and r["arch"] in args.arch
                    and r.get("dtype", "fp32") in dtypes]
        backends = []
    if "triton" in backends:
        specs = [s for s in rule_specs() if "rules" in groups] + [s for s in cover_specs() + hard_specs() + compound_specs()
                                                                if "cover" in groups]
        plan = {a: [s for s in specs if s.dtype in dtypes] for a in args.arch}
        plan.update({a: arch_specs() for a in args.lowering_arch if a not in plan})
        rows += triton_rows(plan, args.workers, args.dump)
    if "cuda" in backends:
        if kb.nvcc_path() is None:
            notes.append("CUDA kernels skipped: nvcc not found (set CUDA_HOME)")
        else:
            rows += [r for r in cuda_rows(sorted(set(args.arch) | set(args.lowering_arch)), args.workers, args.dump)
                     if r.get("dtype", "fp32") in dtypes or not r.get("ok")]
    rows.sort(key=_sort_key)
    attach_rules(rows)
    if args.markdown:
        print(format_markdown([r for r in rows if r.get("group") == "rules"]))
    else:
        print(format_text(rows))
    print(f"\n{len(rows)} kernels in {time.time() - t0:.0f} s; rules (DESIGN.md section 4):")
    print(summary(rows))
    for n in notes:
        print(n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        return 1
    if args.check and any(r["fails"] for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
