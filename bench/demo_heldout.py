"""Independent held-out check of the single-needle demo model (shipped until the binding chain
replaced it; ``--assets`` takes another), with controls that would expose a model
that does not read its memory.

    python bench/demo_heldout.py                       # seed "bench-heldout", n=100 per cell
    python bench/demo_heldout.py --seed other -n 50 --lengths 256,1024,2048

1. Exact match of PERK on needle-in-a-haystack contexts from a seed that neither training nor the
   shipped evaluation used, for each length x needle position (the demo table's PERK row, and
   lengths beyond it when asked).
2. Controls on the training length (``mid`` position):
   * ``swapped memory``: question i answered from the memory of context i+1. A model that reads
     its memory answers context i+1's code: EM against gold i falls to ~0, against gold i+1 it
     stays high.
   * ``no needle``: the memory of a context with the needle sentence removed. EM must be ~0.
   * ``other name``: the question asks for a person who is not in the context. There is no right
     answer; the row reports how often the memory's own code comes out anyway -- a measure of
     whether the model binds the code to the name (the demo's single-needle training never asks it to).
   * ``paraphrases``: three phrasings of the question never seen in training.
   * ``k other needles``: contexts that also hold the codes of k other people (the demo trains on
     single needles only): whether the memory answers the code of the person asked, and how often
     it answers any code of the context at all.
   * ``fresh adapter, PERK base``: the jointly meta-trained base with *default* meta-parameters
     (PEFT LoRA init, every learned learning rate at ``inner_lr``, untrained weighting model) --
     how much of the result the meta-learned memory initialisation and learning rates carry.

Prints a table, ends with a one-line summary and writes ``bench/results/demo_heldout.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

import torch

from perk_fast import demo_train, evaluate
from perk_fast.demo import PARAPHRASES, load_demo, needle_name
from perk_fast.demo_train import NEEDLE_ASSETS_DIR, SEEDS
from perk_fast.metrics import exact_match
from perk_fast.tasks import PEOPLE, generate


def _answer(perk, contexts, questions, batch_size: int) -> list[str]:
    """PERK's cut answers (``perk_fast.evaluate``); scored below against whichever gold a control needs."""
    rows = [{"context": c, "question": q, "answer": ""} for c, q in zip(contexts, questions)]
    return evaluate(perk, rows, batch_size=batch_size, max_new_tokens=8, progress=False)["predictions"]


