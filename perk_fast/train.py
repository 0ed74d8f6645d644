"""Meta-training: the outer loop of PERK.

Outer AdamW over ``PerkModel.meta_parameters()`` with linear warmup then cosine
decay and gradient-norm clipping. Each step draws a batch of examples, writes each
context into its own adapter (the inner loop), scores the questions from those
memories and backpropagates the meta-gradient (``config.meta_grad`` strategy).

Checkpoints (safetensors + JSON) hold the meta-parameters, the optimiser and
scheduler state and the history. The data order and every per-step seed are pure
functions of ``config.seed`` and the step, so a resumed run continues exactly as an
uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Callable, Sequence

import torch

from .model import PerkModel


def _field(example: Any, name: str, index: int, required: bool = True):
    if isinstance(example, dict):
        value = example.get(name)
    else:
        value = getattr(example, name, None)
    if value is None and required:
        raise ValueError(f"dataset[{index}] has no {name!r}: every example needs context, question and answer")
    return value


def _schedule(total: int, warmup_proportion: float) -> Callable[[int], float]:
    warmup = math.ceil(warmup_proportion * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))

    return factor


def _order(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(idx)
    return idx


def _save_checkpoint(path: str, perk_model: PerkModel, optimizer, step: int, history: list) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    perk_model.save(tmp)
    names = {id(p): n for n, p in perk_model.named_meta_parameters()}
    tensors, meta = {}, {"step": step, "history": history, "param_groups": [], "state_steps": {}}
    for group in optimizer.param_groups:
        meta["param_groups"].append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            name = names[id(p)]
            tensors[f"{name}::exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"{name}::exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
            meta["state_steps"][name] = float(state["step"])
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    if os.path.exists(path):
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def _load_checkpoint(path: str, perk_model: PerkModel, optimizer) -> tuple[int, list]:
    from safetensors.torch import load_file

    from .model import check_fingerprint, read_header

    header = read_header(path, "perk_model.json", "perk_fast.PerkModel")
    check_fingerprint(header["base_model"], perk_model.hf_model, f"checkpoint {path}")
    if header["config"] != perk_model.config.to_dict():
        raise ValueError(f"checkpoint {path} was written with a different PerkConfig: {header['config']}")
    perk_model.load_meta_state(
        {k: v.to(perk_model.device) for k, v in load_file(os.path.join(path, "meta_parameters.safetensors")).items()}
    )
    with open(os.path.join(path, "trainer_state.json")) as fh:
        meta = json.load(fh)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    params = dict(perk_model.named_meta_parameters())
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update(saved)
    for name, step in meta["state_steps"].items():
        p = params[name]
        optimizer.state[p] = {
            "step": torch.tensor(step, dtype=torch.float32),
            "exp_avg": tensors[f"{name}::exp_avg"].to(p.device, p.dtype),
            "exp_avg_sq": tensors[f"{name}::exp_avg_sq"].to(p.device, p.dtype),
        }
    return int(meta["step"]), list(meta["history"])


def meta_train(
    perk_model: PerkModel,
    dataset: Sequence[Any],
    *,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 1,
    eval_fn: Callable[[PerkModel, int], dict] | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Meta-train ``perk_model`` on ``dataset``; returns the history (one dict per step).

    Args:
        dataset: a sequence of examples, each a dict or an object with ``context``
            (string or list of documents), ``question``, ``answer`` and optionally
            ``support``.
        steps: outer steps (default: ``epochs`` passes over the dataset).
        batch_size: contexts per outer step (adapted together, batched).
        eval_fn: called as ``eval_fn(perk_model, step)`` every ``eval_every`` steps and
            at the end; the dict it returns is stored in the history.
        checkpoint_dir: where checkpoints go (``checkpoint_dir/last``), every
            ``checkpoint_every`` steps, at the end, and when training is interrupted by
            an exception (which is then re-raised).
        resume: continue from ``checkpoint_dir/last`` (exactly: same data order, seeds,
            optimiser state).
        progress: a tqdm bar showing the outer loss and the inner loss (first -> last step).

    History entries: ``step``, ``loss`` (outer), ``inner_loss_first``/``inner_loss_last``
    (inner loss at the first and last inner step, summed over contexts), ``lr``,
    ``grad_norm``, and ``eval`` when evaluated.
    """
    if not isinstance(perk_model, PerkModel):
        raise TypeError(f"meta_train expects a PerkModel, got {type(perk_model).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= 1")
    for name, value in (("steps", steps), ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} is invalid: allowed None or an integer >= 1")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    config = perk_model.config
    per_epoch = math.ceil(len(dataset) / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    params = list(perk_model.meta_parameters())
    optimizer = torch.optim.AdamW(
        params, lr=config.outer_lr, betas=config.outer_betas, eps=config.outer_eps,
        weight_decay=config.outer_weight_decay,
    )
    factor = _schedule(total, config.warmup_proportion)
    start, history = 0, []
    last = os.path.join(checkpoint_dir, "last") if checkpoint_dir else None
    if resume:
        if not os.path.exists(os.path.join(last, "trainer_state.json")):
            raise FileNotFoundError(f"resume=True but no checkpoint at {last}")
        start, history = _load_checkpoint(last, perk_model, optimizer)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="meta_train", unit="step")
    perk_model.train(True)
    step = start
    try:
        for step in range(start, total):
            epoch, pos = divmod(step, per_epoch)
            order = _order(len(dataset), config.seed, epoch)
            batch = [dataset[i] for i in order[pos * batch_size : (pos + 1) * batch_size]]
            contexts = [_field(e, "context", i) for i, e in enumerate(batch)]
            questions = [_field(e, "question", i) for i, e in enumerate(batch)]
            answers = [_field(e, "answer", i) for i, e in enumerate(batch)]
            supports = [_field(e, "support", i, required=False) for i, e in enumerate(batch)]
            if all(s is None for s in supports):
                supports = None
            lr = config.outer_lr * factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            seed = config.seed * 1_000_003 + step
            loss = perk_model.meta_loss(contexts, questions, answers, supports, seed=seed)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            inner = perk_model.last_inner_losses
            record = {
                "step": step + 1,
                "loss": float(loss.detach()),
                "inner_loss_first": inner[0] if inner else None,
                "inner_loss_last": inner[-1] if inner else None,
                "lr": lr,
                "grad_norm": float(grad_norm),
            }
            if not math.isfinite(record["loss"]) or not math.isfinite(record["grad_norm"]):
                raise FloatingPointError(f"meta_train step {step + 1}: non-finite loss or gradient {record}")
            optimizer.step()
            history.append(record)
            if eval_fn is not None and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == total):
                perk_model.train(False)
                record["eval"] = eval_fn(perk_model, step + 1)
                perk_model.train(True)
            if bar is not None:
                bar.update(1)
                postfix = {"outer": f"{record['loss']:.4f}"}
                if inner:
                    postfix["inner"] = f"{inner[0]:.3f}->{inner[-1]:.3f}"
                bar.set_postfix(postfix)
            if last and checkpoint_every and (step + 1) % checkpoint_every == 0:
                _save_checkpoint(last, perk_model, optimizer, step + 1, history)
    except BaseException:
        if last and len(history) > start:
            _save_checkpoint(last, perk_model, optimizer, history[-1]["step"], history)
        raise
    finally:
        if bar is not None:
            bar.close()
        perk_model.train(False)
    if last:
        _save_checkpoint(last, perk_model, optimizer, total, history)
    return history
