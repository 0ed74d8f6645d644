"""The engine: PERK's inner loop and its meta-gradient strategies, on an explicit inner problem.

An :class:`InnerProblem` is everything the inner loop needs, as explicit values: the loss of one
micro-batch as a function of the adapters, the micro-batches, the shared initial adapters, the
learned learning rates (P, T), the inner optimiser, which steps are second order, and the other
tensors the loss depends on (the token-weighting model; trainable base weights) -- the ones the
meta-gradient must reach through the inner gradients. The engine knows nothing of models,
tokenizers or seeds: the loss function owns those and must be a pure function of
``(adapters, micro_batch, step, second_order)`` (the same call gives the same value, dropout
masks included), which is what lets the flat-memory strategies replay it.

Every strategy returns an :class:`InnerResult`: the adapted adapters and the inner loss of each
step (summed over contexts and micro-batches; detached 0-dim tensors, no host sync).

Strategies (``PerkConfig.meta_grad``):

``unrolled``
    One autograd graph through every step (what ``higher`` and the reference do): memory grows
    like T x context length.

``checkpointed`` -- exact meta-gradients in flat memory
    The inner loop runs forward with no second-order graph and keeps one adapter-sized tensor per
    step, the inner gradient g_t. Everything else is recomputed: (p_t, m_t, v_t) by replaying the
    cheap elementwise updates from p_0 (bit-identical values), the second-order terms by replaying
    the model one micro-batch at a time. The outer backward walks the steps in reverse:

    1. The optimiser update ``p_{t+1}, m_{t+1}, v_{t+1} = U(p_t, g_t, m_t, v_t, lr_t)`` is
       elementwise, so its vector-Jacobian product is a tiny autograd call on adapter-sized
       tensors: it turns the adjoints (p̄_{t+1}, m̄_{t+1}, v̄_{t+1}) into p̄_t (direct part), m̄_t,
       v̄_t, the learned-LR adjoint lr̄_t and ḡ_t, the adjoint of the inner gradient.
    2. The inner gradient is a sum over micro-batches, ``g_t = Σ_c ∇_p L_c(p_t, φ)`` (φ: the
       problem's other tensors), so its second-order term is a sum as well::

           p̄_t += Σ_c (∂²L_c/∂p²) ḡ_t          φ̄ += Σ_c (∂²L_c/∂φ∂p) ḡ_t

       Each term is one replay: recompute L_c with a graph, take ∇_p L_c with
       ``create_graph=True``, contract with ḡ_t, free. Only one micro-batch's double-backward
       graph is alive at any time.
    3. Steps that are first order (``truncated`` before ``unroll_start``, ``first_order``) have a
       detached g_t: they skip the replay, exactly as the unrolled graph would.

    The result equals the unrolled meta-gradient to rounding; the cost is about one extra forward
    + double backward per differentiated step, minus one micro-batch: the last step's last
    micro-batch keeps its double-backward graph from the forward (the reverse walk starts with it).

``recomputed``
    Keeps nothing per step, not even g_t: the reverse walk recomputes the inner gradients
    (first-order passes, the same values bit for bit) to rebuild (p_t, m_t, v_t, g_t) when step t
    is reached. With no stored state that is T(T+1)/2 passes per meta-step (10 at T = 4), since
    every step is rebuilt from p_0. With ``snapshots = c > 0`` the walk follows a binomial
    (revolve) schedule (:func:`revolve_plan`): it may hold up to c intermediate states (p_k, m_k,
    v_k) and picks, by dynamic programming, where to store them so that the number of passes is
    the least possible -- about r T for the smallest r with C(c + r, c) >= T, that is
    O(T log T) once c ~ log T, and 2T - 2 (the floor: one pass to advance to each state, one
    to rebuild each step's gradient, less the kept last step) once C(c + 1, c) >= T. Peak memory
    stays constant in T: c states on top of the c = 0 walk's handful of adapter-sized tensors.

Test-time encoding is :func:`run_inner_loop` with ``differentiable=False``: no graph survives a step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .data import MicroBatch
from .inner import InnerOptimizer

__all__ = ["InnerProblem", "InnerResult", "STRATEGIES", "adapt", "run_inner_loop", "flat_memory_inner_loop",
           "step_gradient", "revolve_plan", "plan_passes"]

STRATEGIES = ("checkpointed", "recomputed", "unrolled")

# loss(adapters, micro_batch, step, second_order) -> 0-dim inner loss of the micro-batch
InnerLoss = Callable[[Sequence[torch.Tensor], MicroBatch, int, bool], torch.Tensor]


@dataclass
class InnerProblem:
    """One batch of contexts to write into their adapters, as explicit values.

    Attributes:
        loss: ``loss(adapters, micro_batch, step, second_order)``, the inner loss of one
            micro-batch (the sum over its contexts of their partial means); ``adapters`` is
            ``[A_0, B_0, ...]`` with a leading context dimension. ``second_order``: the pass will
            be differentiated twice. Must be deterministic in its arguments.
        micro_batches: the segments of every context, split as :func:`perk_fast.data.make_micro_batches` does.
        init: the shared initial adapters ``[A_0, B_0, ...]`` (no context dimension).
        n_contexts: contexts in the batch; every one starts from ``init``.
        lrs: (len(init), T) learning rates, row i for ``init[i]``.
        optimizer: the inner optimiser.
        second_order: per step, whether its gradient is differentiated (False: detached).
        weights: further tensors ``loss`` depends on that may need a meta-gradient.
    """

    loss: InnerLoss
    micro_batches: Sequence[MicroBatch]
    init: Sequence[torch.Tensor]
    n_contexts: int
    lrs: torch.Tensor
    optimizer: InnerOptimizer
    second_order: Sequence[bool]
    weights: Sequence[torch.Tensor] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.second_order)

    def initial_adapters(self) -> list[torch.Tensor]:
        """``init`` broadcast to ``n_contexts`` contexts (views, differentiable w.r.t. ``init``)."""
        return [t.unsqueeze(0).expand(self.n_contexts, *t.shape) for t in self.init]


@dataclass
class InnerResult:
    """Adapted adapters ``[A_0, B_0, ...]`` (leading context dim) and the inner loss of each step."""

    adapters: list[torch.Tensor]
    losses: list[torch.Tensor]


def step_gradient(
    problem: InnerProblem, params: Sequence[torch.Tensor], step: int, *, create_graph: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(g_t, L_t): the inner gradient summed over micro-batches, and the summed inner loss (detached).

    With ``create_graph`` the gradients keep their graph (second order); otherwise they are plain
    tensors and each micro-batch's graph is freed at once.
    """
    total, loss_sum = None, 0.0
    with torch.enable_grad():
        for mb in problem.micro_batches:
            loss = problem.loss(params, mb, step, create_graph)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph)
            total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
            loss_sum = loss_sum + loss.detach()
    return total, loss_sum


