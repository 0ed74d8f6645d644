"""Fused Triton kernels of perk_fast, each beside its pure-PyTorch twin.

The package ``perk_fast.kernels`` (inside perk_fast: a top-level ``kernels`` would shadow the Hugging Face package of that name). Nothing here queries CUDA at import time;
the backend switch in :mod:`perk_fast.kernels.backend` decides per call whether a
Triton kernel or its PyTorch twin runs.
"""
from .backend import get_backend, set_backend, use_backend, use_triton

__all__ = ["get_backend", "set_backend", "use_backend", "use_triton"]
