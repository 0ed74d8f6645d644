"""Test-time encoding: write many contexts into their LoRA memories at once."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .data import make_micro_batches, pad_id
from .inner import run_inner_loop
from .memory import Memory
from .model import PerkModel, model_fingerprint


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: allowed an integer >= 1")
    segments = perk_model.segment_contexts(contexts, rng=None)
    pad = pad_id(perk_model.tokenizer)
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
            group = segments[start : start + batch_size]
            micro = make_micro_batches(group, perk_model.config.segments_per_step, pad, perk_model.device)
            params = [p.detach() for p in perk_model.initial_adapters(len(group))]
            adapted = run_inner_loop(
                perk_model, params, micro, differentiable=False, seed=None,
                progress=(lambda t: bar.update(1)) if bar is not None else None,
            )
            parts.append([p.detach() for p in adapted])
    finally:
        perk_model.train(was_training)
        if bar is not None:
            bar.close()
    tensors = [torch.cat(ts, 0) if len(ts) > 1 else ts[0] for ts in zip(*parts)]
    return Memory(
        tensors,
        [s.n_docs for s in segments],
        model_fingerprint(perk_model.hf_model),
        [s.name for s in perk_model.sites],
        {"inner_steps": steps, "segments": [len(s.segments) for s in segments]},
    )
