"""bench/demo_model_size.py on a tiny size: every stage runs, the JSON holds what the table prints."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from perk_fast.demo_train import CHAINS, spec_label

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("demo_model_size", os.path.join(_ROOT, "bench", "demo_model_size.py"))
size = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(size)


@pytest.mark.parametrize("bad", ["96", "96x", "x2", "98x2", "96x0", "0x2", "ax2"])
def test_a_bad_size_is_named(bad):
    with pytest.raises(ValueError, match=repr(bad)):
        size.parse_size(bad)


def test_the_recipe_is_the_shipped_mix_at_another_size():
    shipped = CHAINS["mix"][-1].recipe
    r = size.size_recipe(192, 4, steps=10, lm_steps=None, threads=1)
    assert (r.hidden_size, r.num_hidden_layers, r.intermediate_size) == (192, 4, 576)
    assert r.init_from is None and r.mix == shipped.mix and r.doc_mix == shipped.doc_mix and r.perk == shipped.perk
    assert r.lm_steps == shipped.lm_steps and r.meta_steps == 10 and r.icr_lr == shipped.icr_lr


def test_a_tiny_run_writes_every_size(tmp_path, capsys):
    out = tmp_path / "size.json"
    common = ["--steps", "2", "--lm-steps", "2", "-n", "2", "--perk-steps", "1", "--threads", "1", "--out", str(out)]
    first = size.main(["--sizes", "16x1"] + common)
    result = size.main(["--sizes", "16x2", "--append"] + common)  # a later size joins the earlier rows
    assert result["sizes"][0] == first["sizes"][0] and result["total_s"] > first["total_s"]
    with pytest.raises(SystemExit):  # a size already there is not run twice
        size.main(["--sizes", "16x1", "--append"] + common)
    with pytest.raises(SystemExit):  # nor added to rows of another budget
        size.main(["--sizes", "16x3", "--append"] + common[:1] + ["3"] + common[2:])
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1].startswith("qa1 read in the prompt after 2 FT-ICR steps: 16x1 ")
    assert json.loads(out.read_text()) == result
    labels = [spec_label(s) for s in CHAINS["mix"][-1].recipe.eval_tasks]
    rows = result["sizes"]
    assert [r["size"] for r in rows] == ["16x1", "16x2"] and rows[1]["parameters"] > rows[0]["parameters"]
    for r in rows:
        assert list(r["exact_match"]) == labels and all(0 <= v <= 100 for v in r["exact_match"].values())
        assert r["perk_step_s"] > 0 and r["icr_s"] > 0 and r["lm_final_loss"] > 0


def test_bad_arguments_exit(tmp_path):
    for argv in (["--sizes", "96x2,97x2"], ["--steps", "0"], ["--perk-steps", "-1"]):
        with pytest.raises(SystemExit):
            size.main(argv + ["--out", str(tmp_path / "x.json")])
