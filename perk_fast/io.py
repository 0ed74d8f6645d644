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

# config fields that do not define the architecture or the weights
_VOLATILE_CONFIG = {
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
    "attn_implementation", "_attn_implementation_autoset", "use_cache", "architectures",
}


def model_fingerprint(hf_model: nn.Module) -> dict[str, Any]:
    """What identifies a base model: its config (hashed) and a digest of its embeddings.

    The digest samples the first rows of the input embeddings rounded to bf16, so it
    survives fp32/fp64/bf16 casts and device moves but tells differently
    initialised or trained weights apart.
    """
    cfg = hf_model.config.to_dict()
    stable = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG}
    config_hash = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    emb = hf_model.get_input_embeddings().weight.detach()[:64].to("cpu", torch.bfloat16).contiguous()
    weights_hash = hashlib.sha256(emb.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    return {"model_type": cfg.get("model_type"), "config_sha": config_hash, "weights_sha": weights_hash}


def check_fingerprint(expected: Mapping[str, Any], hf_model: nn.Module, what: str) -> None:
    """Raise ValueError if ``hf_model`` is not the base model ``expected`` describes."""
    actual = model_fingerprint(hf_model)
    if dict(expected) != actual:
        raise ValueError(
            f"{what} belongs to a different base model: saved for {dict(expected)}, but this model is {actual}"
        )


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
