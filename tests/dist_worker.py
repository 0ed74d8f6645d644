"""Scenarios of the distributed tests, run the same way by 1 process (the test) and by N ranks.

``run_scenario(name, ...)`` builds the same tiny fp64 model and data on every rank and calls
``perk_fast.meta_train``; ``worker`` is the entry point of a spawned rank (it sets the environment
torchrun would set, so meta_train initialises the process group itself) and, when started as a
script (``torchrun ... tests/dist_worker.py OUT``), runs the torchrun smoke scenario.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from perk_fast import PerkConfig, PerkModel, meta_train  # noqa: E402
from perk_fast import train as train_module  # noqa: E402
from perk_fast.distributed import teardown  # noqa: E402
from perk_fast.seeds import call_seed  # noqa: E402

from tiny_models import TOKENIZER, perturb_lora_b, tiny_gpt2  # noqa: E402

STEPS = 3


def dataset(n: int = 12) -> list[dict]:
    names = ["ann", "bob", "cid", "dan", "eve", "fay", "gus", "hal"]
    out = []
    for i in range(n):
        name, value = names[i % len(names)], 10 + (7 * i) % 89
        out.append({"context": [f"{name} has {value}.", "filler text here.", f"box {i} is red."],
                    "question": f"{name}?", "answer": str(value)})
    return out


def build(meta_grad: str = "checkpointed", **overrides) -> PerkModel:
    cfg = dict(inner_steps=2, inner_lr=1e-2, segment_len=24, segments_per_step=2, lora_rank=4, lora_alpha=8.0,
               unroll="full", lm_head_loss="full", lora_dropout=0.2, meta_grad=meta_grad, outer_lr=3e-3,
               warmup_proportion=0.0, seed=5, inner_eps=1e-6, outer_eps=1e-4)
    cfg.update(overrides)
    pm = PerkModel(tiny_gpt2(dtype=torch.float64), TOKENIZER, PerkConfig(**cfg))
    perturb_lora_b(pm)
    return pm


SCENARIOS = {
    **{f"{mg}-B{b}": dict(meta_grad=mg, batch_size=b) for mg in ("checkpointed", "recomputed", "unrolled")
       for b in (4, 3, 1)},
    "base-checkpointed": dict(meta_grad="checkpointed", batch_size=3, base=True),
    "base-recomputed": dict(meta_grad="recomputed", batch_size=3, base=True),
    "accumulate": dict(meta_grad="checkpointed", batch_size=2, accumulate=2),
    # the gradient-spike guard: step 2's loss (so its meta-gradient) scaled by SPIKE on every rank; the
    # guard, judging the summed gradient, skips it on both ranks as on 1 process
    "spike-guard": dict(meta_grad="checkpointed", batch_size=3, spike_at=2,
                        config=dict(grad_spike_factor=10.0, grad_spike_window=1)),
}
SPIKE = 1e6


def run_scenario(name: str, out_dir: str | None = None, *, resume: bool = False, fail_at: int | None = None,
                 fail_rank: int | None = None) -> dict:
    """Run scenario ``name``; returns the final trainable parameters, the history and what was written."""
    spec = SCENARIOS[name]
    pm = build(spec["meta_grad"], **spec.get("config", {}))
    groups = [{"params": "meta"}] + ([{"params": "base", "lr": 1e-3}] if spec.get("base") else [])
    calls = {"save": 0, "eval": 0}
    original = train_module._save_checkpoint

    def counting_save(*args, **kwargs):
        calls["save"] += 1
        return original(*args, **kwargs)

    def eval_fn(model, step):
        calls["eval"] += 1
        if fail_at is not None and step == fail_at and fail_rank == 0:
            raise RuntimeError(f"planned failure at step {step}")
        return {"step": step}

    rank = int(os.environ.get("RANK", "0"))
    original_meta_loss = pm.meta_loss

    def failing_meta_loss(*args, **kwargs):
        if fail_at is not None and fail_rank == rank and kwargs["seed"] == call_seed(pm.config.seed, fail_at - 1):
            raise RuntimeError(f"planned failure on rank {rank} at step {fail_at}")
        loss = original_meta_loss(*args, **kwargs)
        if spec.get("spike_at") and kwargs["seed"] == call_seed(pm.config.seed, spec["spike_at"] - 1):
            loss = loss * SPIKE
        return loss

    pm.meta_loss = failing_meta_loss
    named = dict(pm.named_parameters())
    first_grads = {}

    def on_step(record):  # the summed (and clipped) meta-gradient of the first step
        if record["step"] == 1:
            first_grads.update({n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None})
    train_module._save_checkpoint = counting_save
    try:
        history = meta_train(pm, dataset(), steps=STEPS, batch_size=spec["batch_size"],
                             gradient_accumulation_steps=spec.get("accumulate", 1), param_groups=groups,
                             eval_fn=eval_fn, eval_every=1, checkpoint_dir=out_dir,
                             checkpoint_every=1 if out_dir else None, resume=resume, progress=False,
                             on_step=on_step)
    finally:
        train_module._save_checkpoint = original
    params = {n: p.detach().clone() for n, p in pm.named_parameters()
              if n in dict(pm.named_meta_parameters()) or spec.get("base")}
    return {"params": params, "history": history, "calls": calls, "grads": first_grads}


def worker(rank: int, world: int, port: int, out: str, jobs: list[dict]) -> None:
    """One spawned rank: the environment torchrun would give it, then every job in order."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PERK_FAST_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    results = {}
    for job in jobs:
        start = time.perf_counter()
        try:
            res = run_scenario(job["scenario"], job.get("dir"), resume=job.get("resume", False),
                               fail_at=job.get("fail_at"), fail_rank=job.get("fail_rank"))
            results[job["id"]] = dict(res, error=None, seconds=time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - recorded for the test to check
            results[job["id"]] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(),
                                  "seconds": time.perf_counter() - start}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    import torch.distributed as dist

    if dist.is_initialized():  # every rank leaves together; the group is torn down here, not at exit
        dist.barrier()
    teardown()


def _torchrun_main(out: str) -> None:
    """Under torchrun: one scenario, meta_train initialising the process group from the environment."""
    torch.set_num_threads(1)
    res = run_scenario("checkpointed-B3")
    rank = int(os.environ["RANK"])
    import torch.distributed as dist

    with open(os.path.join(out, f"torchrun_rank{rank}.json"), "w") as fh:
        json.dump({"world": dist.get_world_size(), "losses": [h["loss"] for h in res["history"]],
                   "params": {n: p.flatten()[:5].tolist() for n, p in res["params"].items()}}, fh)


if __name__ == "__main__":
    _torchrun_main(sys.argv[1])