def run_inner_loop(
    problem: InnerProblem, *, differentiable: bool, progress: Callable[[int], None] | None = None
) -> InnerResult:
    """T steps of the inner optimiser from the initial adapters.

    ``differentiable=False`` (test-time encoding): no graph survives a step.
    ``differentiable=True``: the plain unrolled graph; steps whose ``second_order`` is false use
    detached gradients while the update path p_{t+1}(p_t, lr_t) stays differentiable.
    ``progress(t)`` is called after every step.
    """
    opt = problem.optimizer
    params = problem.initial_adapters()
    states = opt.init_state(params)
    losses = []
    for t in range(problem.steps):
        if differentiable:
            grads, loss = step_gradient(problem, params, t, create_graph=problem.second_order[t])
            params, states = opt.step(params, grads, states, problem.lrs[:, t], t)
        else:
            leaves = [p.detach().requires_grad_(True) for p in params]
            grads, loss = step_gradient(problem, leaves, t, create_graph=False)
            with torch.no_grad():
                params, states = opt.step([p.detach() for p in leaves], grads, states, problem.lrs[:, t].detach(), t)
        losses.append(loss)
        if progress is not None:
            progress(t)
    return InnerResult(list(params), losses)


def flat_memory_inner_loop(problem: InnerProblem, *, keep_gradients: bool = True, snapshots: int = 0) -> InnerResult:
    """Adapted adapters whose backward is the flat-memory meta-gradient.

    ``keep_gradients=True`` is ``checkpointed`` (one stored g_t per step), ``False`` is
    ``recomputed`` (nothing stored per step; its reverse walk may hold up to ``snapshots``
    intermediate optimiser states, placed by :func:`revolve_plan`). ``snapshots`` changes the
    number of passes, never the values.
    """
    if isinstance(snapshots, bool) or not isinstance(snapshots, int) or snapshots < 0:
        raise ValueError(f"snapshots={snapshots!r} is invalid: allowed an integer >= 0")
    losses: list[torch.Tensor] = []
    out = _FlatMemoryInnerLoop.apply(problem, keep_gradients, snapshots, losses, problem.lrs, *problem.init,
                                     *problem.weights)
    return InnerResult(list(out), losses)


