"""Data-parallel meta-training over processes with torch.distributed (launched by ``torchrun``).

Every rank holds the whole model (the frozen base is replicated) and computes the same schedule;
each global batch of contexts is split into contiguous slices, one per rank. After the local
backward, the meta-gradients are summed across ranks in one flat buffer per dtype and device
(each rank's loss is already weighted by its share of the batch), so every rank then clips and
steps on exactly the single-process gradient and the parameters stay identical everywhere.

Failure: every step ends with a tiny status all-reduce; a rank that raised joins it with a
"failed" flag before re-raising, so the other ranks raise too instead of waiting in a collective.
A process-group timeout (``PERK_FAST_DIST_TIMEOUT`` seconds, default 600) catches ranks that die
without reaching it.

Nothing here runs without an initialised process group: with one process every function is a
no-op (world size 1), so single-process code pays nothing.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "DistContext", "setup", "context", "slice_bounds", "all_reduce_gradients", "all_reduce_sum", "any_rank_failed",
    "broadcast_object", "RankFailed", "teardown",
]

DEFAULT_TIMEOUT_S = 600


class RankFailed(RuntimeError):
    """Raised on every rank when another rank failed during the same step."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def timeout() -> datetime.timedelta:
    """The process-group timeout: ``PERK_FAST_DIST_TIMEOUT`` seconds (default 600)."""
    seconds = _env_int("PERK_FAST_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    if seconds < 1:
        raise ValueError(f"PERK_FAST_DIST_TIMEOUT={seconds} is invalid: allowed an integer >= 1 (seconds)")
    return datetime.timedelta(seconds=seconds)


def context() -> DistContext:
    """The current process group's view (world size 1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return DistContext()


def setup(backend: str | None = None) -> DistContext:
    """Initialise the process group from torchrun's environment when it is not initialised yet.

    Does nothing (world size 1) unless ``WORLD_SIZE`` > 1 is set. The backend is NCCL when CUDA
    is available, gloo otherwise; on CUDA the current device becomes ``cuda:LOCAL_RANK``. A group
    initialised here is destroyed when the process exits (one initialised by the caller is theirs).
    """
    if dist.is_available() and dist.is_initialized():
        ctx = context()
    else:
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return DistContext()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun "
                                   "(e.g. torchrun --nproc_per_node 2 script.py)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        _import_group_default_modules()
        dist.init_process_group(backend=backend, timeout=timeout())
        # the group this module made is destroyed at exit: left to the interpreter's teardown, gloo's
        # threads were seen to abort a rank ("terminate called without an active exception", SIGABRT)
        atexit.register(teardown)
        ctx = context()
    if torch.cuda.is_available() and ctx.active:
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def _import_group_default_modules() -> None:
    """Import, before the group exists, the torch modules that bind ``group.WORLD`` as a default.

    ``torch.distributed.nn.functional`` evaluates ``group=group.WORLD`` when it is imported; loading
    a model imports it (through ``torch.distributed._shard``) after the group is made, and its ten
    functions then hold the group for the life of the process. ``destroy_process_group`` cannot
    free it, gloo's worker threads outlive the interpreter, and a rank aborted at exit ("terminate
    called without an active exception") in about one run in ten. Imported first, the defaults
    are ``None`` and :func:`teardown` frees the group.
    """
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # a torch build without it has nothing to bind
        pass


def teardown() -> None:
    """Destroy the current process group, if one is initialised (nothing otherwise). A spawned or
    torchrun worker calls it before it exits: left to the interpreter's teardown, gloo's threads
    were seen to abort a rank. :func:`setup` registers it at exit for a group it made."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where small collective buffers live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def slice_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of ``n`` items for ``rank``: the first ``n % world_size``
    ranks get one more item; a rank may get none."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_gradients(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Sum ``p.grad`` over ranks in place, one flat buffer per (device, dtype).

    A parameter without a gradient on a rank counts as zero there; one without a gradient on
    every rank keeps ``grad = None`` (as a single process would leave it, so AdamW skips it).
    """
    if not ctx.active:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_device())
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    present = has.tolist()
    index = {id(p): i for i, p in enumerate(params)}
    for ps in groups.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        dist.all_reduce(flat)
        offset = 0
        for p in ps:
            n = p.numel()
            if present[index[id(p)]]:
                p.grad = flat[offset:offset + n].view_as(p).clone()
            else:
                p.grad = None
            offset += n


def all_reduce_sum(values: Iterable[float | torch.Tensor], ctx: DistContext) -> list[float]:
    """Sum a few scalars over ranks (fp64), returned as floats."""
    values = [float(v) for v in values]
    if not ctx.active:
        return values
    buf = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(buf)
    return buf.tolist()


def any_rank_failed(failed: bool, ctx: DistContext) -> bool:
    """The step's status exchange: True when this or any other rank failed."""
    if not ctx.active:
        return failed
    flag = torch.tensor([1 if failed else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
