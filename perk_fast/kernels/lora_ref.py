"""Pure-PyTorch twin of the batched LoRA linear kernel (:mod:`perk_fast.kernels.lora`).

It is the CPU path, the path taken when the frozen weight or bias must be trained, and the
reference the Triton kernels are tested and benchmarked against. Same signature, same maths::

    y = x W^T + bias + scale * (lora_x A_b^T) B_b^T          (per context b)

Dtype rule: the base product runs in ``x.dtype``; the low-rank product runs in the adapter dtype
(adapters are kept in fp32 when the base model is bf16/fp16); the sum is cast to ``x.dtype``.
Everything is plain autograd, so every order of derivative works, including w.r.t. the weight.
"""
from __future__ import annotations

import numbers

import torch

WEIGHT_LAYOUTS = ("linear", "conv1d")
PRECISIONS = (None, "ieee", "tf32", "input", "split")


def check_lora_inputs(x, weight, bias, lora_a, lora_b, lora_x, *, scale, weight_layout, precision=None):
    """Validate the arguments of ``lora_linear``; returns ``(B, M, K, N, R)``.

    Shapes: x (B, M, K); weight (N, K) for ``linear`` or (K, N) for ``conv1d``; bias (N,);
    lora_a (B, R, K); lora_b (B, N, R); lora_x like x.
    """
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout={weight_layout!r} is not one of {WEIGHT_LAYOUTS}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a Python number (it is a runtime kernel argument), got {type(scale).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, M, K), got {tuple(x.shape)}")
    n_ctx, m, k = x.shape
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    n, k_w = weight.shape if weight_layout == "linear" else weight.shape[::-1]
    if k_w != k:
        expected = "(N, K)" if weight_layout == "linear" else "(K, N)"
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} with layout {weight_layout!r} must be {expected} with K={k}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if lora_a.dim() != 3 or lora_a.shape[0] != n_ctx or lora_a.shape[2] != k:
        raise ValueError(f"lora_a must have shape (B={n_ctx}, R, K={k}), got {tuple(lora_a.shape)}")
    r = lora_a.shape[1]
    if tuple(lora_b.shape) != (n_ctx, n, r):
        raise ValueError(f"lora_b must have shape (B={n_ctx}, N={n}, R={r}), got {tuple(lora_b.shape)}")
    if lora_x is not None and lora_x.shape != x.shape:
        raise ValueError(f"lora_x must have the shape of x {tuple(x.shape)}, got {tuple(lora_x.shape)}")
    return n_ctx, m, k, n, r


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scale: float,
    weight_layout: str = "linear",
    lora_x: torch.Tensor | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """``x W^T + bias + scale * (lora_x A_b^T) B_b^T`` in plain PyTorch, shape (B, M, N), dtype x.dtype.

    Arguments as in :func:`perk_fast.kernels.lora.lora_linear`. ``precision`` only selects how the
    Triton kernels multiply; here the low-rank path always runs exactly in the adapter dtype.
    """
    check_lora_inputs(
        x, weight, bias, lora_a, lora_b, lora_x, scale=scale, weight_layout=weight_layout, precision=precision
    )
    w_nk = weight if weight_layout == "linear" else weight.t()  # a view: (N, K)
    base = torch.matmul(x, w_nk.t())  # (B, M, N) in x.dtype
    if bias is not None:
        base = base + bias
    lx = x if lora_x is None else lora_x
    xa = torch.matmul(lx.to(lora_a.dtype), lora_a.transpose(-1, -2))  # (B, M, R)
    low = torch.matmul(xa, lora_b.transpose(-1, -2))  # (B, M, N) in the adapter dtype
    return (base + scale * low).to(x.dtype)
