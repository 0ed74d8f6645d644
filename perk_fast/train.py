"""Meta-training: the outer loop of PERK.

Outer AdamW over parameter groups (by default every meta-parameter of the PerkModel at
``config.outer_lr``), linear warmup then cosine decay (:mod:`perk_fast.schedule`) and
gradient-norm clipping. Each step draws a batch of examples, writes each context into its own
adapter (the inner loop), scores the questions from those memories and backpropagates the
meta-gradient (``config.meta_grad`` strategy).

Checkpoints (safetensors + JSON) hold the meta-parameters, any trained base weights, the
optimiser state and the history. The data order and every per-step seed are pure functions of
``config.seed`` and the step (:mod:`perk_fast.seeds`), so a resumed run continues exactly as an
uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Callable, Mapping, Sequence

import torch

from . import distributed
from .config import PerkConfig, check_int
from .data import example_field
from .io import check_fingerprint, load_tensors, read_header, replace_dir, save_tensors
from .model import PerkModel
from .schedule import warmup_cosine, warmup_steps
from .seeds import call_seed, epoch_order

__all__ = ["meta_train", "GROUP_SELECTORS", "SpikeGuard"]

# names meta_train accepts for the "params" of a parameter group
GROUP_SELECTORS = ("meta", "lora", "inner_lrs", "weighting", "base")


def _select_one(perk_model: PerkModel, selector: str, index: int) -> list[torch.nn.Parameter]:
    if selector == "meta":
        return list(perk_model.meta_parameters())
    if selector == "lora":
        return list(perk_model.lora_A) + list(perk_model.lora_B)
    if selector == "inner_lrs":
        if not isinstance(perk_model.inner_lrs, torch.nn.Parameter):
            raise ValueError(f"param_groups[{index}]: 'inner_lrs' are not learned (PerkConfig.learn_inner_lr=False)")
        return [perk_model.inner_lrs]
    if selector == "weighting":
        if perk_model.weighting is None:
            raise ValueError(f"param_groups[{index}]: no weighting model (PerkConfig.weighted_loss=False)")
        return list(perk_model.weighting.parameters())
    if selector == "base":
        return list(perk_model.hf_model.parameters())
    raise ValueError(f"param_groups[{index}]['params'] names {selector!r}: allowed "
                     f"{', '.join(map(repr, GROUP_SELECTORS))} or parameters of the PerkModel")


def _select(perk_model: PerkModel, selector: Any, index: int) -> list[torch.nn.Parameter]:
    """The parameters a group's ``params`` names: a selector name, a parameter, or a list of them."""
    items = [selector] if isinstance(selector, (str, torch.Tensor)) else list(selector)
    own = {id(p) for p in perk_model.parameters()}
    params = []
    for item in items:
        if isinstance(item, str):
            params += _select_one(perk_model, item, index)
        elif isinstance(item, torch.nn.Parameter) and id(item) in own:
            params.append(item)
        else:
            raise ValueError(f"param_groups[{index}]['params'] holds {type(item).__name__} that is neither a "
                             f"selector ({', '.join(GROUP_SELECTORS)}) nor a parameter of this PerkModel")
    return params


