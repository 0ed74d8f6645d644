"""bench/demo_history.py: the logs and histories of two runs read and lined up step by step, and the
folders it cannot read named."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("demo_history", os.path.join(_ROOT, "bench", "demo_history.py"))
hist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hist)


def _entry(step, norm, inner=1.0, **kw):
    return {"step": step, "loss": 1.0, "inner_loss_first": 5.0, "inner_loss_last": inner, "lr": 1e-3,
            "grad_norm": norm, "contexts": 8, **kw}


def _run(tmp_path, name, log_lines, history, finished):
    folder = tmp_path / name
    if finished:
        (folder / "assets").mkdir(parents=True)
        (folder / "assets" / "train_report.json").write_text(json.dumps({"perk_history": history}))
    else:
        (folder / "ckpt" / "last").mkdir(parents=True)
        (folder / "ckpt" / "last" / "trainer_state.json").write_text(json.dumps({"step": 4, "history": history}))
    (folder / "train.log").write_text("\n".join(log_lines) + "\n")
    return str(folder)


def test_two_runs_lined_up(tmp_path, capsys):
    plain = _run(tmp_path, "plain", [
        "[2/3] PERK meta-training: 4 steps x 8 contexts",
        "  meta step 2/4  loss 2.5000  10s",
        "  meta step 4/4  loss 1.2500  20s  dev EM 12.5%",
    ], [_entry(1, 100.0, 3.0), _entry(3, 7.0, 2.0)], finished=True)
    guard = _run(tmp_path, "guard", [
        "  meta step 1 skipped: gradient norm 900 over the guard's limit 80",
        "  meta step 2/4  loss 2.0000  11s  1 skipped",
        "  meta step 3 skipped: gradient norm 1e+04 over the guard's limit 80",
    ], [_entry(1, 900.0, skipped=True), _entry(2, 8.0, 1.5), _entry(3, 1e4, skipped=True)], finished=False)
    report = hist.main([plain, guard, "--every", "2"])
    (r2, r4) = report["rows"]
    assert r2["plain"] == {"loss_mean_50": 2.5, "dev_em": None, "history_step": 1, "grad_norm": 100.0,
                           "inner_loss_last": 3.0, "max_grad_norm_window": 100.0, "skipped_so_far": 0}
    assert r2["guard"]["loss_mean_50"] == 2.0 and r2["guard"]["history_step"] == 2
    assert r2["guard"]["max_grad_norm_window"] == 900.0 and r2["guard"]["skipped_so_far"] == 1
    assert r4["plain"]["dev_em"] == 12.5 and r4["plain"]["max_grad_norm_window"] == 7.0
    assert r4["guard"] is None  # not logged that far
    assert report["runs"]["guard"]["skipped_steps"] == [1, 3]
    assert report["runs"]["guard"]["history_from"] == "ckpt/last/trainer_state.json"
    out = capsys.readouterr().out
    assert "| 2 | 2.500 | 100 (100) | 3 | 0 |  | 2.000 | 8 (900) | 1.5 | 1 |  |" in out
    assert "guard: 2 steps skipped by the guard" in out


def test_unreadable_folders_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        hist.main([str(tmp_path / "empty")])
    assert "has no train.log" in capsys.readouterr().err
    (tmp_path / "empty" / "train.log").write_text("nothing\n")
    with pytest.raises(SystemExit):
        hist.main([str(tmp_path / "empty")])
    assert "neither assets/train_report.json nor ckpt/last/trainer_state.json" in capsys.readouterr().err
    ok = _run(tmp_path, "ok", ["  meta step 2/4  loss 2.5000  10s"], [_entry(1, 1.0)], finished=True)
    with pytest.raises(SystemExit):
        hist.main([ok, "--every", "0"])
    assert "every=0 is invalid" in capsys.readouterr().err
