"""Evaluation of PERK memories and of the baselines it is compared with, all scored alike.

Three systems answer the same questions and go through the same scoring path:

* ``evaluate(perk_model, data)`` -- PERK: each context is written into its memory by
  :func:`perk_fast.encode` (T inner steps), then the question alone (no context in the prompt)
  is answered with :meth:`PerkModel.generate`.
* Plain test-time training (TTT, no meta-learning) needs no code of its own: it is
  ``evaluate(PerkModel(base, tokenizer, config), data)`` with a *fresh* PerkModel, whose
  meta-parameters are the defaults -- PEFT initialisation of the LoRA (B = 0), every learned
  learning rate at ``config.inner_lr``, the weighting model's zero-initialised output (every
  token weight ln(2)/3). The inner loop then is ordinary AdamW (or SGD) fine-tuning of an
  untrained adapter on the context, which is exactly that baseline. Build it on a separate
  copy of the base model (a PerkModel patches its model's projections).
* ``evaluate_in_context(hf_model, tokenizer, data)`` -- in-context reading: the documents are
  in the prompt (:func:`in_context_prompt`). With a model trained by
  :func:`finetune_in_context` this is the paper's FT-ICR baseline (the same base fine-tuned,
  with the same budget, to answer with the context in its prompt).

Scoring (``perk_fast.metrics``): the generated continuation is first cut by
:func:`cut_answer` -- generation already stops at EOS (decoded without special tokens); the text
is cut right after the first ``</output>`` when it has an ``<output>`` tag (the support format
``<support>...</support>\\n<output>...</output>`` spans two lines), otherwise at the first newline
(answers are one line; a model that keeps going starts a new line), then stripped. The gold
string is the training target (the answer, or the support + output form when the example has
support facts). Exact match is normalised EM after ``<output>`` extraction, F1 is token F1.

``sweep`` runs systems over context lengths and needle positions (pre / mid / post), prints a
table and saves it as JSON and a PNG plot.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from .data import IGNORE, pad_id, pad_rows, query_target
from .encode import encode
from .metrics import exact_match, f1_score
from .model import PerkModel

__all__ = [
    "cut_answer", "in_context_prompt", "evaluate", "evaluate_in_context", "finetune_in_context",
    "sweep", "format_sweep_table",
]


# ----------------------------------------------------------------------------- helpers
def cut_answer(text: str) -> str:
    """The answer part of a generated continuation (see the module docstring)."""
    close = text.find("</output>")
    if "<output>" in text and close >= 0:
        text = text[: close + len("</output>")]
    else:
        text = text.split("\n", 1)[0]
    return text.strip()


def in_context_prompt(context: Any, question: str) -> str:
    """Prompt of the in-context baseline: the documents (``doc_i: text``, one per line), then
    the question and ``Answer:`` as in PERK's question prompt."""
    docs = [context] if isinstance(context, str) else list(context)
    lines = [f"doc_{i}: {doc}" for i, doc in enumerate(docs)]
    return "\n".join(lines) + f"\n{question}\nAnswer:"


def _get(example: Any, name: str, index: int, required: bool = True) -> Any:
    value = example.get(name) if isinstance(example, Mapping) else getattr(example, name, None)
    if value is None and required:
        raise ValueError(f"dataset[{index}] has no {name!r}: every example needs context, question and answer")
    return value


def _unpack(dataset: Sequence[Any]) -> list[dict]:
    if isinstance(dataset, (str, bytes)) or not isinstance(dataset, Sequence):
        raise TypeError("dataset must be a list of examples (perk_fast.tasks.Example or dicts)")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    rows = []
    for i, ex in enumerate(dataset):
        rows.append({
            "context": _get(ex, "context", i), "question": _get(ex, "question", i),
            "answer": str(_get(ex, "answer", i)), "support": _get(ex, "support", i, required=False),
            "meta": _get(ex, "meta", i, required=False) or {},
        })
    return rows


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= 1")


