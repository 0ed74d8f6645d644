"""PERK at work on the shipped demo model: ``python -m perk_fast.demo`` (under 3 minutes on 2 CPU cores).

1. Loads the demo (``perk_fast/assets/demo``, trained by ``python -m perk_fast.demo_train``, the
   ``mix`` chain): a small byte-level Llama-shaped LM meta-trained with PERK on needles among 0-7
   other people's codes, BabiLong-like qa1 / qa2 and student-records recall, its stage-1 base (for
   plain test-time training) and the FT-ICR baselines.
2. Prints exact match on held-out contexts (seed ``demo-fresh``, never used in training, in the
   runs' evaluations or in recipe choices), one table per task of the recipe (the shipped model: one code,
   4 codes with one asked, qa1, qa2, records recall; ``--assets`` of another run: its tasks), for
   (a) PERK, (b) plain test-time training of an untrained adapter on the same base (no
   meta-learning), (c) the fine-tuned in-context baseline (context in the prompt) with PERK's
   training budget and with k times its examples, at the training length and at 4x it, with the
   fact in the first / middle / last third of the context (where the facts fill more than a third
   of the context, anywhere).
3. Encodes one context once, saves the Memory, loads it back and answers several questions from
   it (a model trained on several codes per context: questions about the different people of that
   context).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from dataclasses import dataclass

import torch

from .demo_train import (ASSETS_DIR, SEEDS, DemoRecipe, eval_systems, icr_long_name, load_run, spec_label,
                         steps_so_far, training_minutes)
from .encode import encode
from .evaluate import cut_answer
from .memory import Memory
from .model import PerkModel
from .tasks import NEEDLE, NEEDLE_QUESTION, generate
from .tokenizer import ByteTokenizer

@dataclass
class Demo:
    """The shipped demo: PERK, the plain-TTT baseline, the FT-ICR baseline, their tokenizer and recipe."""

    perk: PerkModel
    ttt: PerkModel
    icr: torch.nn.Module
    icr_long: torch.nn.Module | None  # None when the recipe had icr_long_steps = 0
    tokenizer: ByteTokenizer
    recipe: DemoRecipe
    report: dict


def load_demo(assets_dir: str = ASSETS_DIR) -> Demo:
    """Load the demo models from ``assets_dir``; FileNotFoundError names what is missing."""
    return Demo(**load_run(assets_dir))


# Phrasings of the needle question; only the first one occurs in training.
PARAPHRASES = (
    "What is the secret code of {name}?",
    "What is {name}'s secret code?",
    "Which code does {name} have?",
    "Tell me the secret code of {name}.",
)


def needle_name(question: str) -> str:
    """The person asked about in a needle question ``What is the secret code of <name>?``."""
    prefix = "What is the secret code of "
    if not (question.startswith(prefix) and question.endswith("?")):
        raise ValueError(f"unexpected needle question {question!r}: expected '{prefix}<name>?'")
    return question[len(prefix):-1]


def context_needles(context: list[str]) -> list[tuple[str, str]]:
    """Every ``(person, code)`` pair a needle context states, in reading order."""
    pattern = re.compile(NEEDLE.format(name=r"(\w+)", value=r"(\d+)").replace(".", r"\."))
    return [m.groups() for doc in context for m in pattern.finditer(doc)]


def memory_round_trip(demo: Demo, *, seed: str = "demo-memory", log=print) -> dict:
    """Encode one held-out context once, save the Memory, load it back, and answer several
    questions from that single memory -- one ``generate`` call, the memory broadcast to every
    question. With the multi-task recipe the context holds 4 people's codes and each person is asked
    about (plus phrasings never seen in training for the first); with the single-needle recipe, the
    phrasings of its one question."""
    recipe = demo.recipe
    if recipe.mix:
        ex = generate("needle", 1, seed=seed, context_tokens=recipe.train_len, position="mid",
                      doc_tokens=recipe.eval_doc_tokens or recipe.doc_tokens, n_distractors=3)[0]
    else:
        ex = generate(recipe.task, 1, seed=seed, context_tokens=recipe.train_len, position="mid",
                      doc_tokens=recipe.doc_tokens)[0]
    facts = context_needles(ex.context)
    name = needle_name(ex.question)
    if (name, ex.answer) not in facts:
        raise RuntimeError(f"the generated context does not state {name}'s code {ex.answer}: {facts}")
    asked = [(p.format(name=name), ex.answer) for p in PARAPHRASES]
    asked += [(NEEDLE_QUESTION.format(name=who), code) for who, code in facts if who != name]
    memory = encode(demo.perk, [ex.context])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory")
        memory.save(path)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        loaded = Memory.load(path, demo.perk)
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(memory.tensors, loaded.tensors))
    questions = [q for q, _ in asked]
    gold = [g for _, g in asked]
    answers = [cut_answer(a) for a in demo.perk.generate(loaded, questions, max_new_tokens=8)]
    stated = "; ".join(f"{who}: {code}" for who, code in facts)
    log(f"\nOne held-out context ({sum(len(d.encode()) for d in ex.context)} byte tokens, {len(ex.context)} "
        f"documents; its codes: {stated}) encoded once -> Memory saved ({size / 1024:.0f} KiB), loaded back "
        f"(identical: {same}). Questions answered from that one memory, no context in the prompt:")
    for q, a, g in zip(questions, answers, gold):
        log(f"  {q:<40} -> {a:<6} {'ok' if a == g else 'wrong (' + g + ')'}")
    return {"questions": questions, "answers": answers, "gold": gold, "identical": same,
            "correct": sum(a == g for a, g in zip(answers, gold))}


def demo_seed() -> str:
    """The held-out seed the demo evaluates on by default, for every model: ``SEEDS["fresh"]``
    (``demo-fresh``), which no training, run evaluation or recipe choice has used. The shipped
    model's final evaluation (``report["final_eval"]``, seed ``demo-final``) served the choice of
    which run to ship, so its numbers are not the demo's default."""
    return SEEDS["fresh"]


