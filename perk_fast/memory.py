"""Memory: the per-context LoRA adapters produced by :func:`perk_fast.encode`.

A Memory is plain data -- adapter tensors, the number of documents of each context, the
fingerprint of the base model it belongs to and the names of the projections it adapts -- so it
can be saved, concatenated, sliced and moved without the model that wrote it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .io import check_fingerprint, load_tensors, read_header, save_tensors, write_header

_FORMAT_VERSION = 1


@dataclass
class Memory:
    """Adapters of C encoded contexts.

    ``tensors`` is ``[A_0, B_0, A_1, B_1, ...]`` in the PerkModel's site order, with
    A_i (C, r, in) and B_i (C, out, r); ``n_docs[c]`` is the number of documents of
    context c (it appears in the question prompt). ``fingerprint`` names the base
    model the memory belongs to; ``sites`` the projections it adapts.
    """

    tensors: list[torch.Tensor]
    n_docs: list[int]
    fingerprint: dict[str, Any]
    sites: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.n_docs)

    def select(self, index: int | list[int]) -> "Memory":
        """The memory of context(s) ``index`` (an int or a list of ints)."""
        idx = [index] if isinstance(index, int) else list(index)
        for i in idx:
            if not -len(self) <= i < len(self):
                raise IndexError(f"context index {i} out of range for a memory of {len(self)} contexts")
        sel = torch.tensor(idx, dtype=torch.long)
        return Memory([t.index_select(0, sel.to(t.device)) for t in self.tensors], [self.n_docs[i] for i in idx],
                      self.fingerprint, self.sites, dict(self.info))

    def expand(self, n: int) -> "Memory":
        """One context's memory repeated for ``n`` questions (no copy)."""
        if len(self) != 1:
            raise ValueError(f"only a single-context memory can be broadcast, this one has {len(self)}")
        return Memory([t.expand(n, *t.shape[1:]) for t in self.tensors], self.n_docs * n, self.fingerprint,
                      self.sites, dict(self.info))

    @staticmethod
    def cat(memories: list["Memory"]) -> "Memory":
        """Concatenate memories of the same base model along the context dimension."""
        if not memories:
            raise ValueError("Memory.cat needs at least one memory")
        first = memories[0]
        for m in memories[1:]:
            if m.fingerprint != first.fingerprint or m.sites != first.sites:
                raise ValueError("Memory.cat: memories belong to different base models or LoRA sites")
        tensors = [torch.cat(ts, 0) for ts in zip(*(m.tensors for m in memories))]
        return Memory(tensors, [n for m in memories for n in m.n_docs], first.fingerprint, first.sites,
                      dict(first.info))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``memory.safetensors`` and ``memory.json`` into directory ``path``."""
        save_tensors(path, "memory.safetensors", {f"t{i}": t for i, t in enumerate(self.tensors)})
        write_header(path, "memory.json", {"format": "perk_fast.Memory", "version": _FORMAT_VERSION,
                                           "n_docs": self.n_docs, "base_model": self.fingerprint,
                                           "sites": self.sites, "info": self.info})

    @classmethod
    def load(cls, path: str | os.PathLike, perk_model: Any = None) -> "Memory":
        """Read a memory saved with :meth:`save`; with ``perk_model``, check it belongs to it."""
        header = read_header(path, "memory.json", "perk_fast.Memory")
        raw = load_tensors(path, "memory.safetensors")
        tensors = [raw[f"t{i}"] for i in range(len(raw))]
        memory = cls(tensors, list(header["n_docs"]), header["base_model"], list(header["sites"]), header.get("info", {}))
        if perk_model is not None:
            memory.check_compatible(perk_model)
            memory.tensors = [t.to(perk_model.device) for t in memory.tensors]
        return memory

    def check_compatible(self, perk_model: Any) -> None:
        """Raise ValueError unless this memory was made for ``perk_model``'s base and sites."""
        check_fingerprint(self.fingerprint, perk_model.hf_model, "memory")
        sites = [s.name for s in perk_model.sites]
        if sites != self.sites:
            raise ValueError(f"memory adapts projections {self.sites[:3]}... but this PerkModel has {sites[:3]}...")
