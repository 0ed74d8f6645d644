"""The gradient-spike guard of meta_train (PerkConfig.grad_spike_factor): what it judges, that a skipped
step leaves every weight and the optimiser state as they were, that it changes nothing when no step
spikes, the error after too many skips in a row, and an exact resume across a skip. (Its decision on
2 gloo ranks: tests/test_distributed.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from perk_fast import PerkConfig, meta_train
from perk_fast.seeds import call_seed
from perk_fast.train import SpikeGuard

import dist_worker


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("value", [1.0, 0.5, -3.0, math.inf, math.nan, True, "10"])
def test_bad_spike_factor_is_named(value):
    with pytest.raises(ValueError, match=r"grad_spike_factor=.* is invalid: allowed None \(the guard off\)"):
        PerkConfig(grad_spike_factor=value)


@pytest.mark.parametrize("field", ["grad_spike_window", "grad_spike_max_skips"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_spike_window_and_skips_are_named(field, value):
    with pytest.raises(ValueError, match=rf"PerkConfig.{field}={value!r} is invalid"):
        PerkConfig(**{field: value})


def test_spike_guard_is_off_by_default_and_round_trips():
    assert PerkConfig().grad_spike_factor is None
    cfg = PerkConfig(grad_spike_factor=8, grad_spike_window=3, grad_spike_max_skips=2)
    assert PerkConfig.from_dict(cfg.to_dict()) == cfg
    # a config saved before the fields existed reads as the guard off
    old = {k: v for k, v in PerkConfig().to_dict().items() if not k.startswith("grad_spike")}
    assert PerkConfig.from_dict(old) == PerkConfig()


# ------------------------------------------------------------------------------------------ the rule
def test_guard_judges_against_the_median_of_applied_steps():
    g = SpikeGuard(factor=4.0, window=3, max_skips=5)
    assert g.limit() is None
    assert [g.judge(s, n) for s, n in enumerate([100.0, 1.0, 2.0], 1)] == [False] * 3  # the window fills first
    assert g.limit() == 8.0  # 4 x median(100, 1, 2)
    assert g.judge(4, 8.5) is True and g.norms == [100.0, 1.0, 2.0]  # a skipped norm stays out of the window
    assert g.judge(5, 8.0) is False and g.norms == [1.0, 2.0, 8.0]  # at the limit: applied
    assert g.limit() == 8.0
    assert g.judge(6, math.inf) is True and g.judge(7, math.nan) is True  # not finite: always a spike
    assert (g.in_a_row, g.total) == (2, 3)
    assert g.judge(8, 3.0) is False and g.in_a_row == 0


def test_non_finite_norm_is_skipped_while_the_window_fills():
    g = SpikeGuard(factor=4.0, window=3, max_skips=5)
    assert g.judge(1, math.nan) is True and g.limit() is None


def test_too_many_skips_in_a_row_raise_naming_the_step_and_norms():
    g = SpikeGuard(factor=2.0, window=1, max_skips=3)
    g.judge(1, 1.0)
    g.judge(2, 5.0)
    g.judge(3, 6.0)
    with pytest.raises(RuntimeError, match=r"meta_train step 4: 3 steps in a row skipped .* norm before clipping 7, "
                                           r"limit 2 = grad_spike_factor 2 x the median of the last 1"):
        g.judge(4, 7.0)


def test_guard_state_is_read_back_from_a_history():
    history = [{"grad_norm": n, "skipped": s} for n, s in [(1.0, False), (2.0, False), (50.0, True), (3.0, False),
                                                            (40.0, True), (45.0, True)]]
    g = SpikeGuard(factor=5.0, window=2, max_skips=4, history=history)
    assert (g.norms, g.in_a_row, g.total) == ([2.0, 3.0], 2, 3)
    assert g.limit() == 12.5
    plain = SpikeGuard(factor=5.0, window=2, max_skips=4, history=[{"grad_norm": 1.0}, {"grad_norm": 4.0}])
    assert plain.norms == [1.0, 4.0] and plain.in_a_row == 0  # entries of a run without the guard


# ------------------------------------------------------------------------------------------ meta_train
class _InfGrad(torch.autograd.Function):
    """Identity forward, an infinite gradient backward: a finite loss whose meta-gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