def default_n(recipe: DemoRecipe) -> int:
    """Held-out examples per table cell when ``-n`` is not given: 50 for up to 2 tables, fewer for more
    (``125 // tables``, at least 10) so that the demo stays under 3 minutes on 2 cores."""
    tables = len(recipe.tasks_for_eval())
    return max(10, min(50, 125 // tables))


def main(n: int | None = None, *, assets_dir: str = ASSETS_DIR, threads: int = 2, seed: str | None = None,
         out_dir: str | None = None, log=print) -> dict:
    """Run the demo with ``n`` held-out examples per table cell (default :func:`default_n`; seed:
    :func:`demo_seed` unless given); returns the numbers."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    demo = load_demo(assets_dir)
    recipe, report = demo.recipe, demo.report
    if n is None:
        n = default_n(recipe)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is invalid: allowed an integer >= 1 (held-out examples per table cell)")
    seed = demo_seed() if seed is None else seed
    perk_cfg = demo.perk.config
    log(f"perk_fast demo: byte-level Llama (d={recipe.hidden_size}, {recipe.num_hidden_layers} layers, "
        f"{report['base_parameters'] / 1e3:.0f}k parameters) trained on CPU in "
        f"{training_minutes(report):.0f} min; memory = rank-{perk_cfg.lora_rank} LoRA written by "
        f"{perk_cfg.inner_steps} AdamW steps.")
    what = ("Tasks: " + ", ".join(spec_label(t) for t in recipe.tasks_for_eval())) if recipe.mix else \
        "Needle in a haystack"
    log(f"{what}; held-out seed {seed!r}, n={n} per cell, exact match (%). Trained at {recipe.train_len} tokens"
        + (f" on documents of {', '.join(map(str, recipe.doc_mix))} tokens" if recipe.doc_mix else "") + ".")
    log("  PERK          meta-trained memory; the prompt holds only the question")
    log("  TTT (no meta) the same inner loop from an untrained adapter on the stage-1 base (no meta-learning)")
    log("  FT-ICR        the stage-1 base fine-tuned with PERK's budget (same examples and steps), context in "
        "the prompt")
    if demo.icr_long is not None:
        times = report["times_s"]
        steps = steps_so_far(report)
        last = "in the last run of the chain: " if report.get("chain") else ""
        log(f"  {icr_long_name(recipe, report.get('steps_before')):<13} the same with {steps['icr_long']:,} steps "
            f"and examples against PERK's {steps['perk']:,} ({last}trained {times.get('icr_long_s', 0):.0f}s; "
            f"PERK's meta-training {times['perk_s']:.0f}s)")
    log("")
    table = eval_systems(demo.perk, demo.ttt, demo.icr, demo.tokenizer, recipe, n=n, seed=seed,
                         icr_long_model=demo.icr_long, out_dir=out_dir, verbose=True,
                         steps_before=report.get("steps_before"))
    mem = memory_round_trip(demo, log=log)
    seconds = time.perf_counter() - start
    log(f"\ndemo finished in {seconds:.0f}s")
    return {"results": table["results"], "table": table["table"], "memory": mem, "seconds": seconds, "n": n}


def _cli(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m perk_fast.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=None, help="held-out examples per table cell (default: 50 for up to "
                    "2 tables, 125 // tables for more: 25 for the 5 tables of the mix)")
    ap.add_argument("--assets", default=ASSETS_DIR, help="demo assets directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", default=None, help=f"held-out seed (default: {SEEDS['fresh']!r}, used by no training, "
                    "run evaluation or recipe choice; the shipped model's final evaluation used 'demo-final')")
    ap.add_argument("--out", default=None, help="also write predictions, sweep.json and sweep.png here")
    args = ap.parse_args(argv)
    main(args.n, assets_dir=args.assets, threads=args.threads, seed=args.seed, out_dir=args.out)


if __name__ == "__main__":
    _cli()
