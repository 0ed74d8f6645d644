"""bench/demo_order_bound.py: the exact reader's answers on hand-made stories whose bound is known."""
from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from perk_fast.tokenizer import ByteTokenizer

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("demo_order_bound", os.path.join(_ROOT, "bench", "demo_order_bound.py"))
bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bound)
TOK = ByteTokenizer()


def _story(docs, answer, question="Where is Mary?"):
    return SimpleNamespace(context=docs, question=question, answer=answer)


def test_two_documents_order_is_known_only_from_ordered_ids():
    ex = _story(["Mary went to the kitchen. John went to the office.", "Mary went to the garden."], "garden")
    assert [c for _, _, c in bound.segment_candidates(ex, TOK, 128)] == ["kitchen", "garden"]
    assert bound.bounds(ex, TOK, 128) == {"unordered": 0.5, "ordered_ids": 1.0}


def test_pieces_of_one_document_are_ordered_only_by_the_eos_of_the_last():
    two = _story(["Mary went to the kitchen. Mary went to the garden."], "garden")
    assert bound.bounds(two, TOK, 40) == {"unordered": 0.5, "ordered_ids": 1.0}
    # the last piece holds no move of Mary: her two pieces before it are unordered
    three = _story(["Mary went to the kitchen. Mary went to the office. One red bird sings."], "office")
    assert len(bound.segment_candidates(three, TOK, 40)) == 2
    assert bound.bounds(three, TOK, 40) == {"unordered": 0.5, "ordered_ids": 0.5}
    # the same place twice: the most frequent candidate is the best pick
    again = _story(["Mary went to the office.", "Mary went to the kitchen.", "Mary went to the office."], "office")
    assert bound.bounds(again, TOK, 128) == {"unordered": 1.0, "ordered_ids": 1.0}


def test_qa2_follows_the_holder():
    ex = _story(["John went to the hallway. Mary got the milk.", "Mary went to the bedroom. John went to the office."],
                "bedroom", question="Where is the milk?")
    assert [c for _, _, c in bound.segment_candidates(ex, TOK, 128)] == ["bedroom"]
    assert bound.bounds(ex, TOK, 128) == {"unordered": 1.0, "ordered_ids": 1.0}
    with pytest.raises(ValueError, match="no segment holds a move"):
        bound.bounds(_story(["John went to the hallway."], "hallway"), TOK, 128)


def test_the_script_writes_its_table(tmp_path, capsys):
    out = tmp_path / "b.json"
    result = bound.main(["--tasks", "qa1", "--lengths", "256", "--docs", "192", "-n", "20", "--out", str(out)])
    assert json.loads(out.read_text()) == result and len(result["rows"]) == 1
    row = result["rows"][0]
    assert 0 < row["unordered"] < row["ordered_ids"] <= 100
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("an exact memory of unordered segments")
    with pytest.raises(SystemExit):
        bound.main(["--tasks", "qa3", "--out", str(out)])
