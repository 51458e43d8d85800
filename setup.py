"""Build and install dicetorch.

The compiled extension ``dicetorch._C`` (fused C++ CPU kernels, plus CUDA kernels when a CUDA
toolchain and a CUDA build of torch are present) is optional: without it dicetorch runs on the
reference and Triton paths.  Build with ``pip install --no-build-isolation -e .`` so that the
extension compiles against the torch already installed.
"""
from setuptools import find_packages, setup

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
        ],
        "examples": ["tqdm", "matplotlib", "scikit-learn"],
        "bench": ["monai==1.6.1", "segmentation-models-pytorch==0.6.0", "psutil"],
    },
)
