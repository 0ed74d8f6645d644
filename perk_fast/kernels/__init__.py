"""Fused Triton kernels of perk_fast, each beside its pure-PyTorch twin.

Inside perk_fast on purpose: a top-level ``kernels`` would shadow the Hugging Face package of that
name, which transformers imports. Nothing here queries CUDA at import time;
the backend switch in :mod:`perk_fast.kernels.backend` decides per call whether a
Triton kernel or its PyTorch twin runs.
"""
from .backend import get_backend, set_backend, use_backend, use_triton

__all__ = ["get_backend", "set_backend", "use_backend", "use_triton"]
