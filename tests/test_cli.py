"""The ``perk-fast`` command line on the reference's config tree and data layout (all written here).

A tiny Llama with a real BPE tokenizer (BOS) saved with save_pretrained; configs with the
reference's keys and values (bf16 and flash_attention_2 included); babilong, student_records and
longgorilla data in the reference's layout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from perk_fast import PerkModel, cli, runs
from perk_fast.io import load_tensors

from tiny_models import bos_bpe_tokenizer, tiny_llama

PLACES = ["kitchen", "garden", "office", "hallway", "bathroom", "bedroom", "cellar", "attic"]


def _write_configs(root) -> str:
    conf = root / "configs"
    (conf / "default").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "run.yaml").write_text("# @package _global_\ndefaults:\n  - _self_\n  - default: default.yaml\n"
                                   "  - experiment: null\n\ndevice_idx: 0\n")
    default = dict(model_name_or_path="gpt2", data_dir="/path/to/data", output_dir="/path/to/checkpoints",
                   inner_opt="adam", inner_lr=1e-5, learning_rate=5e-5, warmup_proportion=0.03, weight_decay=0.1,
                   adam_epsilon=1e-8, max_grad_norm=1.0, gradient_accumulation_steps=1, callback_monitor="val_loss",
                   seed=42, patience=5, lora_alpha=32, lora_r=16, wandb_name="multi", wandb_entity="<ENTITY>",
                   wandb_project="meta-memory", wandb_api_key="<API_KEY>", num_workers=4)
    (conf / "default" / "default.yaml").write_text("# @package _global_\n" + yaml.safe_dump(default))
    train = dict(checkpoint="none", load_checkpoint=False, resume_from_checkpoint=False, do_train=True, do_eval=True,
                 wandb_name="qwen-TGU-babilong-qa1-1k-lora-256-4-step", wandb_project="meta-memory",
                 model_name_or_path="Qwen/Qwen2.5-0.5B", peft_lora=True, lora_rank=256, lora_alpha=16, bf16=True,
                 attn_implementation="flash_attention_2", train_batch_size=1, eval_batch_size=1, num_train_epochs=2,
                 patience=10, callback_monitor="val_loss", learning_rate=1e-5, max_grad_norm=1.0, weight_decay=0.01,
                 warmup_proportion=0.03, gradient_accumulation_steps=1, val_check_interval=0.5,
                 use_liger_kernel=False, n_gpu=1, n_inner_iter=4, dyna_lr=True, inner_lr=5e-5, inner_grad_accum=1,
                 inner_funct="truncated", unroll_start=2, first_order=False, weighted_loss=True,
                 weight_normalize=False, weight_non_linearity="softplus", weight_fuse="concat", weight_q_pool="cls",
                 data_dir="<path_to_data>", dataset_name="babilong", dataset_subset="qa1_1k", packing=True,
                 max_eval_data=3000)
    head = "# @package _global_\ndefaults:\n  - override /default: default.yaml\n\n"
    (conf / "experiment" / "meta_train.yaml").write_text(head + yaml.safe_dump(train))
    test = dict(train, checkpoint="<path_to_checkpoint>", load_checkpoint=True, do_train=False, num_train_epochs=1,
                inner_grad_accum=4.0, inner_funct="default")
    (conf / "experiment" / "meta_test.yaml").write_text(head + yaml.safe_dump(test))
    return str(conf)


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def _babilong(n, offset=0):
    return [{"context": [f"Alice went to the {PLACES[(i + offset) % 8]}.", "The cat sat on the mat."],
             "question": "Where is Alice?", "answer": PLACES[(i + offset) % 8],
             "support": [f"Alice went to the {PLACES[(i + offset) % 8]}."]} for i in range(n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = bos_bpe_tokenizer()
    model = tiny_llama(vocab=len(tok))
    model.config.update(dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data"
    for split, rows in (("train", _babilong(4)), ("validation", _babilong(3, 4)), ("test", _babilong(2, 6))):
        _jsonl(data / "babilong" / "qa1_1k" / f"{split}.jsonl", rows)
    for split in ("train", "validation", "test"):
        base = data / "student_records" / "small" / split
        dbs = [{"database_id": f"db{i}", "database": [
            {"Student Id": 100 + i, "Student Name": "Ann", "Year": 2, "School": "Arts", "Major": "Math", "Grade": 71 + i},
            {"Student Id": 200 + i, "Student Name": "Bo", "Year": 3, "School": "Law", "Major": "Art", "Grade": 55}]}
               for i in range(2)]
        _jsonl(base / "context.jsonl", dbs)
        _jsonl(base / "recall.jsonl", [{"questions": [{"question": "What is the grade of Ann?", "answer": 71 + i},
                                                      {"question": "Which school is Bo in?", "answer": "Law"}]}
                                       for i in range(2)])
        _jsonl(data / "longgorilla" / "apis" / f"{split}.jsonl",
               [{"context": ["api foo(x) returns x."], "prompt": "Call foo on 3.", "api_call": "foo(3)"}])
    return {"root": root, "configs": _write_configs(root), "model": str(root / "model"), "data": str(data)}


def _args(env, out, *extra):
    return ["--config-dir", env["configs"], "experiment=meta_train", f"model_name_or_path={env['model']}",
            f"data_dir={env['data']}", f"output_dir={out}", "lora_rank=4", "n_inner_iter=2", "+max_new_tokens=4",
            "+perk.segment_len=48", "bf16=false", *extra]


def _cli(*argv, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "perk_fast", *argv], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stdout, proc.stderr


def _only_run(out):
    (run,) = [os.path.join(out, d) for d in os.listdir(out)]
    return run


def test_train_end_to_end_with_the_reference_configs(env, tmp_path):
    out = str(tmp_path / "out")
    code, _, err = _cli("train", *_args(env, out, "bf16=true", "+perk.grad_spike_factor=10"))
    assert code == 0, err[-3000:]
    run = _only_run(out)
    assert os.path.basename(run).startswith("qwen-TGU-babilong-qa1-1k-lora-256-4-step_")
    # every reference key is honoured or ignored with a reason, once
    for line in ("attn_implementation=flash_attention_2: loaded as sdpa", "lora_r=16 is ignored",
                 "device_idx: ignored", "use_liger_kernel: ignored", "W&B logging off"):
        assert err.count(line) == 1, line
    files = set(os.listdir(run))
    assert {"config.yaml", "log.txt", "metrics.jsonl", "checkpoints", "outputs", "evals"} <= files
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert cfg["lora_rank"] == 4 and cfg["bf16"] is True and cfg["dataset_subset"] == "qa1_1k"
    # 4 examples x 2 epochs at batch 1: 8 steps, validation every half epoch (2 steps)
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(1, 9))
    # +perk.grad_spike_factor turned the gradient-spike guard on: every step says whether it was skipped
    assert all(m["skipped"] is False for m in metrics if m["kind"] == "train")
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [2, 4, 6, 8]
    rows = [json.loads(line) for line in open(os.path.join(run, "outputs", "outputs_2.jsonl"))]
    assert [r["guid"] for r in rows] == ["qa1_1k_0", "qa1_1k_1", "qa1_1k_2"]
    assert list(rows[0])[:4] == ["guid", "prompt", "answer", "output"]
    assert rows[0]["answer"] == "<support>Alice went to the bathroom.</support>\n<output>bathroom</output>"
    ev = json.load(open(os.path.join(run, "evals", "eval_2.json")))
    assert {"accuracy", "f1", "exact_match", "val_loss", "n"} <= set(ev) and ev["n"] == 3
    best = json.load(open(os.path.join(run, "checkpoints", "best.json")))
    assert best["monitor"] == "val_loss" and len(best["best"]) == 4
    scores = [b["score"] for b in best["best"]]
    assert scores == sorted(scores)
    # every checkpoint loads with PerkModel.load; the bf16 base kept fp32 meta-parameters
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(env["model"])
    for name in ["last"] + [b["path"] for b in best["best"]]:
        pm = PerkModel.load(os.path.join(run, "checkpoints", name), base, AutoTokenizer.from_pretrained(env["model"]))
        from perk_fast.lora import remove_lora

        remove_lora(pm.sites)
    saved = load_tensors(os.path.join(run, "checkpoints", "last"), "meta_parameters.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())


def test_eval_from_the_checkpoint_reproduces_the_training_time_evaluation(env, tmp_path):
    out = str(tmp_path / "out")
    assert runs_main(["train", *_args(env, out, "num_train_epochs=1")]) == 0
    run = _only_run(out)
    ev_out = str(tmp_path / "eval")
    code = runs_main(["eval", "--config-dir", env["configs"], "experiment=meta_test",
                      f"model_name_or_path={env['model']}", f"data_dir={env['data']}", f"output_dir={ev_out}",
                      "lora_rank=4", "n_inner_iter=2", "+max_new_tokens=4", "+perk.segment_len=48", "bf16=false",
                      f"checkpoint={os.path.join(run, 'checkpoints', 'last')}"])
    assert code == 0
    ev_run = _only_run(ev_out)
    for name in ("outputs/outputs_4.jsonl", "evals/eval_4.json"):
        assert open(os.path.join(ev_run, name)).read() == open(os.path.join(run, name)).read(), name
    test_rows = [json.loads(line) for line in open(os.path.join(ev_run, "outputs", "test_outputs_4.jsonl"))]
    assert [r["guid"] for r in test_rows] == ["qa1_1k_0", "qa1_1k_1"]


def runs_main(argv):
    """The command line in this process (faster than a subprocess for the checks that allow it)."""
    return cli.main(argv)


def test_resume_continues_exactly(env, tmp_path, monkeypatch):
    full = str(tmp_path / "full")
    assert runs_main(["train", *_args(env, full, "num_train_epochs=1", "do_eval=false")]) == 0
    broken = str(tmp_path / "broken")
    original = PerkModel.meta_loss
    calls = {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(PerkModel, "meta_loss", interrupted)
    assert runs_main(["train", *_args(env, broken, "num_train_epochs=1", "do_eval=false")]) == 2
    monkeypatch.setattr(PerkModel, "meta_loss", original)
    last = os.path.join(_only_run(broken), "checkpoints", "last")
    assert json.load(open(os.path.join(last, "trainer_state.json")))["step"] == 2
    assert runs_main(["train", *_args(env, broken, "num_train_epochs=1", "do_eval=false",
                                      "resume_from_checkpoint=true", f"checkpoint={last}")]) == 0
    a = load_tensors(os.path.join(_only_run(full), "checkpoints", "last"), "meta_parameters.safetensors")
    b = load_tensors(last, "meta_parameters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_triggers(env, tmp_path):
    out = str(tmp_path / "out")
    # learning_rate 0: the validation loss never improves after the first check
    assert runs_main(["train", *_args(env, out, "learning_rate=0.0", "patience=2", "val_check_interval=1",
                                      "num_train_epochs=3")]) == 0
    metrics = [json.loads(line) for line in open(os.path.join(_only_run(out), "metrics.jsonl"))]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3]  # 12 planned
    state = json.load(open(os.path.join(_only_run(out), "checkpoints", "last", "trainer_state.json")))
    assert state["step"] == 3 and state["history"][-1]["stopped_early"] is True


def test_student_records_and_longgorilla_are_read_as_the_reference_reads_them(env):
    run, _ = runs.parse_config({"model_name_or_path": env["model"], "data_dir": env["data"],
                                "dataset_name": "student_records", "dataset_subset": "small",
                                "student_record_query": "recall"})
    rows = runs.read_split(run, "validation")
    assert [r.meta["guid"] for r in rows] == ["db0", "db0", "db1", "db1"]
    assert rows[0].answer == "71" and rows[2].answer == "72"  # numbers become strings
    assert rows[0].context[0] == "Student <100>, Name: Ann, Year: 2, School: Arts, Major: Math, Grade: 71"
    run, _ = runs.parse_config({"model_name_or_path": env["model"], "data_dir": env["data"],
                                "dataset_name": "longgorilla", "dataset_subset": "apis"})
    (row,) = runs.read_split(run, "test")
    assert (row.question, row.answer, row.meta["guid"]) == ("Call foo on 3.", "foo(3)", "apis_0")


def test_encode_writes_memories_and_answers(env, tmp_path):
    out = str(tmp_path / "out")
    contexts = tmp_path / "contexts.jsonl"
    _jsonl(contexts, [{"context": ["Alice went to the attic."], "question": "Where is Alice?"},
                      {"context": "Bob is in the garden."}])
    assert runs_main(["encode", *_args(env, out, f"+contexts={contexts}", "+answer=true")]) == 0
    run = _only_run(out)
    from perk_fast import Memory

    memory = Memory.load(os.path.join(run, "memory"))
    assert len(memory) == 2
    answers = [json.loads(line) for line in open(os.path.join(run, "answers.jsonl"))]
    assert [a["index"] for a in answers] == [0]


@pytest.mark.parametrize("extra, message", [
    (["lora_rank=zero"], "lora_rank='zero'"),
    (["train_batch_size=0"], "train_batch_size=0"),
    (["callback_monitor=val_speed"], "callback_monitor='val_speed'"),
    (["attn_implementation=magic"], "attn_implementation='magic'"),
    (["dataset_subset=qa9"], "qa9/train.jsonl not found"),
    (["dataset_name=student_records", "dataset_subset=small"], "student_record_query=None"),
    (["inner_funct=sideways"], "inner_funct='sideways'"),
    (["model_name_or_path=/nonexistent/model"], "model_name_or_path='/nonexistent/model'"),
    (["resume_from_checkpoint=true"], "resume_from_checkpoint=true needs checkpoint"),
    (["not_a_key=1"], "Could not override 'not_a_key'"),
    (["+perk.grad_spike_factor=0.5"], "PerkConfig.grad_spike_factor=0.5 is invalid"),
])
def test_bad_inputs_are_errors_that_name_the_key(env, tmp_path, capsys, extra, message):
    code = runs_main(["train", *_args(env, str(tmp_path / "out"), *extra)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-2000:]
    assert "Traceback" not in err


def test_a_malformed_row_names_file_line_and_field(env, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    path = data / "babilong" / "qa1_1k" / "train.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["question"] = ["not", "a", "string"]
    lines[1] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    code = runs_main(["train", *_args(env, str(tmp_path / "out"), f"data_dir={data}")])
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl: line 2: field 'question'" in err, err[-2000:]


def test_unknown_new_key_is_a_warning_and_help_lists_every_key(env, tmp_path, capsys):
    assert runs_main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("n_inner_iter", "weight_decay", "val_check_interval", "student_record_query", "device_idx",
                "wandb_api_key", "max_new_tokens"):
        assert key in text
    code = runs_main(["train", *_args(env, str(tmp_path / "out"), "+mystery=3", "num_train_epochs=1",
                                      "do_eval=false")])
    assert code == 0 and "unknown config key 'mystery' ignored" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("perk-fast")
    assert exe, "the perk-fast console script is not on PATH (pip install -e .)"
    proc = subprocess.run([exe, "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: perk-fast" in proc.stdout


def test_n_gpu_2_runs_under_torchrun(env, tmp_path):
    out = str(tmp_path / "out")
    code, _, err = _cli("train", *_args(env, out, "n_gpu=2", "train_batch_size=2", "num_train_epochs=1",
                                        "do_eval=false"))
    assert code == 0, err[-3000:]
    assert "running under torchrun" in err and "--nproc_per_node 2" in err
    metrics = [json.loads(line) for line in open(os.path.join(_only_run(out), "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["contexts"] == 2 for m in metrics)
