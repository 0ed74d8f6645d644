"""What a demo model's answers are, read from the held-out predictions a demo_train run wrote.

    python bench/demo_answers.py bench/results/demo_curriculum3/eval [--spec needle-3 --distractors 3]
    python bench/demo_answers.py bench/results/demo_eval --spec qa1 [--systems PERK,FT-ICR]
    python bench/demo_answers.py bench/results/demo_eval --spec qa1 --by-placement --systems PERK,FT-ICR

Needles: right, another person's code from the same context, or neither, per evaluation length.
Records recall (``--spec records_recall``): per asked field, right, that field's value in another
record of the context, or neither.
Stories (``qa1`` / ``qa2``): right; an earlier place of the person the answer follows (the asked
person for qa1, the one who picked the object up for qa2); a place only another person went to; a
place not in the story; or no place at all -- and, on the same examples, the exact match of two
rules that read no binding: "the last place the story names" and "a place the person went to, the
first one" (and the expected exact match of a uniformly drawn place of that person). A memory
whose answers are mostly the person's earlier places holds the person's moves but not their order;
one whose answers are the other person's places has lost who went where. ``--by-placement``: the
exact match split by where the followed person's last two moves lie among the segments the memory
is written from (the same segment, two pieces of one document, two documents, or one move only).
"""
from __future__ import annotations

import argparse
import json
import os
import re

from perk_fast import tasks
from perk_fast.demo_train import BABI_KW

_MOVE_RE = re.compile(r"(\w+) (?:went|moved|travelled|journeyed) to the (\w+)\.")
_GRAB_RE = re.compile(r"(\w+) (?:picked up|got|grabbed) the (\w+)\.")
_RECORD_RE = re.compile(r"Student <(\d+)>, Name: ([^,]+), Year: ([^,]+), School: ([^,]+), Major: ([^,]+), "
                        r"Grade: (\d+)")
_FIELDS = {"name": 1, "year": 2, "school": 3, "major": 4, "grade": 5}
RECORD_KINDS = ("right", "other_record_value", "neither")
STORY_KINDS = ("right", "earlier_place", "other_person_place", "place_not_in_story", "not_a_place")


def breakdown(eval_dir: str, spec: str = "needle-3", distractors: int = 3, doc_tokens: int = 192,
              lengths=(256, 1024), positions=("pre", "mid", "post")) -> dict:
    """``{length: {"right", "other_code", "neither", "n"}}`` over the PERK predictions of ``eval_dir``;
    each example is regenerated from its recorded seed (and checked against the recorded answer)."""
    out = {}
    for length in lengths:
        counts = {"right": 0, "other_code": 0, "neither": 0, "n": 0}
        for pos in positions:
            path = os.path.join(eval_dir, spec, "PERK", f"L{length}_{pos}", "predictions.jsonl")
            for row, ex in regenerated(path, "needle", length, pos, doc_tokens, n_distractors=distractors):
                codes = re.findall(r"is (\d+)\.", " ".join(ex.context))
                key = ("right" if row["prediction"] == row["gold"]
                       else "other_code" if row["prediction"] in codes else "neither")
                counts[key] += 1
                counts["n"] += 1
        out[length] = counts
    return out


def story_moves(example) -> list[tuple[str, str]]:
    """The (person, place) moves of a story example's context, in time order."""
    return _MOVE_RE.findall(" ".join(example.context))


def followed_person(example) -> str:
    """Whose last place answers the question: the asked person (qa1) or the one who picked the asked
    object up (qa2)."""
    asked = re.match(r"Where is (?:the (\w+)|(\w+))\?$", example.question)
    if asked is None:
        raise ValueError(f"question {example.question!r} is neither qa1's nor qa2's")
    if asked.group(2):
        return asked.group(2)
    holders = [p for p, o in _GRAB_RE.findall(" ".join(example.context)) if o == asked.group(1)]
    if len(holders) != 1:
        raise ValueError(f"{example.question!r}: {len(holders)} people picked up the {asked.group(1)}")
    return holders[0]


def classify_story_answer(example, prediction: str) -> str:
    """One of ``STORY_KINDS`` for ``prediction`` to a qa1 / qa2 ``example``."""
    if prediction == example.answer:
        return "right"
    moves = story_moves(example)
    person = followed_person(example)
    own = {x for p, x in moves if p == person}
    if prediction in own:
        return "earlier_place"
    if prediction in {x for _, x in moves}:
        return "other_person_place"
    return "place_not_in_story" if prediction in tasks.PLACES else "not_a_place"


def rule_answers(example) -> dict[str, str]:
    """The answers of the two rules that read no binding (see the module doc)."""
    moves = story_moves(example)
    person = followed_person(example)
    own = [x for p, x in moves if p == person]
    return {"last_place_named": moves[-1][1], "first_place_of_person": own[0]}


