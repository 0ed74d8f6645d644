"""Peak-memory measurement of one call, on CPU and CUDA.

CPU: ``torch.distributed._tools.mem_tracker.MemTracker`` gives a deterministic peak of
live tensor bytes. Only its device-level total is used: its per-module hooks raise
on frozen parameters and on ``autograd.grad`` inside a forward, so they are
switched off. CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``.
Both report bytes allocated *while the call runs*, above what was live before it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.distributed._tools.mem_tracker import MemTracker


class DeviceMemTracker(MemTracker):
    """MemTracker reduced to its device totals (per-module hooks switched off)."""

    def _pre_fw_hook(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _post_fw_hook(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _pre_bw_hook(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _post_bw_hook(self, *args: Any, **kwargs: Any) -> None:
        pass


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, peak bytes allocated during the call)``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak_memory supports cpu and cuda devices, got {device}")
    tracker = DeviceMemTracker()
    with tracker:
        result = fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    return result, int(snapshot.get(device, {}).get("Total", 0))
