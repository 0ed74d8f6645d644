"""bench/demo_probe.py: the facts it cuts prompts from, the prompts themselves, the inner-step
extension, and a small end-to-end run on the needles-only demo model (the last run of the binding
chain, shipped before the mix chain: its writer is the one that weights a needle's code)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from perk_fast.demo_train import CHAINS, load_run, task_spec
from perk_fast.tasks import generate

ASSETS_DIR = CHAINS["binding"][-1].recorded  # bench/results/demo_curriculum4/assets
_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "demo_probe.py")
_spec = importlib.util.spec_from_file_location("demo_probe", _PATH)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _examples(spec: str, n: int = 6, length: int = 256):
    task, kw = task_spec(spec)
    if task == "qa1":
        kw["with_support"] = True
    return task, generate(task, n, seed=f"test-probe/{spec}", context_tokens=length, doc_tokens=64, **kw)


@pytest.mark.parametrize("spec", ["needle:3", "qa1", "records_recall"])
def test_the_fact_prefix_is_the_answers_own_fact_in_the_context(spec):
    task, examples = _examples(spec)
    for ex in examples:
        prefix = probe.fact_prefix(task, ex)
        assert prefix and any(prefix + ex.answer in doc for doc in ex.context)
        if task == "qa1":  # the asked (last) move of the person
            assert ex.support[-1] == prefix + ex.answer + "."
        if task == "needle":
            assert prefix.endswith(f"code of {ex.question[len('What is the secret code of '):-1]} is ")
        if task == "records_recall":
            sid = ex.question.split("student ")[1].rstrip("?").split()[0]
            assert prefix.startswith(f"Student <{sid}>")


def test_a_context_without_the_fact_and_an_unknown_task_are_refused():
    task, examples = _examples("needle:0", n=1)
    ex = examples[0]
    gone = type(ex)(context=["Nothing to see here."], question=ex.question, answer=ex.answer, meta=ex.meta)
    with pytest.raises(ValueError, match="not in its context"):
        probe.fact_prefix(task, gone)
    with pytest.raises(ValueError, match="task 'records_aggregate' is invalid"):
        probe.fact_prefix("records_aggregate", ex)
    _, qa = _examples("qa1", n=1)
    no_support = type(ex)(context=qa[0].context, question=qa[0].question, answer=qa[0].answer, meta=qa[0].meta)
    with pytest.raises(ValueError, match="with_support=True"):
        probe.fact_prefix("qa1", no_support)


@pytest.fixture(scope="module")
def binding():
    torch.manual_seed(0)
    return load_run(ASSETS_DIR)


@pytest.mark.parametrize("spec", ["needle:3", "qa1", "records_recall"])
def test_the_in_place_prompt_is_a_segment_cut_before_the_answer(binding, spec):
    perk, tok = binding["perk"], binding["tokenizer"]
    task, examples = _examples(spec, n=4, length=512)  # documents split over segments
    for ex in examples:
        prefix = probe.fact_prefix(task, ex)
        prompt = probe.in_place_prompt(perk, ex, prefix)
        segments = [list(ids) for ids, _ in perk.segment_contexts([ex.context], rng=None)[0].segments]
        holder = [s for s in segments if s[: len(prompt)] == prompt]
        assert holder, "the prompt is not the head of any segment"
        rest = tok.decode(holder[-1][len(prompt):], skip_special_tokens=True)
        assert rest.startswith(ex.answer)
        assert tok.decode(prompt, skip_special_tokens=True).startswith("doc_")
        assert tok.decode(prompt, skip_special_tokens=True).endswith(prefix)


def test_more_inner_steps_repeat_the_last_learned_rates(binding):
    perk = binding["perk"]
    T = perk.config.inner_steps
    assert probe.with_inner_steps(perk, T, None) is perk
    base = probe.load_base(os.path.join(ASSETS_DIR, "perk", "base"))
    longer = probe.with_inner_steps(perk, T + 3, base)
    assert longer.config.inner_steps == T + 3 and longer.hf_model is base
    torch.testing.assert_close(longer.inner_lrs[:, :T], perk.inner_lrs, atol=0, rtol=0)
    for k in range(T, T + 3):
        torch.testing.assert_close(longer.inner_lrs[:, k], perk.inner_lrs[:, T - 1], atol=0, rtol=0)
    mine, theirs = dict(longer.named_meta_parameters()), dict(perk.named_meta_parameters())
    for name in theirs:
        if name != "inner_lrs":
            torch.testing.assert_close(mine[name], theirs[name], atol=0, rtol=0)
    shorter = probe.with_inner_steps(perk, 2, probe.load_base(os.path.join(ASSETS_DIR, "perk", "base")))
    torch.testing.assert_close(shorter.inner_lrs, perk.inner_lrs[:, :2], atol=0, rtol=0)


def test_the_probe_runs_end_to_end_and_reads_the_binding_models_needle_memory(tmp_path, capsys):
    out = tmp_path / "probe.json"
    report = probe.main(["--assets", ASSETS_DIR, "--tasks", "needle:3", "-n", "8", "--inner-steps", "4",
                         "--ttt", "8x2", "--threads", str(torch.get_num_threads()), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "PERK memory: needle:3 answers" in printed.splitlines()[-1]
    saved = json.loads(out.read_text())
    assert saved["results"].keys() == {"needle:3"}
    rows = saved["results"]["needle:3"]
    assert list(rows) == ["PERK", "TTT rank 8, 2 steps", "no memory"]
    # the binding model answers needles among 3 others (95-97 % held out) and its memory holds
    # the code where it read it; without a memory nothing comes back
    assert rows["PERK"]["answer"] >= 0.75 and rows["PERK"]["in_place"] >= 0.75
    assert rows["no memory"]["answer"] == 0 and rows["no memory"]["in_place"] == 0
    assert rows["PERK"]["weights"]["n"] == 8 and "PERK writer weight" in printed
    # only other inner-step counts than the run's: the last line sums up the first of them
    other = probe.main(["--assets", ASSETS_DIR, "--tasks", "needle:3", "-n", "2", "--inner-steps", "2",
                        "--ttt", "", "--threads", str(torch.get_num_threads()), "--out", str(tmp_path / "p2.json")])
    assert list(other["results"]["needle:3"]) == ["PERK, 2 inner steps", "no memory"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("PERK, 2 inner steps memory: needle:3 answers")
    with pytest.raises(SystemExit, match="demo's own seeds"):
        probe.main(["--seed", "demo-eval", "--out", str(out)])
    with pytest.raises(SystemExit, match="--ttt item '16' is invalid"):
        probe.main(["--assets", ASSETS_DIR, "--ttt", "16", "--out", str(out)])
    with pytest.raises(SystemExit, match="-n 0 is invalid"):
        probe.main(["-n", "0", "--out", str(out)])


def test_the_writer_weights_the_needles_code_and_a_reset_writer_weights_every_token_alike(binding):
    import math

    from perk_fast.demo_train import reset_meta_parameters

    perk = binding["perk"]
    task, examples = _examples("needle:3", n=5, length=512)
    prefixes = [probe.fact_prefix(task, ex) for ex in examples]
    w = probe.token_weights(perk, examples, prefixes)
    assert w["n"] == 5
    # the binding model was meta-trained on needles only: its writer puts the code far above the rest
    assert w["answer"] > 3 * w["other"], w
    saved = {k: v.detach().clone() for k, v in perk.weighting.state_dict().items()}
    try:
        reset_meta_parameters(perk, ["weighting"])
        flat = probe.token_weights(perk, examples, prefixes)
        assert flat["answer"] == pytest.approx(math.log(2) / 3, rel=1e-6)
        assert flat["other"] == pytest.approx(math.log(2) / 3, rel=1e-6)
    finally:
        perk.weighting.load_state_dict(saved)
    bad = [p + "x" for p in prefixes[:1]]
    with pytest.raises(ValueError, match="not in its segments"):
        probe.token_weights(perk, examples[:1], bad)


def test_an_answer_cut_by_the_segment_end_counts_its_tokens_inside_and_one_outside_is_skipped(binding, monkeypatch):
    perk = binding["perk"]
    task, examples = _examples("needle:3", n=2, length=512)
    prefixes = [probe.fact_prefix(task, ex) for ex in examples]
    real = probe.fact_segment
    whole = probe.token_weights(perk, examples, prefixes)
    assert whole["skipped"] == 0

    def cut(keep):
        def segment(model, ex, prefix):
            ids, end = real(model, ex, prefix)
            return ids[: end + keep], end
        return segment

    monkeypatch.setattr(probe, "fact_segment", cut(2))  # the first two digits of the code inside
    part = probe.token_weights(perk, examples, prefixes)
    assert part["n"] == 2 and part["skipped"] == 0 and part["answer"] != whole["answer"]
    monkeypatch.setattr(probe, "fact_segment", cut(0))  # the code wholly in the next segment
    with pytest.raises(ValueError, match="no example has an answer token"):
        probe.token_weights(perk, examples, prefixes)
