"""The inner optimisers: functional, differentiable AdamW and SGD with a learning rate per call.

Parameters are a flat list of adapter tensors ``[A_0, B_0, A_1, B_1, ...]`` with a
leading context dimension. Every update is a pure function of
``(p_t, g_t, state_t, lr_t)`` -- elementwise, no hidden state -- so the engine
(:mod:`perk_fast.engine`) can (a) unroll it into one autograd graph or (b) replay it
step by step in reverse for the flat-memory meta-gradient. The learning rate is a
0-dim tensor: PERK learns one per adapter tensor and step.

AdamW follows ``torch.optim.AdamW`` exactly (decoupled decay first, bias-corrected
moments, eps added after the corrected square root), with one change: the square
root is *safe* — its derivative at v = 0 is 0 instead of inf — so the zero
gradients of a zero-initialised LoRA B never turn meta-gradients into NaN.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import PerkConfig

__all__ = ["safe_sqrt", "InnerOptimizer"]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0 whose derivative at 0 is 0 (not inf), so no NaN flows back."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class InnerOptimizer:
    """Functional AdamW or SGD over a list of tensors. State per tensor: (m, v) or ()."""

    def __init__(self, config: PerkConfig) -> None:
        self.kind = config.inner_optimizer
        self.beta1, self.beta2 = config.inner_betas
        self.eps = config.inner_eps
        self.weight_decay = config.inner_weight_decay

    def init_state(self, params: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Zero moments for AdamW, nothing for SGD."""
        if self.kind == "sgd":
            return [() for _ in params]
        return [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    def update(
        self, p: torch.Tensor, g: torch.Tensor, state: tuple[torch.Tensor, ...], lr: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One update of one tensor at 0-based ``step`` with learning rate ``lr`` (0-dim)."""
        if self.kind == "sgd":
            if self.weight_decay:
                g = g + self.weight_decay * p
            return p - lr * g, ()
        m, v = state
        p = p * (1 - lr * self.weight_decay)
        m = m * self.beta1 + g * (1 - self.beta1)
        v = v * self.beta2 + (g * g) * (1 - self.beta2)
        bias1 = 1 - self.beta1 ** (step + 1)
        bias2_sqrt = math.sqrt(1 - self.beta2 ** (step + 1))
        denom = safe_sqrt(v) / bias2_sqrt + self.eps
        p = p - (lr / bias1) * (m / denom)
        return p, (m, v)

    def step(self, params, grads, states, lrs: torch.Tensor, step: int):
        """Update every tensor; ``lrs`` (P,) holds this step's learning rate per tensor."""
        new_params, new_states = [], []
        for i, (p, g, s) in enumerate(zip(params, grads, states)):
            p2, s2 = self.update(p, g, s, lrs[i], step)
            new_params.append(p2)
            new_states.append(s2)
        return new_params, new_states
