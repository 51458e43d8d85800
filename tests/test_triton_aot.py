"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 (no GPU needed).

The specializations the launch heuristic picks are lowered to cubins with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` (see :func:`cases`): the
full-size tile of every BLOCK_C the heuristic returns (smaller tiles only occur for small images
and use fewer registers) for fp32, fp16 and bf16 input; every combination of input dtype, target
(labels with and without ignore_index, float), activation and q; contiguous and channels-last
strides and 32/64-bit offsets spread over that set; a few fp64 kernels; the log-sum-exp kernel of
the chunked softmax.  Integer arguments are specialized as the JIT does (1 becomes a constant,
multiples of 16 get a divisibility hint).  The test fails if a kernel does not lower or spills
(``STACK``/``LOCAL`` bytes in ``cuobjdump -res-usage``), and prints registers and shared memory
per kernel.

The compilation must not run under ``TRITON_INTERPRET``, so it runs in a subprocess without it:
``python tests/test_triton_aot.py`` prints the table on its own.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64",
        "int64": "*i64", "int32": "*i32", "uint8": "*u8"}


def _cuobjdump() -> str | None:
    import triton

    cands = [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"),
             "/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump") or ""]
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def _int_spec(v: int):
    """What the JIT does with an int argument: 1 becomes a constant, multiples of 16 get a hint."""
    if v == 1:
        return "constexpr", None
    ty = "i32" if -(2**31) <= v < 2**31 else "i64"
    return ty, (v % 16 == 0)


CHANNELS = (1, 2, 4, 8, 16, 32, 64, 128, 1024)  # one per distinct BLOCK_C the heuristic returns


def cases():
    """The specializations to compile, as JSON-serialisable dicts (without kernel and arch).

    * every (dtype, target, activation, q) combination, with C rotating over ``CHANNELS`` so that
      every (dtype, BLOCK_C) pair occurs, and layout / offset width alternating;
    * the register-heaviest combination (softmax, q=2, labels with ignore_index) for every dtype,
      both layouts, at the largest single-tile C and in chunked mode;
    * a few fp64 specializations (fp64 tiles are half as large);
    * int32 and uint8 labels once.
    """
    out = []
    combos = itertools.product(("float32", "float16", "bfloat16"), (("int64", False), ("int64", True), ("float", False)),
                               ("softmax", "sigmoid", "none"), (1, 2))
    for i, (dtype, (target, ignore), act, q) in enumerate(combos):
        C = CHANNELS[i % len(CHANNELS)]
        if C == 1 and act == "softmax":
            C = 2  # softmax needs two channels
        out.append(dict(dtype=dtype, target=target, ignore=ignore, act=act, q=q, C=C,
                        layout=("contiguous", "channels_last")[i % 2], int64=(i % 4 == 1)))
    for dtype, layout, C in itertools.product(("float32", "float16", "bfloat16"), ("contiguous", "channels_last"),
                                              (128, 1024)):
        out.append(dict(dtype=dtype, target="int64", ignore=True, act="softmax", q=2, C=C, layout=layout, int64=False))
    for C, act in ((21, "softmax"), (1024, "softmax"), (3, "sigmoid")):  # fp64 (half-size tiles)
        out.append(dict(dtype="float64", target="int64", ignore=True, act=act, q=2, C=C, layout="channels_last",
                        int64=False))
    for lab in ("int32", "uint8"):
        out.append(dict(dtype="bfloat16", target=lab, ignore=True, act="softmax", q=2, C=21, layout="contiguous",
                        int64=True))
    return out


def _config(kernel: str, case: dict) -> dict:
    import torch

    from dicetorch import triton_kernels as tk

    cfg = tk.launch_config(case["C"], 1 << 20, getattr(torch, case["dtype"]), backward=kernel != "fwd")
    return dict(block_c=cfg.block_c, block_m=cfg.block_m, chunked=cfg.chunked, num_warps=cfg.num_warps)


def _signature(kernel: str, case: dict):
    """(fn, signature, constexprs, attrs) the JIT would build for a representative launch of ``case``."""
    from dicetorch import triton_kernels as tk

    fn = {"fwd": tk._dice_fwd_kernel, "bwd": tk._dice_bwd_kernel, "lse": tk._softmax_lse_kernel}[kernel]
    C, M = case["C"], 4096
    xs = (C * M, M, 1) if case["layout"] == "contiguous" else (M * C, 1, C)
    labels = case["target"] != "float"
    ts = (M, 0, 1) if labels else xs
    xptr = _PTR[case["dtype"]]
    tptr = _PTR[case["target"]] if labels else xptr
    acc = "*fp64" if case["dtype"] == "float64" else "*fp32"
    ints = dict(C=C, M=M, ignore_index=255 if case["ignore"] else 0,
                stride_xn=xs[0], stride_xc=xs[1], stride_xm=xs[2],
                stride_tn=ts[0], stride_tc=ts[1], stride_tm=ts[2])
    if kernel == "fwd":
        num_chunks = -(-C // case["block_c"])
        ints.update(num_chunks=num_chunks, programs_per_image=max(1, 132 // num_chunks),
                    num_tiles=M // case["block_m"])
        ptrs = dict(x_ptr=xptr, t_ptr=tptr, lse_ptr=acc, part_ptr=acc)
    elif kernel == "bwd":
        ints.update(tiles_per_image=M // case["block_m"], stride_on=xs[0], stride_oc=xs[1], stride_om=xs[2])
        ptrs = dict(grad_ptr=acc, x_ptr=xptr, t_ptr=tptr, out_ptr=xptr)
    else:
        ints.update(tiles_per_image=M // case["block_m"])
        ptrs = dict(x_ptr=xptr, lse_ptr=acc)
    constexprs = dict(
        ACTIVATION=tk._ACT_CODE[case["act"]], POWER=case["q"], LABELS=labels,
        HAS_IGNORE=labels and case["ignore"], LABEL_OFFSET=1 if C == 1 else 0,
        BLOCK_C=case["block_c"], BLOCK_M=case["block_m"], CHUNKED=case["chunked"],
        INT64=case["int64"], FP64=case["dtype"] == "float64",
    )
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            signature[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in ints:
            ty, div = _int_spec(ints[name])
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = 1
            elif div:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
    return fn, signature, constexprs, attrs


def _resources(cubin: bytes, tool: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{txt}")
    return dict(zip(("regs", "stack", "shared_static", "local"), map(int, m.groups())))


def compile_one(job):
    """Compile one (kernel, case, arch); returns a result row."""
    kernel, case, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case = dict(case, **_config(kernel, case))
    fn, sig, const, attrs = _signature(kernel, case)
    row = dict(kernel=kernel, arch=f"sm_{arch}", **case)
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": case["num_warps"]})
        row.update(ok=True, shared=k.metadata.shared, **_resources(k.asm["cubin"], _cuobjdump()))
    except Exception as exc:  # reported, and the test fails on it
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    return row


def jobs():
    """(kernel, case, arch) triples: fwd and bwd for every case; the log-sum-exp kernel (chunked
    softmax only) for every dtype, layout and offset width."""
    out = [(kernel, case, arch) for case in cases() for kernel in ("fwd", "bwd") for arch in ARCHS]
    for dtype, layout, int64 in itertools.product(("float32", "float16", "bfloat16", "float64"),
                                                  ("contiguous", "channels_last"), (False, True)):
        case = dict(dtype=dtype, target="float", ignore=False, act="softmax", q=1, C=1024, layout=layout,
                    int64=int64)
        out += [("lse", case, arch) for arch in ARCHS]
    return out


def run_all(workers: int = 2) -> list:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, jobs(), chunksize=4))


def format_table(rows) -> str:
    head = f"{'kernel':4} {'arch':5} {'dtype':8} {'target':6} {'act':7} q {'C':>4} {'BC':>3} {'BM':>4} w " \
           f"{'layout':13} i64 {'regs':>4} {'smem':>5} spill"
    lines = [head]
    for r in rows:
        res = (f"{r['regs']:4d} {r['shared']:5d} {r['local'] + r['stack']:5d}" if r["ok"]
               else "FAILED " + r["error"].splitlines()[0][:80])
        lines.append(f"{r['kernel']:4} {r['arch']:5} {r['dtype']:8} {r['target']:6} {r['act']:7} {r['q']} "
                     f"{r['C']:4d} {r['block_c']:3d} {r['block_m']:4d} {r['num_warps']} {r['layout']:13} "
                     f"{'y' if r['int64'] else 'n':3} {res}")
    return "\n".join(lines)


def _have_nvidia_backend() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return bool(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")))


@pytest.mark.skipif(not _have_nvidia_backend(), reason="triton with its NVIDIA backend (ptxas) is not installed")
def test_aot_compile_all_kernels_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(out.read_text())
    assert len(rows) == len(jobs())
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed[:3]
    spills = [r for r in rows if r["local"] or r["stack"]]
    assert not spills, format_table(spills)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    # launch_config puts 16 warps of forward programs on each SM and relies on them being resident
    # at once: that holds while no kernel needs more than 65536 / (16 * 32) = 128 registers.
    assert max(r["regs"] for r in rows) <= 128, format_table(sorted(rows, key=lambda r: -r["regs"])[:5])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the result rows to this file")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET for ahead-of-time compilation", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    rows = run_all(args.workers)
    print(format_table(rows))
    ok = [r for r in rows if r["ok"]]
    for arch in ARCHS:
        sel = [r for r in ok if r["arch"] == f"sm_{arch}"]
        if sel:
            print(f"sm_{arch}: {len(sel)} kernels, registers {min(r['regs'] for r in sel)}-"
                  f"{max(r['regs'] for r in sel)}, shared memory up to {max(r['shared'] for r in sel)} B, "
                  f"spilling {sum(1 for r in sel if r['local'] or r['stack'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
