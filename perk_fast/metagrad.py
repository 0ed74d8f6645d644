"""Exact meta-gradients in flat memory: step checkpointing + segment-chunk replay.

The plain unrolled inner loop keeps, for every step, the activations and the
backward graph of the gradient: memory ~ T x context length. Here the inner loop
runs forward with no second-order graph and keeps one adapter-sized tensor per step,
the inner gradient g_t. Everything else is recomputed: (p_t, m_t, v_t) by replaying the
cheap elementwise updates from p_0 (bit-identical values), the second-order terms by
replaying the model one micro-batch at a time. The outer backward walks the steps in
reverse:

1. The optimiser update ``p_{t+1}, m_{t+1}, v_{t+1} = U(p_t, g_t, m_t, v_t, lr_t)`` is
   elementwise, so its vector-Jacobian product is a tiny autograd call on
   adapter-sized tensors: it turns the adjoints (p̄_{t+1}, m̄_{t+1}, v̄_{t+1}) into
   p̄_t (direct part), m̄_t, v̄_t, the learned-LR adjoint lr̄_t and ḡ_t, the adjoint
   of the inner gradient.
2. The inner gradient is a sum over micro-batches, ``g_t = Σ_c ∇_p L_c(p_t, φ)``
   (φ: the token-weighting model), so its second-order term is a sum as well:

       p̄_t += Σ_c (∂²L_c/∂p²) ḡ_t          φ̄ += Σ_c (∂²L_c/∂φ∂p) ḡ_t

   Each term is one replay: recompute L_c with a graph, take ∇_p L_c with
   ``create_graph=True``, contract with ḡ_t, free. Only one micro-batch's
   double-backward graph is alive at any time.
3. Steps that are first order (``truncated`` before ``unroll_start``, ``first_order``)
   have a detached g_t: they skip the replay, exactly as the unrolled graph would.

Dropout masks are seeded per (call, step, micro-batch), so replays see the masks
of the forward. The result equals the unrolled meta-gradient to rounding; the cost
is about one extra forward + double backward per differentiated step.

``meta_grad="recomputed"`` keeps nothing per step, not even g_t: the reverse walk
recomputes g_0..g_t (first-order passes, the same values bit for bit) to rebuild
(p_t, m_t, v_t, g_t) each time. Peak memory is then constant in T -- a handful of
adapter-sized tensors whatever the number of steps -- at the price of T(T+1)/2 extra
first-order forward+backward passes per meta-step (10 at T = 4). Use it when T x
(contexts x adapter size) is what does not fit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .inner import InnerOptimizer, step_gradient

if TYPE_CHECKING:  # pragma: no cover
    from .data import MicroBatch
    from .model import PerkModel


class _CheckpointedInnerLoop(torch.autograd.Function):
    """inputs: lrs (P, T), init tensors (P of them, unexpanded), weighting params (W);
    outputs: the adapted tensors (P of them, leading context dim)."""

    @staticmethod
    def forward(ctx, model, micro_batches, n_contexts, seed, n_init, lrs, *tensors):
        init, weighting = tensors[:n_init], tensors[n_init:]
        config = model.config
        opt = InnerOptimizer(config)
        params = [t.detach().unsqueeze(0).expand(n_contexts, *t.shape) for t in init]
        states = opt.init_state(params)
        keep = config.meta_grad != "recomputed"
        grads_per_step = []
        for t in range(config.inner_steps):
            grads = _inner_gradient(model, params, micro_batches, t, seed)
            if keep:
                grads_per_step.append(grads)
            with torch.no_grad():
                params, states = opt.step(params, grads, states, lrs[:, t].detach(), t)
            del grads
        ctx.model, ctx.micro_batches, ctx.seed, ctx.n_init = model, micro_batches, seed, n_init
        ctx.n_contexts = n_contexts
        ctx.grads_per_step = grads_per_step if keep else None
        ctx.weighting = weighting
        ctx.save_for_backward(lrs, *init)
        return tuple(params)

    @staticmethod
    def backward(ctx, *p_bar):
        lrs, *init = ctx.saved_tensors
        model, config = ctx.model, ctx.model.config
        opt = InnerOptimizer(config)
        grads_per_step = ctx.grads_per_step
        weighting = list(ctx.weighting)
        need_w = any(ctx.needs_input_grad[6 + ctx.n_init:])
        p0 = [t.detach().unsqueeze(0).expand(ctx.n_contexts, *t.shape) for t in init]
        s0 = opt.init_state(p0)
        p_bar = [torch.zeros_like(p) if g is None else g for g, p in zip(p_bar, p0)]
        s_bar = [tuple(torch.zeros_like(x) for x in s) for s in s0]
        lr_bar = torch.zeros_like(lrs)
        w_bar = [torch.zeros_like(w) for w in weighting]
        recorded = model._inner_losses  # recomputed passes must not overwrite the forward's inner losses
        for t in reversed(range(config.inner_steps)):
            if grads_per_step is not None:
                params, states = _replay_updates(opt, p0, s0, grads_per_step, lrs, t)
                grads = grads_per_step[t]
            else:
                params, states, grads = _recompute_step(opt, model, p0, s0, lrs, t, ctx.micro_batches, ctx.seed)
            p_bar, s_bar, g_bar, lr_bar[:, t] = _update_vjp(opt, params, states, grads, lrs[:, t], t, p_bar, s_bar)
            if config.second_order_step(t):
                hvp_p, hvp_w = _replay_hvp(model, params, ctx.micro_batches, t, ctx.seed, g_bar, weighting, need_w)
                p_bar = [a + b for a, b in zip(p_bar, hvp_p)]
                w_bar = [a + b for a, b in zip(w_bar, hvp_w)]
        model._inner_losses = recorded
        ctx.grads_per_step = None  # free the checkpoints as soon as they are consumed
        init_bar = [pb.sum(0) for pb in p_bar]
        return (
            None,  # model
            None,  # micro_batches
            None,  # n_contexts
            None,  # seed
            None,  # n_init
            lr_bar if ctx.needs_input_grad[5] else None,
            *init_bar,
            *(w_bar if need_w else [None] * len(weighting)),
        )


def _replay_updates(opt: InnerOptimizer, p0, s0, grads_per_step, lrs, t):
    """(p_t, state_t) recomputed from p_0 and the stored g_0..g_{t-1}.

    The same elementwise updates on the same inputs as the forward, so the values are
    bit-identical; O(t) adapter-sized updates, negligible next to one model pass.
    """
    params, states = p0, s0
    with torch.no_grad():
        for k in range(t):
            params, states = opt.step(params, grads_per_step[k], states, lrs[:, k].detach(), k)
    return params, states


def _inner_gradient(model, params, micro_batches, t, seed):
    """g_t at ``params``: a first-order pass (no graph kept), as the inner loop computes it."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in params]
        return step_gradient(model, leaves, micro_batches, t, create_graph=False, seed=seed)


