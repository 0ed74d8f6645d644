"""How a demo model's answers move when its memory is written with later segments weighted more.

    python bench/demo_recency.py --assets perk_fast/assets/demo --weights r=0,r=0.5,r=0.75,r=1,suffix
    python bench/demo_recency.py --assets bench/results/demo_curriculum20/assets --weights r=0.5,r=0
    python bench/demo_recency.py --assets bench/results/demo_curriculum15/assets --weights r=0.5,t=0.5,t=0.75,t=1
    python bench/demo_recency.py --assets bench/results/demo_curriculum15/assets --weights r=0.5 --lr-scale 1.5

Each ``--weights`` entry writes every memory with one inner-loss weighting of a context's S segments
(segment j, inner step t of T), at test time only, with the model's meta-parameters as trained:

* ``r=<x>``: ``PerkConfig.segment_recency = x``, segment j weighted ``1 - x + x (j + 1) / S`` at
  every step (``r=0``: every segment alike, the plain loss);
* ``t=<x>``: the same line over the token's place in the whole context instead of its segment's:
  the k-th of a segment's n label tokens weighted ``1 - x + x (j + k / n) / S``, so of two facts in
  one segment the later is written more strongly too (a schedule tried here, through
  ``MicroBatch.token_scale``; not a PerkConfig option);
* ``suffix``: step t writes only the segments ``j >= floor(t S / T)`` (the later documents get more
  steps; a schedule tried here, not a PerkConfig option).

Cells (seed ``probe-order``, used by nothing else; documents of 192 bytes, n per cell): qa1 at 256
tokens (story anywhere) and 1,024 (mid), split into stories whose asked person moved once and those
with two or three moves; needles among 3 others at 256 (pre) and 1,024 (pre, post); records recall at
256. ``--lr-scale s`` writes every entry with s times the learned inner learning rates,
``--segment-len n`` in segments of n tokens (the qa1 split below keeps the model's own). qa1 cells
are also split by where the asked person's last two moves lie (``demo_answers.py --by-placement``:
one move, one segment, two pieces of one document, two documents). Prints a table; writes JSON
(``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

import torch

from perk_fast import demo_train, tasks
from perk_fast.data import IGNORE
from perk_fast.evaluate import evaluate
from perk_fast.model import PerkModel

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("demo_answers", os.path.join(_HERE, "demo_answers.py"))
answers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(answers)

SEED = "probe-order"
CELLS = (  # (label, task, length, position, task kwargs)
    ("qa1 256", "qa1", 256, "random", demo_train.BABI_KW),
    ("qa1 1024 mid", "qa1", 1024, "mid", demo_train.BABI_KW),
    ("needle-4 256 pre", "needle", 256, "pre", {"n_distractors": 3}),
    ("needle-4 1024 pre", "needle", 1024, "pre", {"n_distractors": 3}),
    ("needle-4 1024 post", "needle", 1024, "post", {"n_distractors": 3}),
    ("records 256", "records_recall", 256, "random", {}),
)


def parse_weights(text: str) -> list[str]:
    """The ``--weights`` entries; ValueError names a bad one."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item != "suffix":
            if not item.startswith(("r=", "t=")):
                raise ValueError(f"--weights entry {item!r} is invalid: allowed r=<0..1>, t=<0..1> or suffix")
            try:
                r = float(item[2:])
            except ValueError:
                raise ValueError(f"--weights entry {item!r} is invalid: {item[2:]!r} is not a number") from None
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"--weights entry {item!r} is invalid: {item[0]} must lie in [0, 1]")
        out.append(item)
    if not out:
        raise ValueError("--weights is empty")
    return out


def _segment_counts(mb) -> torch.Tensor:
    """(rows,) float64: S, the segment count of each row's context, from ``MicroBatch.row_position``
    = (j + 1) / S (1 for a pad row)."""
    j = torch.tensor([max(seg, 0) for _, seg in mb.row_ids], dtype=torch.float64)
    pos = mb.row_position.to(torch.float64)
    return torch.where(pos > 0, torch.round((j + 1) / pos.clamp_min(1e-12)), torch.ones_like(pos))


def _edited_problem(pm: PerkModel, edit):
    """A replacement of ``pm.inner_problem`` whose loss sees ``edit(mb, step)`` instead of each micro-batch."""
    plain = PerkModel.inner_problem.__get__(pm)

    def inner_problem(segments, *, seed, context_ids=None):
        prob = plain(segments, seed=seed, context_ids=context_ids)
        loss = prob.loss

        def edited_loss(adapters, mb, step, second_order):
            return loss(adapters, edit(mb, step), step, second_order)

        return dataclasses.replace(prob, loss=edited_loss)

    return inner_problem


