# Copyright 2026 The diffusers-hybrid authors. Licensed under the Apache License, Version 2.0.
import os
import re

from setuptools import find_packages, setup


def _read_version():
    init = os.path.join(os.path.dirname(__file__), "src", "diffusers_hybrid", "__init__.py")
    with open(init, encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


# torch is not pinned tightly: users keep their own CUDA build (the GPU machines run torch 2.11).
install_requires = [
    "torch>=2.4",
    "diffusers>=0.42.1,<0.44",
    "transformers>=4.56",
    "accelerate>=1.0",
    "huggingface_hub",
    "safetensors",
    "numpy",
    "tqdm",
]

extras = {
    "triton": ["triton>=3.3"],
    "video": ["imageio", "imageio-ffmpeg"],
    "training": ["peft>=0.17", "datasets", "tensorboard", "pyyaml", "tokenizers", "imageio", "imageio-ffmpeg"],
    # triton runs the kernels' CPU tests through its interpreter (TRITON_INTERPRET=1)
    "test": [
        "pytest", "peft>=0.17", "tokenizers", "sentencepiece", "datasets", "pyyaml", "imageio", "imageio-ffmpeg",
        "triton>=3.3; platform_system == 'Linux'",
    ],
}
extras["dev"] = sorted({dep for deps in extras.values() for dep in deps} | {"ruff"})

setup(
    name="diffusers-hybrid",
    version=_read_version(),
    description="Hybrid Forcing: real-time unbounded streaming text-to-video for Hugging Face diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_hybrid": ["py.typed"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
)
