"""FT-ICR, the fine-tuned in-context baseline: every weight of the base trained to answer with the
context in its prompt, on the same examples, steps and batch size as PERK's meta-training.

The loss is PERK's outer loss with the context moved into the prompt (mean over the batch of each
example's mean cross-entropy on its target tokens); the schedule is meta-training's
(:mod:`perk_fast.schedule`), so equal steps x batch size is an equal training budget. Scored with
:func:`perk_fast.evaluate_in_context`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..config import check_int
from ..data import IGNORE, pad_id, pad_rows, prompt_ids, query_target
from ..schedule import warmup_cosine, warmup_steps
from ..seeds import epoch_order
from .scoring import in_context_prompt, unpack_examples

__all__ = ["in_context_batch", "finetune_in_context"]


def in_context_batch(tokenizer: Any, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input ids, labels) of in-context training rows; labels on target + EOS only."""
    ids, labels = [], []
    for r in rows:
        prompt = prompt_ids(tokenizer, in_context_prompt(r["context"], r["question"]))
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
    check_int("batch_size", batch_size)
    check_int("epochs", epochs)
    if steps is not None:
        check_int("steps", steps)
    rows = unpack_examples(dataset)
    per_epoch = math.ceil(len(rows) / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    params = [p for p in hf_model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    warmup = warmup_steps(total, warmup_proportion)
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
                order = epoch_order(len(rows), seed, epoch)
            batch = [rows[i] for i in order[pos * batch_size : (pos + 1) * batch_size]]
            factor = warmup_cosine(step, total, warmup)
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
