"""Peak-memory measurement of one call, on CPU and CUDA.

CPU, ``method="allocator"`` (default): the CPU allocator's own allocation and free events,
recorded by ``torch.profiler`` with ``profile_memory=True``, replayed in order; the peak of the
running sum is the peak of bytes the allocator handed out. This is what the process really held.

CPU, ``method="tracker"``: ``torch.distributed._tools.mem_tracker.MemTracker``'s live tensor
bytes (device totals only: its per-module hooks raise on frozen parameters and on
``autograd.grad`` inside a forward, so they are switched off). It works on fake tensors too
(``bench/linear_ce.py`` sizes full logits that do not fit this way), but it can over-count: in
the inner loop it kept the storage of every step's superseded adapters alive in its accounting
(one adapter set per step more than the allocator events show; ``python bench/inner_loop.py
--cpu-mem tracker`` against the default reproduces the difference).

CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``.
All report bytes allocated *while the call runs*, above what was live before it.
"""
from __future__ import annotations

import contextlib
import os
import sys
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


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ writes included) for the duration; Python's stderr is flushed first."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocator_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side prints a line at start and at stop
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() != DeviceType.CPU:
            continue
        live += e.nbytes()
        peak = max(peak, live)
    return result, peak


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu", method: str = "allocator"
                ) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, peak bytes allocated during the call)``.

    ``method`` (CPU only): ``"allocator"`` (the allocator's events, default) or ``"tracker"``
    (MemTracker's live tensor bytes); see the module docstring.
    """
    if method not in ("allocator", "tracker"):
        raise ValueError(f"method={method!r} is invalid: allowed 'allocator' or 'tracker'")
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
    if method == "allocator":
        return _allocator_peak(fn)
    tracker = DeviceMemTracker()
    with tracker:
        result = fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    return result, int(snapshot.get(device, {}).get("Total", 0))
