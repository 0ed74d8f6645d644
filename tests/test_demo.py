"""The shipped demo: assets present and small, models load, the demo runs end to end, shipped numbers
are reproduced. Missing assets fail these tests (they are part of the package), never skip them."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from perk_fast import demo
from perk_fast import demo_train
from perk_fast.demo_train import (ASSETS_DIR, CHAINS, FINAL_EVAL_N, SEEDS, SHIPPED_CHAIN, SHIPPED_EVAL_DIR, ChainStage,
                                  DemoRecipe, icr_long_name, recipe_from_dict, spec_label, task_examples, task_spec,
                                  train_chain, train_seed, training_examples)
from perk_fast.evaluate import evaluate
from perk_fast.model import model_fingerprint
from perk_fast.tasks import generate


def _report() -> dict:
    with open(os.path.join(ASSETS_DIR, "train_report.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_assets_present_and_small():
    missing = [p for p in demo_train.RUN_FILES if not os.path.exists(os.path.join(ASSETS_DIR, p))]
    assert not missing, f"demo assets missing in {ASSETS_DIR}: {missing} (python -m perk_fast.demo_train)"
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ASSETS_DIR) for f in files)
    assert total < 8 * 2**20, f"demo assets take {total / 2**20:.1f} MiB"


# the demo's default seed evaluated once with n = 100 (python -m perk_fast.demo -n 100 --out ...)
FRESH_SEED_DIR = os.path.join(os.path.dirname(SHIPPED_EVAL_DIR), "demo_fresh_seed", "curriculum15_recency")


def _systems(recipe: DemoRecipe, steps_before: dict | None = None) -> set:
    return {"PERK", "TTT (no meta)", "FT-ICR", icr_long_name(recipe, steps_before)}


def test_report_records_recipe_chain_times_and_final_numbers():
    report = _report()
    recipe = recipe_from_dict(report["recipe"])
    assert recipe.perk_config() and report["times_s"]["train_total_s"] > 0
    chain = report["chain"]
    assert chain["name"] == SHIPPED_CHAIN
    assert [st["stage"] for st in chain["stages"]] == [st.name for st in CHAINS[SHIPPED_CHAIN]]
    assert [st["meta_steps"] for st in chain["stages"]] == [st.recipe.meta_steps for st in CHAINS[SHIPPED_CHAIN]]
    assert chain["train_total_s"] == pytest.approx(sum(st["train_total_s"] for st in chain["stages"]), abs=0.5)
    assert chain["stages"][-1]["train_total_s"] == report["times_s"]["train_total_s"]
    final = report["final_eval"]
    assert final["seed"] == SEEDS["final"] and final["n"] == FINAL_EVAL_N
    assert set(final["results"]) == {spec_label(spec) for spec in recipe.tasks_for_eval()}
    for table in final["results"].values():
        assert set(table) == _systems(recipe, report["steps_before"])
        for system in table.values():
            assert set(system) == set(map(str, recipe.eval_lengths))
            for cells in system.values():
                for cell in cells.values():
                    assert cell["n"] == FINAL_EVAL_N and 0.0 <= cell["exact_match"] <= 1.0


def _checked_recorded_runs(name: str) -> list[str]:
    """The folders of chain ``name``'s recorded runs (bench/results), in order, up to the first not
    present (a run still training); each has its stage's recipe field by field, continuing the
    previous one's folder."""
    previous, checked = None, []
    for stage in CHAINS[name]:
        folder = stage.recorded
        assert folder is not None and os.path.dirname(os.path.dirname(folder)) == os.path.dirname(SHIPPED_EVAL_DIR), \
            (name, stage.name, folder)
        path = os.path.join(folder, "train_report.json")
        if not os.path.exists(path):
            break
        with open(path, encoding="utf-8") as fh:
            report = json.load(fh)
        assert demo_train._same_recipe(report, dataclasses.replace(stage.recipe, init_from=previous)), \
            (name, stage.name)
        previous = folder
        checked.append(folder)
    return checked


def test_the_shipped_chain_is_the_recorded_runs():
    """Every stage of the shipped chain has the recipe of the recorded run in bench/results (field by
    field; only the folder it continues differs), and the shipped model is the last one's."""
    stages = CHAINS[SHIPPED_CHAIN]
    recorded = _checked_recorded_runs(SHIPPED_CHAIN)
    assert len(recorded) == len(stages), recorded
    shipped = _report()
    assert demo_train._same_recipe(shipped, dataclasses.replace(stages[-1].recipe, init_from=shipped["recipe"]["init_from"]))
    from perk_fast.io import load_tensors

    for sub, name in (("perk", "meta_parameters.safetensors"), (os.path.join("perk", "base"), "model.safetensors"),
                      ("icr", "model.safetensors")):
        ours, theirs = (load_tensors(os.path.join(f, sub), name) for f in (ASSETS_DIR, recorded[-1]))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), sub


