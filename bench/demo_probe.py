"""What a demo model's memory holds: is a task's fact written into the memory, and can the model
answer the task's question from it?

    python bench/demo_probe.py                                   # the qa1 / records run, n=60 per task
    python bench/demo_probe.py --assets perk_fast/assets/demo --tasks needle:3

For each held-out example (seed ``bench-probe``, which no training run or evaluation uses) the
context is encoded into a memory, and from that memory the model is asked three things:

* ``answer``: the task's question (the demo's exact match, ``perk_fast.evaluate``);
* ``in place``: the context's own segment (``doc_i: ...``), cut just before the answer inside the
  fact that answers the question, continued greedily -- the inner loop's own objective: has the
  memory stored the fact where it read it?
* ``alone``: the same fact's words before the answer, with nothing before them (``" Julie moved to
  the"``, ``" Student <7192>, Name: David Brooks, Year: Senior, School: School of Business, Major:
  Accounting, Grade:"``) -- the fact recalled from its own key, without its context. A qa1 prefix
  may occur twice in a story (the person moved there with the same verb before); gold is the
  place of the asked (last) move.

A continuation scores when it starts with the gold answer. Rows:

* ``PERK``: the run's meta-trained model as trained (its inner steps);
* ``PERK, T inner steps``: the same memory written with more steps (steps after the learned ones
  at the last learned step's learning rates) -- whether a longer inner loop stores more;
* ``TTT rank r, T steps``: the stage-1 base with a fresh PEFT LoRA memory (no meta-learning);
* ``no memory``: the PERK base alone (the chance level of each probe).

A memory that holds the fact (``in place`` / ``alone`` high) but does not answer the question
(``answer`` low) limits the task at the reading side, which only meta-training teaches; a memory
that does not hold it limits it at the writing side (inner steps, rank, model size). Prints a
table, ends with a one-line summary and writes ``bench/results/demo_probe.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import torch

from perk_fast import demo_train, encode
from perk_fast.data import pad_id
from perk_fast.demo_train import SEEDS, load_base, load_run, meta_state_for_steps, task_spec
from perk_fast.generation import generate_continuations
from perk_fast.model import PerkModel
from perk_fast.tasks import generate

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ASSETS = os.path.join(_HERE, "results", "demo_curriculum6", "assets")
_RECORD_LABEL = {"name": "Name: ", "year": "Year: ", "school": "School: ", "major": "Major: ", "grade": "Grade: "}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def fact_prefix(task: str, ex) -> str:
    """The words of the fact that answers ``ex.question`` before its answer, as they stand in the
    context (``" "`` not included). ValueError when the context does not hold the fact."""
    if task in ("qa1", "qa2", "qa3"):
        if not ex.support:
            raise ValueError(f"{task} example {ex.meta.get('index')}: generate it with with_support=True")
        sentence = ex.support[-1]
        return sentence[: sentence.rindex(ex.answer)]
    docs = ex.context if isinstance(ex.context, list) else [ex.context]
    if task == "needle":
        name = re.fullmatch(r"What is the secret code of (.+)\?", ex.question).group(1)
        anchor = f"code of {name} is "
        for doc in docs:
            for sentence in _SENTENCE_END.split(doc):
                if anchor + ex.answer in sentence:
                    return sentence[: sentence.index(anchor) + len(anchor)]
    elif task == "records_recall":
        sid = re.search(r"student (\d+)", ex.question).group(1)
        label = _RECORD_LABEL[ex.meta["kind"]]
        for doc in docs:
            for line in doc.split("\n"):
                if line.startswith(f"Student <{sid}>") and label + ex.answer in line:
                    return line[: line.index(label) + len(label)]
    else:
        raise ValueError(f"task {task!r} is invalid: allowed needle, qa1, qa2, qa3, records_recall")
    raise ValueError(f"{task} example {ex.meta.get('index')}: the fact of {ex.question!r} is not in its context")


def _find(haystack: list[int], needle: list[int]) -> int:
    """Start of the last occurrence of ``needle`` in ``haystack`` (qa1: the asked move is the last), or -1."""
    for i in range(len(haystack) - len(needle), -1, -1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def fact_segment(perk: PerkModel, ex, prefix: str) -> tuple[list[int], int]:
    """The context's last segment holding ``prefix`` (as the inner loop reads it at test time: doc
    ids in order) and the position right after it (where the answer starts). Byte-level tokenizers
    only (a text's ids are then a contiguous run of any text holding it)."""
    want = _ids(perk.tokenizer, prefix)
    found = None
    for ids, _ in perk.segment_contexts([ex.context], rng=None)[0].segments:
        at = _find(list(ids), want)
        if at >= 0:
            found = (list(ids), at + len(want))
    if found is None:
        raise ValueError(f"example {ex.meta.get('index')}: {prefix!r} is not in its segments")
    return found


def in_place_prompt(perk: PerkModel, ex, prefix: str) -> list[int]:
    """The segment of :func:`fact_segment` cut right after ``prefix``."""
    ids, end = fact_segment(perk, ex, prefix)
    return ids[:end]


@torch.no_grad()
def token_weights(perk: PerkModel, examples: list, prefixes: list[str]) -> dict:
    """The meta-learned inner-loss weights the writer gives, at its first inner step (the memory at
    its meta-learned initialisation), to the answer tokens of the asked fact against every other
    token of the same segment: mean of each over the examples' segments. A token at position p is
    weighted ``weighting(h_p)``, as in :meth:`PerkModel.inner_loss`; an answer cut by the segment's end
    counts its tokens inside the segment, one wholly in the next segment is skipped (``skipped``).
    ValueError when ``perk`` has no weighting model or the segment contradicts the answer."""
    if perk.weighting is None:
        raise ValueError("token_weights: this PerkModel has no weighting model (weighted_loss=False)")
    answer, other, skipped = [], [], 0
    for ex, prefix in zip(examples, prefixes):
        ids, end = fact_segment(perk, ex, prefix)
        gold = _ids(perk.tokenizer, ex.answer)
        inside = ids[end : end + len(gold)]  # a segment may end inside (or right before) the answer
        if inside != gold[: len(inside)]:
            raise ValueError(f"example {ex.meta.get('index')}: the answer {ex.answer!r} does not follow {prefix!r}")
        if not inside:
            skipped += 1
            continue
        x = torch.tensor([ids], device=perk.device)
        w = perk.weighting(perk.hidden_states(x, perk.initial_adapters(1), seed=None, second_order=False))[0]
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[end : end + len(inside)] = True
        mask_other = ~mask
        mask_other[0] = False  # the first token is never a target
        answer.append(float(w[mask].mean()))
        other.append(float(w[mask_other].mean()))
    if not answer:
        raise ValueError("token_weights: no example has an answer token inside the segment of its fact")
    return {"answer": sum(answer) / len(answer), "other": sum(other) / len(other), "n": len(answer),
            "skipped": skipped}


def _continue(model: PerkModel, memory, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of raw prompts, row i with memory i (``memory=None``: the base alone)."""
    tok = model.tokenizer

    def run():
        return generate_continuations(model.hf_model, prompts, pad_id=pad_id(tok), eos_id=tok.eos_token_id,
                                      max_new_tokens=max_new_tokens)

    if memory is None:
        new = run()
    else:
        with model.adapters_active(model._memory_params(memory, len(prompts)), None):
            new = run()
    return [tok.decode(row, skip_special_tokens=True) for row in new]


def _starts(preds: list[str], golds: list[str]) -> float:
    return sum(p.lstrip().startswith(g) for p, g in zip(preds, golds)) / max(1, len(golds))


def with_inner_steps(perk: PerkModel, steps: int, base) -> PerkModel:
    """``perk`` with ``steps`` inner steps on ``base`` (a fresh copy of its base: one PerkModel per HF
    model) with a copy of its meta-parameters; steps beyond the learned ones use the last learned
    step's learning rates."""
    if steps == perk.config.inner_steps:
        return perk
    other = PerkModel(base, perk.tokenizer, dataclasses.replace(perk.config, inner_steps=steps))
    other.load_meta_state(meta_state_for_steps(perk, steps))
    return other


def probe(base: PerkModel, examples: list, task: str, *, model: PerkModel | None, batch_size: int,
          max_new_tokens: int) -> dict:
    """One row of the table: the answer / in-place / alone scores of ``model``'s memories
    (``model=None``: ``base`` without a memory)."""
    from perk_fast.data import prompt_ids, query_prompt
    from perk_fast.evaluate.scoring import cut_answer
    from perk_fast.metrics import exact_match

    t0 = time.perf_counter()
    prefixes = [fact_prefix(task, ex) for ex in examples]
    golds = [ex.answer for ex in examples]
    tok = base.tokenizer
    memory = None
    if model is not None:
        memory = encode(model, [ex.context for ex in examples], batch_size=batch_size)
        answers = model.generate(memory, [ex.question for ex in examples], max_new_tokens=max_new_tokens)
    else:
        prompts = [prompt_ids(tok, query_prompt(ex.question, len(ex.context))) for ex in examples]
        answers = [s.strip() for s in _continue(base, None, prompts, max_new_tokens)]
    answers = [cut_answer(a) for a in answers]
    who = model or base
    room = max(len(_ids(tok, g)) for g in golds) + 2
    place_out = _continue(who, memory, [in_place_prompt(base, ex, p) for ex, p in zip(examples, prefixes)], room)
    alone_out = _continue(who, memory, [_ids(tok, " " + p) for p in prefixes], room)
    return {
        "answer": sum(exact_match(a, g) for a, g in zip(answers, golds)) / len(golds),
        "in_place": _starts(place_out, golds),
        "alone": _starts(alone_out, golds),
        "n": len(examples),
        "seconds": round(time.perf_counter() - t0, 2),
        "samples": [{"question": ex.question, "gold": g, "answer": a, "in_place": pi, "alone": al}
                    for ex, g, a, pi, al in list(zip(examples, golds, answers, place_out, alone_out))[:3]],
    }


def systems(run: dict, assets: str, inner_steps: list[int], ttt: list[tuple[int, int]]) -> dict:
    """Row name -> the PerkModel whose memories are probed (None: the PERK base without memory)."""
    perk, recipe = run["perk"], run["recipe"]
    rows = {}
    for steps in inner_steps:
        name = "PERK" if steps == perk.config.inner_steps else f"PERK, {steps} inner steps"
        rows[name] = with_inner_steps(perk, steps, load_base(os.path.join(assets, "perk", "base")))
    for rank, steps in ttt:
        cfg = dataclasses.replace(recipe.perk_config(), lora_rank=rank, inner_steps=steps)
        rows[f"TTT rank {rank}, {steps} steps"] = PerkModel(load_base(os.path.join(assets, "base")),
                                                             run["tokenizer"], cfg)
    rows["no memory"] = None
    return rows


def _pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        rank, _, steps = item.partition("x")
        if not (rank.isdigit() and steps.isdigit()) or int(rank) < 1 or int(steps) < 1:
            raise SystemExit(f"--ttt item {item!r} is invalid: allowed RANKxSTEPS, e.g. 16x4")
        out.append((int(rank), int(steps)))
    return out


def _ints(name: str, text: str) -> list[int]:
    items = [t for t in text.split(",") if t]
    if not items or not all(t.isdigit() and int(t) > 0 for t in items):
        raise SystemExit(f"--{name} {text!r} is invalid: allowed a comma list of positive integers")
    return [int(t) for t in items]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", default=DEFAULT_ASSETS, help="a finished demo run (default: the qa1 / records run)")
    ap.add_argument("--tasks", default="needle:3,qa1,records_recall", help="comma list of demo task specs")
    ap.add_argument("--seed", default="bench-probe")
    ap.add_argument("-n", type=int, default=60)
    ap.add_argument("--length", type=int, default=None, help="context tokens (default: the run's train_len)")
    ap.add_argument("--inner-steps", default=None, help="PERK inner steps to try (default: T,2T,4T of the run)")
    ap.add_argument("--ttt", default="16x4,16x16,64x16", help="TTT memories RANKxSTEPS (comma list)")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "demo_probe.json"))
    args = ap.parse_args(argv)
    if args.seed in SEEDS.values():
        raise SystemExit(f"--seed {args.seed!r} is one of the demo's own seeds {sorted(SEEDS.values())}; "
                         "pick a seed nothing has used")
    if args.n < 1:
        raise SystemExit(f"-n {args.n} is invalid: allowed >= 1")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    run = load_run(args.assets)
    recipe = run["recipe"]
    from perk_fast.tokenizer import ByteTokenizer

    if not isinstance(run["tokenizer"], ByteTokenizer):
        raise SystemExit("demo_probe cuts prompts by bytes: it needs a run with the byte-level tokenizer")
    t_steps = run["perk"].config.inner_steps
    inner = _ints("inner-steps", args.inner_steps) if args.inner_steps else [t_steps, 2 * t_steps, 4 * t_steps]
    rows = systems(run, args.assets, inner, _pairs(args.ttt))
    length = args.length or recipe.train_len
    doc = recipe.eval_doc_tokens or recipe.doc_tokens
    results, lines = {}, []
    start = time.perf_counter()
    from tqdm.auto import tqdm

    specs = [s for s in args.tasks.split(",") if s]
    bar = tqdm(total=len(specs) * len(rows), desc="probe", unit="row")
    for spec in specs:
        task, kw = task_spec(spec, "--tasks")
        if task in ("qa1", "qa2", "qa3"):
            kw["with_support"] = True  # the asked fact's sentence (the question prompt does not show it)
        examples = generate(task, args.n, seed=f"{args.seed}/{spec}", context_tokens=length, doc_tokens=doc, **kw)
        results[spec] = {}
        weights = None
        if "PERK" in rows and run["perk"].weighting is not None:
            weights = token_weights(run["perk"], examples, [fact_prefix(task, ex) for ex in examples])
        for name, model in rows.items():
            results[spec][name] = probe(run["perk"], examples, task, model=model, batch_size=args.batch_size,
                                        max_new_tokens=recipe.max_new_tokens)
            bar.update(1)
        if weights is not None:
            results[spec]["PERK"]["weights"] = weights
    bar.close()
    width = max(len(r) for r in rows)
    head = f"{'memory':<{width}}  " + "  ".join(f"{s:>26}" for s in specs)
    sub = f"{'':<{width}}  " + "  ".join(f"{'answer in-place  alone':>26}" for _ in specs)
    lines += [head, sub]
    for name in rows:
        cells = []
        for spec in specs:
            r = results[spec][name]
            cells.append(f"{100 * r['answer']:>12.0f}%{100 * r['in_place']:>6.0f}%{100 * r['alone']:>6.0f}%")
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>26}" for c in cells))
    if all("weights" in results[s].get("PERK", {}) for s in specs):
        lines.append(f"{'PERK writer weight':<{width}}  " + "  ".join(
            f"{'answer %.3f / other %.3f' % (results[s]['PERK']['weights']['answer'], results[s]['PERK']['weights']['other']):>26}"
            for s in specs))
    table = "\n".join(lines)
    print(f"demo_probe: {args.assets}, {length} tokens, documents of {doc}, seed {args.seed!r}, n={args.n} per task")
    print(table)
    report = {
        "assets": os.path.relpath(args.assets, os.path.dirname(_HERE)) if os.path.isabs(args.assets) else args.assets,
        "seed": args.seed, "n": args.n, "length": length, "doc_tokens": doc, "tasks": specs,
        "results": results, "table": table, "seconds": round(time.perf_counter() - start, 1),
        "machine": {**demo_train.machine_info(), "threads": args.threads},
        "command": "python bench/demo_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    # the last line sums up the run's own memory, or the first PERK row asked for (--inner-steps without T)
    name = "PERK" if "PERK" in rows else next((r for r in rows if r.startswith("PERK")), None)
    if name is None:
        return report
    perk = {s: results[s][name] for s in specs}
    print(f"{name} memory: " + "; ".join(f"{s} answers {100 * r['answer']:.0f}%, holds the fact in place "
                                      f"{100 * r['in_place']:.0f}% / alone {100 * r['alone']:.0f}%"
                                      for s, r in perk.items()))
    return report


if __name__ == "__main__":
    main()
