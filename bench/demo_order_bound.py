"""How much of qa1 / qa2 a memory can answer at all when it does not know its segments' order.

    python bench/demo_order_bound.py                 # qa1, qa2; 256 and 1,024 tokens; n = 300
    python bench/demo_order_bound.py --tasks qa1 -n 50 --docs 192

qa1 ("Where is Mary?") and qa2 ("Where is the milk?") are answered by the *last* move of a
person. PERK writes the context into its memory from segments of ``segment_len`` tokens, each
``doc_<id>: ...``; the inner loop's loss sums over the segments, so the memory can know their order
only from those ids. With ``PerkConfig.shuffle_docs=True`` (the default, and the demo's training)
the ids are a random permutation in training, and the pieces of a document longer than a segment
share its id; a memory meta-trained that way learns nothing from the ids about order.

For each story the script asks what a reader that holds every segment *exactly* could answer:

* ``unordered``: no order between segments: the candidates are the followed person's last place in
  each segment holding one of their moves; the best answer is the most frequent candidate (ties
  shared). This bounds a memory meta-trained with shuffled ids, however good.
* ``ordered_ids``: document ids in order (``shuffle_docs=False``): the last document holding a
  move is known; inside it the piece ending with EOS is known to be last, other pieces of the same
  document are unordered as above.

Prints a table and a summary line; writes ``bench/results/demo_order_bound.json``.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os

from perk_fast import tasks
from perk_fast.data import build_segments
from perk_fast.demo_train import BABI_KW
from perk_fast.tokenizer import ByteTokenizer

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("demo_answers", os.path.join(_HERE, "demo_answers.py"))
answers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(answers)
OUT = os.path.join(_HERE, "results", "demo_order_bound.json")


def best_pick(candidates: list[str], answer: str) -> float:
    """Exact match of answering the most frequent candidate (ties: each equally likely)."""
    counts = collections.Counter(candidates)
    top = max(counts.values())
    best = [c for c, k in counts.items() if k == top]
    return (answer in best) / len(best)


def segment_candidates(example, tokenizer, segment_len: int) -> list[tuple[int, bool, str]]:
    """``(doc id, ends with EOS, the followed person's last place in it)`` per segment holding one
    of that person's moves, in the order the segments are built (ids in order: no shuffle)."""
    person = answers.followed_person(example)
    eos = tokenizer.decode([tokenizer.eos_token_id])
    out = []
    for ids, _ in build_segments(tokenizer, example.context, segment_len).segments:
        text = tokenizer.decode(ids)
        doc = int(text.split(":", 1)[0].rsplit("_", 1)[1])
        own = [x for p, x in answers._MOVE_RE.findall(text) if p == person]
        if own:
            out.append((doc, text.endswith(eos), own[-1]))
    return out


def bounds(example, tokenizer, segment_len: int) -> dict[str, float]:
    """``{"unordered": EM, "ordered_ids": EM}`` of the exact reader of the module doc on one story."""
    cands = segment_candidates(example, tokenizer, segment_len)
    if not cands:
        raise ValueError(f"{example.question!r}: no segment holds a move of the person it follows")
    unordered = best_pick([c for _, _, c in cands], example.answer)
    last_doc = max(d for d, _, _ in cands)
    pieces = [(e, c) for d, e, c in cands if d == last_doc]
    final = [c for e, c in pieces if e]
    ordered = float(final[0] == example.answer) if final else best_pick([c for _, c in pieces], example.answer)
    return {"unordered": unordered, "ordered_ids": ordered}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="qa1,qa2")
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--docs", default="64,128,192,256", help="document sizes (bytes); the demo trains on "
                    "64 / 128 / 256 and evaluates on 192")
    ap.add_argument("--segment-len", type=int, default=128)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--seed", default="bench-order-bound")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"-n {args.n} is invalid: allowed an integer >= 1")
    task_list = args.tasks.split(",")
    if any(t not in ("qa1", "qa2") for t in task_list):
        ap.error(f"--tasks {args.tasks!r} is invalid: allowed qa1 and / or qa2")
    tokenizer = ByteTokenizer()
    rows = []
    for task in task_list:
        for length in (int(x) for x in args.lengths.split(",")):
            for doc in (int(x) for x in args.docs.split(",")):
                examples = tasks.generate(task, args.n, seed=f"{args.seed}/{task}", context_tokens=length,
                                          position="random", doc_tokens=doc, **BABI_KW)
                got = [bounds(ex, tokenizer, args.segment_len) for ex in examples]
                rows.append({"task": task, "length": length, "doc_tokens": doc, "n": args.n, **{
                    k: round(100 * sum(g[k] for g in got) / len(got), 1) for k in ("unordered", "ordered_ids")}})
    print(f"{'task':<5} {'length':>6} {'doc':>5} {'unordered':>10} {'ordered ids':>12}   (exact reader, EM %)")
    for r in rows:
        print(f"{r['task']:<5} {r['length']:>6} {r['doc_tokens']:>5} {r['unordered']:>10.1f} {r['ordered_ids']:>12.1f}")
    eval_rows = [r for r in rows if r["doc_tokens"] == 192 and r["task"] == "qa1"] or rows
    summary = (f"an exact memory of unordered segments answers {eval_rows[0]['task']} at {eval_rows[0]['length']} "
               f"tokens (documents of {eval_rows[0]['doc_tokens']}) {eval_rows[0]['unordered']:.0f}% of the time; "
               f"with ordered document ids {eval_rows[0]['ordered_ids']:.0f}%")
    print(summary)
    result = {"segment_len": args.segment_len, "seed": args.seed, "rows": rows, "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
