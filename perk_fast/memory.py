"""Memory: the per-context LoRA adapters produced by :func:`perk_fast.encode`.

A Memory is plain data -- adapter tensors, the number of documents of each context, the
fingerprint of the base model it belongs to, the projections it adapts and its LoRA settings
(rank, alpha, rsLoRA, scale, weight layouts) -- so it can be saved, concatenated, sliced, moved
and exported without the model that wrote it. ``to_peft`` writes one context's memory as a
standard PEFT LoRA adapter directory (what ``peft.PeftModel.from_pretrained`` and multi-LoRA
inference servers load); ``from_peft`` reads such an adapter back.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .io import check_fingerprint, load_tensors, read_header, save_tensors, write_header

_FORMAT_VERSION = 2
_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_SIDECAR = "perk_memory.json"  # what PEFT's config has no field for (documents, base fingerprint)


@dataclass
class Memory:
    """Adapters of C encoded contexts.

    ``tensors`` is ``[A_0, B_0, A_1, B_1, ...]`` in the PerkModel's site order, with
    A_i (C, r, in) and B_i (C, out, r); ``n_docs[c]`` is the number of documents of
    context c (it appears in the question prompt). ``fingerprint`` names the base
    model the memory belongs to; ``sites`` the projections it adapts; ``lora`` its LoRA settings
    (``rank``, ``alpha``, ``rslora``, ``scale``, ``layouts`` -- one per site, ``linear`` or
    ``conv1d``).
    """

    tensors: list[torch.Tensor]
    n_docs: list[int]
    fingerprint: dict[str, Any]
    sites: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.n_docs)

    def _like(self, tensors: list[torch.Tensor], n_docs: list[int]) -> "Memory":
        return Memory(tensors, n_docs, self.fingerprint, self.sites, dict(self.info), dict(self.lora))

    def select(self, index: int | list[int]) -> "Memory":
        """The memory of context(s) ``index`` (an int or a list of ints; negative ints count from the end)."""
        idx = [index] if isinstance(index, int) else list(index)
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"context index {i!r} must be an int")
            if not -len(self) <= i < len(self):
                raise IndexError(f"context index {i} out of range for a memory of {len(self)} contexts")
        idx = [i % len(self) for i in idx]
        sel = torch.tensor(idx, dtype=torch.long)
        return self._like([t.index_select(0, sel.to(t.device)) for t in self.tensors], [self.n_docs[i] for i in idx])

    def expand(self, n: int) -> "Memory":
        """One context's memory repeated for ``n`` questions (no copy)."""
        if len(self) != 1:
            raise ValueError(f"only a single-context memory can be broadcast, this one has {len(self)}")
        return self._like([t.expand(n, *t.shape[1:]) for t in self.tensors], self.n_docs * n)

    @staticmethod
    def cat(memories: list["Memory"]) -> "Memory":
        """Concatenate memories of the same base model along the context dimension."""
        if not memories:
            raise ValueError("Memory.cat needs at least one memory")
        first = memories[0]
        for m in memories[1:]:
            if m.fingerprint != first.fingerprint or m.sites != first.sites or m.lora != first.lora:
                raise ValueError("Memory.cat: memories belong to different base models, LoRA sites or settings")
        tensors = [torch.cat(ts, 0) for ts in zip(*(m.tensors for m in memories))]
        return first._like(tensors, [n for m in memories for n in m.n_docs])

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write ``memory.safetensors`` and ``memory.json`` into directory ``path``."""
        save_tensors(path, "memory.safetensors", {f"t{i}": t for i, t in enumerate(self.tensors)})
        write_header(path, "memory.json", {"format": "perk_fast.Memory", "version": _FORMAT_VERSION,
                                           "n_docs": self.n_docs, "base_model": self.fingerprint,
                                           "sites": self.sites, "lora": self.lora, "info": self.info})

    save_pretrained = save

    @classmethod
    def load(cls, path: str | os.PathLike, perk_model: Any = None) -> "Memory":
        """Read a memory saved with :meth:`save`; with ``perk_model``, check it belongs to it."""
        header = read_header(path, "memory.json", "perk_fast.Memory")
        raw = load_tensors(path, "memory.safetensors")
        tensors = [raw[f"t{i}"] for i in range(len(raw))]
        memory = cls(tensors, list(header["n_docs"]), header["base_model"], list(header["sites"]),
                     header.get("info", {}), header.get("lora", {}))
        if perk_model is not None:
            memory.check_compatible(perk_model)
            memory.tensors = [t.to(perk_model.device) for t in memory.tensors]
        return memory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, perk_model: Any = None) -> "Memory":
        """:meth:`load` under the Hugging Face name."""
        return cls.load(path, perk_model)

    def check_compatible(self, perk_model: Any) -> None:
        """Raise ValueError unless this memory fits ``perk_model``: its base (fingerprint), the
        adapted projections, the LoRA rank and scale, and every tensor's shape."""
        check_fingerprint(self.fingerprint, perk_model.hf_model, "memory", perk_model.site_weights())
        sites = [s.name for s in perk_model.sites]
        if sites != self.sites:
            raise ValueError(f"memory adapts projections {self.sites[:3]}... but this PerkModel has {sites[:3]}...")
        cfg = perk_model.config
        if self.lora:
            if self.lora.get("rank") != cfg.lora_rank or abs(self.lora.get("scale", 0) - cfg.lora_scale) > 1e-12:
                raise ValueError(f"memory has LoRA rank {self.lora.get('rank')} and scale {self.lora.get('scale')}, "
                                 f"this PerkModel rank {cfg.lora_rank} and scale {cfg.lora_scale}")
        if len(self.tensors) != 2 * len(perk_model.sites):
            raise ValueError(f"memory holds {len(self.tensors)} tensors for {len(perk_model.sites)} projections "
                             "(two per projection expected)")
        for site, a, b in zip(perk_model.sites, self.tensors[0::2], self.tensors[1::2]):
            want_a, want_b = (cfg.lora_rank, site.in_features), (site.out_features, cfg.lora_rank)
            if tuple(a.shape[1:]) != want_a or tuple(b.shape[1:]) != want_b or a.shape[0] != b.shape[0]:
                raise ValueError(f"memory tensors of {site.name} have shapes {tuple(a.shape)} / {tuple(b.shape)}, "
                                 f"expected (C, {want_a[0]}, {want_a[1]}) / (C, {want_b[0]}, {want_b[1]})")

    # ------------------------------------------------------------------ PEFT
    def to_peft(self, path: str | os.PathLike, index: int = 0, *, perk_model: Any = None,
                base_model_name_or_path: str | None = None) -> None:
        """Write context ``index``'s memory as a PEFT LoRA adapter directory.

        ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``,
        ``fan_in_fan_out`` for GPT-2's Conv1D, ``base_model_name_or_path``) and
        ``adapter_model.safetensors`` with PEFT's key names
        (``base_model.model.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r));
        ``peft.PeftModel.from_pretrained(base, path)`` then computes what perk_fast computes with
        this memory. ``perk_memory.json`` beside them keeps the number of documents and the base
        model's fingerprint for :meth:`from_peft`. ``base_model_name_or_path`` defaults to the
        PerkModel's base model path when ``perk_model`` is given.
        """
        if not self.lora:
            raise ValueError("this memory records no LoRA settings (saved by an older perk_fast): load it with "
                             "Memory.load(path, perk_model) and encode again, or re-save it from a PerkModel")
        if perk_model is not None:
            self.check_compatible(perk_model)
            if base_model_name_or_path is None:
                base_model_name_or_path = getattr(perk_model.hf_model.config, "_name_or_path", None) or None
        one = self.select(index)
        layouts = self.lora["layouts"]
        if len(set(layouts)) > 1:
            raise ValueError(f"memory mixes weight layouts {sorted(set(layouts))}: PEFT's fan_in_fan_out is one flag "
                             "per adapter")
        leaves = [name.rsplit(".", 1)[-1] for name in self.sites]
        # leaf names when every module with that leaf name is adapted (the usual case), else full names
        full_names = self.lora.get("all_layers") is False
        targets = sorted(set(self.sites)) if full_names else sorted(set(leaves))
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": self.lora["rank"], "lora_alpha": self.lora["alpha"], "use_rslora": self.lora["rslora"],
            "target_modules": targets, "fan_in_fan_out": layouts[0] == "conv1d", "lora_dropout": 0.0,
            "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        }
        tensors = {}
        for name, a, b in zip(self.sites, one.tensors[0::2], one.tensors[1::2]):
            tensors[f"base_model.model.{name}.lora_A.weight"] = a[0]
            tensors[f"base_model.model.{name}.lora_B.weight"] = b[0]
        os.makedirs(path, exist_ok=True)
        save_tensors(path, _PEFT_WEIGHTS, tensors)
        with open(os.path.join(path, _PEFT_CONFIG), "w") as fh:
            json.dump(config, fh, indent=2)
        write_header(path, _PEFT_SIDECAR, {"format": "perk_fast.PeftMemory", "version": _FORMAT_VERSION,
                                           "n_docs": one.n_docs[0], "base_model": self.fingerprint,
                                           "sites": self.sites, "lora": self.lora, "info": self.info})

    @classmethod
    def from_peft(cls, path: str | os.PathLike, perk_model: Any, *, n_docs: int | None = None) -> "Memory":
        """Read a PEFT LoRA adapter directory (e.g. written by :meth:`to_peft`) as a one-context Memory
        for ``perk_model``; its rank, alpha, rsLoRA and target projections must match.

        ``n_docs`` (documents of the encoded context, used in the question prompt) defaults to the one
        recorded by :meth:`to_peft`; an adapter from elsewhere needs it.
        """
        config_path = os.path.join(path, _PEFT_CONFIG)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{config_path} not found: not a PEFT adapter directory")
        with open(config_path) as fh:
            config = json.load(fh)
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
        cfg = perk_model.config
        want = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.lora_rslora}
        got = {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
               "use_rslora": bool(config.get("use_rslora", False))}
        if got != want:
            raise ValueError(f"{config_path}: adapter settings {got} do not match this PerkModel's {want}")
        sidecar = os.path.join(path, _PEFT_SIDECAR)
        header = None
        if os.path.exists(sidecar):
            header = read_header(path, _PEFT_SIDECAR, "perk_fast.PeftMemory")
        if n_docs is None:
            if header is None:
                raise ValueError(f"{path}: no {_PEFT_SIDECAR}; pass n_docs (the encoded context's number of documents)")
            n_docs = int(header["n_docs"])
        raw = load_tensors(path, _PEFT_WEIGHTS)
        tensors = []
        for site in perk_model.sites:
            for part in ("A", "B"):
                key = f"base_model.model.{site.name}.lora_{part}.weight"
                if key not in raw:
                    raise ValueError(f"{path}: {key} missing: the adapter does not cover projection {site.name}")
                tensors.append(raw[key].to(perk_model.device, perk_model.meta_dtype).unsqueeze(0))
        extra = sorted(set(raw) - {f"base_model.model.{s.name}.lora_{p}.weight" for s in perk_model.sites
                                   for p in "AB"})
        if extra:
            raise ValueError(f"{path}: adapter weights {extra[:3]} are for projections this PerkModel does not adapt")
        fingerprint = header["base_model"] if header else perk_model.fingerprint()
        memory = cls(tensors, [n_docs], fingerprint, [s.name for s in perk_model.sites],
                     dict(header["info"]) if header else {"source": os.fspath(path)}, perk_model.lora_settings())
        memory.check_compatible(perk_model)
        return memory
