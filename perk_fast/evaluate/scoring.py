"""Evaluation: PERK and the in-context baseline answer the same questions, scored by the same code.

* ``evaluate(perk_model, data)`` -- PERK: each context is written into its memory by
  :func:`perk_fast.encode` (T inner steps), then the question alone (no context in the prompt)
  is answered with :meth:`PerkModel.generate`. With a *fresh* PerkModel this is plain test-time
  training (no meta-learning).
* ``evaluate_in_context(hf_model, tokenizer, data)`` -- the documents are in the prompt
  (:func:`in_context_prompt`).

Scoring: :func:`cut_answer`, then normalised exact match and token F1 (:mod:`perk_fast.metrics`)
against the training target; per-example ``predictions.jsonl`` and ``summary.json`` when an
``out_dir`` is given.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

from torch import nn

from ..config import check_int
from ..data import example_field, pad_id, prompt_ids, query_target
from ..encode import encode
from ..generation import generate_continuations
from ..metrics import exact_match, f1_score
from ..model import PerkModel

__all__ = ["cut_answer", "in_context_prompt", "evaluate", "evaluate_in_context", "unpack_examples"]


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


def unpack_examples(dataset: Sequence[Any]) -> list[dict]:
    """Rows of ``context`` / ``question`` / ``answer`` (``support`` and ``meta`` optional) from a list of
    :class:`perk_fast.tasks.Example` or dicts; a missing required field names the example's index."""
    if isinstance(dataset, (str, bytes)) or not isinstance(dataset, Sequence):
        raise TypeError("dataset must be a list of examples (perk_fast.tasks.Example or dicts)")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    rows = []
    for i, ex in enumerate(dataset):
        rows.append({
            "context": example_field(ex, "context", i), "question": example_field(ex, "question", i),
            "answer": str(example_field(ex, "answer", i)), "support": example_field(ex, "support", i, required=False),
            "meta": example_field(ex, "meta", i, required=False) or {},
        })
    return rows


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
    check_int("batch_size", batch_size)
    check_int("max_new_tokens", max_new_tokens)
    rows = unpack_examples(dataset)
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
    """Greedy continuations of the prompts (left-padded, batched)."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    new = generate_continuations(hf_model, ids, pad_id=pad_id(tokenizer), eos_id=tokenizer.eos_token_id,
                                 max_new_tokens=max_new_tokens)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]


def evaluate_in_context(
    hf_model: nn.Module,
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
