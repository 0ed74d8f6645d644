"""perk_fast: fast, memory-efficient PERK (test-time learning of long contexts into LoRA memories)."""
from setuptools import setup

setup(
    name="perk_fast",
    version="0.1.0",
    description="Fast, memory-efficient PERK: encode long contexts into batched LoRA memories and meta-train them",
    packages=["perk_fast", "perk_fast.evaluate", "perk_fast.kernels"],
    package_data={"perk_fast": ["assets/*", "assets/**/*", "configs/*.yaml", "configs/**/*.yaml"]},
    entry_points={"console_scripts": ["perk-fast=perk_fast.cli:main"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11,<2.15",
        "transformers>=5.0,<6",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "higher==0.2.1", "peft", "triton>=3.6"],
        "bench": ["matplotlib", "higher==0.2.1", "peft", "triton>=3.6"],
    },
)
