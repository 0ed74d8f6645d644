"""The seams the layering introduced: the engine's explicit inner problem, meta_train's parameter
groups, one schedule, one seed module, one left-padding, plotting without matplotlib."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from perk_fast import PerkConfig, PerkModel, meta_train
from perk_fast.data import left_pad
from perk_fast.engine import InnerProblem, adapt, run_inner_loop
from perk_fast.inner import InnerOptimizer
from perk_fast.schedule import warmup_cosine, warmup_steps
from perk_fast.seeds import call_seed, epoch_order, pass_seed, site_seed

from tiny_models import ANSWERS, CONTEXTS, QUESTIONS, TOKENIZER, perturb_lora_b, tiny_gpt2


def _pm(**cfg):
    base = dict(inner_steps=2, inner_lr=1e-2, segment_len=24, segments_per_step=2, lora_rank=4, lora_alpha=8.0,
                unroll="full", lm_head_loss="full", outer_lr=1e-3)
    base.update(cfg)
    return PerkModel(tiny_gpt2(dtype=torch.float64), TOKENIZER, PerkConfig(**base))


# ------------------------------------------------------------------ engine
def test_engine_runs_on_a_problem_without_any_model():
    """A quadratic inner loss: the engine needs only tensors and a loss function."""
    target = torch.randn(3, 4, dtype=torch.float64)
    init = [torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)]
    lrs = torch.full((1, 3), 0.1, dtype=torch.float64, requires_grad=True)
    cfg = PerkConfig(inner_optimizer="sgd", inner_weight_decay=0.0, inner_steps=3)

    class MB:
        index = 0

    def loss(adapters, mb, step, second_order):
        return ((adapters[0] - target) ** 2).sum()

    problem = InnerProblem(loss=loss, micro_batches=[MB()], init=init, n_contexts=2, lrs=lrs,
                           optimizer=InnerOptimizer(cfg), second_order=[True] * 3)
    results = {s: adapt(problem, s) for s in ("unrolled", "checkpointed", "recomputed")}
    # SGD on (p - t)^2: p_k = t (1 - (1 - 0.2)^k)
    expected = target * (1 - 0.8**3)
    for r in results.values():
        torch.testing.assert_close(r.adapters[0], expected.expand(2, 3, 4), rtol=1e-12, atol=1e-12)
        assert len(r.losses) == 3
    grads = {s: torch.autograd.grad(r.adapters[0].sum(), [init[0], lrs]) for s, r in results.items()}
    for s in ("checkpointed", "recomputed"):
        for a, b in zip(grads[s], grads["unrolled"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    no_graph = run_inner_loop(problem, differentiable=False)
    assert not no_graph.adapters[0].requires_grad


def test_inner_losses_come_back_from_the_engine_for_every_strategy():
    for strategy in ("unrolled", "checkpointed", "recomputed"):
        pm = _pm(meta_grad=strategy)
        perturb_lora_b(pm)
        loss = pm.meta_loss(CONTEXTS[:2], QUESTIONS[:2], ANSWERS[:2], seed=1)
        first = pm.last_inner_losses
        loss.backward()  # the backward's replays must not change what the forward recorded
        assert pm.last_inner_losses == first and len(first) == 2 and first[1] < first[0]


# ------------------------------------------------------------------ meta_train parameter groups
def _data(n=4):
    return [{"context": [f"item {i} is red.", "filler."], "question": f"item {i}?", "answer": "red"}
            for i in range(n)]


def test_default_group_is_every_meta_parameter_at_outer_lr():
    a, b = _pm(), _pm()
    h1 = meta_train(a, _data(), steps=2, batch_size=2, progress=False)
    h2 = meta_train(b, _data(), steps=2, batch_size=2, progress=False, param_groups=[{"params": "meta"}])
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    for p, q in zip(a.meta_parameters(), b.meta_parameters()):
        assert torch.equal(p, q)


def test_groups_have_their_own_learning_rates_and_the_base_is_refrozen():
    pm = _pm()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    groups = [{"params": ["lora", "weighting"], "lr": 1e-3}, {"params": "inner_lrs", "lr": 0.0},
              {"params": "base", "lr": 1e-3, "weight_decay": 0.0}]
    history = meta_train(pm, _data(), steps=2, batch_size=2, progress=False, param_groups=groups, shuffle=False)
    assert len(history) == 2
    assert torch.equal(pm.inner_lrs, before["inner_lrs"])  # lr 0: untouched
    assert not torch.equal(pm.lora_A[0], before["lora_A.0"])
    changed = [n for n, p in pm.hf_model.named_parameters() if not torch.equal(p, before["hf_model." + n])]
    assert changed, "the base group did not train the base"
    assert not any(p.requires_grad for p in pm.hf_model.parameters())


def test_trained_base_is_checkpointed_and_resumes_exactly(tmp_path):
    groups = [{"params": "meta"}, {"params": "base", "lr": 1e-3}]
    full = _pm()
    meta_train(full, _data(), steps=3, batch_size=2, progress=False, param_groups=groups)

    def stop(model, step):
        raise KeyboardInterrupt

    broken = _pm()
    with pytest.raises(KeyboardInterrupt):
        meta_train(broken, _data(), steps=3, batch_size=2, progress=False, param_groups=groups,
                   checkpoint_dir=str(tmp_path), eval_fn=stop, eval_every=2)
    resumed = _pm()
    meta_train(resumed, _data(), steps=3, batch_size=2, progress=False, param_groups=groups,
               checkpoint_dir=str(tmp_path), resume=True)
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_shuffle_false_visits_the_dataset_in_order():
    seen = []
    pm = _pm()
    original = pm.meta_loss

    def spy(contexts, *args, **kwargs):
        seen.append([c[0] for c in contexts])
        return original(contexts, *args, **kwargs)

    pm.meta_loss = spy
    meta_train(pm, _data(4), steps=2, batch_size=2, progress=False, shuffle=False)
    assert seen == [["item 0 is red.", "item 1 is red."], ["item 2 is red.", "item 3 is red."]]


@pytest.mark.parametrize("groups, match", [
    ([{"params": "everything"}], "names 'everything'"),
    ([{"params": "meta"}, {"params": "lora"}], "appears in two groups"),
    ([{"params": "meta", "momentum": 0.9}], r"unknown keys \['momentum'\]"),
    ([{"lr": 1e-3}], "with 'params'"),
    ([], "non-empty list"),
    ([{"params": [torch.nn.Parameter(torch.zeros(2))]}], "nor a parameter of this PerkModel"),
])
def test_bad_parameter_groups_are_named(groups, match):
    with pytest.raises(ValueError, match=match):
        meta_train(_pm(), _data(), steps=1, progress=False, param_groups=groups)


def test_on_step_sees_every_record():
    got = []
    meta_train(_pm(), _data(), steps=3, batch_size=2, progress=False, on_step=got.append)
    assert [r["step"] for r in got] == [1, 2, 3]


# ------------------------------------------------------------------ one schedule, one seed module, one padding
def test_schedule_warms_up_then_decays_to_zero():
    total, warmup = 10, warmup_steps(10, 0.2)
    factors = [warmup_cosine(s, total, warmup) for s in range(total)]
    assert warmup == 2 and factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert warmup_cosine(0, 5, 0) == 1.0


def test_seeds_are_pure_functions():
    assert call_seed(42, 3) == 42 * 1_000_003 + 3
    assert pass_seed(7, 1, 2) == pass_seed(7, 1, 2) != pass_seed(7, 1, 3)
    assert pass_seed(7, "outer") != pass_seed(7, 0)
    assert site_seed(5, 1) != site_seed(5, 2) and 0 <= site_seed(2**62, 9) < 2**63 - 1
    assert sorted(epoch_order(10, 1, 0)) == list(range(10)) and epoch_order(10, 1, 0) != epoch_order(10, 1, 1)


def test_left_pad_aligns_the_ends():
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ------------------------------------------------------------------ plotting is optional
def test_sweep_without_matplotlib_writes_table_and_json_and_says_so(tmp_path, monkeypatch):
    from perk_fast import sweep
    from perk_fast.evaluate import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(plots, "plotting_available", lambda: False)
    from perk_fast.evaluate import sweeps

    monkeypatch.setattr(sweeps, "plotting_available", lambda: False)
    pm = PerkModel(tiny_gpt2(), TOKENIZER, PerkConfig(inner_steps=2, segment_len=48, lora_rank=2))
    with pytest.warns(UserWarning, match=r'perk_fast\[plot\]'):
        report = sweep({"PERK": pm}, lengths=[192], positions=["mid"], n=1, out_dir=str(tmp_path), verbose=False,
                       max_new_tokens=2, doc_tokens=40)
    assert (tmp_path / "sweep.json").exists() and not (tmp_path / "sweep.png").exists()
    assert "PERK" in report["table"]
    with pytest.raises(ImportError, match=r'perk_fast\[plot\]'):
        sweep({"PERK": pm}, lengths=[192], positions=["mid"], n=1, out_dir=str(tmp_path), verbose=False,
              max_new_tokens=2, plot=True, doc_tokens=40)
    with pytest.raises(ValueError, match="plot='yes'"):
        sweep({"PERK": pm}, lengths=[192], n=1, plot="yes")