def _run(steps=4, spike_at=(), inf_at=(), fail_at=None, checkpoint_dir=None, resume=False, **config):
    """meta_train of the distributed tests' tiny fp64 model; the losses of the steps in ``spike_at`` scaled
    by 1e6, those of ``inf_at`` given an infinite gradient. Returns (model, history, the meta-parameters
    after every step)."""
    pm = dist_worker.build("checkpointed", lora_dropout=0.0, **config)
    original = pm.meta_loss
    at = {call_seed(pm.config.seed, s - 1): s for s in (*spike_at, *inf_at)}
    failed = {call_seed(pm.config.seed, fail_at - 1)} if fail_at else set()

    def meta_loss(*args, **kwargs):
        if kwargs["seed"] in failed:
            raise RuntimeError("planned failure")
        loss = original(*args, **kwargs)
        step = at.get(kwargs["seed"])
        if step in spike_at:
            loss = loss * 1e6
        elif step in inf_at:
            loss = _InfGrad.apply(loss)
        return loss

    pm.meta_loss = meta_loss
    snapshots = []
    named = [p for _, p in pm.named_meta_parameters()]

    def on_step(record):
        snapshots.append([p.detach().clone() for p in named])

    history = meta_train(pm, dist_worker.dataset(), steps=steps, batch_size=2, progress=False, on_step=on_step,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=1 if checkpoint_dir else None, resume=resume)
    return pm, history, snapshots


def test_a_skipped_step_changes_no_weight():
    _, history, snaps = _run(spike_at=(3,), grad_spike_factor=10.0, grad_spike_window=2)
    assert [h["skipped"] for h in history] == [False, False, True, False]
    assert [h["spike_limit"] for h in history][:2] == [None, None]
    assert history[2]["grad_norm"] > history[2]["spike_limit"] == 10.0 * (history[0]["grad_norm"]
                                                                           + history[1]["grad_norm"]) / 2
    assert all(torch.equal(a, b) for a, b in zip(snaps[1], snaps[2]))  # step 3: nothing moved
    assert not all(torch.equal(a, b) for a, b in zip(snaps[2], snaps[3]))  # step 4 trains again
    assert [h["lr"] for h in history] == [h["lr"] for h in _run(grad_spike_factor=10.0)[1]]  # the schedule goes on


def test_without_the_guard_the_spike_is_applied():
    _, history, snaps = _run(spike_at=(3,))
    assert "skipped" not in history[2]
    assert not all(torch.equal(a, b) for a, b in zip(snaps[1], snaps[2]))


def test_the_guard_changes_nothing_when_no_step_spikes():
    pm_on, h_on, _ = _run(grad_spike_factor=10.0, grad_spike_window=1)
    pm_off, h_off, _ = _run()
    assert not any(h["skipped"] for h in h_on)
    assert [h["loss"] for h in h_on] == [h["loss"] for h in h_off]
    for (n, a), (_, b) in zip(pm_on.named_meta_parameters(), pm_off.named_meta_parameters()):
        assert torch.equal(a, b), n


def test_an_infinite_gradient_is_skipped_with_the_guard_and_raises_without():
    _, history, snaps = _run(inf_at=(2,), grad_spike_factor=10.0, grad_spike_window=2)
    assert [h["skipped"] for h in history] == [False, True, False, False]
    assert not math.isfinite(history[1]["grad_norm"])
    assert all(torch.isfinite(p).all() for p in snaps[-1])
    with pytest.raises(FloatingPointError, match="meta_train step 2: non-finite loss or gradient"):
        _run(inf_at=(2,))


def test_skips_in_a_row_end_the_run_and_the_checkpoint_keeps_them(tmp_path):
    with pytest.raises(RuntimeError, match="meta_train step 4: 2 steps in a row skipped by the gradient-spike guard"):
        _run(steps=6, spike_at=(3, 4), checkpoint_dir=str(tmp_path), grad_spike_factor=10.0, grad_spike_window=2,
             grad_spike_max_skips=2)
    import json

    with open(tmp_path / "last" / "trainer_state.json") as fh:
        state = json.load(fh)
    assert state["step"] == 4 and [h["skipped"] for h in state["history"]] == [False, False, True, True]
    assert state["history"][-1]["spike_limit"] == state["history"][-2]["spike_limit"] is not None


def test_resume_across_a_skip_is_exact(tmp_path):
    cfg = dict(grad_spike_factor=10.0, grad_spike_window=2)
    pm_ref, h_ref, _ = _run(steps=6, spike_at=(3,), **cfg)
    with pytest.raises(RuntimeError, match="planned failure"):
        _run(steps=6, spike_at=(3,), fail_at=5, checkpoint_dir=str(tmp_path), **cfg)
    pm, history, _ = _run(steps=6, spike_at=(3,), checkpoint_dir=str(tmp_path), resume=True, **cfg)
    assert [h["skipped"] for h in history] == [h["skipped"] for h in h_ref] == [False, False, True] + [False] * 3
    assert [h["spike_limit"] for h in history] == [h["spike_limit"] for h in h_ref]
    for (n, a), (_, b) in zip(pm.named_meta_parameters(), pm_ref.named_meta_parameters()):
        assert torch.equal(a, b), n