def _build_groups(perk_model: PerkModel, param_groups: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """AdamW parameter groups with their peak learning rates (``initial_lr``)."""
    config = perk_model.config
    if param_groups is None:
        param_groups = [{"params": "meta"}]
    if isinstance(param_groups, Mapping) or not isinstance(param_groups, Sequence) or not param_groups:
        raise ValueError("param_groups must be a non-empty list of dicts, each with 'params'")
    groups, seen = [], set()
    for i, spec in enumerate(param_groups):
        if not isinstance(spec, Mapping) or "params" not in spec:
            raise ValueError(f"param_groups[{i}]={spec!r} is invalid: allowed a dict with 'params' and AdamW options")
        unknown = sorted(set(spec) - {"params", "lr", "weight_decay", "betas", "eps"})
        if unknown:
            raise ValueError(f"param_groups[{i}] has unknown keys {unknown}; allowed: params, lr, weight_decay, "
                             "betas, eps")
        params = _select(perk_model, spec["params"], i)
        for p in params:
            if id(p) in seen:
                raise ValueError(f"param_groups[{i}]: a parameter appears in two groups")
            seen.add(id(p))
        decay = spec.get("weight_decay", config.outer_weight_decay)
        parts = [(params, decay)]
        if config.outer_decay_exempt and decay:
            exempt = _decay_exempt(perk_model)
            parts = [([p for p in params if id(p) not in exempt], decay), ([p for p in params if id(p) in exempt], 0.0)]
        for part, part_decay in parts:
            if not part:
                continue
            group = {"params": part, "lr": spec.get("lr", config.outer_lr), "weight_decay": part_decay}
            for key in ("betas", "eps"):
                if key in spec:
                    group[key] = spec[key]
            group["initial_lr"] = group["lr"]
            groups.append(group)
    return groups


def _decay_exempt(perk_model: PerkModel) -> set[int]:
    """Parameters the outer AdamW does not decay (``PerkConfig.outer_decay_exempt``): biases, the
    weights of normalisation layers, and the learned learning rates -- as the reference intends."""
    exempt = {id(perk_model.inner_lrs)}
    for module in perk_model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or name.endswith("bias"):
                exempt.add(id(p))
    return exempt


def _names(perk_model: PerkModel) -> dict[int, str]:
    return {id(p): n for n, p in perk_model.named_parameters()}


def _save_checkpoint(path: str, perk_model: PerkModel, optimizer, step: int, history: list) -> None:
    tmp = path + ".tmp"
    perk_model.save(tmp)
    names = _names(perk_model)
    meta_ids = {id(p) for p in perk_model.meta_parameters()}
    base = {}
    tensors, meta = {}, {"step": step, "history": history, "param_groups": [], "state_steps": {}}
    for group in optimizer.param_groups:
        meta["param_groups"].append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            name = names[id(p)]
            if id(p) not in meta_ids:
                base[name] = p  # trained base weights: PerkModel.save does not hold them
            state = optimizer.state.get(p)
            if not state:
                continue
            tensors[f"{name}::exp_avg"] = state["exp_avg"]
            tensors[f"{name}::exp_avg_sq"] = state["exp_avg_sq"]
            meta["state_steps"][name] = float(state["step"])
    save_tensors(tmp, "optimizer.safetensors", tensors)
    if base:
        save_tensors(tmp, "trained_base.safetensors", base)
    with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    replace_dir(tmp, path)


def _load_checkpoint(path: str, perk_model: PerkModel, optimizer) -> tuple[int, list]:
    header = read_header(path, "perk_model.json", "perk_fast.PerkModel")
    # compared as configs, not dicts: a checkpoint written before a field existed holds its default
    if PerkConfig.from_dict(header["config"]) != perk_model.config:
        raise ValueError(f"checkpoint {path} was written with a different PerkConfig: {header['config']}")
    params = dict(perk_model.named_parameters())
    base_file = os.path.join(path, "trained_base.safetensors")
    if os.path.exists(base_file):  # the base was trained: its fingerprint changed with it
        with torch.no_grad():
            for name, value in load_tensors(path, "trained_base.safetensors").items():
                if name not in params or params[name].shape != value.shape:
                    raise ValueError(f"checkpoint {path}: trained base weight {name} does not fit this model")
                params[name].copy_(value)
    check_fingerprint(header["base_model"], perk_model.hf_model, f"checkpoint {path}", perk_model.site_weights())
    perk_model.load_meta_state(
        {k: v.to(perk_model.device) for k, v in load_tensors(path, "meta_parameters.safetensors").items()}
    )
    with open(os.path.join(path, "trainer_state.json")) as fh:
        meta = json.load(fh)
    tensors = load_tensors(path, "optimizer.safetensors")
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint {path} has {len(meta['param_groups'])} parameter groups, this run "
                         f"{len(optimizer.param_groups)}")
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


class SpikeGuard:
    """The gradient-spike guard of ``config.grad_spike_factor`` (see :class:`~perk_fast.PerkConfig`).

    A step is a spike when its pre-clip meta-gradient norm is not finite, or exceeds ``factor``
    times the median norm of the last ``window`` applied steps (judged once ``window`` steps have
    been applied). Its state is read back from a run's history, so a resumed run decides exactly
    as an uninterrupted one; every rank sees the same summed gradient and so decides the same.
    """

    def __init__(self, factor: float, window: int, max_skips: int, history: Sequence[Mapping[str, Any]] = ()):
        self.factor, self.window, self.max_skips = float(factor), int(window), int(max_skips)
        applied = [h["grad_norm"] for h in history if not h.get("skipped")]
        self.norms = applied[-self.window:]
        self.in_a_row = 0
        for h in reversed(history):
            if not h.get("skipped"):
                break
            self.in_a_row += 1
        self.total = sum(1 for h in history if h.get("skipped"))

    def limit(self) -> float | None:
        """The norm above which the next step is skipped (None: fewer than ``window`` steps applied yet)."""
        if len(self.norms) < self.window:
            return None
        return self.factor * statistics.median(self.norms)

    def judge(self, step: int, grad_norm: float) -> bool:
        """Whether step ``step`` (1-based) with this pre-clip norm is skipped; records the decision.
        RuntimeError when it would be the ``max_skips``-th skip in a row."""
        limit = self.limit()
        skip = not math.isfinite(grad_norm) or (limit is not None and grad_norm > limit)
        if not skip:
            self.norms = (self.norms + [grad_norm])[-self.window:]
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_skips:
            raise RuntimeError(
                f"meta_train step {step}: {self.in_a_row} steps in a row skipped by the gradient-spike guard "
                f"(this one's norm before clipping {grad_norm:.4g}, limit {limit if limit is None else f'{limit:.4g}'} = "
                f"grad_spike_factor {self.factor:g} x the median of the last {self.window} applied steps); the run "
                "is diverging: lower the learning rates, or raise PerkConfig.grad_spike_factor / grad_spike_max_skips")
        return True


