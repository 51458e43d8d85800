"""Shared test settings: a fixed seed per test and a bounded hypothesis profile (2-core CI)."""
import os

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------------------------
# Triton kernels run on CPU tensors in the Triton interpreter, which must be switched on before
# triton is first imported.  Test modules that compare backends therefore list "triton" only in an
# interpreter process and rerun themselves in one (see ``interpreter_suite``).
# ----------------------------------------------------------------------------------------------
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends_under_test():
    """Backends compared with "reference" in this process: "triton" in an interpreter process,
    otherwise every other backend available for CPU tensors."""
    from dicetorch import ops

    if INTERPRETED:
        return ["triton"]
    return [b for b in ops.available_backends("cpu") if b not in ("reference", "triton")]


def interpreter_suite(test_file: str, timeout: int = 900):
    """Run the "triton"-parametrized tests of ``test_file`` under TRITON_INTERPRET=1 in a subprocess."""
    import importlib.util
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-p", "no:cacheprovider",
           "-k", "triton", "-W", "ignore::RuntimeWarning"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "2"]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert " passed" in proc.stdout and "no tests ran" not in proc.stdout