def _recompute_step(opt: InnerOptimizer, model, p0, s0, lrs, t, micro_batches, seed):
    """(p_t, state_t, g_t) rebuilt from p_0 by recomputing g_0..g_t (``meta_grad="recomputed"``).

    The same passes and elementwise updates on the same inputs as the forward, so the values are
    those of the forward; only the current step's tensors are alive.
    """
    params, states = p0, s0
    for k in range(t):
        grads = _inner_gradient(model, params, micro_batches, k, seed)
        with torch.no_grad():
            params, states = opt.step(params, grads, states, lrs[:, k].detach(), k)
        del grads
    return params, states, _inner_gradient(model, params, micro_batches, t, seed)


def _update_vjp(opt: InnerOptimizer, params, states, grads, lrs_t, t, p_bar, s_bar):
    """Backpropagate the adjoints of (p_{t+1}, state_{t+1}) through one elementwise update."""
    with torch.enable_grad():
        p_in = [p.detach().requires_grad_(True) for p in params]
        g_in = [g.detach().requires_grad_(True) for g in grads]
        s_in = [tuple(x.detach().requires_grad_(True) for x in s) for s in states]
        lr_in = lrs_t.detach().requires_grad_(True)
        outs, out_bars = [], []
        for i, (p, g, s) in enumerate(zip(p_in, g_in, s_in)):
            p_new, s_new = opt.update(p, g, s, lr_in[i], t)
            outs.append(p_new)
            out_bars.append(p_bar[i])
            outs.extend(s_new)
            out_bars.extend(s_bar[i])
        flat_s = [x for s in s_in for x in s]
        inputs = p_in + g_in + flat_s + [lr_in]
        grads_in = torch.autograd.grad(outs, inputs, out_bars, allow_unused=True)
    n = len(p_in)
    zeros = lambda ref, g: torch.zeros_like(ref) if g is None else g  # noqa: E731
    new_p_bar = [zeros(p, g) for p, g in zip(p_in, grads_in[:n])]
    g_bar = [zeros(p, g) for p, g in zip(g_in, grads_in[n : 2 * n])]
    flat_bar = list(grads_in[2 * n : 2 * n + len(flat_s)])
    new_s_bar, k = [], 0
    for s in s_in:
        new_s_bar.append(tuple(zeros(x, flat_bar[k + j]) for j, x in enumerate(s)))
        k += len(s)
    lr_bar = zeros(lr_in, grads_in[-1])
    return new_p_bar, new_s_bar, g_bar, lr_bar


def _replay_hvp(model, params, micro_batches, t, seed, g_bar, weighting, need_w):
    """Σ_c of (∂∇_p L_c / ∂(p, φ))ᵀ ḡ, one micro-batch graph alive at a time."""
    hvp_p = [torch.zeros_like(p) for p in params]
    hvp_w = [torch.zeros_like(w) for w in weighting]
    targets_w = weighting if need_w else []
    for mb in micro_batches:
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in params]
            loss = model.inner_loss(leaves, mb, seed=model.pass_seed(seed, t, mb.index), second_order=True)
            g = torch.autograd.grad(loss, leaves, create_graph=True)
            out = torch.autograd.grad(g, leaves + targets_w, g_bar, allow_unused=True)
        for i, v in enumerate(out[: len(leaves)]):
            if v is not None:
                hvp_p[i] += v
        for i, v in enumerate(out[len(leaves) :]):
            if v is not None:
                hvp_w[i] += v
        del loss, g, out, leaves
    return hvp_p, hvp_w


def checkpointed_inner_loop(
    model: "PerkModel", micro_batches: Sequence["MicroBatch"], n_contexts: int, *, seed: int | None
) -> list[torch.Tensor]:
    """Adapted adapters of ``n_contexts`` contexts whose backward is the flat-memory meta-gradient."""
    # ordered as the inner loop orders adapters: [A_0, B_0, A_1, B_1, ...]
    init = [x for pair in zip(model.lora_A, model.lora_B) for x in pair]
    weighting = list(model.weighting.parameters()) if model.weighting is not None else []
    out = _CheckpointedInnerLoop.apply(
        model, micro_batches, n_contexts, seed, len(init), model.inner_lr_table(), *init, *weighting
    )
    return list(out)
