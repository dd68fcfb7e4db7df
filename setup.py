"""Build script.  Install with ``pip install -e . --no-build-isolation`` (build isolation
would reinstall the whole torch stack; flash-attention and apex use the same convention).

The C++/CUDA extensions under csrc/ are added by ``get_extensions()``; see the
environment switches documented in README.md.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def get_extensions():
    return []


def get_cmdclass():
    return {}


setup(
    name="adpo-kernels",
    version="0.1.0",
    description="Fused GPU/CPU kernels and a fast trainer for Diffusion-DPO and Adaptive-DPO",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["adpo_kernels", "adpo_kernels.*", "adpo_train", "adpo_train.*",
                                    "bench", "bench.*"]),
    package_data={"adpo_kernels": ["_build_info.json"]},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton"],
        "train": ["diffusers", "transformers", "accelerate", "peft", "safetensors", "tqdm", "pillow",
                  "pyarrow", "matplotlib"],
        "test": ["pytest", "hypothesis"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["adpo-train=adpo_train.cli:main", "adpo-bench=bench.__main__:main"]},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
    zip_safe=False,
)
