"""What a demo model's needle answers are: right, another person's code from the same context, or
neither, per evaluation length, read from the held-out predictions a demo_train run wrote.

    python bench/demo_answers.py bench/results/demo_curriculum3/eval [--spec needle-3 --distractors 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re

from perk_fast import tasks


def breakdown(eval_dir: str, spec: str = "needle-3", distractors: int = 3, doc_tokens: int = 192,
              lengths=(256, 1024), positions=("pre", "mid", "post")) -> dict:
    """``{length: {"right", "other_code", "neither", "n"}}`` over the PERK predictions of ``eval_dir``;
    each example is regenerated from its recorded seed (and checked against the recorded answer)."""
    out = {}
    for length in lengths:
        counts = {"right": 0, "other_code": 0, "neither": 0, "n": 0}
        for pos in positions:
            path = os.path.join(eval_dir, spec, "PERK", f"L{length}_{pos}", "predictions.jsonl")
            with open(path, encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh]
            examples = tasks.generate("needle", len(rows), seed=rows[0]["meta"]["seed"], context_tokens=length,
                                      position=pos, n_distractors=distractors, doc_tokens=doc_tokens)
            for row, ex in zip(rows, examples):
                if ex.answer != row["gold"]:
                    raise ValueError(f"{path}: example {row['index']} does not regenerate (answer {ex.answer!r} "
                                     f"!= recorded {row['gold']!r})")
                codes = re.findall(r"is (\d+)\.", " ".join(ex.context))
                key = ("right" if row["prediction"] == row["gold"]
                       else "other_code" if row["prediction"] in codes else "neither")
                counts[key] += 1
                counts["n"] += 1
        out[length] = counts
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir")
    ap.add_argument("--spec", default="needle-3")
    ap.add_argument("--distractors", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=192)
    args = ap.parse_args(argv)
    result = breakdown(args.eval_dir, args.spec, args.distractors, args.doc_tokens)
    for length, c in result.items():
        among = c["right"] + c["other_code"]
        print(f"{length:>6} tokens: right {c['right']}, other person's code {c['other_code']}, neither "
              f"{c['neither']} (n={c['n']}; right among context codes {100 * c['right'] / max(1, among):.0f}%)")


if __name__ == "__main__":
    main()
