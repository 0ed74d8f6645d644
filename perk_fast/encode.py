"""Test-time encoding: write many contexts into their LoRA memories at once."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .config import check_int
from .engine import run_inner_loop
from .memory import Memory
from .model import PerkModel


def encode(
    perk_model: PerkModel,
    contexts: Sequence[Any],
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> Memory:
    """Encode B contexts into a :class:`Memory` (T inner steps each, no second-order graph).

    Args:
        perk_model: the (meta-trained) PerkModel.
        contexts: a list of contexts, each a string or a list of documents.
        batch_size: contexts adapted together (default: all at once). Results do not
            depend on it: each context's update is exactly what it would be alone.
        progress: show a progress bar over batches and inner steps.

    Returns:
        A Memory with the adapters of every context, in order. Doc ids are not
        shuffled and dropout is off (test time).
    """
    if not isinstance(perk_model, PerkModel):
        raise TypeError(f"encode expects a PerkModel, got {type(perk_model).__name__}")
    if isinstance(contexts, str) or not isinstance(contexts, Sequence):
        raise TypeError("contexts must be a list of contexts (each a string or a list of documents)")
    if len(contexts) == 0:
        raise ValueError("contexts is empty: pass at least one context")
    if batch_size is None:
        batch_size = len(contexts)
    check_int("batch_size", batch_size)
    segments = perk_model.segment_contexts(contexts, rng=None)
    steps = perk_model.config.inner_steps
    n_batches = (len(segments) + batch_size - 1) // batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_batches * steps, desc="encode", unit="step")
    parts = []
    was_training = perk_model.training
    perk_model.train(False)
    try:
        for start in range(0, len(segments), batch_size):
            problem = perk_model.inner_problem(segments[start : start + batch_size], seed=None)
            result = run_inner_loop(problem, differentiable=False,
                                    progress=(lambda t: bar.update(1)) if bar is not None else None)
            parts.append([p.detach() for p in result.adapters])
    finally:
        perk_model.train(was_training)
        if bar is not None:
            bar.close()
    tensors = [torch.cat(ts, 0) if len(ts) > 1 else ts[0] for ts in zip(*parts)]
    return Memory(
        tensors,
        [s.n_docs for s in segments],
        perk_model.fingerprint(),
        [s.name for s in perk_model.sites],
        {"inner_steps": steps, "segments": [len(s.segments) for s in segments]},
        perk_model.lora_settings(),
    )