def _score_and_write(rows, raw, system: str, seconds: float, out_dir, extra: dict) -> dict:
    """Score cut predictions against gold targets; write predictions.jsonl / summary.json."""
    records, em_sum, f1_sum = [], 0.0, 0.0
    for i, (row, text) in enumerate(zip(rows, raw)):
        gold = query_target(row["answer"], row["support"])
        pred = cut_answer(text)
        em, f1 = exact_match(pred, gold), f1_score(pred, gold)
        em_sum += em
        f1_sum += f1
        records.append({"index": i, "question": row["question"], "answer": row["answer"], "gold": gold,
                        "prediction": pred, "raw": text, "exact_match": em, "f1": f1, "meta": row["meta"]})
    n = len(rows)
    summary = {"system": system, "exact_match": em_sum / n, "f1": f1_sum / n, "n": n,
               "seconds": round(seconds, 3), **extra}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    summary["predictions"] = [r["prediction"] for r in records]
    return summary


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(starts, desc=desc, unit="batch")
    return starts


def _answer_and_score(dataset, answer: Callable[[list[dict]], list[str]], *, system: str, desc: str,
                      batch_size: int, max_new_tokens: int, out_dir, progress: bool, extra: dict | None = None) -> dict:
    """The shared evaluation loop: check the arguments, ``answer`` the rows batch by batch, score, write."""
    _check_positive("batch_size", batch_size)
    _check_positive("max_new_tokens", max_new_tokens)
    rows = _unpack(dataset)
    start = time.perf_counter()
    raw: list[str] = []
    for s in _batches(len(rows), batch_size, progress, desc):
        raw += answer(rows[s : s + batch_size])
    seconds = time.perf_counter() - start
    info = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, **(extra or {})}
    return _score_and_write(rows, raw, system, seconds, out_dir, info)


# ----------------------------------------------------------------------------- PERK (and TTT)
def evaluate(
    perk_model: PerkModel,
    dataset: Sequence[Any],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Encode every context into its memory, answer its question from the memory, score.

    Args:
        perk_model: a PerkModel (meta-trained for PERK; fresh for plain test-time training).
        dataset: examples with ``context``, ``question``, ``answer`` (optionally ``support``,
            ``meta``): ``perk_fast.tasks.Example`` objects or dicts.
        batch_size: contexts encoded (and questions answered) together.
        max_new_tokens: generation budget per answer (greedy; stops at EOS).
        out_dir: when given, ``predictions.jsonl`` (one record per example: question, gold,
            cut prediction, raw generation, scores, meta) and ``summary.json`` are written there.
        progress: a progress bar over batches.

    Returns:
        ``{"system": "perk", "exact_match", "f1", "n", "seconds", ..., "predictions"}`` with
        EM and F1 as fractions in [0, 1] and the cut predictions in dataset order.
    """
    if not isinstance(perk_model, PerkModel):
        raise TypeError(f"evaluate expects a PerkModel, got {type(perk_model).__name__}")

    def answer(group: list[dict]) -> list[str]:
        memory = encode(perk_model, [r["context"] for r in group])
        return perk_model.generate(memory, [r["question"] for r in group], max_new_tokens=max_new_tokens)

    return _answer_and_score(dataset, answer, system="perk", desc="evaluate", batch_size=batch_size,
                             max_new_tokens=max_new_tokens, out_dir=out_dir, progress=progress,
                             extra={"inner_steps": perk_model.config.inner_steps})


# ----------------------------------------------------------------------------- in-context baseline
def _generate_from_prompts(hf_model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded prompts."""
    pad = pad_id(tokenizer)
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    length = max(len(x) for x in ids)
    device = next(hf_model.parameters()).device
    input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row):] = 1
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        hf_model.train(was_training)
    return [tokenizer.decode(row[length:], skip_special_tokens=True) for row in out.tolist()]


