"""bench/demo_meta_diff.py against the recorded runs' files read directly."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
from safetensors.torch import load_file

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("demo_meta_diff", os.path.join(_ROOT, "bench", "demo_meta_diff.py"))
diff = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diff)

RANK16 = os.path.join(_ROOT, "bench", "results", "demo_curriculum8", "assets")
RANK64 = os.path.join(_ROOT, "bench", "results", "demo_curriculum11", "assets")  # curriculum8 grown to rank 64


def test_the_summary_is_the_runs_own_first_step_rates_and_b_norms(capsys):
    out = diff.main([RANK16, RANK64])
    assert "|B| cols<16" in capsys.readouterr().out
    for run, rank in ((RANK16, 16), (RANK64, 64)):
        meta = load_file(os.path.join(run, "perk", "meta_parameters.safetensors"))
        with open(os.path.join(run, "train_report.json"), encoding="utf-8") as fh:
            history = json.load(fh)["perk_history"]
        first, last = history[0], history[-25:]
        s = out[run]
        assert s["rank"] == rank and s["first_step"]["step"] == 1 == first["step"]
        assert s["first_step"]["inner_loss_last"] == first["inner_loss_last"] and s["first_step"]["loss"] == first["loss"]
        assert s["last_logged"]["steps"] == (last[0]["step"], last[-1]["step"]) and len(history) > 25
        for k in ("loss", "inner_loss_first", "inner_loss_last"):
            assert s["last_logged"][k] == pytest.approx(sum(h[k] for h in last) / 25, rel=1e-12)
        assert s["inner_lr_mean_abs"] == pytest.approx(meta["inner_lrs"].abs().mean().item(), rel=1e-6)
        sq = [(v.double() ** 2) for k, v in meta.items() if k.startswith("lora_B.")]
        learned = sum(x[:, :16].sum() for x in sq).sqrt().item()
        new = sum(x[:, 16:].sum() for x in sq).sqrt().item()
        assert s["b_norm_first"] == pytest.approx(learned, rel=1e-9) and s["b_norm_rest"] == pytest.approx(new, abs=1e-12)
    assert out[RANK16]["b_norm_rest"] == 0 and out[RANK64]["b_norm_rest"] > 0  # the grown memory's new B columns moved


def test_a_folder_without_a_run_is_named(tmp_path):
    with pytest.raises(SystemExit):
        diff.main([RANK16, str(tmp_path)])
    with pytest.raises(ValueError, match="no train_report.json"):
        diff.read_run(str(tmp_path))
