"""Compile GPU kernels ahead of time, without a GPU (used by ``benchmarks/kernel_report.py``).

* Triton: :func:`trace_launches` calls a kernel module's entry points with every
  ``JITFunction.run`` intercepted, and returns the launches (kernel, arguments, constexprs,
  ``num_warps``, grid) the module would make; :func:`bind` turns one into what the JIT would
  compile, through Triton's own binder (the same argument specialization as a real launch), and
  :func:`compile_launch` lowers it for ``GPUTarget("cuda", arch, 32)``.
* CUDA: :func:`compile_cu` compiles the device code of a ``.cu`` file for one architecture with
  nvcc (setup.py's nvcc flags, torch's extension flags and include directories) and returns its
  PTX and cubin; :func:`demangle` and :func:`template_args` name the instantiations.

Nothing here knows which kernels dicetorch has.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
def trace_launches(module_name: str, entry_points, hooks: dict | None = None) -> list:
    """[(direction, JITFunction, args, kwargs, grid)] launched by ``entry_points(module)``.

    ``entry_points(module)`` returns {direction: zero-argument callable}; the callables run with
    kernel launches captured instead of executed (call them on ``meta`` tensors: nothing is read).
    ``hooks`` maps module function names to stand-ins used meanwhile (e.g. the SM count of the
    target architecture, or the resident programs per SM of a compiled kernel).
    """
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(module_name)
    launches, direction = [], [None]

    def capture(self, *args, grid, warmup, **kwargs):
        launches.append((direction[0], self, args, kwargs, grid))

    saved_run = JITFunction.run
    saved = {name: getattr(mod, name) for name in (hooks or {}) if hasattr(mod, name)}
    JITFunction.run = capture
    for name in saved:
        setattr(mod, name, hooks[name])
    try:
        for d, call in entry_points(mod).items():
            direction[0] = d
            call()
    finally:
        JITFunction.run = saved_run
        for name, fn in saved.items():
            setattr(mod, name, fn)
    return launches


def grid_size(grid) -> int:
    g = list(grid) + [1, 1]
    return int(g[0]) * int(g[1]) * int(g[2])


def bind(fn, args, kwargs, arch: int):
    """(target, signature, constexprs, attrs, options) the JIT would compile for this launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def compile_key(fn, args, kwargs, arch: int) -> tuple:
    """Identifies a compilation: equal keys compile to the same code."""
    _, sig, const, attrs, opts = bind(fn, args, kwargs, arch)
    return (arch, fn.__module__, fn.__name__, repr(sorted(sig.items())), repr(sorted(const.items(), key=str)),
            repr(sorted(attrs.items(), key=str)), repr(sorted(opts.__dict__.items(), key=str)))


def compile_launch(fn, args, kwargs, arch: int):
    """(CompiledKernel, signature, constexprs, options) of one captured launch, for ``sm_<arch>``."""
    import triton
    from triton.compiler import ASTSource

    target, sig, const, attrs, opts = bind(fn, args, kwargs, arch)
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=target,
                       options=opts.__dict__)
    return k, sig, const, opts


def constexpr_values(signature: dict, constexprs: dict) -> dict:
    """{argument name: value} of the constexpr (and JIT-specialized) arguments."""
    names = list(signature)
    return {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1 and path[0] < len(names)}


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
def setup_nvcc_flags() -> list:
    """The nvcc flags setup.py passes (its ``"nvcc": [...]`` list), read from setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "nvcc" and isinstance(v, ast.List):
                    return [e.value for e in v.elts if isinstance(e, ast.Constant)]
    raise RuntimeError("setup.py has no extra_compile_args['nvcc'] list")


def nvcc_path() -> str | None:
    cand = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return cand if os.access(cand, os.X_OK) else shutil.which("nvcc")


def nvcc_command(source: str, arch: int, out_dir: str) -> list:
    """nvcc for the device code of ``source`` (a cubin for sm_<arch>, the PTX kept in out_dir)."""
    import torch
    from torch.utils import cpp_extension as ce

    flags = [f for f in setup_nvcc_flags() if f not in ("-Xptxas", "-v")]
    inc = [f"-I{p}" for p in ce.include_paths(device_type="cuda")]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return [nvcc_path(), "-std=c++20", *ce.COMMON_NVCC_FLAGS, *flags, *inc, "-DDICETORCH_WITH_CUDA=1",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-arch=sm_{arch}", "-cubin", "--keep", "--keep-dir", out_dir,
            "-o", os.path.join(out_dir, f"kernels_sm{arch}.cubin"), os.path.join(ROOT, source)]


def compile_cu(source: str, arch: int) -> tuple:
    """(PTX text, cubin bytes, seconds) of ``source`` for sm_<arch>; RuntimeError with nvcc's output."""
    with tempfile.TemporaryDirectory(prefix=f"kernels_sm{arch}_") as d:
        t0 = time.time()
        proc = subprocess.run(nvcc_command(source, arch, d), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{arch}:\n{(proc.stderr or proc.stdout)[-3000:]}")
        seconds = time.time() - t0
        ptx = open(os.path.join(d, os.path.splitext(os.path.basename(source))[0] + ".ptx")).read()
        cubin = open(os.path.join(d, f"kernels_sm{arch}.cubin"), "rb").read()
    return ptx, cubin, seconds


def demangle(names: list) -> list:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return list(names)


def template_args(demangled: str) -> list:
    """Template arguments of a demangled function name, e.g. ['float', 'long', 'true', 'float']."""
    m = re.search(r"<(.*)>\s*\(", demangled)
    if not m:
        return []
    out, depth, cur = [], 0, ""
    for ch in m.group(1):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()] if cur.strip() else out
