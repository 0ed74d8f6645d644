"""Batched LoRA memories on Hugging Face causal LMs, without patching transformers.

Each target projection (GPT-2 ``Conv1D`` c_attn / c_proj / c_fc, whose weight is
stored transposed as (in, out); Llama / Qwen2 ``nn.Linear`` q/k/v/o/gate/up/down,
weight (out, in)) keeps its class and its state-dict keys; only its instance
``forward`` is redirected to :func:`_lora_forward`. While no adapters are active the
projection computes exactly what it did before.

Adapters are batched per context: for C contexts, ``A`` has shape (C, r, in) and
``B`` (C, out, r); row ``c`` belongs to context ``c``. The rows of the activations
that reach a projection must be grouped by context (``rows = C * k``, context-major),
so the layer sees them as (C, k * tokens, in) and calls the fused batched op
``perk_fast.kernels.lora.lora_linear`` (Triton on CUDA, its PyTorch twin elsewhere):

    y = x Wᵀ + bias + s · (dropout(x) A_cᵀ) B_cᵀ,   s = alpha / sqrt(r) (rsLoRA) or alpha / r

Dropout masks come from a counter-based generator keyed per row (pass seed, the row's
context, its segment) and per projection, so a pass can be replayed bit-exactly (needed
by the checkpointed meta-gradient) and a context's masks do not depend on its batch.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .config import DEFAULT_TARGETS, PerkConfig
from .kernels.lora import lora_linear
from .seeds import keyed_uniform

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class LoraSite:
    """One projection that carries a LoRA memory."""

    name: str  # module path inside the HF model, e.g. "transformer.h.0.attn.c_attn"
    module: nn.Module
    layout: str  # "linear" (weight (out, in)) or "conv1d" (weight (in, out))
    in_features: int
    out_features: int
    index: int  # position in the site list (seeds dropout, orders tensors)
    original_forward: Callable = field(repr=False)


@dataclass
class ActiveAdapters:
    """What the patched projections read during a forward pass."""

    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # per site: A (C, r, in), B (C, out, r)
    scale: float
    dropout: float = 0.0
    dropout_keys: torch.Tensor | None = None  # (rows,) int64 per-row keys; None: no dropout in this pass


class AdapterSlot:
    """Mutable holder shared by all patched projections of one model."""

    def __init__(self) -> None:
        self.active: ActiveAdapters | None = None


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return (Conv1D,)


def _layer_of(name: str) -> int | None:
    match = _LAYER_INDEX.search("." + name + ".")
    return int(match.group(1)) if match else None


def find_sites(model: nn.Module, config: PerkConfig) -> list[tuple[str, nn.Module, str, int, int]]:
    """Locate the target projections of ``model``: (name, module, layout, in, out).

    Raises ValueError naming the model type and what is missing when the model is
    not supported or no projection matches.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    targets = config.target_modules
    if targets is None:
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"model type {model_type!r} is not supported out of the box: perk_fast knows "
                f"{sorted(DEFAULT_TARGETS)}; pass PerkConfig(target_modules=[...]) naming its nn.Linear / "
                "Conv1D projections to use it anyway"
            )
        targets = DEFAULT_TARGETS[model_type]
    conv1d = _conv1d_type()
    found = []
    seen_targets = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets:
            continue
        layer = _layer_of(name)
        if config.layers is not None and layer not in config.layers:
            continue
        _refuse_unsupported(model_type, name, module, model)
        if conv1d and isinstance(module, conv1d):
            in_f, out_f = module.weight.shape
            found.append((name, module, "conv1d", in_f, out_f))
        elif isinstance(module, nn.Linear):
            found.append((name, module, "linear", module.in_features, module.out_features))
        else:
            raise ValueError(
                f"model type {model_type!r}: target module {name!r} is a {type(module).__name__}, "
                "but LoRA memories need nn.Linear or transformers' Conv1D"
            )
        seen_targets.add(leaf)
    missing = sorted(set(targets) - seen_targets)
    if not found:
        raise ValueError(
            f"model type {model_type!r}: none of the target modules {list(targets)} was found"
            + (f" in layers {list(config.layers)}" if config.layers is not None else "")
        )
    if missing:
        raise ValueError(f"model type {model_type!r}: target modules {missing} were not found in the model")
    if config.layers is not None:
        present = {_layer_of(n) for n, *_ in found}
        absent = sorted(set(config.layers) - present)
        if absent:
            raise ValueError(f"model type {model_type!r}: layers {absent} do not exist (PerkConfig.layers)")
    return found


