"""What perk_fast needs of a Hugging Face causal LM, checked once, with errors that say what is missing.

PERK reads the final hidden state of the decoder (``base_model_prefix``: ``transformer`` for
GPT-2, ``model`` for Llama / Qwen2) and applies the LM head itself (chunked, with token
weights), so a model must expose both. Second-order replays need attention that autograd can
differentiate twice (SDPA's math path, or eager attention).
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["model_type", "check_causal_lm", "check_runtime", "decoder_body", "lm_head"]

# config fields of features perk_fast would compute wrongly (its LM-head loss has no soft-capping)
_SOFTCAP_FIELDS = ("final_logit_softcapping", "attn_logit_softcapping")

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
    for name in _SOFTCAP_FIELDS:
        if getattr(hf_model.config, name, None) is not None:
            raise ValueError(f"model type {kind!r} uses {name}={getattr(hf_model.config, name)!r}: logit soft-capping "
                             "is not supported (perk_fast's LM-head loss and attention path would compute other numbers)")
    check_runtime(hf_model)
    attn = getattr(hf_model.config, "_attn_implementation", None)
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"model type {kind!r} uses attn_implementation={attn!r}; PERK's second-order passes need "
            "'sdpa' or 'eager' (fused kernels are still used where no second order is needed)"
        )


def check_runtime(hf_model: nn.Module) -> None:
    """Refuse states of the model that would make perk_fast's numbers wrong, checked at every pass.

    * HF gradient checkpointing recomputes layers in the backward, where perk_fast's adapters (set
      for the duration of a forward) are no longer active: the gradients would miss the memory.
      perk_fast's own ``meta_grad='checkpointed'`` / ``'recomputed'`` bound memory instead.
    * A model dispatched over several devices (``device_map='auto'``): the batched adapters live on
      one device.
    """
    kind = model_type(hf_model)
    flag = "is_activation_checkpointing" if hasattr(type(hf_model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    if getattr(hf_model, flag, False):
        off = "activation_checkpointing_disable" if hasattr(type(hf_model), "activation_checkpointing_disable") else \
            "gradient_checkpointing_disable"
        raise ValueError(f"model type {kind!r} has Hugging Face gradient checkpointing enabled, which recomputes "
                         f"layers without the active memory: call hf_model.{off}() "
                         "(PerkConfig(meta_grad='checkpointed' or 'recomputed') keeps meta-training memory flat)")
    device_map = getattr(hf_model, "hf_device_map", None)
    if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
        raise ValueError(f"model type {kind!r} is dispatched over devices {sorted({str(d) for d in device_map.values()})} "
                         "(device_map): perk_fast needs the whole model on one device; load it without device_map "
                         "and use torchrun for several GPUs")
