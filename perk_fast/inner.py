"""The functional inner loop: differentiable AdamW / SGD with learned per-step learning rates.

Parameters are a flat list of adapter tensors ``[A_0, B_0, A_1, B_1, ...]`` with a
leading context dimension. Every update is a pure function of
``(p_t, g_t, state_t, lr_t)`` so it can be (a) unrolled into one autograd graph
(``meta_grad='unrolled'``) or (b) replayed step by step in reverse by the
checkpointed meta-gradient (:mod:`perk_fast.metagrad`).

AdamW follows ``torch.optim.AdamW`` exactly (decoupled decay first, bias-corrected
moments, eps added after the corrected square root), with one change: the square
root is *safe* — its derivative at v = 0 is 0 instead of inf — so the zero
gradients of a zero-initialised LoRA B never turn meta-gradients into NaN.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from .config import PerkConfig

if TYPE_CHECKING:  # pragma: no cover
    from .data import MicroBatch
    from .model import PerkModel


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


def step_gradient(
    model: "PerkModel",
    params: Sequence[torch.Tensor],
    micro_batches: Sequence["MicroBatch"],
    step: int,
    *,
    create_graph: bool,
    seed: int | None,
) -> list[torch.Tensor]:
    """g_t = sum over micro-batches of d L_c / d p_t (the accumulated inner gradient).

    With ``create_graph`` the gradients keep their graph (second order); otherwise
    they are plain tensors and each micro-batch's graph is freed at once.
    """
    total, loss_sum = None, 0.0
    with torch.enable_grad():
        for mb in micro_batches:
            loss = model.inner_loss(params, mb, seed=model.pass_seed(seed, step, mb.index), second_order=create_graph)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph)
            total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
            loss_sum = loss_sum + loss.detach()
    model.record_inner_loss(step, loss_sum)
    return total


def run_inner_loop(
    model: "PerkModel",
    params: list[torch.Tensor],
    micro_batches: Sequence["MicroBatch"],
    *,
    differentiable: bool,
    seed: int | None = None,
    progress=None,
) -> list[torch.Tensor]:
    """T steps of the inner optimiser from ``params``; returns the adapted tensors.

    ``differentiable=False`` (test-time encoding): no graph survives a step.
    ``differentiable=True``: the plain unrolled graph; steps for which
    ``config.second_order_step(t)`` is false use detached gradients while the
    update path p_{t+1}(p_t, lr_t) stays differentiable.
    """
    config = model.config
    opt = InnerOptimizer(config)
    states = opt.init_state(params)
    lrs = model.inner_lr_table()
    for t in range(config.inner_steps):
        if differentiable:
            grads = step_gradient(
                model, params, micro_batches, t, create_graph=config.second_order_step(t), seed=seed
            )
            params, states = opt.step(params, grads, states, lrs[:, t], t)
        else:
            leaves = [p.detach().requires_grad_(True) for p in params]
            grads = step_gradient(model, leaves, micro_batches, t, create_graph=False, seed=seed)
            with torch.no_grad():
                params, states = opt.step([p.detach() for p in leaves], grads, states, lrs[:, t].detach(), t)
        if progress is not None:
            progress(t)
    return params