def adapt(problem: InnerProblem, strategy: str, *, snapshots: int = 0) -> InnerResult:
    """Run the inner loop with meta-gradient ``strategy`` (one of :data:`STRATEGIES`).

    ``unrolled`` under ``torch.no_grad()`` builds no graph at all (the same values).
    ``snapshots``: the states ``recomputed`` may hold during its reverse walk (ignored otherwise).
    """
    if strategy in ("checkpointed", "recomputed"):
        return flat_memory_inner_loop(problem, keep_gradients=strategy == "checkpointed",
                                      snapshots=snapshots if strategy == "recomputed" else 0)
    if strategy == "unrolled":
        return run_inner_loop(problem, differentiable=torch.is_grad_enabled())
    raise ValueError(f"meta-gradient strategy {strategy!r} is invalid: allowed {', '.join(STRATEGIES)}")


# ------------------------------------------------------------------------------ flat memory
class _FlatMemoryInnerLoop(torch.autograd.Function):
    """inputs: lrs (P, T), init tensors (P of them, unexpanded), weights (W);
    outputs: the adapted tensors (P of them, leading context dim)."""

    @staticmethod
    def forward(ctx, problem, keep_gradients, snapshots, losses, lrs, *tensors):
        n_init = len(problem.init)
        init = tensors[:n_init]
        opt = problem.optimizer
        params = [t.detach().unsqueeze(0).expand(problem.n_contexts, *t.shape) for t in init]
        states = opt.init_state(params)
        grads_per_step = []
        # the last step's last micro-batch is computed with its double-backward graph and kept: the
        # reverse walk starts there, so it skips one replay (memory: one micro-batch graph, which the
        # replays need at their peak anyway -- still flat in T and in the context length)
        keep_last = any(ctx.needs_input_grad) and problem.second_order[-1] and len(problem.micro_batches) > 0
        ctx.kept = ctx.last_grads = None
        for t in range(problem.steps):
            if keep_last and t == problem.steps - 1:
                grads, loss, ctx.kept = _inner_gradient_keeping_last(problem, params, t)
                ctx.last_grads = None if keep_gradients else grads
            else:
                grads, loss = _inner_gradient(problem, params, t)
            losses.append(loss)
            if keep_gradients:
                grads_per_step.append(grads)
            with torch.no_grad():
                params, states = opt.step(params, grads, states, lrs[:, t].detach(), t)
            del grads
        ctx.problem = problem
        ctx.snapshots = snapshots
        ctx.grads_per_step = grads_per_step if keep_gradients else None
        ctx.save_for_backward(lrs, *init)
        return tuple(params)

    @staticmethod
    def backward(ctx, *p_bar):
        lrs, *init = ctx.saved_tensors
        problem = ctx.problem
        opt = problem.optimizer
        grads_per_step = ctx.grads_per_step
        n_init = len(init)
        weights = list(problem.weights)
        w_needed = [i for i, need in enumerate(ctx.needs_input_grad[5 + n_init:]) if need]
        p0 = [t.detach().unsqueeze(0).expand(problem.n_contexts, *t.shape) for t in init]
        s0 = opt.init_state(p0)
        p_bar = [torch.zeros_like(p) if g is None else g for g, p in zip(p_bar, p0)]
        s_bar = [tuple(torch.zeros_like(x) for x in s) for s in s0]
        lr_bar = torch.zeros_like(lrs)
        w_bar = [torch.zeros_like(w) for w in weights]
        if grads_per_step is not None:
            walk = _checkpointed_walk(opt, p0, s0, grads_per_step, lrs)
        else:
            walk = _recomputed_walk(problem, p0, s0, lrs, ctx.snapshots, ctx)
        for t, params, states, grads in walk:
            # a one-item box: _replay_hvp pops the kept graph, so that nothing here holds it once it is used
            kept = [ctx.kept] if t == problem.steps - 1 and ctx.kept is not None else None
            ctx.kept = None if kept is not None else ctx.kept
            p_bar, s_bar, g_bar, lr_bar[:, t] = _update_vjp(opt, params, states, grads, lrs[:, t], t, p_bar, s_bar)
            del grads
            if problem.second_order[t]:
                hvp_p, hvp_w = _replay_hvp(problem, params, t, g_bar, [weights[i] for i in w_needed], kept=kept)
                p_bar = [a + b for a, b in zip(p_bar, hvp_p)]
                for i, v in zip(w_needed, hvp_w):
                    w_bar[i] = w_bar[i] + v
            del params, states
        ctx.grads_per_step = None  # free the checkpoints as soon as they are consumed
        init_bar = [pb.sum(0) for pb in p_bar]
        return (
            None,  # problem
            None,  # keep_gradients
            None,  # snapshots
            None,  # losses
            lr_bar if ctx.needs_input_grad[4] else None,
            *init_bar,
            *(w_bar[i] if i in w_needed else None for i in range(len(weights))),
        )