def test_every_chain_is_its_recorded_runs():
    """Each chain's stages carry the folder of their recorded run; every recorded run present has its
    stage's recipe, continuing the previous stage's recorded run (a run still training may be absent)."""
    for name in CHAINS:
        assert _checked_recorded_runs(name), name


def test_demo_models_load_and_match_their_bases():
    d = demo.load_demo()
    assert d.perk.config.inner_steps == d.recipe.perk["inner_steps"]
    # the PERK base is the jointly meta-trained one; TTT and FT-ICR start from other weights
    assert model_fingerprint(d.perk.hf_model) != model_fingerprint(d.ttt.hf_model)
    assert all(torch.count_nonzero(b) == 0 for b in d.ttt.lora_B)
    assert not any(p.requires_grad for p in d.icr.parameters())
    assert model_fingerprint(d.icr) != model_fingerprint(d.icr_long)


@pytest.mark.parametrize("which, position", [("final", "mid"), ("fresh", "post")])
def test_shipped_predictions_are_reproduced(which, position):
    """Re-run PERK on the first held-out examples of the hardest needle cell at 4x the training
    length: the same predictions as the committed files of the shipped final evaluation (seed
    demo-final) and of the demo's default seed (demo-fresh)."""
    d = demo.load_demo()
    seed, folder = (_report()["final_eval"]["seed"], SHIPPED_EVAL_DIR) if which == "final" else \
        (demo.demo_seed(), FRESH_SEED_DIR)
    assert seed == SEEDS[which]
    spec = "needle:3"
    assert spec in d.recipe.tasks_for_eval()
    length = d.recipe.eval_lengths[-1]
    path = os.path.join(folder, spec.replace(":", "-"), "PERK", f"L{length}_{position}", "predictions.jsonl")
    with open(path, encoding="utf-8") as fh:
        committed = [json.loads(line) for line in fh][:3]
    task, kw = task_spec(spec)
    data = generate(task, 3, seed=f"{seed}/{spec}", context_tokens=length, position=position,
                    doc_tokens=d.recipe.eval_doc_tokens or d.recipe.doc_tokens, **kw)
    out = evaluate(d.perk, data, max_new_tokens=d.recipe.max_new_tokens, progress=False)
    assert out["predictions"] == [r["prediction"] for r in committed]


def test_training_data_never_overlaps_evaluation_seeds():
    """The held-out seeds (the final evaluation's and the demo's default) are none of the chain's
    training, dev or earlier evaluation seeds, and their contexts are not among the first training
    examples of any stage."""
    steps, held = 0, set()
    recipe = CHAINS[SHIPPED_CHAIN][-1].recipe
    assert demo.demo_seed() == SEEDS["fresh"] != SEEDS["final"]
    for name in ("final", "fresh"):
        for spec in recipe.tasks_for_eval():
            task, kw = task_spec(spec)
            seed = f"{SEEDS[name]}/{spec}"
            for position in demo_train.cell_positions(recipe, spec, recipe.train_len, n=32, seed=seed):
                held |= {" ".join(e.context) for e in generate(task, 32, seed=seed, context_tokens=recipe.train_len,
                                                               position=position, doc_tokens=recipe.doc_tokens, **kw)}
    for stage in CHAINS[SHIPPED_CHAIN]:
        seed = train_seed(steps)
        assert SEEDS["final"] not in seed and SEEDS["eval"] not in seed and SEEDS["fresh"] not in seed
        assert SEEDS["fresh"] not in (stage.recipe.eval_seed, SEEDS["final"])
        small = dataclasses.replace(stage.recipe, meta_steps=8, warmup_meta_steps=min(stage.recipe.warmup_meta_steps, 4))
        assert not {" ".join(e.context) for e in training_examples(small, seed)} & held
        steps += stage.recipe.meta_steps
    assert len(set(SEEDS.values())) == len(SEEDS) == 6
    dev = task_examples(recipe, 40, SEEDS["dev"])
    assert not {" ".join(e.context) for e in dev} & held


def test_demo_main_runs_end_to_end(capsys):
    out = demo.main(2, threads=torch.get_num_threads())
    printed = capsys.readouterr().out
    shipped = demo.load_demo()
    recipe = shipped.recipe
    for name in _systems(recipe, shipped.report["steps_before"]):
        assert name in printed
    assert "n=2" in printed and f"held-out seed {SEEDS['fresh']!r}" in printed
    assert out["memory"]["identical"] is True
    assert len(out["memory"]["answers"]) >= 2
    assert set(out["results"]) == {spec_label(spec) for spec in recipe.tasks_for_eval()}


