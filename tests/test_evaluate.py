"""perk_fast.evaluate: answer cutting, scoring wiring, files written, baselines, sweeps (tiny random models)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from perk_fast import PerkConfig, PerkModel
from perk_fast.data import IGNORE, query_target
from perk_fast.evaluate import (
    cut_answer,
    evaluate,
    evaluate_in_context,
    finetune_in_context,
    in_context_batch,
    in_context_prompt,
    sweep,
)
from perk_fast.metrics import exact_match, f1_score
from perk_fast.tasks import Example, generate

from tiny_models import TOKENIZER, tiny_llama

SMALL = PerkConfig(inner_steps=2, inner_lr=1e-3, segment_len=48, lora_rank=4, seed=3)


def _perk(seed: int = 0) -> PerkModel:
    return PerkModel(tiny_llama(seed=seed), TOKENIZER, SMALL)


def _needles(n: int = 3, tokens: int = 96, **kw):
    return generate("needle", n, seed="test-evaluate", context_tokens=tokens, doc_tokens=40, **kw)


@pytest.mark.parametrize(
    "raw, cut",
    [
        ("1234", "1234"),
        ("  1234  \nYou have memorized 2 documents.", "1234"),
        ("kitchen\n\ngarden", "kitchen"),
        ("<support>Mary went to the kitchen.</support>\n<output>kitchen</output>\nmore", 
         "<support>Mary went to the kitchen.</support>\n<output>kitchen</output>"),
        ("<output>kitchen", "<output>kitchen"),
        ("", ""),
    ],
    ids=["plain", "newline", "blank-line", "support-spans-lines", "unclosed-output", "empty"],
)
def test_cut_answer(raw, cut):
    assert cut_answer(raw) == cut


def test_in_context_prompt_lists_documents_then_question():
    prompt = in_context_prompt(["a b.", "c d."], "What?")
    assert prompt == "doc_0: a b.\ndoc_1: c d.\nWhat?\nAnswer:"
    assert in_context_prompt("one doc.", "Q?") == "doc_0: one doc.\nQ?\nAnswer:"


def test_evaluate_writes_files_and_scores_consistently(tmp_path):
    pm = _perk()
    data = _needles(3)
    out = evaluate(pm, data, batch_size=2, max_new_tokens=6, out_dir=tmp_path, progress=False)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    for rec, ex in zip(records, data):
        assert rec["question"] == ex.question and rec["gold"] == ex.answer
        assert rec["prediction"] == cut_answer(rec["raw"])
        assert rec["exact_match"] == exact_match(rec["prediction"], ex.answer)
        assert rec["f1"] == f1_score(rec["prediction"], ex.answer)
        assert rec["meta"]["task"] == "needle"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n"] == 3 and summary["system"] == "perk"
    assert math.isclose(summary["exact_match"], sum(r["exact_match"] for r in records) / 3)
    assert math.isclose(summary["f1"], sum(r["f1"] for r in records) / 3)
    assert out["predictions"] == [r["prediction"] for r in records]
    assert out["exact_match"] == summary["exact_match"]


def test_evaluate_scores_through_metrics(monkeypatch):
    """Known generations: EM / F1 after cutting and <output> extraction, gold with support facts."""
    pm = _perk()
    data = [
        Example(["The secret code of Mary is 1234."], "What is the secret code of Mary?", "1234"),
        Example(["The secret code of Tom is 99."], "What is the secret code of Tom?", "99"),
        Example(["Mary went to the kitchen."], "Where is Mary?", "kitchen", support=["Mary went to the kitchen."]),
        Example(["Bill is red."], "What colour is Bill?", "the red one"),
    ]
    generations = iter([
        "1234\nYou have memorized",  # cut at the newline: exact
        "98",  # wrong
        "<support>whatever</support>\n<output>Kitchen.</output>\ntrailing",  # <output> extraction, normalised
        "red two",  # partial: EM 0, F1 from tokens {red, one} vs {red, two}
    ])
    monkeypatch.setattr(pm, "generate", lambda memory, questions, max_new_tokens=32: [next(generations) for _ in questions])
    out = evaluate(pm, data, batch_size=2, progress=False)
    assert out["predictions"][0] == "1234"
    assert query_target(data[2].answer, data[2].support).endswith("<output>kitchen</output>")
    assert out["exact_match"] == pytest.approx(2 / 4)
    assert out["f1"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)


def test_evaluate_rejects_bad_arguments():
    pm = _perk()
    with pytest.raises(TypeError, match="PerkModel"):
        evaluate(object(), _needles(1), progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(pm, [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(pm, _needles(1), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="answer"):
        evaluate(pm, [{"context": "x y.", "question": "q?"}], progress=False)


def test_evaluate_in_context_left_padding_matches_single_rows(tmp_path):
    model = tiny_llama(seed=1)
    data = _needles(3, tokens=64) + _needles(1, tokens=120)
    batched = evaluate_in_context(model, TOKENIZER, data, batch_size=4, max_new_tokens=5, out_dir=tmp_path,
                                  progress=False)
    single = [evaluate_in_context(model, TOKENIZER, [ex], batch_size=1, max_new_tokens=5, progress=False)
              for ex in data]
    raw = [json.loads(line)["raw"] for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert batched["predictions"] == [s["predictions"][0] for s in single]
    assert all(isinstance(r, str) for r in raw)
    assert json.loads((tmp_path / "summary.json").read_text())["system"] == "in_context"


def test_in_context_batch_labels_only_the_target():
    data = _needles(2)
    ids, labels = in_context_batch(TOKENIZER, [{"context": e.context, "question": e.question, "answer": e.answer,
                                                "support": None} for e in data])
    for row_ids, row_labels, ex in zip(ids.tolist(), labels.tolist(), data):
        target = [t for t in row_labels if t != IGNORE]
        assert TOKENIZER.decode(target) == " " + ex.answer + TOKENIZER.eos_token
        prompt_len = len(TOKENIZER.encode(in_context_prompt(ex.context, ex.question)))
        assert row_ids[prompt_len : prompt_len + len(target)] == target


def test_finetune_in_context_learns():
    torch.manual_seed(0)
    model = tiny_llama(seed=2)
    data = _needles(4, tokens=48)
    history = finetune_in_context(model, TOKENIZER, data, epochs=40, batch_size=4, lr=1e-2, progress=False)
    assert len(history) == 40
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert not model.training


def test_sweep_table_files_and_shared_data(tmp_path):
    pm = _perk()
    icr = tiny_llama(seed=4)
    seen = []

    def spy(data, out_dir=None):
        seen.append([e.answer for e in data])
        return evaluate_in_context(icr, TOKENIZER, data, max_new_tokens=4, out_dir=out_dir, progress=False)

    report = sweep({"perk": pm, "icr": spy}, lengths=(112, 160), positions=("pre", "post"), n=2, seed="s",
                   max_new_tokens=4, out_dir=tmp_path, verbose=False, doc_tokens=40)
    assert set(report["results"]) == {"perk", "icr"}
    cell = report["results"]["perk"][160]["post"]
    assert cell["n"] == 2 and 0.0 <= cell["exact_match"] <= 1.0
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["results"]["icr"]["112"]["pre"]["n"] == 2
    assert (tmp_path / "perk" / "L112_pre" / "predictions.jsonl").exists()
    assert len(seen) == 4
    lines = report["table"].splitlines()
    assert lines[0].split() == ["system", "length", "pre", "post", "n"]
    assert len(lines) == 2 + 4


def test_fresh_perk_model_is_plain_test_time_training():
    """TTT baseline = a fresh PerkModel: B = 0, every learned rate at inner_lr, flat token weights."""
    pm = _perk()
    assert all(torch.count_nonzero(b) == 0 for b in pm.lora_B)
    assert torch.all(pm.inner_lrs == SMALL.inner_lr)
    h = torch.randn(5, tiny_llama().config.hidden_size)
    assert torch.allclose(pm.weighting(h), torch.full((5,), math.log(2) / 3))


def test_top_level_evaluate_is_the_function():
    import sys

    import perk_fast

    module = sys.modules["perk_fast.evaluate"]
    assert perk_fast.evaluate is module.evaluate and callable(perk_fast.evaluate)
    assert perk_fast.sweep is module.sweep and perk_fast.evaluate_in_context is module.evaluate_in_context
