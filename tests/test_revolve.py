"""The binomial (revolve) schedule of ``meta_grad='recomputed'``: every plan is valid (each state it
uses is the one it claims, no more than ``snapshots`` states held), its pass count is Griewank's
optimum, the engine performs exactly those passes, and the meta-gradients do not depend on it."""
from __future__ import annotations

from math import comb

import pytest
import torch

from perk_fast import PerkConfig, PerkModel
from perk_fast.engine import InnerProblem, adapt, plan_passes, revolve_plan
from perk_fast.inner import InnerOptimizer

from tiny_models import ANSWERS, CONTEXTS, QUESTIONS, TOKENIZER, flat_grads, perturb_lora_b, tiny_gpt2


def simulate(plan, steps, snapshots):
    """Run a plan on state indices; returns (reverse order, most states held at once)."""
    current, stack, reversed_steps, held = 0, [], [], 0
    for op, k in plan:
        if op == "advance":
            assert current == k, (op, k, current)
            current += 1
        elif op == "store":
            assert current == k, (op, k, current)
            stack.append(current)
            held = max(held, len(stack))
        elif op == "drop":
            assert stack and stack.pop() == k, (op, k, stack)
        elif op == "restore":
            current = stack[-1] if stack else 0
            assert current == k, (op, k, current)
        elif op == "reverse":
            assert current == k, (op, k, current)
            reversed_steps.append(k)
        else:
            raise AssertionError(op)
    assert not stack
    return reversed_steps, held


@pytest.mark.parametrize("last_kept", [False, True])
@pytest.mark.parametrize("snapshots", [0, 1, 2, 3, 5, 40])
def test_every_plan_reverses_each_step_once_in_order_within_its_slots(snapshots, last_kept):
    for steps in range(1, 26):
        plan = revolve_plan(steps, snapshots, last_kept=last_kept)
        order, held = simulate(plan, steps, snapshots)
        assert order == list(reversed(range(steps)))
        assert held <= snapshots


def griewank_advances(steps: int, slots: int) -> int:
    """Least forward steps to reverse ``steps`` steps with ``slots`` checkpoints, the start state among
    them (Griewank 1992): r * steps - C(slots + r, slots + 1), r the least with C(slots + r, slots) >= steps."""
    r = 0
    while comb(slots + r, slots) < steps:
        r += 1
    return r * steps - comb(slots + r, slots + 1)


@pytest.mark.parametrize("snapshots", [0, 1, 2, 3, 4, 7])
def test_pass_count_is_the_binomial_optimum(snapshots):
    for steps in range(2, 65):
        plan = revolve_plan(steps, snapshots)
        # one pass per reverse step (its gradient) plus Griewank's advances; p_0 is the extra slot
        assert plan_passes(plan) == steps + griewank_advances(steps, snapshots + 1), (steps, snapshots)
        kept = revolve_plan(steps, snapshots, last_kept=True)
        assert plan_passes(kept, last_kept=True) == plan_passes(plan) - 1


def test_pass_counts_against_the_quadratic_walk():
    assert plan_passes(revolve_plan(4, 0)) == 10  # T(T+1)/2: every step rebuilt from p_0
    assert plan_passes(revolve_plan(4, 2, last_kept=True), last_kept=True) == 6  # the floor 2T - 2
    assert plan_passes(revolve_plan(16, 0)) == 136
    assert plan_passes(revolve_plan(16, 2)) == 49
    # O(T log T) with log T slots
    for steps in (16, 64, 256):
        slots = steps.bit_length() - 1
        assert plan_passes(revolve_plan(steps, slots)) <= steps * slots, steps


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        revolve_plan(0, 1)
    with pytest.raises(ValueError, match="snapshots=-1 is invalid"):
        revolve_plan(3, -1)
    with pytest.raises(ValueError, match="recompute_snapshots=-1 is invalid"):
        PerkConfig(recompute_snapshots=-1)
    with pytest.raises(ValueError, match="recompute_snapshots=1.5 is invalid"):
        PerkConfig(recompute_snapshots=1.5)


# ------------------------------------------------------------------ the engine follows the plan
def _counting_problem(steps, second_order):
    """A two-micro-batch problem whose loss counts its first-order calls."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    init = [torch.randn(3, 4, dtype=torch.float64, generator=gen).requires_grad_(True)]
    lrs = torch.full((1, steps), 0.05, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_(True)
    calls = {"first": 0, "second": 0}

    class MB:
        def __init__(self, index):
            self.index = index

    def loss(adapters, mb, step, second):
        calls["second" if second else "first"] += 1
        diff = adapters[0] - target[mb.index]
        return (weight * diff**2 * (1 + 0.1 * step)).sum() + 0.05 * (adapters[0] ** 4).sum()

    problem = InnerProblem(loss=loss, micro_batches=[MB(0), MB(1)], init=init, n_contexts=2, lrs=lrs,
                           optimizer=InnerOptimizer(PerkConfig(inner_steps=steps, unroll="full")), second_order=second_order,
                           weights=[weight])
    return problem, calls, [init[0], lrs, weight]


@pytest.mark.parametrize("pattern", ["truncated", "first_order"])
@pytest.mark.parametrize("snapshots", [0, 1, 2, 5])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_engine_performs_the_planned_passes_and_the_same_meta_gradient(steps, snapshots, pattern):
    # truncated: step 0 first order (when T > 1); first_order: no step differentiated, nothing kept
    second = [pattern == "truncated" and (t >= 1 or steps == 1) for t in range(steps)]
    ref_problem, _, ref_leaves = _counting_problem(steps, second)
    reference = torch.autograd.grad(adapt(ref_problem, "checkpointed").adapters[0].pow(2).sum(), ref_leaves)
    problem, calls, leaves = _counting_problem(steps, second)
    out = adapt(problem, "recomputed", snapshots=snapshots).adapters[0].pow(2).sum()
    forward_first = calls["first"]
    grads = torch.autograd.grad(out, leaves)
    n_mb = 2
    kept = second[-1]
    # forward: every micro-batch first order, except the last step's last one (kept with its graph)
    assert forward_first == steps * n_mb - (1 if kept else 0)
    backward_first = calls["first"] - forward_first
    assert backward_first == n_mb * plan_passes(revolve_plan(steps, snapshots, last_kept=kept), last_kept=kept)
    for a, b in zip(grads, reference):
        assert torch.equal(a, b)  # the schedule changes the cost, never the values


def test_recomputed_snapshots_leave_model_meta_gradients_unchanged():
    grads = {}
    for meta_grad, snapshots in (("checkpointed", 2), ("recomputed", 0), ("recomputed", 1), ("recomputed", 3)):
        pm = PerkModel(tiny_gpt2(dtype=torch.float64), TOKENIZER, PerkConfig(
            inner_steps=5, inner_lr=1e-2, segment_len=24, segments_per_step=2, lora_rank=4, lora_alpha=8.0,
            unroll="full", lm_head_loss="full", meta_grad=meta_grad, recompute_snapshots=snapshots))
        perturb_lora_b(pm)
        pm.train()
        loss = pm.meta_loss(CONTEXTS, QUESTIONS, ANSWERS, seed=5)
        grads[(meta_grad, snapshots)] = flat_grads(loss, list(pm.meta_parameters()))
    reference = grads.pop(("checkpointed", 2))
    for key, g in grads.items():
        assert all(torch.equal(a, b) for a, b in zip(g, reference)), key
