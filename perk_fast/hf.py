"""What perk_fast needs of a Hugging Face causal LM, checked once, with errors that say what is missing.

PERK reads the final hidden state of the decoder (``base_model_prefix``: ``transformer`` for
GPT-2, ``model`` for Llama / Qwen2) and applies the LM head itself (chunked, with token
weights), so a model must expose both. Second-order replays need attention that autograd can
differentiate twice (SDPA's math path, or eager attention).
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["model_type", "check_causal_lm", "decoder_body", "lm_head"]

SUPPORTED_ATTENTION = (None, "eager", "sdpa")


def model_type(hf_model: Any) -> str:
    """``config.model_type`` (the class name when there is none)."""
    return getattr(getattr(hf_model, "config", None), "model_type", None) or type(hf_model).__name__


def decoder_body(hf_model: nn.Module) -> nn.Module:
    """The decoder without its LM head (its output is the final normed hidden state)."""
    return getattr(hf_model, hf_model.base_model_prefix)


def lm_head(hf_model: nn.Module) -> nn.Module:
    """The output embeddings (LM head) module."""
    return hf_model.get_output_embeddings()


def check_causal_lm(hf_model: Any) -> None:
    """Raise TypeError / ValueError naming the model type unless ``hf_model`` is a usable causal LM."""
    if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
        raise TypeError(f"hf_model must be a transformers model, got {type(hf_model).__name__}")
    kind = model_type(hf_model)
    prefix = getattr(hf_model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(hf_model, prefix, None), nn.Module):
        raise ValueError(f"model type {kind!r}: no decoder body (base_model_prefix) found; need a *ForCausalLM")
    head = lm_head(hf_model)
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model type {kind!r}: no output embeddings (LM head) found; need a *ForCausalLM")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"model type {kind!r}: LM heads with a bias are not supported")
    attn = getattr(hf_model.config, "_attn_implementation", None)
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"model type {kind!r} uses attn_implementation={attn!r}; PERK's second-order passes need "
            "'sdpa' or 'eager' (fused kernels are still used where no second order is needed)"
        )
