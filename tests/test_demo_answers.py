"""bench/demo_answers.py: answer classes of needles, stories and records, on predictions written here
from regenerated examples (so every class is known beforehand), and on the shipped evaluation."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from perk_fast import tasks
from perk_fast.demo_train import BABI_KW

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("demo_answers", os.path.join(_ROOT, "bench", "demo_answers.py"))
answers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(answers)

_RESULTS = os.path.join(_ROOT, "bench", "results")
SHIPPED_EVAL = os.path.join(_RESULTS, "demo_eval")


def _write(folder, examples, predictions, seed):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "predictions.jsonl"), "w", encoding="utf-8") as fh:
        for i, (ex, pred) in enumerate(zip(examples, predictions)):
            fh.write(json.dumps({"index": i, "gold": ex.answer, "prediction": pred, "meta": {"seed": seed}}) + "\n")


def _story_predictions(examples):
    """One prediction of each story class, in turn (where the example allows it), and the class meant."""
    preds, meant = [], []
    for i, ex in enumerate(examples):
        moves = answers.story_moves(ex)
        person = answers.followed_person(ex)
        own = [x for p, x in moves if p == person and x != ex.answer]
        other = [x for p, x in moves if p != person and x not in {y for q, y in moves if q == person}]
        absent = [x for x in tasks.PLACES if x not in {y for _, y in moves}]
        choice = [("right", ex.answer), ("earlier_place", own[0] if own else None),
                  ("other_person_place", other[0] if other else None),
                  ("place_not_in_story", absent[0] if absent else None), ("not_a_place", "moon")][i % 5]
        if choice[1] is None:
            choice = ("right", ex.answer)
        meant.append(choice[0])
        preds.append(choice[1])
    return preds, meant


@pytest.mark.parametrize("spec", ["qa1", "qa2"])
def test_story_answers_fall_in_the_class_they_were_made_for(tmp_path, spec):
    seed = f"test/{spec}"
    examples = tasks.generate(spec, 40, seed=seed, context_tokens=256, position="random", doc_tokens=192, **BABI_KW)
    preds, meant = _story_predictions(examples)
    assert [answers.classify_story_answer(ex, p) for ex, p in zip(examples, preds)] == meant
    _write(tmp_path / spec / "PERK" / "L256_random", examples, preds, seed)
    out = answers.story_breakdown(str(tmp_path), spec)
    counts = out["PERK"][256]
    assert counts["n"] == 40 and all(counts[k] == meant.count(k) for k in answers.STORY_KINDS)
    assert sum(meant.count(k) for k in answers.STORY_KINDS) == 40 and meant.count("earlier_place") > 0
    # the rules, counted by hand: the story's last move; the followed person's first move
    last = sum(answers.story_moves(ex)[-1][1] == ex.answer for ex in examples)
    assert counts["rules"]["last_place_named"] == last
    chance = sum(1 / len({x for p, x in answers.story_moves(ex) if p == answers.followed_person(ex)})
                 for ex in examples)
    assert counts["rules"]["person_place_chance"] == pytest.approx(chance)


def test_qa2_follows_the_person_who_picked_the_object_up():
    ex = tasks.generate("qa2", 1, seed="test/holder", context_tokens=256, position="random", doc_tokens=192,
                        **BABI_KW)[0]
    obj = ex.question.split("the ")[1].rstrip("?")
    holder = answers.followed_person(ex)
    assert f"{holder} " in " ".join(ex.context) and any(
        s in " ".join(ex.context) for s in (f"{holder} picked up the {obj}.", f"{holder} got the {obj}.",
                                            f"{holder} grabbed the {obj}."))
    # qa2's answer is the holder's last place
    assert [x for p, x in answers.story_moves(ex) if p == holder][-1] == ex.answer


def test_records_answers_right_other_record_or_neither(tmp_path):
    seed = "test/records"
    examples = tasks.generate("records_recall", 30, seed=seed, context_tokens=256, position="random", doc_tokens=192)
    preds, meant = [], []
    for i, ex in enumerate(examples):
        asked = ex.question.split("student ")[1].split(" ")[0].rstrip("?")
        column = answers._FIELDS[ex.meta["kind"]]
        others = [m.group(column) for m in answers._RECORD_RE.finditer(" ".join(ex.context))
                  if m.group(1) != asked and m.group(column) != ex.answer]
        if i % 3 == 1 and others:
            preds.append(others[0])
            meant.append("other_record_value")
        elif i % 3 == 2:
            preds.append("nobody")
            meant.append("neither")
        else:
            preds.append(ex.answer)
            meant.append("right")
    assert [answers.classify_record_answer(ex, p) for ex, p in zip(examples, preds)] == meant
    assert meant.count("other_record_value") > 0
    _write(tmp_path / "records_recall" / "PERK" / "L256_random", examples, preds, seed)
    out = answers.records_breakdown(str(tmp_path))[256]
    assert out["all"]["n"] == 30 and all(out["all"][k] == meant.count(k) for k in answers.RECORD_KINDS)
    assert sum(c["n"] for f, c in out.items() if f != "all") == 30


def test_a_prediction_that_does_not_regenerate_is_refused(tmp_path):
    seed = "test/qa1"
    examples = tasks.generate("qa1", 3, seed=seed, context_tokens=256, position="random", doc_tokens=192, **BABI_KW)
    _write(tmp_path / "qa1" / "PERK" / "L256_random", examples, [e.answer for e in examples], seed)
    assert answers.story_breakdown(str(tmp_path), "qa1")["PERK"][256]["right"] == 3
    with pytest.raises(ValueError, match="does not regenerate"):  # another seed's stories
        _write(tmp_path / "qa1" / "PERK" / "L256_random", examples, [e.answer for e in examples], "test/other")
        answers.story_breakdown(str(tmp_path), "qa1")
    with pytest.raises(FileNotFoundError, match="FT-ICR"):
        answers.story_breakdown(str(tmp_path), "qa1", systems=("FT-ICR",))
    with pytest.raises(ValueError, match="qa1 or qa2"):
        answers.story_breakdown(str(tmp_path), "records_recall")


def test_the_shipped_evaluation_reads_back(capsys):
    """The README's numbers: the shipped model's qa1 answers at 256 tokens (n = 100) and its needles
    among 3 others, and the same of curriculum14 and curriculum13 (shipped before it, in turn) and curriculum9
    (shipped before the ordered-id runs), curriculum17 and curriculum18 (evaluated, not adopted); then the
    shipped model, curriculum17 and curriculum18 on the second held-out seed."""
    for folder, qa1, at256, at1024 in (
            (SHIPPED_EVAL, 76, (297, 0, 3), (292, 0, 8)),  # curriculum15 written with segment_recency 0.5
            (os.path.join(_RESULTS, "demo_eval_curriculum15"), 71, (298, 0, 2), (295, 0, 5)),
            (os.path.join(_RESULTS, "demo_eval_curriculum14"), 69, (299, 0, 1), (299, 0, 1)),
            (os.path.join(_RESULTS, "demo_eval_curriculum13"), 65, (295, 0, 5), (291, 0, 9)),
            (os.path.join(_RESULTS, "demo_eval_curriculum9"), 45, (286, 5, 9), (268, 8, 24)),
            (os.path.join(_RESULTS, "demo_eval_curriculum17"), 65, (298, 0, 2), (297, 0, 3)),
            (os.path.join(_RESULTS, "demo_eval_curriculum18"), 69, (294, 0, 6), (293, 3, 4)),
            # the same models on the second held-out seed, demo-fresh
            (os.path.join(_RESULTS, "demo_fresh_seed", "curriculum15_recency"), 72, (293, 3, 4), (287, 3, 10)),
            (os.path.join(_RESULTS, "demo_fresh_seed", "curriculum15"), 59, (296, 3, 1), (290, 4, 6)),
            (os.path.join(_RESULTS, "demo_fresh_seed", "curriculum17"), 59, (300, 0, 0), (295, 0, 5)),
            (os.path.join(_RESULTS, "demo_fresh_seed", "curriculum18"), 61, (298, 2, 0), (299, 0, 1))):
        out = answers.story_breakdown(folder, "qa1", systems=("PERK",))["PERK"][256]
        assert out["n"] == 100 and out["right"] == qa1, folder
        needles = answers.breakdown(folder)
        for length, (right, other, neither) in ((256, at256), (1024, at1024)):
            assert needles[length] == {"right": right, "other_code": other, "neither": neither, "n": 300}, folder
    answers.main([SHIPPED_EVAL, "--spec", "records_recall"])
    assert "name (n=" in capsys.readouterr().out


def test_last_two_moves_placement_reads_the_memorys_segments():
    """Hand-made stories whose last two moves of the asked person lie where the name says (segments of
    64 tokens: a document longer than that is cut into pieces that keep its doc id)."""
    ex = lambda docs: tasks.Example(context=docs, question="Where is John?", answer="garden")  # noqa: E731
    filler = "The sky was grey over the town that day. "  # 41 bytes: two of them and a move fill a piece
    cases = {
        "one_move": ["Mary went to the office.", "John moved to the garden."],
        "same_segment": ["John went to the office. John moved to the garden.", "Mary went to the hallway."],
        "two_documents": ["John went to the office. Mary went to the hallway.", "John moved to the garden."],
        "two_pieces_of_one_document": ["John went to the office. " + filler * 2 + "John moved to the garden."],
    }
    for want, docs in cases.items():
        assert answers.last_two_moves_placement(ex(docs), segment_len=64) == want, want
    # an earlier move elsewhere does not matter: the last two are what is judged
    story = ["John went to the kitchen.", "John went to the office. John moved to the garden."]
    assert answers.last_two_moves_placement(ex(story), segment_len=64) == "same_segment"
    # a whole-segment document holds both moves at 128 tokens, two pieces at 64
    one_doc = ["John went to the office. " + filler + "John moved to the garden."]
    assert answers.last_two_moves_placement(ex(one_doc), segment_len=128) == "same_segment"
    assert answers.last_two_moves_placement(ex(one_doc), segment_len=64) == "two_pieces_of_one_document"


def test_placement_breakdown_counts_right_answers_per_placement(tmp_path):
    seed = "test/placement"
    examples = tasks.generate("qa1", 40, seed=seed, context_tokens=256, position="random", doc_tokens=192, **BABI_KW)
    preds = [ex.answer if i % 2 else "moon" for i, ex in enumerate(examples)]
    _write(tmp_path / "qa1" / "PERK" / "L256_random", examples, preds, seed)
    cells = answers.placement_breakdown(str(tmp_path), "qa1")["PERK"][256]
    kinds = [answers.last_two_moves_placement(ex) for ex in examples]
    for kind in answers.PLACEMENTS:
        mine = [i for i, k in enumerate(kinds) if k == kind]
        assert cells[kind]["n"] == len(mine) and cells[kind]["right"] == sum(i % 2 for i in mine), kind
    assert sum(c["n"] for c in cells.values()) == 40 and cells["one_move"]["chance"] == cells["one_move"]["n"]
    assert len({k for k in kinds}) >= 3  # the stories of the demo's evaluation fall in several placements