def suffix_problem(pm: PerkModel):
    """A replacement of ``pm.inner_problem`` whose step t writes only segments ``j >= floor(t S / T)``."""
    steps = pm.config.inner_steps

    def edit(mb, step):
        n_seg = _segment_counts(mb).tolist()
        keep = [1.0 if j >= 0 and j >= (step * int(s)) // steps else 0.0 for (_, j), s in zip(mb.row_ids, n_seg)]
        return dataclasses.replace(mb, row_scale=mb.row_scale * torch.tensor(keep, dtype=mb.row_scale.dtype))

    return _edited_problem(pm, edit)


def token_positions(mb) -> torch.Tensor:
    """(rows, L) float64: ``(j + k / n) / S`` at the k-th (1-based) of the n label tokens of a row holding
    segment j of its context's S segments (``MicroBatch.row_position`` = (j + 1) / S); 0 elsewhere."""
    real = (mb.labels != IGNORE).to(torch.float64)
    within = real.cumsum(1) / real.sum(1, keepdim=True).clamp_min(1.0)  # k / n on label positions
    j = torch.tensor([max(seg, 0) for _, seg in mb.row_ids], dtype=torch.float64)
    return (j[:, None] + within) / _segment_counts(mb)[:, None] * real


def token_problem(pm: PerkModel, x: float):
    """A replacement of ``pm.inner_problem`` whose loss weights each label token by ``1 - x + x p``,
    p its :func:`token_positions` place in the context."""
    def edit(mb, step):
        scale = (1.0 - x + x * token_positions(mb)).to(mb.row_scale.device)
        return dataclasses.replace(mb, token_scale=scale)

    return _edited_problem(pm, edit)


def run_cells(pm: PerkModel, weights: str, n: int) -> dict:
    """Exact match per cell with the memories written the ``weights`` way (the model is restored after)."""
    config = pm.config
    if weights == "suffix":
        pm.inner_problem = suffix_problem(pm)
        pm.config = config.replace(segment_recency=0.0)
    elif weights.startswith("t="):
        pm.inner_problem = token_problem(pm, float(weights[2:]))
        pm.config = config.replace(segment_recency=0.0)
    else:
        pm.config = config.replace(segment_recency=float(weights[2:]))
    out = {}
    try:
        for label, task, length, position, kw in CELLS:
            examples = tasks.generate(task, n, seed=f"{SEED}/{task}", context_tokens=length, position=position,
                                      doc_tokens=192, **kw)
            scored = evaluate(pm, examples, max_new_tokens=32, progress=False)
            cell = {"exact_match": scored["exact_match"], "n": n}
            if task == "qa1":
                where = [answers.last_two_moves_placement(e) for e in examples]
                right = [p == e.answer for e, p in zip(examples, scored["predictions"])]
                several = [k for k in answers.PLACEMENTS if k != "one_move"]
                kinds = {"one_move": ["one_move"], "several_moves": several, **{k: [k] for k in several}}
                for kind, members in kinds.items():
                    mine = [ok for ok, k in zip(right, where) if k in members]
                    cell[kind] = {"exact_match": sum(mine) / max(1, len(mine)), "n": len(mine)}
            out[label] = cell
    finally:
        pm.config = config
        pm.__dict__.pop("inner_problem", None)
    return out


def table(results: dict) -> str:
    """Rows: weightings; columns: cells (qa1 with its single-move / several-move split)."""
    labels = [c[0] for c in CELLS]
    head = "| weights | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 1)]
    for weights, cells in results.items():
        row = []
        for label in labels:
            c = cells[label]
            text = f"{100 * c['exact_match']:.0f}"
            if "one_move" in c:
                text += f" ({100 * c['one_move']['exact_match']:.0f} / {100 * c['several_moves']['exact_match']:.0f})"
            row.append(text)
        lines.append(f"| {weights} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def placement_table(results: dict) -> str:
    """Rows: weightings; columns: each qa1 cell split by where the asked person's last two moves lie
    (right / n)."""
    qa1 = [c[0] for c in CELLS if c[1] == "qa1"]
    cols = [(label, kind) for label in qa1 for kind in answers.PLACEMENTS]
    lines = ["| weights | " + " | ".join(f"{label}: {kind}" for label, kind in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for weights, cells in results.items():
        row = [f"{100 * cells[label][kind]['exact_match']:.0f} (n = {cells[label][kind]['n']})" for label, kind in cols]
        lines.append(f"| {weights} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", default=demo_train.ASSETS_DIR)
    ap.add_argument("--weights", default="r=0,r=0.5,r=0.75,r=1,suffix")
    ap.add_argument("--lr-scale", type=float, default=1.0,
                    help="multiply the model's learned inner learning rates by this for every entry (default 1)")
    ap.add_argument("--segment-len", type=int, default=None,
                    help="write every entry's memories in segments of this many tokens (default: the model's own)")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = ap.parse_args(argv)
    try:
        weights = parse_weights(args.weights)
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    if not args.lr_scale > 0:
        ap.error(f"--lr-scale {args.lr_scale} is invalid: it must be > 0")
    pm = demo_train.load_run(args.assets)["perk"]
    if args.segment_len is not None:
        try:
            pm.config = pm.config.replace(segment_len=args.segment_len)
        except ValueError as err:
            ap.error(f"--segment-len {args.segment_len} is invalid: {err}")
    if args.lr_scale != 1.0:
        with torch.no_grad():
            pm.inner_lrs.mul_(args.lr_scale)
    results, start = {}, time.perf_counter()
    for w in weights:
        t = time.perf_counter()
        results[w] = run_cells(pm, w, args.n)
        print(f"{w}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    text = table(results)
    by_place = placement_table(results)
    print(f"{args.assets}, seed {SEED}, n = {args.n} per cell, inner rates x {args.lr_scale:g}, "
          f"segments of {pm.segment_len}; qa1 (single move / several moves)\n{text}\n\n"
          f"qa1 by where the asked person's last two moves lie\n{by_place}")
    report = {"assets": args.assets, "seed": SEED, "n": args.n, "trained_segment_recency": pm.config.segment_recency,
              "lr_scale": args.lr_scale, "segment_len": pm.segment_len,
              "results": results, "table": text, "placement_table": by_place, "seconds": time.perf_counter() - start,
              "machine": demo_train.machine_info()}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