def test_long_icr_baseline_is_optional_but_never_silently_missing(tmp_path):
    assets = tmp_path / "demo"
    shutil.copytree(ASSETS_DIR, assets, ignore=shutil.ignore_patterns("eval"))
    shutil.rmtree(assets / "icr_long")
    with pytest.raises(FileNotFoundError, match="icr_long"):
        demo.load_demo(str(assets))
    report = json.loads((assets / "train_report.json").read_text())
    report["recipe"]["icr_long_steps"] = 0
    (assets / "train_report.json").write_text(json.dumps(report))
    d = demo.load_demo(str(assets))
    assert d.icr_long is None
    assert icr_long_name(DemoRecipe()) == "FT-ICR 10x"
    # a continuation is named by all the steps both models had: 23,000 + 4,000 against 11,500 + 2,500
    longer = DemoRecipe(meta_steps=2500, icr_long_steps=4000)
    assert icr_long_name(longer) == "FT-ICR 1.6x"
    assert icr_long_name(longer, {"perk": 11500, "icr": 11500, "icr_long": 23000}) == "FT-ICR 1.9x"


def test_recipe_rejects_bad_values_by_name():
    for bad in (dict(meta_steps=0), dict(eval_n=-1), dict(base_lr=-1e-3), dict(icr_lr=0.0), dict(distractors=()),
                dict(lm_batch=2.5)):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"DemoRecipe.{name}="):
            DemoRecipe(**bad)
    DemoRecipe(base_lr=0.0, eval_n=0, icr_long_steps=0)  # frozen base, no evaluation, no long baseline


def test_curriculum_puts_its_warmup_tasks_first_and_is_checked():
    from perk_fast.demo_train import RECIPES, _parse, training_examples

    recipe = dataclasses.replace(RECIPES["multi"], meta_steps=6, meta_batch=4, warmup_mix=("needle:0",),
                                 warmup_meta_steps=2)
    examples = training_examples(recipe)
    assert len(examples) == 24
    assert all(e.meta["task"] == "needle" and e.question.count("code") == 1 for e in examples[:8])
    assert all(len(demo.context_needles(e.context)) == 1 for e in examples[:8])
    assert {e.meta["task"] for e in examples[8:]} == {"needle", "qa1", "qa2", "records_recall"}
    # the tasks after the warmup are those the recipe alone would draw (the same seed stream)
    plain = training_examples(dataclasses.replace(recipe, warmup_mix=None, warmup_meta_steps=0))
    assert [e.question for e in examples[8:]] == [e.question for e in plain[:16]]
    with pytest.raises(ValueError, match="warmup_meta_steps=6 is invalid"):
        dataclasses.replace(recipe, warmup_meta_steps=6)
    with pytest.raises(ValueError, match="disagree"):
        dataclasses.replace(recipe, warmup_mix=None)
    with pytest.raises(ValueError, match="DemoRecipe.warmup_mix: task 'needl'"):
        dataclasses.replace(recipe, warmup_mix=("needl:1",))
    parsed, *_ = _parse(["--recipe", "needle", "--mix", "needle:0,needle:3", "--doc-mix", "64,200",
                         "--warmup-mix", "needle:0", "--warmup-meta-steps", "10", "--eval-tasks", "needle:3"])
    assert parsed.mix == ("needle:0", "needle:3") and parsed.doc_mix == (64, 200)
    assert parsed.warmup_mix == ("needle:0",) and parsed.warmup_meta_steps == 10
    assert parsed.tasks_for_eval() == ("needle:3",)


def test_training_pipeline_end_to_end_at_toy_size(tmp_path):
    """The whole recipe (LM, PERK, FT-ICR, FT-ICR kx, save, report) at toy size, then the demo on its output;
    and --eval-n 0 skips evaluation but still writes the models and the report."""
    from perk_fast.demo_train import main as train_main

    out = str(tmp_path / "toy")
    args = ["--recipe", "needle", "--out", out, "--lm-contexts", "16", "--lm-batch", "4", "--lm-steps", "2", "--meta-steps", "2", "--meta-batch", "2", "--icr-long-steps", "4",
            "--dev-n", "2", "--dev-every", "1", "--eval-n", "1", "--threads", str(torch.get_num_threads())]
    report = train_main(args)
    assert report["eval"]["n"] == 1 and set(report["eval"]["results"]) == {"PERK", "TTT (no meta)", "FT-ICR",
                                                                           "FT-ICR 2x"}
    # the machine it ran on, down to the vector ISA of torch's kernels (runs on other CPUs round differently)
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cpu_count"] == os.cpu_count()
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    result = demo.main(1, assets_dir=out, threads=torch.get_num_threads())
    assert set(result["results"]) == {"PERK", "TTT (no meta)", "FT-ICR", "FT-ICR 2x"}
    args0 = ["--recipe", "needle", "--out", str(tmp_path / "toy0"), "--lm-contexts", "16", "--lm-batch", "4", "--lm-steps", "2", "--meta-steps", "2", "--meta-batch", "2",
             "--icr-long-steps", "0", "--dev-n", "2", "--dev-every", "1", "--eval-n", "0",
             "--perk", '{"grad_spike_factor": 10, "grad_spike_window": 1}']
    report0 = train_main(args0)
    assert report0["eval"] is None and os.path.exists(tmp_path / "toy0" / "train_report.json")
    # with the gradient-spike guard on, the report lists the steps it skipped (none here)
    assert report0["perk_skipped_steps"] == [] and "perk_skipped_steps" not in report
    assert [("skipped" in h) for h in report0["perk_history"]] == [True] * len(report0["perk_history"])
    assert demo.load_demo(str(tmp_path / "toy0")).icr_long is None