_announced: set[int] = set()


def _on_main(ctx: distributed.DistContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and hand its result to every rank; an exception there ends every rank.

    The broadcast always happens (with the result or with the failure), so no rank is left
    waiting in a collective when rank 0 fails.
    """
    if not ctx.active:
        return fn()
    outcome, error = None, None
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks know
            error, outcome = err, ("failed", repr(err))
    outcome = distributed.broadcast_object(outcome, ctx)
    if error is not None:
        _announced.add(id(error))  # every rank has heard of it: no further status exchange for this one
        raise error
    if outcome[0] != "ok":
        raise distributed.RankFailed(f"rank 0 failed: {outcome[1]}")
    return outcome[1]


def _check_same_everywhere(ctx: distributed.DistContext, perk_model: PerkModel, dataset_len: int, total: int,
                           params: Sequence[torch.nn.Parameter]) -> None:
    """Every rank must run the same data and configuration; rank 0's starting parameters are copied to all."""
    if not ctx.active:
        return
    mine = (dataset_len, total, perk_model.config.to_dict(), [tuple(p.shape) for p in params])
    theirs = distributed.broadcast_object(mine, ctx)
    if theirs != mine:
        raise ValueError(f"rank {ctx.rank} differs from rank 0 in (dataset size, steps, PerkConfig, parameter "
                         f"shapes): {mine[:2]} vs {theirs[:2]}; every rank must run the same meta_train call")
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def meta_train(
    perk_model: PerkModel,
    dataset: Sequence[Any],
    *,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    shuffle: bool = True,
    eval_fn: Callable[[PerkModel, int], dict] | None = None,
    eval_every: int | None = None,
    on_step: Callable[[dict], None] | None = None,
    early_stop: Callable[[dict], bool] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Meta-train ``perk_model`` on ``dataset``; returns the history (one dict per optimiser step).

    Args:
        dataset: a sequence of examples, each a dict or an object with ``context``
            (string or list of documents), ``question``, ``answer`` and optionally
            ``support``.
        steps: optimiser steps (default: ``epochs`` passes over the dataset).
        batch_size: contexts adapted together (batched) in one forward/backward.
        gradient_accumulation_steps: k such batches per optimiser step: each step takes
            ``k * batch_size`` contexts and equals one step over a batch that large (the
            meta-gradient is that batch's mean), at the memory of ``batch_size``.
        param_groups: AdamW parameter groups, each a dict with ``params`` -- a selector name or a
            list of names and parameters: ``"meta"`` (every meta-parameter), ``"lora"`` (the LoRA
            initialisation), ``"inner_lrs"``, ``"weighting"``, ``"base"`` (the base model's
            weights, trained jointly) -- and optionally ``lr`` (peak; default
            ``config.outer_lr``), ``weight_decay`` (default ``config.outer_weight_decay``),
            ``betas``, ``eps``. Every group follows the same warmup + cosine schedule relative to
            its own peak. With ``config.outer_decay_exempt`` (default) biases, norm weights and the
            learned learning rates of every group get no weight decay. Default: ``[{"params": "meta"}]``. Base weights in a group are unfrozen
            for the run and frozen again when it ends.
        shuffle: visit the dataset in a seeded random order per epoch (default); ``False`` visits
            it in order.
        eval_fn: called as ``eval_fn(perk_model, step)`` every ``eval_every`` steps and
            at the end (on rank 0 only when distributed); the dict it returns is stored in the
            history of every rank.
        on_step: called with each step's history entry once the step is done (rank 0 only).
        early_stop: called with each evaluation's dict (the same on every rank); True ends training
            after that step (the entry gets ``"stopped_early": True``).
        checkpoint_dir: where checkpoints go (``checkpoint_dir/last``), every
            ``checkpoint_every`` steps, at the end, and when training is interrupted by
            an exception (which is then re-raised). Written by rank 0 only.
        resume: continue from ``checkpoint_dir/last`` (exactly: same data order, seeds,
            optimiser state), with any number of processes.
        progress: a tqdm bar showing the outer loss and the inner loss (first -> last step),
            on rank 0.

    Several processes: run the same script under ``torchrun --nproc_per_node N``. When
    torch.distributed is initialised (by the caller, or here from torchrun's environment), every
    rank computes the same batch order and takes a contiguous slice of each batch; meta-gradients
    are summed over ranks before clipping, so N ranks give the single-process result. A
    context's randomness (doc-id shuffle, dropout masks) is keyed by its index in the optimiser
    step's batch, never by where it is computed. An exception on any rank ends every rank.

    History entries: ``step``, ``loss`` (outer, the batch mean), ``inner_loss_first``/
    ``inner_loss_last`` (inner loss at the first and last inner step, summed over the batch's
    contexts), ``lr`` (of the first group), ``grad_norm`` (before clipping), ``contexts``, and
    ``eval`` when evaluated. With the gradient-spike guard on (``config.grad_spike_factor``) also
    ``skipped`` (no optimiser update at that step) and ``spike_limit`` (the norm it was judged
    against; None while the guard's window fills). A non-finite loss raises FloatingPointError;
    so does a non-finite gradient norm unless the guard is on, which skips it.
    """
    if not isinstance(perk_model, PerkModel):
        raise TypeError(f"meta_train expects a PerkModel, got {type(perk_model).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    check_int("batch_size", batch_size)
    check_int("epochs", epochs)
    check_int("gradient_accumulation_steps", gradient_accumulation_steps)
    for name, value in (("steps", steps), ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        check_int(name, value, allow_none=True)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    ctx = distributed.setup()
    if ctx.active and perk_model.device.type == "cuda" and perk_model.device.index != ctx.local_rank:
        perk_model.to(torch.device("cuda", ctx.local_rank))
    config = perk_model.config
    per_step = batch_size * gradient_accumulation_steps
    per_epoch = math.ceil(len(dataset) / per_step)
    total = steps if steps is not None else epochs * per_epoch
    groups = _build_groups(perk_model, param_groups)
    params = [p for g in groups for p in g["params"]]
    meta_ids = {id(p) for p in perk_model.meta_parameters()}
    unfrozen = [p for p in params if id(p) not in meta_ids and not p.requires_grad]
    _check_same_everywhere(ctx, perk_model, len(dataset), total, params)
    optimizer = torch.optim.AdamW(groups, lr=config.outer_lr, betas=config.outer_betas, eps=config.outer_eps,
                                  weight_decay=config.outer_weight_decay)
    warmup = warmup_steps(total, config.warmup_proportion)
    start, history = 0, []
    guard = None
    last = os.path.join(checkpoint_dir, "last") if checkpoint_dir else None
    if resume:
        if not os.path.exists(os.path.join(last, "trainer_state.json")):
            raise FileNotFoundError(f"resume=True but no checkpoint at {last}")
        start, history = _load_checkpoint(last, perk_model, optimizer)
        if history and history[-1].get("stopped_early"):
            return history  # the run ended by early stopping: nothing left to do
    if config.grad_spike_factor is not None:
        guard = SpikeGuard(config.grad_spike_factor, config.grad_spike_window, config.grad_spike_max_skips, history)

    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="meta_train", unit="step")
    for p in unfrozen:
        p.requires_grad_(True)
    perk_model.train(True)
    status_known = False  # a rank that raised RankFailed already knows every rank knows
    try:
        for step in range(start, total):
            epoch, pos = divmod(step, per_epoch)
            order = epoch_order(len(dataset), config.seed, epoch) if shuffle else range(len(dataset))
            batch = [dataset[i] for i in order[pos * per_step : (pos + 1) * per_step]]
            seed = call_seed(config.seed, step)
            factor = warmup_cosine(step, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            optimizer.zero_grad(set_to_none=True)
            local_failure = None
            try:
                local = _local_meta_step(perk_model, batch, batch_size, seed, ctx)
            except BaseException as err:  # noqa: BLE001 - every rank must hear of it first
                local_failure = err
            status_known = True
            if distributed.any_rank_failed(local_failure is not None, ctx):
                if local_failure is not None:
                    raise local_failure
                raise distributed.RankFailed(f"meta_train step {step + 1}: another rank failed")
            status_known = False
            distributed.all_reduce_gradients(params, ctx)
            loss_value, inner_first, inner_last = distributed.all_reduce_sum(local, ctx)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            record = {
                "step": step + 1,
                "loss": loss_value,
                "inner_loss_first": inner_first,
                "inner_loss_last": inner_last,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "contexts": len(batch),
            }
            if not math.isfinite(record["loss"]) or (guard is None and not math.isfinite(record["grad_norm"])):
                raise FloatingPointError(f"meta_train step {step + 1}: non-finite loss or gradient {record}")
            if guard is not None:
                record["spike_limit"] = guard.limit()
                try:
                    record["skipped"] = guard.judge(step + 1, record["grad_norm"])
                except RuntimeError:  # the guard ends the run: the step is kept in the checkpoint written on the way out
                    record["skipped"] = True
                    history.append(record)
                    raise
            if not record.get("skipped"):
                optimizer.step()
            history.append(record)
            if eval_fn is not None and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == total):
                def run_eval(step=step):
                    perk_model.train(False)
                    try:
                        return eval_fn(perk_model, step + 1)
                    finally:
                        perk_model.train(True)

                record["eval"] = _on_main(ctx, run_eval)
                if early_stop is not None and early_stop(record["eval"]):
                    record["stopped_early"] = True
            if ctx.is_main:
                if on_step is not None:
                    on_step(record)
                if bar is not None:
                    bar.update(1)
                    postfix = {"outer": f"{record['loss']:.4f}",
                               "inner": f"{record['inner_loss_first']:.3f}->{record['inner_loss_last']:.3f}"}
                    if guard is not None:
                        postfix["skipped"] = guard.total
                    bar.set_postfix(postfix)
            if last and checkpoint_every and (step + 1) % checkpoint_every == 0:
                _on_main(ctx, lambda: _save_checkpoint(last, perk_model, optimizer, step + 1, history))
            if record.get("stopped_early"):
                break
    except BaseException as err:
        if (ctx.active and not status_known and not isinstance(err, distributed.RankFailed)
                and id(err) not in _announced):
            try:  # tell the others (they meet this in their next status exchange)
                distributed.any_rank_failed(True, ctx)
            except Exception:  # noqa: BLE001 - the original error is what matters
                pass
        if last and ctx.is_main and len(history) > start:
            _save_checkpoint(last, perk_model, optimizer, history[-1]["step"], history)
        raise
    finally:
        if bar is not None:
            bar.close()
        perk_model.train(False)
        for p in unfrozen:
            p.requires_grad_(False)
    if last:
        done = history[-1]["step"] if history else start
        _on_main(ctx, lambda: _save_checkpoint(last, perk_model, optimizer, done, history))
    return history


def _local_meta_step(perk_model: PerkModel, batch: Sequence[Any], batch_size: int, seed: int,
                     ctx: distributed.DistContext) -> tuple[float, float, float]:
    """Backpropagate this rank's share of one optimiser step's batch, ``batch_size`` contexts at a time.

    The batch is cut into micro-batches of ``batch_size``; each is split over the ranks. Every
    local loss is the slice's share of the whole batch's mean, so the gradients summed over
    micro-batches and ranks are the batch mean's. Returns this rank's (loss, first inner loss,
    last inner loss) contributions.
    """
    loss_sum, first, last = 0.0, 0.0, 0.0
    for start in range(0, len(batch), batch_size):
        micro = batch[start : start + batch_size]
        lo, hi = distributed.slice_bounds(len(micro), ctx.rank, ctx.world_size)
        if lo == hi:
            continue
        part = micro[lo:hi]
        loss = perk_model.meta_loss(
            [example_field(e, "context", i) for i, e in enumerate(part)],
            [example_field(e, "question", i) for i, e in enumerate(part)],
            [example_field(e, "answer", i) for i, e in enumerate(part)],
            _supports(part),
            seed=seed, context_ids=range(start + lo, start + hi), batch_size=len(batch),
        )
        loss.backward()
        inner = perk_model.last_inner_losses
        loss_sum += float(loss.detach())
        first += inner[0]
        last += inner[-1]
    return loss_sum, first, last


def _supports(batch: Sequence[Any]) -> list | None:
    supports = [example_field(e, "support", i, required=False) for i, e in enumerate(batch)]
    return None if all(s is None for s in supports) else supports