def _inner_gradient(problem: InnerProblem, params, t):
    """(g_t, L_t) at ``params``: a first-order pass (no graph kept), as the inner loop computes it."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in params]
        return step_gradient(problem, leaves, t, create_graph=False)


def _inner_gradient_keeping_last(problem: InnerProblem, params, t):
    """(g_t, L_t, (leaves, g of the last micro-batch with its graph)): first-order passes for every
    micro-batch but the last, whose gradient is taken with ``create_graph=True`` and kept."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in params]
        total, loss_sum, kept = None, 0.0, None
        last = len(problem.micro_batches) - 1
        for k, mb in enumerate(problem.micro_batches):
            loss = problem.loss(leaves, mb, t, k == last)
            grads = torch.autograd.grad(loss, leaves, create_graph=k == last)
            if k == last:
                kept = (leaves, grads)
                grads = [g.detach() for g in grads]
            total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
            loss_sum = loss_sum + loss.detach()
    return total, loss_sum, kept


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


def _checkpointed_walk(opt: InnerOptimizer, p0, s0, grads_per_step, lrs):
    """(t, p_t, state_t, g_t) for t = T-1 .. 0 from the stored gradients (``checkpointed``)."""
    for t in reversed(range(len(grads_per_step))):
        params, states = _replay_updates(opt, p0, s0, grads_per_step, lrs, t)
        yield t, params, states, grads_per_step[t]


def _recomputed_walk(problem: InnerProblem, p0, s0, lrs, snapshots: int, ctx):
    """(t, p_t, state_t, g_t) for t = T-1 .. 0, rebuilt by first-order passes along
    :func:`revolve_plan` (``recomputed``). The last step's gradient is ``ctx.last_grads`` when the
    forward kept it (it is taken, so that nothing holds it afterwards).

    The same passes and elementwise updates on the same inputs as the forward, so the values are
    those of the forward; alive: the current state, at most ``snapshots`` stored states, and p_0.
    """
    opt = problem.optimizer
    last_grads, ctx.last_grads = ctx.last_grads, None
    base = (p0, s0)
    stack: list = []
    params, states = base
    for op, k in revolve_plan(problem.steps, snapshots, last_kept=last_grads is not None):
        if op == "advance":
            grads, _ = _inner_gradient(problem, params, k)
            with torch.no_grad():
                params, states = opt.step(params, grads, states, lrs[:, k].detach(), k)
            del grads
        elif op == "store":
            stack.append((params, states))
        elif op == "drop":
            stack.pop()
        elif op == "restore":
            params, states = stack[-1] if stack else base
        else:  # "reverse": step k's gradient at the current state (which is state k)
            if k == problem.steps - 1 and last_grads is not None:
                grads, last_grads = last_grads, None
            else:
                grads, _ = _inner_gradient(problem, params, k)
            yield k, params, states, grads
            del grads