def test_multi_task_recipe_end_to_end_at_toy_size(tmp_path):
    """The shipped multi-task recipe at toy size: mixed tasks and document sizes, the PERK stage on 2
    spawned gloo processes (with a checkpoint to resume from), one table per evaluation task."""
    from perk_fast.demo_train import RECIPES, main as train_main, task_examples

    recipe = RECIPES["multi"]
    examples = task_examples(recipe, 16, "toy")
    assert {e.meta["task"] for e in examples} == {"needle", "qa1", "qa2", "records_recall"}
    out = str(tmp_path / "multi")
    report = train_main(["--recipe", "multi", "--out", out, "--lm-contexts", "16", "--lm-batch", "4", "--lm-steps", "2", "--meta-steps", "2",
                         "--meta-batch", "2", "--icr-long-steps", "2", "--dev-n", "2", "--dev-every", "1",
                         "--eval-n", "1", "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert set(report["eval"]["results"]) == {"needle (1 code)", "needle (4 codes)", "qa1", "qa2", "records_recall"}
    assert os.path.exists(tmp_path / "ckpt" / "last" / "trainer_state.json")
    assert report["recipe"]["ranks"] == 2
    # the stories and records outgrow a third of the training length: evaluated anywhere there
    qa = report["eval"]["results"]["qa1"]["PERK"]
    assert list(qa[256]) == ["random"] and list(qa[1024]) == ["pre", "mid", "post"]
    assert report["recipe"]["max_new_tokens"] >= 29  # the longest records answer


def test_context_needles_lists_every_code_in_reading_order():
    ex = generate("needle", 1, seed="needles", context_tokens=256, doc_tokens=96, n_distractors=3)[0]
    facts = demo.context_needles(ex.context)
    assert len(facts) == 4 and len({who for who, _ in facts}) == 4
    assert (demo.needle_name(ex.question), ex.answer) in facts
    text = " ".join(ex.context)
    positions = [text.index(f"The secret code of {who} is {code}.") for who, code in facts]
    assert positions == sorted(positions)


def test_resume_without_a_checkpoint_fails_before_any_training(tmp_path):
    from perk_fast.demo_train import RECIPES, train

    lines = []
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(RECIPES["needle"], str(tmp_path / "out"), log=lines.append, checkpoint_dir=str(tmp_path / "none"),
              resume=True)
    assert lines == [] and not (tmp_path / "out").exists()  # stage 1 never started
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(RECIPES["needle"], str(tmp_path / "out"), log=lines.append, resume=True)


def test_a_continuation_starts_from_the_earlier_run_on_fresh_examples(tmp_path):
    """--init-from: stage 1 is the earlier run's base, PERK goes on from its meta-parameters (with a
    near-zero learning rate they stay put, while a fresh memory would not), the examples are new, the
    step counts add up over a chain of runs; a missing folder or a different model is refused by name
    before any training."""
    from perk_fast.demo_train import RECIPES, load_base, main as train_main, train, train_seed, training_examples
    from perk_fast.io import load_tensors
    from perk_fast.model import PerkModel
    from perk_fast.tokenizer import ByteTokenizer

    toy = ["--recipe", "needle", "--lm-contexts", "16", "--lm-batch", "4", "--lm-steps", "2", "--meta-batch", "2",
           "--dev-n", "2", "--dev-every", "1", "--eval-n", "0", "--threads", str(torch.get_num_threads())]
    first, second, third = (str(tmp_path / n) for n in ("first", "second", "third"))
    train_main(toy + ["--out", first, "--meta-steps", "2", "--icr-long-steps", "4"])
    frozen = ["--meta-lr", "1e-12", "--lr-lr", "1e-12", "--base-lr", "0", "--icr-lr", "1e-12"]
    report = train_main(toy + frozen + ["--out", second, "--meta-steps", "1", "--icr-long-steps", "2",
                                        "--init-from", first])
    assert report["steps_before"] == {"perk": 2, "icr": 2, "icr_long": 4}
    assert report["earlier_run"]["init_from"] == first and report["recipe"]["init_from"] == first
    before = load_tensors(os.path.join(first, "perk"), "meta_parameters.safetensors")
    after = load_tensors(os.path.join(second, "perk"), "meta_parameters.safetensors")
    fresh = PerkModel(load_base(os.path.join(first, "base")), ByteTokenizer(), RECIPES["needle"].perk_config())
    fresh_state = {k: v.detach() for k, v in fresh.named_meta_parameters()}
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0)
    moved = [n for n in before if n in fresh_state and not torch.allclose(fresh_state[n], before[n], atol=1e-6)]
    assert moved, "the earlier run's meta-parameters equal a fresh memory's: the check above proves nothing"
    for name in ("base", "icr"):  # same weights as the earlier run's (a zero / near-zero learning rate)
        a = load_tensors(os.path.join(first, name), "model.safetensors")
        b = load_tensors(os.path.join(second, name), "model.safetensors")
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
    recipe = dataclasses.replace(RECIPES["needle"], meta_steps=2, meta_batch=2)
    old = {tuple(e.context) for e in training_examples(recipe)}
    new = {tuple(e.context) for e in training_examples(recipe, train_seed(2))}
    assert train_seed(0) != train_seed(2) and not old & new
    report3 = train_main(toy + ["--out", third, "--meta-steps", "1", "--icr-long-steps", "0", "--init-from", second])
    assert report3["steps_before"] == {"perk": 3, "icr": 3, "icr_long": 6}
    # more inner steps: the learned rates of the earlier steps are kept, the new steps start from the last's
    steps = RECIPES["needle"].perk["inner_steps"]
    longer = str(tmp_path / "longer")
    lines = []
    train(dataclasses.replace(recipe_from_dict(report["recipe"]), perk=dict(report["recipe"]["perk"],
                                                                             inner_steps=steps + 2),
                              init_from=second, meta_steps=1, icr_long_steps=0, lm_contexts=16, lm_batch=4,
                              lm_steps=2, eval_n=0, meta_lr=1e-12, lr_lr=1e-12, base_lr=0.0),
          longer, log=lines.append)
    assert any(f"inner steps {steps} -> {steps + 2}" in line for line in lines), lines
    lrs = load_tensors(os.path.join(longer, "perk"), "meta_parameters.safetensors")["inner_lrs"]
    assert lrs.shape == (after["inner_lrs"].shape[0], steps + 2)
    torch.testing.assert_close(lrs[:, :steps], after["inner_lrs"], atol=1e-9, rtol=0)
    torch.testing.assert_close(lrs[:, steps:], after["inner_lrs"][:, -1:].expand(-1, 2), atol=1e-9, rtol=0)
    assert PerkModel.load(os.path.join(longer, "perk"), load_base(os.path.join(longer, "perk", "base")),
                          ByteTokenizer()).config.inner_steps == steps + 2
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        demo_train.meta_state_for_steps(fresh, 0)
    assert demo_train.meta_state_for_steps(fresh, 2)["inner_lrs"].shape[1] == 2
    # a higher rank at the same scale: the learned components are kept, the new ones start fresh
    rank, alpha = RECIPES["needle"].perk["lora_rank"], RECIPES["needle"].perk["lora_alpha"]
    wider, lines = str(tmp_path / "wider"), []
    train(dataclasses.replace(recipe_from_dict(report["recipe"]), perk=dict(report["recipe"]["perk"],
                                                                             lora_rank=4 * rank, lora_alpha=2 * alpha),
                              init_from=second, meta_steps=1, icr_long_steps=0, lm_contexts=16, lm_batch=4,
                              lm_steps=2, eval_n=0, meta_lr=1e-12, lr_lr=1e-12, base_lr=0.0),
          wider, log=lines.append)
    assert any(f"LoRA rank {rank} -> {4 * rank}" in line for line in lines), lines
    grown = load_tensors(os.path.join(wider, "perk"), "meta_parameters.safetensors")
    wide_fresh = PerkModel(load_base(os.path.join(first, "base")), ByteTokenizer(), dataclasses.replace(
        RECIPES["needle"].perk_config(), lora_rank=4 * rank, lora_alpha=2 * alpha))
    wide_state = dict(wide_fresh.named_meta_parameters())
    a_names = [n for n in after if n.startswith("lora_A.")]
    assert a_names and grown.keys() == after.keys()
    for name in a_names:
        b_name = name.replace("lora_A.", "lora_B.")
        assert grown[name].shape == (4 * rank, after[name].shape[1])
        torch.testing.assert_close(grown[name][:rank], after[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(grown[name][rank:], wide_state[name].detach()[rank:], atol=1e-6, rtol=0)
        assert grown[name][rank:].abs().max() > 0
        assert grown[b_name][:, rank:].abs().max() < 1e-6  # so the initial memory writes what the earlier one did
        torch.testing.assert_close(grown[b_name][:, :rank], after[b_name], atol=1e-6, rtol=0)
        # same LoRA scale (2 alpha / sqrt(4 r) = alpha / sqrt(r)): the same initial delta-W
        torch.testing.assert_close(grown[b_name] @ grown[name], after[b_name] @ after[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(grown["inner_lrs"], after["inner_lrs"], atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match=r"lora_alpha=64 keeps it"):  # a higher rank at another scale
        train(dataclasses.replace(RECIPES["needle"], init_from=first, perk=dict(RECIPES["needle"].perk,
                                                                                lora_rank=4 * rank)),
              str(tmp_path / "x"), log=lines.append)
    lines = []
    with pytest.raises(ValueError, match="lora_rank=2 is lower"):
        train(dataclasses.replace(RECIPES["needle"], init_from=first, perk=dict(RECIPES["needle"].perk, lora_rank=2)),
              str(tmp_path / "x"), log=lines.append)
    small = PerkModel(load_base(os.path.join(first, "base")), ByteTokenizer(), dataclasses.replace(
        RECIPES["needle"].perk_config(), lora_rank=2))
    with pytest.raises(ValueError, match="lora_rank=2 is lower than the earlier memory's"):
        demo_train.meta_state_for_model(fresh, small)

    lines = []
    with pytest.raises(FileNotFoundError, match="missing"):
        train(dataclasses.replace(RECIPES["needle"], init_from=str(tmp_path / "nowhere")), str(tmp_path / "x"),
              log=lines.append)
    with pytest.raises(ValueError, match="hidden_size"):
        train(dataclasses.replace(RECIPES["needle"], init_from=first, hidden_size=32), str(tmp_path / "x"),
              log=lines.append)
    with pytest.raises(ValueError, match="no long FT-ICR"):
        train(dataclasses.replace(RECIPES["needle"], init_from=third, hidden_size=64), str(tmp_path / "x"),
              log=lines.append)
    with pytest.raises(ValueError, match="init_from"):
        DemoRecipe(init_from="")
    assert lines == [] and not (tmp_path / "x").exists()


def _toy_chain() -> tuple:
    toy = dataclasses.replace(demo_train.RECIPES["needle"], lm_contexts=16, lm_batch=4, lm_steps=2, meta_steps=2,
                              meta_batch=2, icr_long_steps=2, dev_n=2, dev_every=1, eval_n=0, train_len=192,
                              doc_tokens=60, eval_lengths=(192,), threads=torch.get_num_threads())
    return ChainStage("first", toy), ChainStage("second", dataclasses.replace(toy, meta_steps=1, icr_long_steps=1))


def test_a_chain_runs_its_stages_in_order_and_goes_on_at_the_first_unfinished_one(tmp_path, monkeypatch):
    monkeypatch.setitem(CHAINS, "toy", _toy_chain())
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    report = train_chain("toy", out, work_dir=work, final_n=1, log=lambda *a: None)
    first = os.path.join(work, "first", "assets")
    assert os.path.exists(os.path.join(first, "train_report.json"))
    assert report["recipe"]["init_from"] == first and report["steps_before"] == {"perk": 2, "icr": 2, "icr_long": 2}
    assert [st["stage"] for st in report["chain"]["stages"]] == ["first", "second"]
    assert report["final_eval"]["seed"] == SEEDS["final"] and report["final_eval"]["n"] == 1
    assert demo_train.training_minutes(report) == pytest.approx(report["chain"]["train_total_s"] / 60)
    # runs trained already become the chain's result without training (checked stage by stage)
    adopted = str(tmp_path / "adopted")
    got = demo_train.adopt_chain("toy", [first, out], adopted, final_n=1, log=lambda *a: None)
    em = lambda r: {(s, L, p): c["exact_match"] for s, t in r["final_eval"]["results"].items()  # noqa: E731
                    for L, cells in t.items() for p, c in cells.items()}
    assert em(got) == em(report) and len(em(got)) == 4 * 1 * 3
    assert [st["stage"] for st in got["chain"]["stages"]] == ["first", "second"]
    with pytest.raises(ValueError, match="is not stage 'first'"):
        demo_train.adopt_chain("toy", [out, first], adopted, final_n=0)
    with pytest.raises(ValueError, match="2 stages, 1 runs"):
        demo_train.adopt_chain("toy", [first], adopted, final_n=0)
    with pytest.raises(ValueError, match=r"stages \['first', 'second'\] have no recorded run"):
        demo_train.adopt_chain("toy", ["recorded"], adopted, final_n=0)
    monkeypatch.setitem(CHAINS, "toy", tuple(dataclasses.replace(st, recorded=f) for st, f in
                                             zip(_toy_chain(), (first, out))))
    assert em(demo_train.adopt_chain("toy", ["recorded"], adopted, final_n=1, log=lambda *a: None)) == em(report)
    monkeypatch.setitem(CHAINS, "toy", _toy_chain())
    # finished stages are not trained again; a missing last stage is
    lines = []
    train_chain("toy", out, work_dir=work, final_n=0, log=lines.append)
    assert len(lines) == 2 and all("already trained" in line for line in lines), lines
    shutil.rmtree(out)
    lines = []
    again = train_chain("toy", out, work_dir=work, final_n=0, log=lines.append)
    assert "already trained" in lines[0] and "stage 2/2 (second, 1 meta-steps) ->" in lines[1]
    assert again["steps_before"]["perk"] == 2 and "final_eval" not in again
    # a stage folder holding another recipe's run is refused by name, not overwritten
    path = os.path.join(first, "train_report.json")
    with open(path, encoding="utf-8") as fh:
        changed = json.load(fh)
    changed["recipe"]["meta_steps"] = 3
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(changed, fh)
    with pytest.raises(ValueError, match="another recipe"):
        train_chain("toy", out, work_dir=work, final_n=0, log=lambda *a: None)
    with pytest.raises(ValueError, match="chain 'nope' is unknown"):
        train_chain("nope", out)
    with pytest.raises(ValueError, match="final_n=-1 is invalid"):
        train_chain("toy", out, work_dir=work, final_n=-1)
    with pytest.raises(ValueError, match="final_n=-1 is invalid"):
        demo_train.adopt_chain("toy", [first, out], adopted, final_n=-1)
    with pytest.raises(ValueError, match="n=0 is invalid"):
        demo_train.final_evaluation(out, n=0)


def test_a_chain_cannot_be_changed_on_the_command_line():
    parsed = demo_train._parse([])
    assert isinstance(parsed, demo_train.ChainArgs) and parsed.name == SHIPPED_CHAIN
    assert parsed.eval_out == SHIPPED_EVAL_DIR and parsed.final_n == FINAL_EVAL_N
    for argv in (["--meta-steps", "5"], ["--perk", '{"lora_rank": 4}'], ["--init-from", "x"],
                 ["--recipe", "needle", "--work-dir", "w"], ["--final-n", "-1"]):
        with pytest.raises(SystemExit):
            demo_train._parse(argv)
    recipe, out, *_ = demo_train._parse(["--recipe", "needle", "--out", "o", "--meta-steps", "5"])
    assert recipe.meta_steps == 5 and out == "o"


def test_a_chain_other_than_the_shipped_one_needs_its_own_out(capsys):
    """--recipe direct / binding / needles-first would overwrite the shipped model in the default --out:
    refused by name; with --out they parse as chains."""
    for name in ("direct", "binding", "needles-first"):
        with pytest.raises(SystemExit):
            demo_train._parse(["--recipe", name])
        assert f"--recipe {name} is not the shipped chain" in capsys.readouterr().err
        parsed = demo_train._parse(["--recipe", name, "--out", "o"])
        assert isinstance(parsed, demo_train.ChainArgs) and parsed.name == name and parsed.out == "o"
    stages = CHAINS["direct"]
    assert sum(st.recipe.meta_steps for st in stages) == 5000
    assert all(st.recipe.perk["shuffle_docs"] is False for st in stages)
    assert stages[0].recipe.warmup_meta_steps == 300 and stages[1].recipe.meta_lr == pytest.approx(stages[0].recipe.meta_lr * 0.3)
    # the same budget the chain's way: its binding first stage, then the mix with the weighting writer reset
    first, mix = CHAINS["needles-first"]
    assert first.recipe == CHAINS["binding"][0].recipe and first.recipe.eval_tasks == ("needle:0", "needle:3")
    assert first.recipe.meta_steps + mix.recipe.meta_steps == 5000 and mix.recipe.reset_meta == ("weighting",)
    assert mix.recipe == dataclasses.replace(stages[1].recipe, reset_meta=("weighting",), init_from=mix.recipe.init_from)


def test_reset_meta_puts_the_named_groups_back_and_only_them(tmp_path):
    """--reset-meta on a continuation: the weighting model's output layer is zero again (every token
    weight ln(2)/3) and / or every learned inner learning rate is inner_lr again; the other
    meta-parameters continue from the earlier run. Bad names, a fresh run, and a model without the
    group are refused by name."""
    from perk_fast.demo_train import RECIPES, load_base, main as train_main, reset_meta_parameters
    from perk_fast.io import load_tensors
    from perk_fast.model import PerkModel
    from perk_fast.tokenizer import ByteTokenizer

    toy = ["--recipe", "needle", "--lm-contexts", "16", "--lm-batch", "4", "--lm-steps", "2", "--meta-batch", "2",
           "--dev-n", "2", "--dev-every", "1", "--eval-n", "0", "--icr-long-steps", "0",
           "--threads", str(torch.get_num_threads())]
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train_main(toy + ["--out", first, "--meta-steps", "2"])
    frozen = ["--meta-lr", "1e-12", "--lr-lr", "1e-12", "--base-lr", "0", "--icr-lr", "1e-12"]
    lines = []
    report = train_main(toy + frozen + ["--out", second, "--meta-steps", "1", "--init-from", first,
                                        "--reset-meta", "weighting,inner_lrs"])
    assert list(report["recipe"]["reset_meta"]) == ["weighting", "inner_lrs"]
    before = load_tensors(os.path.join(first, "perk"), "meta_parameters.safetensors")
    after = load_tensors(os.path.join(second, "perk"), "meta_parameters.safetensors")
    inner_lr = RECIPES["needle"].perk["inner_lr"]
    assert not torch.allclose(before["inner_lrs"], torch.full_like(before["inner_lrs"], inner_lr))
    torch.testing.assert_close(after["inner_lrs"], torch.full_like(after["inner_lrs"], inner_lr), atol=1e-9, rtol=0)
    assert before["weighting.fc2.weight"].abs().max() > 0
    assert after["weighting.fc2.weight"].abs().max() < 1e-9 and after["weighting.fc2.bias"].abs().max() < 1e-9
    for name in before:
        if not (name == "inner_lrs" or name.startswith("weighting.fc2")):
            torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="reset_meta=.*needs init_from"):
        DemoRecipe(reset_meta=("weighting",))
    with pytest.raises(ValueError, match=r"reset_meta=\('lora',\) is invalid"):
        DemoRecipe(init_from=first, reset_meta=("lora",))
    with pytest.raises(ValueError, match="distinct"):
        DemoRecipe(init_from=first, reset_meta=("weighting", "weighting"))
    with pytest.raises(SystemExit):
        demo_train._parse(["--recipe", "needle", "--reset-meta", "weighting"])
    plain = PerkModel(load_base(os.path.join(first, "base")), ByteTokenizer(),
                      dataclasses.replace(RECIPES["needle"].perk_config(), weighted_loss=False, learn_inner_lr=False))
    for name in ("weighting", "inner_lrs"):
        with pytest.raises(ValueError, match=f"reset '{name}'"):
            reset_meta_parameters(plain, [name])
    with pytest.raises(ValueError, match="reset 'lora' is invalid"):
        reset_meta_parameters(plain, ["lora"])
    # a run written before reset_meta existed is still the same recipe (its default is what it did)
    old = json.loads(json.dumps(report))
    del old["recipe"]["reset_meta"]
    assert demo_train._same_recipe(old, dataclasses.replace(demo_train.recipe_from_dict(report["recipe"]),
                                                            reset_meta=()))
    assert not demo_train._same_recipe(old, demo_train.recipe_from_dict(report["recipe"]))


def test_the_log_names_each_step_the_spike_guard_skipped():
    """A recipe with perk.grad_spike_factor: meta_train_joint logs each skipped step with its norm and the
    guard's limit (the sampled perk_history of a report may miss it)."""
    from perk_fast.demo_train import RECIPES
    from perk_fast.model import PerkModel
    from perk_fast.seeds import call_seed
    from perk_fast.tokenizer import ByteTokenizer

    recipe = dataclasses.replace(RECIPES["needle"], hidden_size=32, intermediate_size=64, meta_steps=3, meta_batch=2,
                                 ranks=1, threads=1, perk=dict(RECIPES["needle"].perk, grad_spike_factor=10.0,
                                                               grad_spike_window=1))
    tok = ByteTokenizer()
    pm = PerkModel(demo_train.build_base(recipe, tok), tok, recipe.perk_config())
    original = pm.meta_loss
    spike_seed = call_seed(pm.config.seed, 1)  # step 2

    def meta_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss * 1e6 if kwargs["seed"] == spike_seed else loss

    pm.meta_loss = meta_loss
    lines = []
    history = demo_train.meta_train_joint(pm, demo_train.training_examples(recipe), recipe, log=lines.append)
    assert [h["skipped"] for h in history] == [False, True, False]
    (line,) = [m for m in lines if "skipped:" in m]
    assert line == (f"  meta step 2 skipped: gradient norm {history[1]['grad_norm']:.4g} over the guard's limit "
                    f"{history[1]['spike_limit']:.4g}")


def test_a_chains_test_time_fields_reach_its_result_and_only_the_result(tmp_path, monkeypatch):
    """TEST_TIME_PERK of a chain: train_chain and adopt_chain give the result's PerkModel (and, through the
    report, the TTT baseline) those PerkConfig fields; the stage runs keep their own; adopting in place
    is refused."""
    monkeypatch.setitem(CHAINS, "toy", _toy_chain())
    monkeypatch.setitem(demo_train.TEST_TIME_PERK, "toy", {"segment_recency": 0.25})
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    report = train_chain("toy", out, work_dir=work, final_n=0, log=lambda *a: None)
    first = os.path.join(work, "first", "assets")
    run = demo_train.load_run(out)
    assert run["perk"].config.segment_recency == 0.25 and run["ttt"].config.segment_recency == 0.25
    assert run["report"]["test_time_perk"] == {"segment_recency": 0.25} and "test_time_perk" not in report
    assert run["perk"].config.replace(segment_recency=0.0) == run["recipe"].perk_config()
    assert demo_train.load_run(first)["perk"].config.segment_recency == 0.0  # a stage run is left alone
    adopted = str(tmp_path / "adopted")
    demo_train.adopt_chain("toy", [first, out], adopted, final_n=0, log=lambda *a: None)
    assert demo_train.load_run(adopted)["perk"].config.segment_recency == 0.25
    with pytest.raises(ValueError, match="adopt its last run .* into another out_dir, not in place"):
        demo_train.adopt_chain("toy", [first, out], out, final_n=0)


def test_the_shipped_model_writes_with_its_chains_test_time_fields():
    d = demo.load_demo()
    fields = demo_train.TEST_TIME_PERK[SHIPPED_CHAIN]
    assert _report()["test_time_perk"] == fields
    want = CHAINS[SHIPPED_CHAIN][-1].recipe.perk_config().replace(**fields)
    assert d.perk.config == want and d.ttt.config == want
