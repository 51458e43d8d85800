"""The CUDA kernels of dicetorch._C: registered with the dispatcher, and compiled without spills.

No GPU is needed: the registration is a dispatcher query, and the register/spill figures come
from the ptxas report that setup.py saves while compiling csrc/cuda/dice_cuda.cu with
``-Xptxas -v`` (build/ptxas_usage.txt).  A spilling kernel reads and writes local memory in its
inner loop, so any spill store or load fails the test.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from dicetorch import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS_LOG = os.path.join(ROOT, "build", "ptxas_usage.txt")
KERNELS = ("forward_partial_kernel", "reduce_partial_kernel", "backward_kernel")

_info = ops.extension_info()
pytestmark = pytest.mark.skipif(
    not _info["cuda"],
    reason="dicetorch._C was built without CUDA kernels (no nvcc under CUDA_HOME, a CPU-only torch, "
    "or DICETORCH_CUDA=0)" if _info["loaded"] else f"dicetorch._C is not built: {_info['error']}",
)


def test_cuda_kernels_registered():
    for op in ("dicetorch::fused_forward", "dicetorch::fused_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    assert "cuda" in ops.available_backends("cuda")


def _demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return list(names)


def parse_ptxas(text: str):
    """[(arch, kernel, registers, stack_bytes, spill_stores, spill_loads)] from `ptxas -v` output."""
    rows, cur, spill = [], None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            cur, spill = (m.group(2), m.group(1)), None
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            spill = tuple(int(v) for v in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur and spill is not None:
            rows.append((cur[0], cur[1], int(m.group(1)), *spill))
            cur = None
    names = _demangle([r[1] for r in rows])
    short = [re.sub(r"dicetorch::cuda::\(anonymous namespace\)::", "", n).split("(")[0] for n in names]
    return [(r[0], s, *r[2:]) for r, s in zip(rows, short)]


def test_ptxas_no_spills():
    assert os.path.exists(PTXAS_LOG), (
        f"{PTXAS_LOG} is missing: setup.py writes it when it builds the CUDA kernels; rebuild with "
        "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`"
    )
    with open(PTXAS_LOG) as f:
        rows = parse_ptxas(f.read())
    assert rows, f"no kernel entries in {PTXAS_LOG}"
    print(f"\n{'arch':6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
    for arch, name, regs, stack, st, ld in rows:
        print(f"{arch:6} {regs:4d} {stack:5d} {st:8d} {ld:8d}  {name}")
    for kernel in KERNELS:
        assert any(kernel in r[1] for r in rows), f"{kernel} missing from the ptxas report"
    spilling = [r for r in rows if r[4] or r[5]]
    assert not spilling, "kernels with register spills:\n" + "\n".join(map(str, spilling))
