"""Reading the reference's Lightning checkpoints (``.ckpt``) without unpickling arbitrary objects.

``torch.load(path, weights_only=True)`` allows only tensors, storages and plain containers; a
checkpoint that holds anything else (an OmegaConf DictConfig, an argparse Namespace, a class of
the reference's) is refused with the name of what it found, never executed. The reference's own
checkpoints hold only plain types (its hyper-parameters are a plain dict), so they load.

Key names in the reference's ``state_dict`` (its LightningModule ``MetaLMModule``):

* LoRA: ``model.lm_model.base_model.model.<module path>.lora_A.default.weight`` (r, in) and
  ``...lora_B.default.weight`` (out, r) -- PEFT's names under the module's ``model.lm_model``;
* the frozen base: ``model.lm_model.base_model.model.<module path>.base_layer.weight`` for the
  adapted projections, ``model.lm_model.base_model.model.<name>`` for everything else;
* learned learning rates: ``inner_schedular.names_lr_dict.<PEFT parameter name, "." -> "-">``, a
  vector of T + 1 per LoRA tensor (the last is never used by the reference);
* the weighting model: ``model.weighting_model.fc1.weight`` etc.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ReferenceCheckpoint", "read_reference_checkpoint"]

_LORA = "model.lm_model.base_model.model."
_LRS = "inner_schedular.names_lr_dict."
_WEIGHTING = "model.weighting_model."


@dataclass
class ReferenceCheckpoint:
    """What a reference checkpoint holds, by module path."""

    lora_a: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (r, in)
    lora_b: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (out, r)
    lrs_a: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (T + 1,)
    lrs_b: dict[str, torch.Tensor] = field(default_factory=dict)
    weighting: dict[str, torch.Tensor] = field(default_factory=dict)  # fc1.weight, ...
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # module path of a parameter -> tensor
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0


def _site(name: str, marker: str) -> str:
    return name.split(marker, 1)[0]


def read_reference_checkpoint(path: str | os.PathLike) -> ReferenceCheckpoint:
    """Parse a reference ``.ckpt`` (weights-only load; refused with the offending type otherwise)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a reference Lightning checkpoint (.ckpt)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError (or a subclass) names the global it refused
        raise ValueError(f"{path}: refused to unpickle it -- it holds objects other than tensors and plain "
                         f"containers ({str(err).splitlines()[0]}); perk_fast never executes checkpoint code. "
                         "Re-save its state_dict and hyper-parameters as plain data to import it") from None
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    out = ReferenceCheckpoint(hyper_parameters=dict(raw.get("hyper_parameters") or {}),
                              global_step=int(raw.get("global_step") or 0))
    for name, tensor in raw["state_dict"].items():
        if name.startswith(_LRS):
            peft_name = name[len(_LRS):].replace("-", ".")
            if ".lora_A." in peft_name:
                out.lrs_a[_site(peft_name.split("base_model.model.", 1)[1], ".lora_A.")] = tensor
            elif ".lora_B." in peft_name:
                out.lrs_b[_site(peft_name.split("base_model.model.", 1)[1], ".lora_B.")] = tensor
        elif name.startswith(_WEIGHTING):
            out.weighting[name[len(_WEIGHTING):]] = tensor
        elif name.startswith(_LORA):
            rest = name[len(_LORA):]
            if ".lora_A." in rest:
                out.lora_a[_site(rest, ".lora_A.")] = tensor
            elif ".lora_B." in rest:
                out.lora_b[_site(rest, ".lora_B.")] = tensor
            elif ".base_layer." in rest:
                out.base[rest.replace(".base_layer.", ".")] = tensor
            else:
                out.base[rest] = tensor
    if not out.lora_a:
        raise ValueError(f"{path}: no PEFT LoRA weights (model.lm_model.base_model.model.*.lora_A.default.weight): "
                         "only the reference's peft_lora checkpoints can be imported")
    return out