# ------------------------------------------------------------------------------ revolve schedule
@functools.lru_cache(maxsize=None)
def _revolve_cost(length: int, snapshots: int, rightmost: bool) -> tuple[int, int]:
    """(least first-order passes to reverse ``length`` steps from a restorable start state with
    ``snapshots`` free slots, the first split achieving it; 0: no split). ``rightmost``: the
    segment ends at the last step, whose gradient costs no pass (the forward kept it)."""
    free = 1 if rightmost else 0
    snapshots = min(snapshots, length - 1)  # more slots than interior states buy nothing
    if length == 1:
        return 1 - free, 0
    # no slot: rebuild each step from the start state -> sum_{j < length} (j advances + 1 pass)
    best = (length * (length + 1) // 2 - free, 0)
    if snapshots == 0:
        return best
    for m in range(1, length):
        right, _ = _revolve_cost(length - m, snapshots - 1, rightmost)
        left, _ = _revolve_cost(m, snapshots, False)
        cost = m + right + left
        if cost < best[0]:
            best = (cost, m)
    return best


def revolve_plan(steps: int, snapshots: int, *, last_kept: bool = False) -> list[tuple[str, int]]:
    """The reverse walk of ``recomputed`` over ``steps`` inner steps holding at most ``snapshots``
    intermediate states: a list of ``(op, k)``, with the current state starting at state 0:

    * ``("advance", k)``: one first-order pass for g_k at the current state k, then the update to state k + 1;
    * ``("store", k)`` / ``("drop", k)``: push the current state k / pop the newest stored one;
    * ``("restore", k)``: the current state becomes the newest stored one (state 0 when none is stored);
    * ``("reverse", k)``: the reverse step k at the current state k (one pass for g_k, none for the last
      step when ``last_kept``: the forward kept its gradient).

    Reverse steps come in the order T-1 .. 0. The places to store are chosen by dynamic
    programming over the recursion "advance m steps, store, reverse the right part with one slot
    fewer, drop, restore, reverse the left part", which is Griewank's binomial checkpointing
    (revolve): :func:`plan_passes` is the least number of passes for the slot budget. With
    ``snapshots=0`` every step is rebuilt from state 0 (T(T+1)/2 passes).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: allowed an integer >= 1")
    if isinstance(snapshots, bool) or not isinstance(snapshots, int) or snapshots < 0:
        raise ValueError(f"snapshots={snapshots!r} is invalid: allowed an integer >= 0")
    plan: list[tuple[str, int]] = []

    def walk(start: int, end: int, slots: int) -> None:
        rightmost = last_kept and end == steps
        _, m = _revolve_cost(end - start, slots, rightmost)
        if m == 0:  # rebuild each step from the start state
            for t in reversed(range(start, end)):
                if t != end - 1:
                    plan.append(("restore", start))
                plan.extend(("advance", k) for k in range(start, t))
                plan.append(("reverse", t))
            return
        plan.extend(("advance", k) for k in range(start, start + m))
        plan.append(("store", start + m))
        walk(start + m, end, slots - 1)
        plan.append(("drop", start + m))
        plan.append(("restore", start))
        walk(start, start + m, slots)

    walk(0, steps, snapshots)
    return plan


def plan_passes(plan: Sequence[tuple[str, int]], *, last_kept: bool = False) -> int:
    """First-order passes a :func:`revolve_plan` costs (advances and reverse steps; the kept last step is free)."""
    steps = max(k for op, k in plan if op == "reverse") + 1
    return sum(1 for op, k in plan if op == "advance" or (op == "reverse" and not (last_kept and k == steps - 1)))


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


def _replay_hvp(problem: InnerProblem, params, t, g_bar, targets_w, kept=None):
    """Σ_c of (∂∇_p L_c / ∂(p, φ))ᵀ ḡ, one micro-batch graph alive at a time (``kept``: a one-item
    list holding the last micro-batch's graph from the forward, used -- and released -- instead of
    replaying it)."""
    hvp_p = [torch.zeros_like(p) for p in params]
    hvp_w = [torch.zeros_like(w) for w in targets_w]
    last = len(problem.micro_batches) - 1
    order = list(range(len(problem.micro_batches)))
    if kept is not None:  # the kept graph first, so that it is freed before any replay builds one
        order = [last] + order[:-1]
    for k in order:
        mb = problem.micro_batches[k]
        with torch.enable_grad():
            if kept is not None and k == last:
                leaves, g = kept.pop()
                loss = None
            else:
                leaves = [p.detach().requires_grad_(True) for p in params]
                loss = problem.loss(leaves, mb, t, True)
                g = torch.autograd.grad(loss, leaves, create_graph=True)
            out = torch.autograd.grad(g, leaves + list(targets_w), g_bar, allow_unused=True)
        for i, v in enumerate(out[: len(leaves)]):
            if v is not None:
                hvp_p[i] += v
        for i, v in enumerate(out[len(leaves) :]):
            if v is not None:
                hvp_w[i] += v
        del loss, g, out, leaves
    return hvp_p, hvp_w
