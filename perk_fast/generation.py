"""Batched generation from left-padded prompts: one implementation for PERK and the in-context baselines.

Prompts of different lengths are left-padded (:func:`perk_fast.data.left_pad`) so that every
row continues at the same position; the attention mask hides the pads. Greedy decoding (no
sampling, one beam) by default, stopping at the tokenizer's EOS; any ``transformers`` generation
option can be passed instead.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from .data import left_pad

__all__ = ["generate_continuations"]


def generate_continuations(
    hf_model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """The new token ids ``hf_model`` generates after each prompt (EOS and pads included).

    Greedy unless ``generate_kwargs`` say otherwise (``do_sample``, ``num_beams``,
    ``num_return_sequences`` -- rows then come out grouped by prompt --, ``generation_config``, ...).
    The model is put in eval mode for the call (and restored), gradients are off.
    """
    options = {"do_sample": False, "num_beams": 1}
    if generate_kwargs.get("generation_config") is not None:  # the given config decides; ours goes into a copy
        config = copy.deepcopy(generate_kwargs.pop("generation_config"))
        config.max_new_tokens = max_new_tokens
        config.pad_token_id = pad_id if config.pad_token_id is None else config.pad_token_id
        config.eos_token_id = eos_id if config.eos_token_id is None else config.eos_token_id
        options = {"generation_config": config}
    ids, mask = left_pad(prompts, pad_id)
    device = next(hf_model.parameters()).device
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad():
            options.update(generate_kwargs)
            if "generation_config" not in options:
                options.setdefault("pad_token_id", pad_id)
                options.setdefault("eos_token_id", eos_id)
                options["max_new_tokens"] = max_new_tokens
            out = hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)
    finally:
        hf_model.train(was_training)
    return [row[ids.shape[1]:] for row in out.tolist()]
