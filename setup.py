"""Build and install dicetorch.

The compiled extension ``dicetorch._C`` (fused C++ CPU kernels, plus CUDA kernels when a CUDA
toolchain and a CUDA build of torch are present) is optional: without it dicetorch runs on the
reference and Triton paths.  Build with ``pip install --no-build-isolation -e .`` so that the
extension compiles against the torch already installed::

    CUDA_HOME=/usr/local/cuda MAX_JOBS=2 pip install --no-build-isolation -e ".[test]"

Environment:
    DICETORCH_CUDA        "0": CPU kernels only; "1": CUDA kernels required; unset: when possible
    CUDA_HOME             defaults to /usr/local/cuda when that exists
    TORCH_CUDA_ARCH_LIST  defaults to DEFAULT_CUDA_ARCH_LIST when no GPU is visible (T4, Ampere/Ada,
                          Hopper, Blackwell, and PTX of the newest for the driver to JIT on later
                          GPUs); the list used is recorded in build/cuda_arch_list.txt
    DICETORCH_NO_EXT=1    build no extension at all (pure-Python install)

The ptxas register/spill report of the CUDA kernels is written to build/ptxas_usage.txt.
"""
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PTXAS_LOG = os.path.join(ROOT, "build", "ptxas_usage.txt")
ARCH_LOG = os.path.join(ROOT, "build", "cuda_arch_list.txt")
# A cubin runs on its own major version only (sm_80 also on 8.6/8.9, sm_100 not on 12.x), so the
# default reaches every family people train on; "+PTX" adds compute_120 PTX for newer GPUs.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0;10.0;12.0+PTX"

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda"):
    # torch otherwise guesses /usr/local from `which nvcc` and cannot find cudart
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _want_cuda(torch, cuda_home) -> bool:
    flag = os.environ.get("DICETORCH_CUDA", "")
    possible = (
        torch.version.cuda is not None
        and cuda_home is not None
        and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    )
    if flag == "0":
        return False
    if flag == "1" and not possible:
        raise RuntimeError(
            "DICETORCH_CUDA=1 but the CUDA kernels cannot be built: need a CUDA build of torch "
            f"(torch.version.cuda={torch.version.cuda}) and nvcc under CUDA_HOME={cuda_home}"
        )
    return possible


def _extension_build():
    """(ext_modules, cmdclass) for dicetorch._C, or ([], {}) when torch is not importable."""
    if os.environ.get("DICETORCH_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("dicetorch: torch is not importable; building without the compiled extension", file=sys.stderr)
        return [], {}

    with_cuda = _want_cuda(torch, cpp_extension.CUDA_HOME)
    sources = ["csrc/dice.cpp", "csrc/cpu/dice_cpu.cpp"]
    # One copy of the CPU kernel per x86 instruction set, picked at run time (see dice.cpp).
    # These files need their own compiler flags, so BuildExt compiles them separately.
    cap_sources = []
    define_macros = []
    if os.uname().machine in ("x86_64", "AMD64"):
        cap_sources = [
            ("csrc/cpu/dice_cpu_avx2.cpp", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2",
                                             "-DCPU_CAPABILITY_AVX2"]),
            ("csrc/cpu/dice_cpu_avx512.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                                               "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]),
        ]
        define_macros = [("DICETORCH_CPU_X86", "1")]
    cxx = ["-O3", "-g0", "-Wno-unknown-pragmas"]  # -g0: no debug info (smaller .so, faster build)
    kwargs = {}
    link = []
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is a header template: without _OPENMP it runs the whole range on the
        # calling thread.  The DT_NEEDED libgomp.so.1 resolves to the copy torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        sources.append("csrc/cuda/dice_cuda.cu")
        define_macros.append(("DICETORCH_WITH_CUDA", "1"))
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            # -Xptxas -v: registers and spill stores/loads per kernel (saved to build/ptxas_usage.txt);
            # --threads 0: the architectures compile in parallel (about 4.5 CPU-minutes each)
            "nvcc": ["-O3", "-Xptxas", "-v", "--use_fast_math", "--threads", "0"],
        }
        ext_cls = cpp_extension.CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls("dicetorch._C", sources, define_macros=define_macros, extra_link_args=link, **kwargs)

    class BuildExt(cpp_extension.BuildExtension):
        """BuildExtension (ninja) that also builds the per-capability CPU kernels and saves the
        ptxas report of the CUDA kernels."""

        def build_extension(self, ext):
            # ext.extra_compile_args now holds torch's flags (ABI, C++ standard): add the ISA flags.
            base = list(ext.extra_compile_args["cxx"])
            objects = []
            for src, flags in cap_sources:
                objects += self.compiler.compile(
                    [src], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, extra_postargs={"cxx": base + flags, "nvcc": []},
                    depends=ext.depends,
                )
            # linked after the portable objects, so that the linker keeps the portable copy of any
            # inline function the ISA-specific objects also define
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

        def build_extensions(self):
            if not with_cuda:
                return super().build_extensions()
            os.makedirs(os.path.dirname(PTXAS_LOG), exist_ok=True)
            with open(ARCH_LOG, "w") as f:  # what tests/test_cuda_build.py compares the .so with
                f.write(os.environ.get("TORCH_CUDA_ARCH_LIST", "") + "\n")
            log_path = PTXAS_LOG + ".build"
            # ninja writes the compilers' output to fd 1/2: capture it, then replay it
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            with open(log_path, "w") as log:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                try:
                    super().build_extensions()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
                    os.close(saved[0])
                    os.close(saved[1])
                    with open(log_path) as f:
                        text = f.read()
                    sys.stdout.write(text)
            lines = [ln for ln in text.splitlines() if "ptxas info" in ln or "bytes stack frame" in ln]
            if lines or not os.path.exists(PTXAS_LOG):  # nothing recompiled: keep the last report
                with open(PTXAS_LOG, "w") as f:
                    f.write("\n".join(lines) + "\n")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(
    name="dicetorch",
    version="0.1.0",
    description="Exact, fused Dice-family segmentation losses for PyTorch (Triton, CUDA and C++ kernels)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dicetorch", "dicetorch.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "test": [
            "pytest", "pytest-xdist", "hypothesis", "expecttest", "tqdm", "matplotlib",
            "monai==1.6.1", "segmentation-models-pytorch==0.6.0", "kornia==0.9.0", "scikit-learn",
            "torchmetrics==1.9.0",  # dicetorch.metrics is tested value for value against this release
        ],
        # dicetorch.metrics (DiceScore, GeneralizedDiceScore, MeanIoU on torchmetrics.Metric)
        "metrics": ["torchmetrics>=1.9,<2"],
        "examples": ["tqdm", "matplotlib", "scikit-learn", "torchmetrics>=1.9,<2"],
        "bench": ["monai==1.6.1", "segmentation-models-pytorch==0.6.0", "psutil"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
