"""A torchrun worker for the exit test: the group made by perk_fast.distributed.setup, a module
that binds ``group.WORLD`` imported after it (as loading a Hugging Face model does), collectives,
then teardown. Writes the names of the threads left after teardown to ``<out>/exit_rank<R>.json``.

Only perk_fast.distributed is imported before the group exists: a model class import would bring
in torch.distributed.nn.functional early and hide what the test looks for.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch
import torch.distributed as dist

from perk_fast import distributed


def _thread_names() -> list[str] | None:
    """Names of this process's threads (Linux), None where /proc does not list them."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as fh:
                names.append(fh.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def main(out: str) -> None:
    imported_early = "torch.distributed.nn.functional" in sys.modules
    ctx = distributed.setup()
    importlib.import_module("torch.distributed._shard.sharded_tensor")  # what from_pretrained imports
    total = distributed.all_reduce_sum([ctx.rank + 1], ctx)
    name = distributed.broadcast_object(f"run-{total[0]:g}", ctx)
    during = _thread_names()
    dist.barrier()
    distributed.teardown()
    with open(os.path.join(out, f"exit_rank{ctx.rank}.json"), "w") as fh:
        json.dump({"imported_early": imported_early, "name": name, "during": during, "after": _thread_names(),
                   "initialized": dist.is_initialized(), "torch": torch.__version__}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
