"""The installation built what this machine can build.

Kernel tests skip when the extension is absent (a pure-Python install is supported), so this test
is what fails when a build silently dropped it: with a C++ compiler present the CPU kernels must
be there, and with nvcc and a CUDA build of torch the CUDA kernels too.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dicetorch import ops


def _nvcc_available() -> bool:
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    return torch.version.cuda is not None and home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


def test_extension_built_with_what_the_machine_offers():
    info = ops.extension_info()
    if os.environ.get("DICETORCH_NO_EXT") == "1":
        assert not info["loaded"]
        return
    if shutil.which("c++") or shutil.which("g++"):
        assert info["loaded"] and info["cpu"], f"dicetorch._C missing or without CPU kernels: {info}"
        assert ops.resolve_backend("auto", torch.device("cpu")) == "cpu"
    if _nvcc_available() and os.environ.get("DICETORCH_CUDA") != "0":
        assert info["cuda"], f"nvcc is available but dicetorch._C has no CUDA kernels: {info}"


def test_cpu_kernels_run_in_parallel():
    """at::parallel_for splits the CPU kernels over torch's threads only when the extension is
    compiled with OpenMP (a header template; without _OPENMP it runs serially): the built library
    must need the OpenMP runtime whenever torch's own parallel backend is OpenMP."""
    info = ops.extension_info()
    if not info["loaded"]:
        pytest.skip("no compiled extension in this installation (DICETORCH_NO_EXT=1)")
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend here is not OpenMP")
    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils) is needed to inspect the built library"
    import dicetorch._C as ext
    dynamic = subprocess.run([readelf, "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in dynamic, f"dicetorch._C is not linked with OpenMP:\n{dynamic}"