def _refuse_unsupported(model_type: str, name: str, module: nn.Module, model: nn.Module) -> None:
    """Targets perk_fast would compute wrongly: quantised linears, mixture-of-experts experts."""
    cls = type(module)
    if cls.__module__.startswith("bitsandbytes") or cls.__name__ in ("Linear4bit", "Linear8bitLt", "Params4bit"):
        raise ValueError(f"model type {model_type!r}: target module {name!r} is a bitsandbytes {cls.__name__}; "
                         "quantised linears are not supported (their weight is not a plain matrix): load the model "
                         "in bf16 / fp32")
    if ".experts." in f".{name}." or any(getattr(model.config, f, None) for f in
                                         ("num_experts", "num_local_experts", "n_routed_experts")) and "expert" in name:
        raise ValueError(f"model type {model_type!r}: target module {name!r} is a mixture-of-experts expert "
                         "projection; routed experts are not supported as memory sites (each token would reach "
                         "only some of them): target the attention projections with PerkConfig(target_modules=...)")


def inject_lora(model: nn.Module, config: PerkConfig, slot: AdapterSlot) -> list[LoraSite]:
    """Redirect the forward of every target projection to the batched LoRA op."""
    sites = []
    for index, (name, module, layout, in_f, out_f) in enumerate(find_sites(model, config)):
        if getattr(module, "_perk_fast_site", None) is not None:
            raise ValueError(f"module {name!r} already carries a perk_fast memory; build one PerkModel per HF model")
        site = LoraSite(name, module, layout, in_f, out_f, index, original_forward=module.forward)
        module.forward = functools.partial(_lora_forward, site, slot)
        module._perk_fast_site = site
        sites.append(site)
    return sites


def remove_lora(sites: list[LoraSite]) -> None:
    """Undo :func:`inject_lora`: the projections compute their original forward again."""
    for site in sites:
        site.module.forward = site.original_forward
        site.module._perk_fast_site = None


def dropout_mask(keys: torch.Tensor, stream: int, length: int, features: int, p: float, dtype: torch.dtype
                 ) -> torch.Tensor:
    """(rows, length, features) inverted-dropout mask (0 or 1/(1-p)) of rows keyed by ``keys``
    (:func:`perk_fast.seeds.keyed_uniform`): a row's mask depends on its key, not on the batch."""
    keep = keyed_uniform(keys, stream, length, features) >= p
    return keep.to(dtype) / (1.0 - p)


def _lora_forward(site: LoraSite, slot: AdapterSlot, x: torch.Tensor) -> torch.Tensor:
    active = slot.active
    if active is None:
        return site.original_forward(x)
    a, b = active.tensors[site.index]
    contexts = a.shape[0]
    if x.shape[0] % contexts:
        raise ValueError(
            f"{site.name}: {x.shape[0]} input rows cannot be grouped over {contexts} context memories "
            "(rows must be context-major, the same number per context)"
        )
    lead = x.shape[:-1]
    x3 = x.reshape(contexts, -1, site.in_features)
    lora_x = None
    if active.dropout > 0 and active.dropout_keys is not None:
        keys = active.dropout_keys
        if x.dim() != 3 or x.shape[0] != keys.numel():
            raise ValueError(f"{site.name}: dropout keys for {keys.numel()} rows, but the input has shape "
                             f"{tuple(x.shape)} (rows, length, features)")
        mask = dropout_mask(keys.to(x.device), site.index, x.shape[1], site.in_features, active.dropout, x.dtype)
        lora_x = (x * mask).reshape(contexts, -1, site.in_features)
    module = site.module
    y = lora_linear(
        x3, module.weight, module.bias, a, b, scale=active.scale, weight_layout=site.layout, lora_x=lora_x
    )
    return y.reshape(*lead, site.out_features)


def init_lora_tensors(site: LoraSite, rank: int, generator: torch.Generator, dtype: torch.dtype):
    """PEFT's initialisation: A kaiming-uniform (a = sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B zero."""
    bound = 1.0 / math.sqrt(site.in_features)
    a = (torch.rand(rank, site.in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    b = torch.zeros(site.out_features, rank, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)
