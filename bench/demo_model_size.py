"""Model-size ablation of the demo mix: does a bigger base answer qa1 / qa2 / records better when it
reads the context in its prompt, and what would a PERK meta-step of that size cost?

    python bench/demo_model_size.py                           # 96x2 (the shipped size), 96x4, 192x4
    python bench/demo_model_size.py --sizes 96x2 --steps 50 --lm-steps 20 -n 4 --out /tmp/size.json

For each size ``DxL`` (hidden size D, L layers, MLP 3D, 4 heads) the script trains, from a fresh
seeded initialisation and with the shipped mix recipe (``CHAINS["mix"]``; byte tokenizer, 256-token
contexts, documents of 64 / 128 / 256 bytes):

1. the stage-1 language model (the recipe's ``lm_steps``, as ``python -m perk_fast.demo_train`` does);
2. FT-ICR: every weight fine-tuned with the context in the prompt on the mix's first ``--steps`` x 8
   training examples (the demo's FT-ICR baseline, at the recipe's learning rate);

then scores exact match with the context in the prompt on the dev seed (``demo-dev/model-size``,
never the held-out evaluation seeds), per task, at 256 tokens, facts placed anywhere. It also times
``--perk-steps`` PERK meta-steps of that size (one process, ``--threads`` threads, full second-order
unroll, base trained jointly, after one untimed step), so that a PERK chain of that size can be
costed against the shipped one. FT-ICR reading the story in its prompt is the base's own reasoning
over it: a size at which it stays low is a size at which PERK's memory has little to be read by.

Prints a table, a one-line summary, and writes ``bench/results/demo_model_size.json`` (after every
size, so an interrupted run keeps the sizes it finished).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch

from perk_fast.demo_train import (CHAINS, SEEDS, build_base, meta_train_joint, pretrain_lm, round_to_fp16,
                                  spec_label, task_spec, training_examples)
from perk_fast.evaluate import evaluate_in_context, finetune_in_context
from perk_fast.model import PerkModel
from perk_fast.tasks import generate
from perk_fast.tokenizer import ByteTokenizer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "demo_model_size.json")


def parse_size(text: str) -> tuple[int, int]:
    """``"192x4"`` -> (192, 4); the hidden size must split over 4 heads."""
    d, sep, layers = text.partition("x")
    if not sep or not d.isdigit() or not layers.isdigit() or int(d) < 4 or int(d) % 4 or int(layers) < 1:
        raise ValueError(f"size {text!r} is invalid: allowed DxL with D a multiple of 4 (4 heads) and L >= 1, "
                         "e.g. 96x2")
    return int(d), int(layers)


def size_recipe(d: int, layers: int, *, steps: int, lm_steps: int | None, threads: int):
    """The shipped mix recipe at another size: a fresh run (no ``init_from``), ``steps`` examples x 8."""
    base = CHAINS["mix"][-1].recipe
    return dataclasses.replace(base, init_from=None, reset_meta=(), hidden_size=d, num_hidden_layers=layers,
                               intermediate_size=3 * d, meta_steps=steps, lm_steps=lm_steps or base.lm_steps,
                               threads=threads, ranks=1, dev_every=10 ** 9)


def perk_step_seconds(base, tokenizer, recipe, steps: int) -> float:
    """Seconds per PERK meta-step of ``recipe``'s size (a copy of ``base``; one untimed step first)."""
    perk = PerkModel(copy.deepcopy(base), tokenizer, recipe.perk_config())
    data = training_examples(dataclasses.replace(recipe, meta_steps=steps + 1))
    quiet = lambda *_: None  # noqa: E731
    meta_train_joint(perk, data[:recipe.meta_batch], dataclasses.replace(recipe, meta_steps=1), log=quiet)
    t = time.perf_counter()
    meta_train_joint(perk, data[recipe.meta_batch:], dataclasses.replace(recipe, meta_steps=steps), log=quiet)
    return (time.perf_counter() - t) / steps