def person_place_chance(example) -> float:
    """Exact match expected from answering a uniformly drawn place the person went to."""
    person = followed_person(example)
    own = {x for p, x in story_moves(example) if p == person}
    return 1.0 / len(own)


def classify_record_answer(example, prediction: str) -> str:
    """One of ``RECORD_KINDS`` for ``prediction`` to a records-recall ``example``: right, the asked
    field's value in another record of the context, or neither."""
    if prediction == example.answer:
        return "right"
    asked = re.search(r"student (\d+)", example.question).group(1)
    column = _FIELDS[example.meta["kind"]]
    others = {m.group(column) for m in _RECORD_RE.finditer(" ".join(example.context)) if m.group(1) != asked}
    return "other_record_value" if prediction in others else "neither"


def regenerated(path: str, task: str, length: int, position: str, doc_tokens: int, **task_kw) -> list:
    """``[(prediction row, regenerated example), ...]`` of one ``predictions.jsonl``: each example is
    regenerated from its recorded seed and checked against the recorded answer."""
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    examples = tasks.generate(task, len(rows), seed=rows[0]["meta"]["seed"], context_tokens=length,
                              position=position, doc_tokens=doc_tokens, **task_kw)
    for row, ex in zip(rows, examples):
        if ex.answer != row["gold"]:
            raise ValueError(f"{path}: example {row['index']} does not regenerate (answer {ex.answer!r} "
                             f"!= recorded {row['gold']!r})")
    return list(zip(rows, examples))


def regenerated_cells(eval_dir: str, spec: str, system: str, doc_tokens: int = 192, **task_kw):
    """Yield ``(length, pairs)`` per position folder (``L<length>_<position>``) of
    ``eval_dir/spec/<system>``, ``pairs`` as :func:`regenerated` gives them."""
    folder = os.path.join(eval_dir, spec, system.replace(" ", "_"))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no predictions of system {system!r} at {folder}")
    for cell in sorted(os.listdir(folder)):
        m = re.fullmatch(r"L(\d+)_(\w+)", cell)
        if m is not None:
            length = int(m.group(1))
            yield length, regenerated(os.path.join(folder, cell, "predictions.jsonl"), spec, length, m.group(2),
                                      doc_tokens, **task_kw)


def records_breakdown(eval_dir: str, system: str = "PERK", doc_tokens: int = 192) -> dict:
    """``{length: {field: {kind: count, "n"}}}`` over the records-recall predictions of ``system``
    (every position folder), plus a field ``"all"`` (:func:`regenerated_cells`)."""
    out: dict = {}
    for length, pairs in regenerated_cells(eval_dir, "records_recall", system, doc_tokens):
        per_field = out.setdefault(length, {})
        for row, ex in pairs:
            kind = classify_record_answer(ex, row["prediction"])
            for key in (ex.meta["kind"], "all"):
                c = per_field.setdefault(key, {**{k: 0 for k in RECORD_KINDS}, "n": 0})
                c[kind] += 1
                c["n"] += 1
    return {length: dict(sorted(v.items())) for length, v in sorted(out.items())}


def story_breakdown(eval_dir: str, spec: str = "qa1", systems=("PERK",), doc_tokens: int = 192) -> dict:
    """``{system: {length: {kind: count, "n", "rules": {rule: right}}}}`` over every position folder
    of ``eval_dir/spec/<system>`` (:func:`regenerated_cells`)."""
    if spec not in ("qa1", "qa2"):
        raise ValueError(f"spec {spec!r} is invalid: the story breakdown reads qa1 or qa2")
    out = {}
    for system in systems:
        per_length: dict = {}
        for length, pairs in regenerated_cells(eval_dir, spec, system, doc_tokens, **BABI_KW):
            counts = per_length.setdefault(length, {**{k: 0 for k in STORY_KINDS}, "n": 0, "rules": {
                "last_place_named": 0, "first_place_of_person": 0, "person_place_chance": 0.0}})
            for row, ex in pairs:
                counts[classify_story_answer(ex, row["prediction"])] += 1
                counts["n"] += 1
                for rule, answer in rule_answers(ex).items():
                    counts["rules"][rule] += answer == ex.answer
                counts["rules"]["person_place_chance"] += person_place_chance(ex)
        out[system] = dict(sorted(per_length.items()))
    return out


PLACEMENTS = ("one_move", "same_segment", "two_pieces_of_one_document", "two_documents")


