"""The CUDA kernels of dicetorch._C: registered with the dispatcher, built for the requested
architectures, and compiled without spills on every architecture of the default list.

No GPU is needed: the registration is a dispatcher query; the architectures of the built
extension are listed by ``cuobjdump --list-elf --list-ptx`` and compared with the
TORCH_CUDA_ARCH_LIST setup.py recorded (build/cuda_arch_list.txt); the register/spill figures
come from the ptxas report that setup.py saves while compiling csrc/cuda/dice_cuda.cu with
``-Xptxas -v`` (build/ptxas_usage.txt).  The architectures of setup.py's default list that the
build left out (CI builds sm_80 only, to save time: the kernels take about 4.5 CPU-minutes per
architecture) are compiled here, device code only, by ``benchmarks/kernel_report.py``'s nvcc
machinery, and checked against the report's rules (``--check``): no spills (a spilling kernel reads
and writes local memory in its inner loop), no barriers for C <= 8, 128-bit access, one exp per
element, occupancy.  ``DICETORCH_CHECK_ARCHS`` (e.g. ``90`` or ``75,90``) narrows them to a subset
(CI checks sm_90 alone, the Hopper GPUs people train on, to stay within its time).
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
import torch

from dicetorch import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS_LOG = os.path.join(ROOT, "build", "ptxas_usage.txt")
ARCH_LOG = os.path.join(ROOT, "build", "cuda_arch_list.txt")
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


def arch_images(arch_list: str):
    """({"sm_80", ...} cubins, {"sm_120"} PTX) that a TORCH_CUDA_ARCH_LIST value asks for."""
    elf, ptx = set(), set()
    for a in arch_list.replace(" ", ";").split(";"):
        m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", a.strip())
        if m is None:
            continue
        name = f"sm_{m.group(1)}{m.group(2)}{m.group(3)}"
        elf.add(name)
        if m.group(4):
            ptx.add(name)
    return elf, ptx


def _cuobjdump():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ptx_stats

    return ptx_stats.find_tool("cuobjdump")


def test_extension_holds_the_requested_architectures():
    if not os.path.exists(ARCH_LOG):
        pytest.skip(f"{ARCH_LOG} is missing (written by setup.py when it builds the CUDA kernels)")
    requested = open(ARCH_LOG).read().strip()
    if not requested:
        pytest.skip("built for the visible GPU (TORCH_CUDA_ARCH_LIST was not set)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    so = ops._C.__file__
    out = subprocess.run([tool, "--list-elf", "--list-ptx", so], capture_output=True, text=True).stdout
    elf = set(re.findall(r"ELF file\s+\d+:\s+\S*?\.(sm_\d+a?)\.cubin", out))
    ptx = set(re.findall(r"PTX file\s+\d+:\s+\S*?\.(sm_\d+a?)\.ptx", out))
    assert (elf, ptx) == arch_images(requested), f"{so} for TORCH_CUDA_ARCH_LIST={requested!r}:\n{out}"


def default_arch_list() -> str:
    """setup.py's DEFAULT_CUDA_ARCH_LIST (setup.py cannot be imported: it runs setup())."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DEFAULT_CUDA_ARCH_LIST" for t in node.targets):
            return node.value.value
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCH_LIST")


def _unbuilt_default_archs() -> list:
    built = set()
    if os.path.exists(ARCH_LOG):
        built = arch_images(open(ARCH_LOG).read().strip())[0]
    archs = sorted(int(a[3:]) for a in arch_images(default_arch_list())[0] - built)
    only = os.environ.get("DICETORCH_CHECK_ARCHS", "").replace(",", " ").split()
    return [a for a in archs if str(a) in only] if only else archs


@pytest.mark.parametrize("arch", _unbuilt_default_archs() or [pytest.param(0, marks=pytest.mark.skip(
    reason="the build holds every architecture of the default list"))])
def test_default_archs_the_build_left_out_compile_and_keep_the_rules(arch):
    """Device code for each architecture of the default list that the build left out, checked as
    `benchmarks/kernel_report.py --backends cuda --arch <arch> --check` checks it: DESIGN.md section
    4's rules (no spills, no barriers for C <= 8, 128-bit access, one exp per element, occupancy or
    loads in flight) on the PTX and cubin of every kernel instantiation."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import kernel_report

    rows = kernel_report.compile_cuda(arch)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed[0].get("error", "")[-3000:]
    for kernel in KERNELS:
        assert any(r["kernel"] == kernel for r in rows), f"{kernel} missing for sm_{arch}"
    kernel_report.attach_rules(rows)
    broken = [r for r in rows if r["fails"]]
    assert not broken, f"sm_{arch}: rules broken:\n" + "\n".join(
        f"{r['kernel']} {r['dtype']} target {r['target']} {r['act']} {r['tile']}: "
        + ", ".join(f"{name} ({detail})" for name, ok, detail in r["rules"] if not ok) for r in broken[:20])
