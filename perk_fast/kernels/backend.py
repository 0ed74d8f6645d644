"""Backend switch shared by every kernel: ``auto`` | ``triton`` | ``torch``.

* ``auto`` (default): Triton kernels on CUDA tensors, the PyTorch twin elsewhere.
* ``triton``: always the Triton kernels. On CPU tensors this needs the Triton
  interpreter (``TRITON_INTERPRET=1`` set before Triton is imported); without it
  a clear error is raised instead of silently running something else.
* ``torch``: always the PyTorch twin.

The initial value comes from the environment variable ``PERK_FAST_BACKEND``;
``set_backend`` / ``use_backend`` change it in code.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_ENV_VAR = "PERK_FAST_BACKEND"


def _check(name: str, source: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    return value


_backend: str | None = None  # resolved lazily so importing never fails on a bad env var


def get_backend() -> str:
    """The active backend name (``auto``, ``triton`` or ``torch``)."""
    global _backend
    if _backend is None:
        _backend = _check(os.environ.get(_ENV_VAR, "auto"), _ENV_VAR)
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for every kernel from now on."""
    global _backend
    _backend = _check(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects ``name`` and restores the previous backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide whether a kernel call on ``tensors`` takes the Triton path.

    Raises a RuntimeError when ``triton`` is forced on CPU tensors without the
    interpreter, rather than silently falling back.
    """
    backend = get_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return on_cuda
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors if t is not None})
        raise RuntimeError(
            f"backend 'triton' was forced but the tensors are on {devices}; Triton kernels run on "
            "CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing triton, "
            "or use backend 'torch'/'auto'"
        )
    return True