def evaluate_in_context(
    hf_model: torch.nn.Module,
    tokenizer: Any,
    dataset: Sequence[Any],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Answer with the context in the prompt (:func:`in_context_prompt`), scored as :func:`evaluate`.

    ``hf_model`` is a plain causal LM (not wrapped in a PerkModel). Returns the same dict as
    :func:`evaluate` with ``system`` = ``"in_context"``.
    """

    def answer(group: list[dict]) -> list[str]:
        prompts = [in_context_prompt(r["context"], r["question"]) for r in group]
        return _generate_from_prompts(hf_model, tokenizer, prompts, max_new_tokens)

    return _answer_and_score(dataset, answer, system="in_context", desc="evaluate_in_context", batch_size=batch_size,
                             max_new_tokens=max_new_tokens, out_dir=out_dir, progress=progress)


def in_context_batch(tokenizer: Any, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input ids, labels) of in-context training rows; labels on target + EOS only."""
    ids, labels = [], []
    for r in rows:
        prompt = tokenizer.encode(in_context_prompt(r["context"], r["question"]), add_special_tokens=False)
        target = tokenizer.encode(" " + query_target(r["answer"], r["support"]), add_special_tokens=False)
        target = target + [tokenizer.eos_token_id]
        ids.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
    return pad_rows(ids, pad_id(tokenizer)), pad_rows(labels, IGNORE)


def finetune_in_context(
    hf_model: torch.nn.Module,
    tokenizer: Any,
    dataset: Sequence[Any],
    *,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.95),
    warmup_proportion: float = 0.03,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Fine-tune every weight of ``hf_model`` to answer with the context in its prompt (FT-ICR).

    The loss is PERK's outer loss with the context moved into the prompt: mean over the batch of
    each example's mean cross-entropy on its target tokens (answer or support/output form, plus
    EOS). AdamW with linear warmup over ``warmup_proportion`` of the steps then cosine decay, and
    gradient-norm clipping -- the same schedule as ``meta_train``, so giving it the same
    ``steps`` x ``batch_size`` examples gives it the same training budget. The data order is a
    seeded shuffle per epoch. Returns the history (one dict per step: step, loss, lr, grad_norm).
    """
    _check_positive("batch_size", batch_size)
    _check_positive("epochs", epochs)
    if steps is not None:
        _check_positive("steps", steps)
    rows = _unpack(dataset)
    per_epoch = math.ceil(len(rows) / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    params = [p for p in hf_model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    warmup = math.ceil(warmup_proportion * total)
    device = next(hf_model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="finetune_in_context", unit="step")
    history, order = [], []
    hf_model.train()
    try:
        for step in range(total):
            epoch, pos = divmod(step, per_epoch)
            if pos == 0:
                order = list(range(len(rows)))
                random.Random(seed * 7919 + epoch).shuffle(order)
            batch = [rows[i] for i in order[pos * batch_size : (pos + 1) * batch_size]]
            factor = (step + 1) / warmup if step < warmup else 0.5 * (
                1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            ids, labels = in_context_batch(tokenizer, batch)
            ids, labels = ids.to(device), labels.to(device)
            logits = hf_model(input_ids=ids).logits[:, :-1].float()
            target = labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="none"
            ).view(target.shape)
            counts = (target != IGNORE).sum(1).clamp_min(1)
            loss = (ce.sum(1) / counts).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            record = {"step": step + 1, "loss": float(loss.detach()), "lr": lr * factor, "grad_norm": float(grad_norm)}
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
    finally:
        if bar is not None:
            bar.close()
        hf_model.eval()
    return history


# ----------------------------------------------------------------------------- sweeps
def _run_system(system: Any, data: list, *, batch_size: int, max_new_tokens: int, out_dir) -> dict:
    if isinstance(system, PerkModel):
        return evaluate(system, data, batch_size=batch_size, max_new_tokens=max_new_tokens, out_dir=out_dir,
                        progress=False)
    if callable(system):
        return system(data, out_dir=out_dir)
    raise TypeError(f"a sweep system must be a PerkModel or a callable(dataset, out_dir=...) -> dict, got "
                    f"{type(system).__name__}")


def format_sweep_table(results: Mapping[str, Mapping[int, Mapping[str, dict]]], *, metric: str = "exact_match") -> str:
    """Text table: one row per (system, length), one column per position, ``metric`` in percent."""
    systems = list(results)
    if not systems:
        return ""
    lengths = list(results[systems[0]])
    positions = list(results[systems[0]][lengths[0]])
    name_w = max(len("system"), *(len(s) for s in systems))
    header = f"{'system':<{name_w}}  {'length':>6}  " + "  ".join(f"{p:>6}" for p in positions) + "     n"
    lines = [header, "-" * len(header)]
    for s in systems:
        for length in lengths:
            cells = results[s][length]
            vals = "  ".join(f"{100 * cells[p][metric]:6.1f}" for p in positions)
            n = cells[positions[0]]["n"]
            lines.append(f"{s:<{name_w}}  {length:>6}  {vals}  {n:>4}")
    return "\n".join(lines)


def _plot_sweep(results, lengths, positions, path: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(positions), figsize=(4 * len(positions), 3.4), sharey=True, squeeze=False)
    styles = [("o", "-", 7), ("s", "--", 6), ("^", ":", 5), ("D", "-.", 4)]  # overlapping lines stay visible
    for ax, pos in zip(axes[0], positions):
        for i, (name, cells) in enumerate(results.items()):
            marker, line, size = styles[i % len(styles)]
            ax.plot(lengths, [100 * cells[length][pos][metric] for length in lengths], marker=marker, linestyle=line,
                    markersize=size, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(length) for length in lengths])
        ax.set_title(f"position: {pos}")
        ax.set_xlabel("context tokens")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (%)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(
    systems: Mapping[str, Any],
    *,
    task: str = "needle",
    lengths: Sequence[int] = (256, 1024),
    positions: Sequence[str] = ("pre", "mid", "post"),
    n: int = 16,
    seed: int | str = "sweep",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    out_dir: str | os.PathLike | None = None,
    metric: str = "exact_match",
    verbose: bool = True,
    **task_kwargs: Any,
) -> dict:
    """Evaluate several systems over context lengths and fact positions on the same data.

    Args:
        systems: name -> a PerkModel (scored with :func:`evaluate`) or a callable
            ``f(dataset, out_dir=...) -> dict`` (e.g. a ``functools.partial`` of
            :func:`evaluate_in_context`).
        task, lengths, positions, n, seed, task_kwargs: the data of each cell is
            ``tasks.generate(task, n, seed=seed, context_tokens=length, position=position, **task_kwargs)``,
            the same for every system.
        out_dir: when given, per-cell predictions go to ``out_dir/<system>/L<length>_<position>/``
            (``<system>``: the name with every run of other characters than letters, digits, ``.``
            and ``-`` replaced by ``_``),
            and ``sweep.json`` and ``sweep.png`` (one panel per position, ``metric`` vs length) to
            ``out_dir``.
        verbose: print the table (:func:`format_sweep_table`).

    Returns:
        ``{"results": {system: {length: {position: summary}}}, "table": str, "n": n, ...}``
        (summaries without their prediction lists).
    """
    from .tasks import generate

    if not systems:
        raise ValueError("systems is empty: pass at least one name -> system")
    _check_positive("n", n)
    lengths, positions = [int(x) for x in lengths], list(positions)
    results: dict[str, dict[int, dict[str, dict]]] = {name: {} for name in systems}
    for length in lengths:
        for pos in positions:
            data = generate(task, n, seed=seed, context_tokens=length, position=pos, **task_kwargs)
            for name, system in systems.items():
                folder = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "system"
                cell_dir = None if out_dir is None else os.path.join(out_dir, folder, f"L{length}_{pos}")
                summary = _run_system(system, data, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      out_dir=cell_dir)
                summary = {k: v for k, v in summary.items() if k != "predictions"}
                results[name].setdefault(length, {})[pos] = summary
    table = format_sweep_table(results, metric=metric)
    if verbose:
        print(table)
    report = {"task": task, "seed": seed, "n": n, "lengths": lengths, "positions": positions, "metric": metric,
              "task_kwargs": task_kwargs, "results": results, "table": table}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sweep.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
        _plot_sweep(results, lengths, positions, os.path.join(out_dir, "sweep.png"), metric)
    return report
