"""Learning-rate sweep of the demo's FT-ICR baseline on the dev seed (checks the recipe's choice).

    python bench/demo_icr_lr.py                       # lrs 3e-4,1e-3,3e-3,1e-2; PERK's budget
    python bench/demo_icr_lr.py --steps 3000 --lrs 1e-3

Each learning rate fine-tunes a fresh copy of the single-needle stage-1 base
(``bench/results/demo_needle/assets/base``, the model shipped before the binding chain) with
the context in its prompt on the demo's training examples (``steps`` x ``meta_batch``, the same
examples and schedule as ``python -m perk_fast.demo_train``), then scores exact match on the dev
seed (never the held-out evaluation seed) at the training length and 4x it, needle in the middle.
Prints a table, a one-line summary, and writes ``bench/results/demo_icr_lr.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from perk_fast.demo import load_demo
from perk_fast.demo_train import NEEDLE_ASSETS_DIR, SEEDS, load_base, task_examples
from perk_fast.evaluate import evaluate_in_context, finetune_in_context
from perk_fast.tasks import generate


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's meta_steps (PERK's budget)")
    ap.add_argument("-n", type=int, default=48, help="dev examples per length")
    ap.add_argument("--threads", type=int, default=2)
    # the single-needle model this check was written for (shipped until the binding chain replaced it)
    ap.add_argument("--assets", default=NEEDLE_ASSETS_DIR)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "demo_icr_lr.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    demo = load_demo(args.assets)
    recipe, tok = demo.recipe, demo.tokenizer
    steps = args.steps or recipe.meta_steps
    train = task_examples(recipe, steps * recipe.meta_batch, SEEDS["train"])
    lengths = (recipe.train_len, 4 * recipe.train_len)
    dev = {L: generate(recipe.task, args.n, seed=SEEDS["dev"], context_tokens=L, position="mid",
                       doc_tokens=recipe.doc_tokens) for L in lengths}
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        t = time.perf_counter()
        model = load_base(os.path.join(args.assets, "base"))
        hist = finetune_in_context(model, tok, train, steps=steps, batch_size=recipe.meta_batch, lr=lr,
                                   seed=recipe.seed, progress=False)
        model.requires_grad_(False)
        em = {L: evaluate_in_context(model, tok, dev[L], max_new_tokens=8, progress=False)["exact_match"]
              for L in lengths}
        final = sum(h["loss"] for h in hist[-20:]) / min(20, len(hist))
        rows.append({"lr": lr, "steps": steps, "final_loss": final, "dev_exact_match": em,
                     "seconds": time.perf_counter() - t})
        print(f"  lr {lr:<7g} steps {steps}  final loss {final:.3f}  dev EM "
              + "  ".join(f"L{L} {100 * v:5.1f}%" for L, v in em.items()), flush=True)
    summary = (f"FT-ICR with {steps} steps x {recipe.meta_batch}: dev EM at L{recipe.train_len} "
               + ", ".join(f"{100 * r['dev_exact_match'][recipe.train_len]:.1f}% (lr {r['lr']:g})" for r in rows)
               + f"; recipe icr_lr {recipe.icr_lr:g}")
    print(summary)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "summary": summary, "dev_seed": SEEDS["dev"], "n": args.n,
                   "command": "python bench/demo_icr_lr.py " + " ".join(argv if argv is not None else sys.argv[1:])}, fh, indent=2)
    print(f"wrote {args.out}")
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
