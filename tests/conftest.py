"""Shared pytest setup: Triton's CPU interpreter on machines without CUDA, and ``requires_cuda``."""
import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():  # must happen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