def last_two_moves_placement(example, segment_len: int = 128) -> str:
    """Where the followed person's last two moves lie among the segments PERK's inner loop writes
    (``build_segments`` with ordered ids, as in every evaluation): ``one_move`` (the person moved
    once), in the ``same_segment``, in two pieces of one document longer than a segment (they share
    its doc id: only the EOS ending the last piece tells them apart), or in ``two_documents`` (told
    apart by their ids). Move sentences are matched in time order across the segments."""
    from perk_fast.data import build_segments
    from perk_fast.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    person = followed_person(example)
    where = []  # (segment index, doc id) of each of the person's moves, in order
    segments = build_segments(tok, example.context, segment_len).segments
    for k, (ids, _) in enumerate(segments):
        text = tok.decode(ids)
        doc = re.match(r"\s*doc_(\d+):", text)
        where += [(k, doc.group(1)) for p, _ in _MOVE_RE.findall(text) if p == person]
    own = [x for p, x in story_moves(example) if p == person]
    if len(where) != len(own):
        raise ValueError(f"{example.question!r}: {len(own)} moves of {person} in the context, {len(where)} in its "
                         f"segments")
    if len(where) == 1:
        return "one_move"
    (seg_a, doc_a), (seg_b, doc_b) = where[-2:]
    if seg_a == seg_b:
        return "same_segment"
    return "two_pieces_of_one_document" if doc_a == doc_b else "two_documents"


def placement_breakdown(eval_dir: str, spec: str = "qa1", systems=("PERK",), doc_tokens: int = 192,
                        segment_len: int = 128) -> dict:
    """``{system: {length: {placement: {"right", "n", "chance"}}}}``: exact match by
    :func:`last_two_moves_placement` over every position folder of ``eval_dir/spec/<system>``, and the
    expected right answers of a uniformly drawn place of the followed person (:func:`person_place_chance`)."""
    if spec not in ("qa1", "qa2"):
        raise ValueError(f"spec {spec!r} is invalid: the placement breakdown reads qa1 or qa2")
    out = {}
    for system in systems:
        per_length: dict = {}
        for length, pairs in regenerated_cells(eval_dir, spec, system, doc_tokens, **BABI_KW):
            cells = per_length.setdefault(length, {k: {"right": 0, "n": 0, "chance": 0.0} for k in PLACEMENTS})
            for row, ex in pairs:
                c = cells[last_two_moves_placement(ex, segment_len)]
                c["right"] += row["prediction"] == ex.answer
                c["n"] += 1
                c["chance"] += person_place_chance(ex)
        out[system] = dict(sorted(per_length.items()))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir")
    ap.add_argument("--spec", default="needle-3")
    ap.add_argument("--distractors", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=192)
    ap.add_argument("--systems", default="PERK",
                    help="stories and records: comma list of systems (folders under the task)")
    ap.add_argument("--by-placement", action="store_true",
                    help="stories: exact match by where the followed person's last two moves lie among the "
                         "memory's segments (one move, one segment, two pieces of one document, two documents)")
    ap.add_argument("--segment-len", type=int, default=128, help="--by-placement: the memory's segment length")
    args = ap.parse_args(argv)
    if args.by_placement:
        result = placement_breakdown(args.eval_dir, args.spec, args.systems.split(","), args.doc_tokens,
                                     args.segment_len)
        for system, per_length in result.items():
            for length, cells in per_length.items():
                print(f"{system:>10} {length:>5} tokens: " + ", ".join(
                    f"{k.replace('_', ' ')} {100 * c['right'] / c['n']:.0f}% (n={c['n']}, a place of the person "
                    f"drawn at random {100 * c['chance'] / c['n']:.0f}%)" if c["n"] else
                    f"{k.replace('_', ' ')} - (n=0)" for k, c in cells.items()))
        return
    if args.spec == "records_recall":
        for system in args.systems.split(","):
            for length, fields in records_breakdown(args.eval_dir, system, args.doc_tokens).items():
                for field, c in fields.items():
                    print(f"{system:>10} {length:>5} tokens {field:>7} (n={c['n']}): "
                          + ", ".join(f"{k.replace('_', ' ')} {100 * c[k] / c['n']:.0f}%" for k in RECORD_KINDS))
        return
    if args.spec in ("qa1", "qa2"):
        result = story_breakdown(args.eval_dir, args.spec, args.systems.split(","), args.doc_tokens)
        for system, per_length in result.items():
            for length, c in per_length.items():
                pct = lambda k: 100 * k / max(1, c["n"])  # noqa: E731
                print(f"{system:>10} {length:>5} tokens (n={c['n']}): "
                      + ", ".join(f"{k.replace('_', ' ')} {pct(c[k]):.0f}%" for k in STORY_KINDS)
                      + "; rules: " + ", ".join(f"{k.replace('_', ' ')} {pct(v):.0f}%" for k, v in c["rules"].items()))
        return
    result = breakdown(args.eval_dir, args.spec, args.distractors, args.doc_tokens)
    for length, c in result.items():
        among = c["right"] + c["other_code"]
        print(f"{length:>6} tokens: right {c['right']}, other person's code {c['other_code']}, neither "
              f"{c['neither']} (n={c['n']}; right among context codes {100 * c['right'] / max(1, among):.0f}%)")


if __name__ == "__main__":
    main()
