"""Persistence shared by every saved object: base-model fingerprints, JSON headers, safetensors.

A saved perk_fast object is a directory with a JSON header (``format``, ``version`` and what the
object needs to be rebuilt) next to one or more safetensors files. Tensors are always written from
CPU, contiguous; nothing is pickled. ``replace_dir`` swaps a freshly written directory in for an
old one so that an interrupted save never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Mapping

import torch
from torch import nn

__all__ = [
    "model_fingerprint", "check_fingerprint", "read_header", "write_header", "save_tensors", "load_tensors",
    "replace_dir",
]

# config fields that define the architecture (what a memory's numbers depend on); anything else --
# generation settings, output flags, dtype, defaults a transformers upgrade adds -- does not count
_ARCHITECTURE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
    "n_head", "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "hidden_act",
    "activation_function", "tie_word_embeddings", "rms_norm_eps", "layer_norm_epsilon", "rope_theta",
    "rope_scaling", "attention_bias", "mlp_bias", "scale_attn_weights",
)
_SAMPLES_PER_WEIGHT = 4096
_FINGERPRINT_FORMAT = 2

# the first release's fingerprint (config hash without a few volatile fields + 64 embedding rows);
# kept so that memories and models saved then still load
_VOLATILE_CONFIG_V1 = {
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
    "attn_implementation", "_attn_implementation_autoset", "use_cache", "architectures",
}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _weight_sample(weight: torch.Tensor) -> bytes:
    """A deterministic sample of a weight, rounded to bf16 (so fp32 / fp64 / bf16 copies agree)."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    if n > _SAMPLES_PER_WEIGHT:
        index = torch.linspace(0, n - 1, _SAMPLES_PER_WEIGHT, device=flat.device).round().long()
        flat = flat.index_select(0, index)
    sample = flat.to("cpu", torch.bfloat16).contiguous()
    return bytes(str(tuple(weight.shape)), "ascii") + sample.view(torch.int16).numpy().tobytes()


def model_fingerprint(hf_model: nn.Module, target_weights: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """What identifies a base model: its architecture (config fields that define it, hashed) and a
    digest of the weights the memories adapt.

    ``target_weights``: the weights of the adapted projections (PerkModel passes them); default
    every 2-D weight of the model. Each is sampled at 4096 evenly spaced elements rounded to bf16,
    so the digest survives dtype casts, device moves, config flags and transformers upgrades, and
    tells differently trained or initialised weights apart.
    """
    cfg = hf_model.config.to_dict()
    arch = {k: cfg[k] for k in _ARCHITECTURE_FIELDS if k in cfg}
    config_hash = _digest(json.dumps(arch, sort_keys=True, default=str).encode())
    if target_weights is None:
        target_weights = [p for p in hf_model.parameters() if p.dim() == 2]
    h = hashlib.sha256()
    for w in target_weights:
        h.update(_weight_sample(w))
    return {"format": _FINGERPRINT_FORMAT, "model_type": cfg.get("model_type"), "config_sha": config_hash,
            "weights_sha": h.hexdigest()[:16]}


def _fingerprint_v1(hf_model: nn.Module) -> dict[str, Any]:
    cfg = hf_model.config.to_dict()
    stable = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_V1}
    config_hash = _digest(json.dumps(stable, sort_keys=True, default=str).encode())
    emb = hf_model.get_input_embeddings().weight.detach()[:64].to("cpu", torch.bfloat16).contiguous()
    return {"model_type": cfg.get("model_type"), "config_sha": config_hash,
            "weights_sha": _digest(emb.view(torch.int16).numpy().tobytes())}


def check_fingerprint(expected: Mapping[str, Any], hf_model: nn.Module, what: str,
                      target_weights: list[torch.Tensor] | None = None) -> None:
    """Raise ValueError if ``hf_model`` is not the base model ``expected`` describes."""
    expected = dict(expected)
    if expected.get("format") == _FINGERPRINT_FORMAT:
        actual = model_fingerprint(hf_model, target_weights)
    else:
        actual = _fingerprint_v1(hf_model)
    if expected != actual:
        raise ValueError(f"{what} belongs to a different base model: saved for {expected}, but this model is {actual}")


def read_header(path: str | os.PathLike, name: str, fmt: str) -> dict[str, Any]:
    """The JSON header ``name`` of a saved directory, checked to be of format ``fmt``."""
    header_path = os.path.join(path, name)
    if not os.path.exists(header_path):
        raise FileNotFoundError(f"{header_path} not found: not a saved {fmt.split('.')[-1]} directory")
    with open(header_path) as fh:
        header = json.load(fh)
    if header.get("format") != fmt:
        raise ValueError(f"{header_path}: format {header.get('format')!r} is not a {fmt}")
    return header


def write_header(path: str | os.PathLike, name: str, header: Mapping[str, Any]) -> None:
    """Write ``header`` as indented JSON to ``path/name`` (the directory is created)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, name), "w") as fh:
        json.dump(dict(header), fh, indent=2)


def save_tensors(path: str | os.PathLike, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` (detached, on CPU, contiguous) to the safetensors file ``path/name``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, os.path.join(path, name))


def load_tensors(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """Read the safetensors file ``path/name`` (CPU tensors)."""
    from safetensors.torch import load_file

    file = os.path.join(path, name)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found")
    return load_file(file)


def replace_dir(fresh: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the completely written directory ``fresh`` to ``path``, replacing what was there.

    The old directory is renamed aside first and deleted only once ``fresh`` is in place, so at
    every moment one complete version exists on disk.
    """
    fresh, path = os.fspath(fresh), os.fspath(path)
    old = path + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(fresh, path)
    if os.path.exists(old):
        shutil.rmtree(old)
