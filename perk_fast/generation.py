"""Batched generation from left-padded prompts: one implementation for PERK and the in-context baselines.

Prompts of different lengths are left-padded (:func:`perk_fast.data.left_pad`) so that every
row continues at the same position; the attention mask hides the pads. Greedy decoding (no
sampling, one beam) stops at the tokenizer's EOS.
"""
from __future__ import annotations

from typing import Sequence

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
) -> list[list[int]]:
    """The new token ids ``hf_model`` generates after each prompt (greedy; EOS and pads included).

    The model is put in eval mode for the call (and restored), gradients are off.
    """
    ids, mask = left_pad(prompts, pad_id)
    device = next(hf_model.parameters()).device
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id,
            )
    finally:
        hf_model.train(was_training)
    return [row[ids.shape[1]:] for row in out.tolist()]