def run_size(text: str, *, steps: int, lm_steps: int | None, perk_steps: int, n: int, threads: int,
             log=print) -> dict:
    """Train and score one size; returns its JSON row."""
    d, layers = parse_size(text)
    recipe = size_recipe(d, layers, steps=steps, lm_steps=lm_steps, threads=threads)
    tokenizer = ByteTokenizer()
    row = {"size": text, "hidden_size": d, "layers": layers, "intermediate_size": 3 * d}
    t = time.perf_counter()
    base = build_base(recipe, tokenizer)
    row["parameters"] = sum(p.numel() for p in base.parameters())
    log(f"[{text}] {row['parameters']:,} weights: stage-1 LM, {recipe.lm_steps} steps")
    history = pretrain_lm(base, tokenizer, recipe, log=lambda *_: None)
    round_to_fp16(base)
    row["lm_s"] = round(time.perf_counter() - t, 1)
    row["lm_final_loss"] = sum(h["loss"] for h in history[-20:]) / len(history[-20:])
    if perk_steps:
        log(f"[{text}] timing {perk_steps} PERK meta-steps")
        row["perk_step_s"] = round(perk_step_seconds(base, tokenizer, recipe, perk_steps), 3)
    log(f"[{text}] FT-ICR: {steps} steps x {recipe.meta_batch} examples")
    t = time.perf_counter()
    icr = copy.deepcopy(base)
    icr_history = finetune_in_context(icr, tokenizer, training_examples(recipe), steps=steps,
                                      batch_size=recipe.meta_batch, lr=recipe.icr_lr, seed=recipe.seed,
                                      progress=False)
    icr.requires_grad_(False)
    row["icr_s"] = round(time.perf_counter() - t, 3)
    row["icr_final_loss"] = sum(h["loss"] for h in icr_history[-20:]) / len(icr_history[-20:])
    row["exact_match"] = {}
    for spec in recipe.eval_tasks:
        task, kw = task_spec(spec)
        dev = generate(task, n, seed=f"{SEEDS['dev']}/model-size/{spec}", context_tokens=recipe.train_len,
                       position="random", doc_tokens=recipe.eval_doc_tokens, **kw)
        scored = evaluate_in_context(icr, tokenizer, dev, max_new_tokens=recipe.max_new_tokens, progress=False)
        row["exact_match"][spec_label(spec)] = round(100 * scored["exact_match"], 1)
    log(f"[{text}] " + ", ".join(f"{k} {v:.0f}%" for k, v in row["exact_match"].items()))
    return row


def table(rows: list[dict]) -> str:
    labels = list(rows[0]["exact_match"])
    head = ["size", "weights", "LM loss", "PERK s/step", "FT-ICR loss"] + labels
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        step = f"{r['perk_step_s']:.2f}" if "perk_step_s" in r else "--"
        lines.append(" | ".join([r["size"], f"{r['parameters']:,}", f"{r['lm_final_loss']:.3f}", step,
                                 f"{r['icr_final_loss']:.3f}"] + [f"{r['exact_match'][k]:.0f}" for k in labels]))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="96x2,96x4,192x4", help="comma list of DxL (hidden size x layers)")
    ap.add_argument("--steps", type=int, default=4000, help="FT-ICR steps (x 8 examples of the mix)")
    ap.add_argument("--lm-steps", type=int, default=None, help="stage-1 steps (default: the recipe's)")
    ap.add_argument("--perk-steps", type=int, default=5, help="PERK meta-steps timed per size (0: none)")
    ap.add_argument("-n", type=int, default=60, help="dev examples per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--append", action="store_true",
                    help="add the sizes to those already in --out (run with the same --steps, -n, --threads)")
    args = ap.parse_args(argv)
    for name in ("steps", "n", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)} is invalid: allowed an integer >= 1")
    if args.perk_steps < 0:
        ap.error(f"--perk-steps={args.perk_steps} is invalid: allowed an integer >= 0")
    if args.lm_steps is not None and args.lm_steps < 1:
        ap.error(f"--lm-steps={args.lm_steps} is invalid: allowed an integer >= 1")
    sizes = args.sizes.split(",")
    try:
        for s in sizes:
            parse_size(s)
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    result = {"sizes": [], "steps": args.steps, "n": args.n, "threads": args.threads, "seed": f"{SEEDS['dev']}/model-size",
              "command": "python bench/demo_model_size.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    before_s = 0.0
    if args.append and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as fh:
            earlier = json.load(fh)
        for key in ("steps", "n", "threads"):
            if earlier[key] != result[key]:
                ap.error(f"--append: {args.out} was run with {key}={earlier[key]}, this run has {result[key]}")
        again = [s for s in sizes if s in {r["size"] for r in earlier["sizes"]}]
        if again:
            ap.error(f"--append: {args.out} has size(s) {', '.join(again)} already")
        result["sizes"] = earlier["sizes"]
        result["command"] = earlier["command"] + " && " + result["command"]
        before_s = earlier["total_s"]
    t = time.perf_counter()
    for s in sizes:
        result["sizes"].append(run_size(s, steps=args.steps, lm_steps=args.lm_steps, perk_steps=args.perk_steps,
                                        n=args.n, threads=args.threads))
        result["total_s"] = round(before_s + time.perf_counter() - t, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    rows = result["sizes"]
    print(table(rows))
    first, last = rows[0], rows[-1]
    summary = (f"qa1 read in the prompt after {args.steps} FT-ICR steps: "
               + ", ".join(f"{r['size']} {r['exact_match'].get('qa1', float('nan')):.0f}%" for r in rows))
    if "perk_step_s" in first and "perk_step_s" in last:
        summary += f"; a PERK meta-step at {last['size']} costs {last['perk_step_s'] / first['perk_step_s']:.1f}x {first['size']}'s"
    print(summary)
    result["summary"] = summary
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
