"""The shipped demo: assets present and small, models load, the demo runs end to end, shipped numbers
are reproduced. Missing assets fail these tests (they are part of the package), never skip them."""
from __future__ import annotations

import json
import os

import torch

from perk_fast import demo
from perk_fast.demo_train import ASSETS_DIR, DemoRecipe, task_examples
from perk_fast.evaluate import evaluate
from perk_fast.model import model_fingerprint
from perk_fast.tasks import generate


def _report() -> dict:
    with open(os.path.join(ASSETS_DIR, "train_report.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_assets_present_and_small():
    missing = [p for p in demo._REQUIRED if not os.path.exists(os.path.join(ASSETS_DIR, p))]
    assert not missing, f"demo assets missing in {ASSETS_DIR}: {missing} (python -m perk_fast.demo_train)"
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ASSETS_DIR) for f in files)
    assert total < 8 * 2**20, f"demo assets take {total / 2**20:.1f} MiB"


def test_report_records_recipe_times_and_numbers():
    report = _report()
    recipe = report["recipe"]
    assert DemoRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()}).perk_config()
    assert report["times_s"]["train_total_s"] > 0
    results = report["eval"]["results"]
    assert set(results) == {"PERK", "TTT (no meta)", "FT-ICR", "FT-ICR 10x"}
    for system in results.values():
        for length in map(str, recipe["eval_lengths"]):
            for pos in recipe["eval_positions"]:
                cell = system[length][pos]
                assert cell["n"] == recipe["eval_n"] and 0.0 <= cell["exact_match"] <= 1.0


def test_demo_models_load_and_match_their_bases():
    d = demo.load_demo()
    assert d.perk.config.inner_steps == d.recipe.perk["inner_steps"]
    # the PERK base is the jointly meta-trained one; TTT and FT-ICR start from other weights
    assert model_fingerprint(d.perk.hf_model) != model_fingerprint(d.ttt.hf_model)
    assert all(torch.count_nonzero(b) == 0 for b in d.ttt.lora_B)
    assert not any(p.requires_grad for p in d.icr.parameters())
    assert model_fingerprint(d.icr) != model_fingerprint(d.icr_long)


def test_shipped_predictions_are_reproduced():
    """Re-run PERK on the first held-out examples of one cell: same predictions as the shipped files."""
    d = demo.load_demo()
    report = _report()
    length = report["recipe"]["eval_lengths"][-1]
    path = os.path.join(ASSETS_DIR, "eval", "PERK", f"L{length}_mid", "predictions.jsonl")
    with open(path, encoding="utf-8") as fh:
        shipped = [json.loads(line) for line in fh][:3]
    data = generate(d.recipe.task, 3, seed=report["eval"]["seed"], context_tokens=length, position="mid",
                    doc_tokens=d.recipe.doc_tokens)
    out = evaluate(d.perk, data, max_new_tokens=8, progress=False)
    assert out["predictions"] == [r["prediction"] for r in shipped]


def test_training_data_never_overlaps_evaluation_seeds():
    recipe = DemoRecipe()
    train = task_examples(recipe, 64, "demo-train")
    held = generate(recipe.task, 64, seed=_report()["eval"]["seed"], context_tokens=recipe.train_len,
                    position="mid", doc_tokens=recipe.doc_tokens)
    assert not {" ".join(e.context) for e in train} & {" ".join(e.context) for e in held}


def test_demo_main_runs_end_to_end(capsys):
    out = demo.main(2, threads=torch.get_num_threads())
    printed = capsys.readouterr().out
    for name in ("PERK", "TTT (no meta)", "FT-ICR", "FT-ICR 10x"):
        assert name in printed
    assert "n=2" in printed
    assert out["memory"]["identical"] is True
    assert len(out["memory"]["answers"]) >= 2
    assert set(out["results"]) == {"PERK", "TTT (no meta)", "FT-ICR", "FT-ICR 10x"}