def _em(preds, golds) -> float:
    return sum(exact_match(p, g) for p, g in zip(preds, golds)) / max(1, len(golds))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", default="bench-heldout")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--lengths", default=None, help="comma list (default: the demo's eval lengths)")
    ap.add_argument("--positions", default="pre,mid,post")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    # the single-needle model this check was written for (shipped until the binding chain replaced it)
    ap.add_argument("--assets", default=NEEDLE_ASSETS_DIR)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "demo_heldout.json"))
    args = ap.parse_args(argv)
    if args.seed in SEEDS.values():
        raise SystemExit(f"--seed {args.seed!r} is one of the demo's own seeds {sorted(SEEDS.values())}; "
                         "pick a seed nothing has used")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    demo = load_demo(args.assets)
    perk, recipe = demo.perk, demo.recipe
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(recipe.eval_lengths)
    positions = args.positions.split(",")
    t0 = time.perf_counter()

    grid: dict[str, dict[str, float]] = {}
    rows = []
    for length in lengths:
        grid[str(length)] = {}
        for pos in positions:
            data = generate(recipe.task, args.n, seed=args.seed, context_tokens=length, position=pos,
                            doc_tokens=recipe.doc_tokens)
            t = time.perf_counter()
            preds = _answer(perk, [e.context for e in data], [e.question for e in data], args.batch_size)
            em = _em(preds, [e.answer for e in data])
            grid[str(length)][pos] = em
            rows.append((f"PERK L={length}", pos, em, time.perf_counter() - t))
            print(f"  PERK L={length:<5} {pos:<5} EM {100 * em:5.1f}%  ({time.perf_counter() - t:.0f}s)", flush=True)

    # controls at the training length
    data = generate(recipe.task, args.n, seed=args.seed + "-controls", context_tokens=recipe.train_len,
                    position="mid", doc_tokens=recipe.doc_tokens)
    ctx = [e.context for e in data]
    qs = [e.question for e in data]
    gold = [e.answer for e in data]
    controls: dict[str, dict] = {}
    base = _answer(perk, ctx, qs, args.batch_size)
    controls["own memory"] = {"em_vs_gold": _em(base, gold)}
    rolled = ctx[1:] + ctx[:1]
    swapped = _answer(perk, rolled, qs, args.batch_size)
    controls["swapped memory"] = {"em_vs_gold": _em(swapped, gold),
                                  "em_vs_memory_code": _em(swapped, gold[1:] + gold[:1])}
    stripped = [[". ".join(s for s in doc.split(". ") if "secret code" not in s) for doc in c] for c in ctx]
    if any("secret code" in d for c in stripped for d in c):
        raise RuntimeError("needle sentence not removed")
    no_needle = _answer(perk, stripped, qs, args.batch_size)
    controls["no needle"] = {"em_vs_gold": _em(no_needle, gold)}
    others = []
    for i, q in enumerate(qs):
        name = needle_name(q)
        others.append(f"What is the secret code of {next(p for p in PEOPLE[i % len(PEOPLE):] + PEOPLE if p != name)}?")
    other = _answer(perk, ctx, others, args.batch_size)
    controls["other name"] = {"em_vs_memory_code": _em(other, gold)}
    for k, p in enumerate(PARAPHRASES[1:], 1):
        para = _answer(perk, ctx, [p.format(name=needle_name(q)) for q in qs], args.batch_size)
        controls[f"paraphrase {k}: {p}"] = {"em_vs_gold": _em(para, gold)}
    for k in (1, 2, 3):
        multi = generate(recipe.task, args.n, seed=f"{args.seed}-controls-d{k}", context_tokens=recipe.train_len,
                         position="mid", doc_tokens=recipe.doc_tokens, n_distractors=k)
        preds = _answer(perk, [e.context for e in multi], [e.question for e in multi], args.batch_size)
        codes = [set(re.findall(r"The secret code of \w+ is (\d+)\.", " ".join(e.context))) for e in multi]
        controls[f"{k} other needle{'s' if k > 1 else ''} in the context"] = {
            "em_vs_gold": _em(preds, [e.answer for e in multi]), "chance": 1 / (k + 1),
            "some_code_in_context": sum(p in c for p, c in zip(preds, codes)) / len(preds)}
    from perk_fast.demo_train import load_base
    from perk_fast.model import PerkModel

    fresh = PerkModel(load_base(os.path.join(args.assets, "perk", "base")), demo.tokenizer, recipe.perk_config())
    controls["fresh adapter, PERK base"] = {"em_vs_gold": _em(_answer(fresh, ctx, qs, args.batch_size), gold)}
    seconds = time.perf_counter() - t0

    print(f"\nHeld-out check of {args.assets}, seed {args.seed!r}, n={args.n} per cell, exact match (%)")
    header = f"{'length':>8} " + " ".join(f"{p:>7}" for p in positions)
    print(header)
    print("-" * len(header))
    for length in lengths:
        print(f"{length:>8} " + " ".join(f"{100 * grid[str(length)][p]:7.1f}" for p in positions))
    print(f"\nControls at L={recipe.train_len}, position mid, seed {args.seed + '-controls'!r}:")
    for name, vals in controls.items():
        print(f"  {name:<48} " + "  ".join(f"{k} {100 * v:5.1f}%" for k, v in vals.items()))
    all_cells = [v for d in grid.values() for v in d.values()]
    spread = {L: 100 * (max(d.values()) - min(d.values())) for L, d in grid.items()}
    summary = (f"PERK held-out EM {100 * min(all_cells):.0f}-{100 * max(all_cells):.0f}% over lengths {lengths} x "
               f"{positions}; position spread {max(spread.values()):.0f} pts; swapped memory -> "
               f"{100 * controls['swapped memory']['em_vs_gold']:.0f}% vs gold, "
               f"{100 * controls['swapped memory']['em_vs_memory_code']:.0f}% vs the memory's code; "
               f"no needle -> {100 * controls['no needle']['em_vs_gold']:.0f}%")
    print(f"\n{summary}  ({seconds:.0f}s)")
    result = {"seed": args.seed, "n": args.n, "lengths": lengths, "positions": positions, "exact_match": grid,
              "position_spread_pts": spread, "controls": controls, "summary": summary, "seconds": seconds,
              "assets": os.path.relpath(args.assets), "threads": args.threads,
              "machine": {**demo_train.machine_info(), "platform": platform.platform()},
              "command": "python bench/demo_heldout.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
