"""The command line's recipes: what ``perk-fast train / eval / encode / export`` do with a composed config.

A thin layer over the Python API (``PerkConfig.from_reference``, ``meta_train``, ``encode``,
``PerkModel.generate``, ``Memory.to_peft``): every reference key is either honoured or ignored on
purpose with a one-line reason (:data:`RUN_KEYS`, :data:`IGNORED_KEYS`; PerkConfig keys in
``perk_fast.config.REFERENCE_KEYS``), printed once per run.

One folder per run, ``<output_dir>/<wandb_name>_<YYYYmmdd-HHMMSS>`` (the reference's naming):
``config.yaml`` (the resolved config), ``log.txt``, ``metrics.jsonl`` (one line per step and per
evaluation; TensorBoard events under ``tensorboard/`` when tensorboard is installed),
``checkpoints/last`` (resumable) and ``checkpoints/step=<n>-<monitor>=<value>`` (the best
``save_top_k`` by ``callback_monitor``, listed in ``checkpoints/best.json``), each loadable with ``PerkModel.load``; per evaluation
``outputs/outputs_<step>.jsonl`` (rows ``guid, prompt, answer, output`` as the reference writes
them, plus ``prediction, exact_match, f1``) and ``evals/eval_<step>.json`` (``accuracy`` and ``f1``
computed as the reference computes them, plus perk_fast's ``exact_match``, ``f1_token``,
``val_loss``, ``n``). The test split of an evaluation run goes to ``test_outputs_<step>.jsonl`` /
``test_eval_<step>.json``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import distributed
from .config import REFERENCE_KEYS, REFERENCE_RUN_KEYS, PerkConfig
from .data import query_prompt, query_target
from .encode import encode
from .evaluate import cut_answer
from .memory import Memory
from .metrics import exact_match, f1_score
from .model import PerkModel
from .readers import RECORD_QUERIES, read_examples, read_reference_split
from .train import meta_train

__all__ = ["ConfigError", "RunConfig", "RUN_KEYS", "IGNORED_KEYS", "EXTRA_KEYS", "parse_config", "train_run",
           "eval_run", "encode_run", "export_run", "key_table"]

LOG = logging.getLogger("perk_fast")


class ConfigError(ValueError):
    """A bad configuration value: the command line prints it without a traceback."""


# reference keys the runs honour -> how
RUN_KEYS = {
    "model_name_or_path": "the base model: a local directory (save_pretrained) or a hub id where there is a network",
    "data_dir": "data root: <data_dir>/<dataset_name>/<dataset_subset>/{train,validation,test}.jsonl",
    "dataset_name": "babilong, student_records or longgorilla (the reader)",
    "dataset_subset": "the subset folder ('none': no subset level); also the guid prefix",
    "student_record_query": "student_records: recall, relation, count, aggregate or sort (the <query>.jsonl joined)",
    "output_dir": "runs go to <output_dir>/<wandb_name>_<timestamp>/",
    "checkpoint": "a perk_fast checkpoint directory (or a reference .ckpt) to load / resume / evaluate",
    "load_checkpoint": "train from the meta-parameters of `checkpoint` (step 0)",
    "resume_from_checkpoint": "continue the run of `checkpoint` (its checkpoints/last) exactly",
    "do_train": "meta-train (train subcommand)",
    "do_eval": "evaluate on the validation split every val_check_interval and at the end of training (the eval "
               "subcommand scores validation and test)",
    "peft_lora": "true: LoRA memory on a frozen base; false: the base weights are meta-trained jointly (full-parameter"
                 " meta-learning; the memory stays a LoRA adapter)",
    "bf16": "true: the base in bf16; adapters, optimiser states and meta-parameters stay fp32",
    "attn_implementation": "eager / sdpa as given; flash_attention_2 loads as sdpa (fused attention where no second"
                           " order is needed, the twice-differentiable math path where it is)",
    "train_batch_size": "contexts per meta-step, adapted together (batched; the reference keeps only one)",
    "eval_batch_size": "contexts encoded and answered together",
    "num_train_epochs": "passes over the training split",
    "gradient_accumulation_steps": "meta-steps of train_batch_size per optimiser step",
    "patience": "early stopping: validation checks without improvement of callback_monitor",
    "callback_monitor": "val_loss (lower is better), val_accuracy or val_f1 (higher): early stopping and best checkpoints",
    "val_check_interval": "a fraction of an epoch (0.5: twice per epoch) or a number of optimiser steps",
    "max_eval_data": "at most this many evaluation rows, sampled with the run's seed (0: all)",
    "seed": "data order, doc-id shuffles, dropout masks, evaluation sampling, LoRA initialisation",
    "n_gpu": "processes: above 1, runs under torchrun (started for you when not already under it)",
    "wandb_name": "the run's name (folder and W&B)",
    "wandb_project": "W&B logging when wandb is installed and configured (else one line says it is off)",
    "wandb_entity": "the W&B entity",
}

# reference keys ignored on purpose -> why
IGNORED_KEYS = {
    "device_idx": "never read by the reference; choose GPUs with CUDA_VISIBLE_DEVICES",
    "wandb_api_key": "a key in a config file would be logged with it; use WANDB_API_KEY or `wandb login`",
    "use_liger_kernel": "perk_fast's own twice-differentiable kernels are always used",
    "num_workers": "tokenisation runs in the training process; no data-loader workers",
    "weight_fuse": "never read by the reference",
    "weight_q_pool": "never read by the reference",
    "random_facts": "read only by dead code in the reference",
    "multi_task": "read only by dead code in the reference",
    "model_type": "the reference's workaround key; perk_fast reads the model's own config",
}

# perk_fast's own keys (add them with +key=value)
EXTRA_KEYS = {
    "max_new_tokens": "generation budget of evaluation answers (default 512, the reference's)",
    "save_top_k": "best checkpoints kept by callback_monitor (default 10, the reference's)",
    "max_steps": "stop meta-training after this many optimiser steps",
    "perk": "a dict of PerkConfig fields that override the mapping, e.g. +perk.meta_grad=recomputed",
    "contexts": "encode: a JSON / JSONL file of rows with `context` (and `question` to answer)",
    "memory_out": "encode: where the Memory is saved (default <run>/memory)",
    "answer": "encode: also answer each row's question from its memory",
    "memory": "export: a saved Memory directory",
    "index": "export: which context of the memory (default 0)",
    "out": "export: the PEFT adapter directory to write",
    "init": "export: true exports the meta-learned initialisation of `checkpoint` instead of a memory",
}


def key_table() -> str:
    """Every key the configuration accepts and what becomes of it (``--help``)."""
    lines = ["PerkConfig keys (the inner and outer loops; see PerkConfig.from_reference):"]
    lines += [f"  {k}" for k in sorted(REFERENCE_KEYS)]
    lines.append("run keys (honoured):")
    lines += [f"  {k:<28} {v}" for k, v in RUN_KEYS.items()]
    lines.append("ignored on purpose:")
    lines += [f"  {k:<28} {v}" for k, v in IGNORED_KEYS.items()]
    lines.append("perk_fast's own keys (+key=value):")
    lines += [f"  {k:<28} {v}" for k, v in EXTRA_KEYS.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ parsing
def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config key {key}={value!r} is invalid: allowed {allowed}")


def _bool(cfg, key, default):
    v = cfg.get(key, default)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise _bad(key, v, "true or false")


def _int(cfg, key, default, minimum=None):
    v = cfg.get(key, default)
    if v is None and default is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise _bad(key, v, "an integer")
    if minimum is not None and int(v) < minimum:
        raise _bad(key, v, f"an integer >= {minimum}")
    return int(v)


def _str(cfg, key, default=None, allowed=None):
    v = cfg.get(key, default)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _bad(key, v, "a string")
    if allowed is not None and v not in allowed:
        raise _bad(key, v, "one of " + ", ".join(map(repr, allowed)))
    return v


def _optional_path(value):
    return None if value in (None, "", "none", "None", "null") else str(value)


@dataclass
class RunConfig:
    """The run-level settings of a composed config (see :data:`RUN_KEYS`)."""

    model_name_or_path: str
    data_dir: str
    dataset_name: str
    dataset_subset: str | None
    output_dir: str
    student_record_query: str | None = None
    checkpoint: str | None = None
    load_checkpoint: bool = False
    resume_from_checkpoint: bool = False
    do_train: bool = True
    do_eval: bool = True
    peft_lora: bool = True
    bf16: bool = False
    attn_implementation: str = "sdpa"
    train_batch_size: int = 1
    eval_batch_size: int = 1
    num_train_epochs: int = 1
    gradient_accumulation_steps: int = 1
    patience: int | None = None
    callback_monitor: str = "val_loss"
    val_check_interval: float | int = 1.0
    max_eval_data: int = 0
    seed: int = 42
    n_gpu: int = 1
    wandb_name: str = "run"
    wandb_project: str | None = None
    wandb_entity: str | None = None
    max_new_tokens: int = 512
    save_top_k: int = 10
    max_steps: int | None = None
    learning_rate: float = 1e-5
    notes: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)

    @property
    def monitor_mode(self) -> str:
        return "min" if "loss" in self.callback_monitor else "max"


def parse_config(cfg: Mapping[str, Any]) -> tuple[RunConfig, PerkConfig]:
    """(run settings, PerkConfig) of a composed config; ConfigError names any bad key and value."""
    cfg = dict(cfg)
    notes: list[str] = []
    for key, reason in IGNORED_KEYS.items():
        if key in cfg:
            notes.append(f"{key}: ignored ({reason})")
    known = set(REFERENCE_KEYS) | REFERENCE_RUN_KEYS | set(RUN_KEYS) | set(IGNORED_KEYS) | set(EXTRA_KEYS)
    unknown = sorted(k for k in cfg if k not in known)
    for key in unknown:
        notes.append(f"WARNING: unknown config key {key!r} ignored")
    perk_overrides = cfg.get("perk") or {}
    if not isinstance(perk_overrides, Mapping):
        raise _bad("perk", perk_overrides, "a mapping of PerkConfig fields (+perk.field=value)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            perk = PerkConfig.from_reference({k: v for k, v in cfg.items() if k in REFERENCE_KEYS}, **perk_overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
    notes += [str(w.message).replace("PerkConfig.from_reference: ", "") for w in caught]
    attn = _str(cfg, "attn_implementation", "sdpa", ("eager", "sdpa", "flash_attention_2"))
    if attn == "flash_attention_2":
        notes.append("attn_implementation=flash_attention_2: loaded as sdpa -- first-order passes use fused attention "
                     "where it exists, second-order passes the twice-differentiable math path")
        attn = "sdpa"
    dataset_name = _str(cfg, "dataset_name", "babilong", ("babilong", "student_records", "longgorilla"))
    query = _str(cfg, "student_record_query", None)
    if dataset_name == "student_records" and query not in RECORD_QUERIES:
        raise _bad("student_record_query", query, ", ".join(RECORD_QUERIES) + " (+student_record_query=...)")
    monitor = _str(cfg, "callback_monitor", "val_loss", ("val_loss", "val_accuracy", "val_f1"))
    interval = cfg.get("val_check_interval", 1.0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
        raise _bad("val_check_interval", interval, "a fraction of an epoch in (0, 1] or a number of steps >= 1")
    if isinstance(interval, float) and interval > 1:
        raise _bad("val_check_interval", interval, "a fraction of an epoch in (0, 1] or an integer number of steps")
    lr = cfg.get("learning_rate", 1e-5)
    run = RunConfig(
        model_name_or_path=_str(cfg, "model_name_or_path") or "",
        data_dir=str(cfg.get("data_dir", "./data")),
        dataset_name=dataset_name,
        dataset_subset=_optional_path(cfg.get("dataset_subset")),
        output_dir=str(cfg.get("output_dir", "./runs")),
        student_record_query=query,
        checkpoint=_optional_path(cfg.get("checkpoint")),
        load_checkpoint=_bool(cfg, "load_checkpoint", False),
        resume_from_checkpoint=_bool(cfg, "resume_from_checkpoint", False),
        do_train=_bool(cfg, "do_train", True),
        do_eval=_bool(cfg, "do_eval", True),
        peft_lora=_bool(cfg, "peft_lora", True),
        bf16=_bool(cfg, "bf16", False),
        attn_implementation=attn,
        train_batch_size=_int(cfg, "train_batch_size", 1, 1),
        eval_batch_size=_int(cfg, "eval_batch_size", 1, 1),
        num_train_epochs=_int(cfg, "num_train_epochs", 1, 1),
        gradient_accumulation_steps=_int(cfg, "gradient_accumulation_steps", 1, 1),
        patience=_int(cfg, "patience", None, 1),
        callback_monitor=monitor,
        val_check_interval=interval,
        max_eval_data=_int(cfg, "max_eval_data", 0, 0),
        seed=_int(cfg, "seed", 42),
        n_gpu=_int(cfg, "n_gpu", 1, 1),
        wandb_name=str(cfg.get("wandb_name") or "run"),
        wandb_project=_str(cfg, "wandb_project", None),
        wandb_entity=_str(cfg, "wandb_entity", None),
        max_new_tokens=_int(cfg, "max_new_tokens", 512, 1),
        save_top_k=_int(cfg, "save_top_k", 10, 0),
        max_steps=_int(cfg, "max_steps", None, 1),
        learning_rate=float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else 0.0,
        notes=notes,
        extras={k: cfg[k] for k in EXTRA_KEYS if k in cfg},
    )
    if not run.model_name_or_path:
        raise _bad("model_name_or_path", cfg.get("model_name_or_path"), "a model directory or hub id")
    if not run.peft_lora:
        notes.append("peft_lora=false: the reference adapts every weight in its inner loop; perk_fast's memory is "
                     "always a LoRA adapter, and the base weights are meta-trained jointly in the outer loop")
        if perk.lm_head_loss == "chunked":
            perk = perk.replace(lm_head_loss="full")
    return run, perk


# ------------------------------------------------------------------------------------ building
def load_base(run: RunConfig, device: torch.device):
    """(hf_model, tokenizer) of ``run.model_name_or_path``; bf16 when ``run.bf16``."""
    from transformers import AutoModelForCausalLM

    path = run.model_name_or_path
    dtype = torch.bfloat16 if run.bf16 else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=run.attn_implementation)
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key model_name_or_path={path!r}: cannot load a causal LM ({err})") from None
    tokenizer = _load_tokenizer(path)
    return model.to(device).eval(), tokenizer


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    config = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config) as fh:
            if json.load(fh).get("tokenizer_class") == "ByteTokenizer":
                from .tokenizer import ByteTokenizer

                return ByteTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key model_name_or_path={path!r}: cannot load its tokenizer ({err})") from None


def build_perk_model(run: RunConfig, perk: PerkConfig, device: torch.device) -> PerkModel:
    """The PerkModel of a run: the base, the mapped PerkConfig, and the checkpoint's meta-parameters
    when ``load_checkpoint`` / evaluation asks for them."""
    hf_model, tokenizer = load_base(run, device)
    ckpt = run.checkpoint
    if ckpt and os.path.isdir(os.path.join(ckpt, "base")):  # a checkpoint of a run that trained the base
        hf_model, _ = load_base(RunConfig(**{**run.__dict__, "model_name_or_path": os.path.join(ckpt, "base")}),
                                device)
    pm = PerkModel(hf_model, tokenizer, perk)
    if run.bf16:
        pm.to(torch.bfloat16)
    return pm


def load_meta(pm: PerkModel, checkpoint: str) -> None:
    """Copy the meta-parameters of a perk_fast checkpoint directory into ``pm``."""
    from .io import load_tensors, read_header

    if not os.path.isdir(checkpoint):
        if checkpoint.endswith(".ckpt") and os.path.isfile(checkpoint):
            try:
                pm.load_reference_checkpoint(checkpoint)
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"config key checkpoint={checkpoint!r}: {err}") from None
            return
        raise ConfigError(f"config key checkpoint={checkpoint!r}: not a perk_fast checkpoint directory or a "
                          "reference .ckpt file")
    try:
        header = read_header(checkpoint, "perk_model.json", "perk_fast.PerkModel")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config key checkpoint={checkpoint!r}: {err}") from None
    if header["config"] != pm.config.to_dict():
        diff = {k: (v, pm.config.to_dict().get(k)) for k, v in header["config"].items() if pm.config.to_dict().get(k) != v}
        LOG.info("checkpoint %s was saved with other PerkConfig values (saved, now): %s", checkpoint, diff)
    pm.load_meta_state({k: v.to(pm.device) for k, v in load_tensors(checkpoint, "meta_parameters.safetensors").items()})


# ------------------------------------------------------------------------------------ data
def read_split(run: RunConfig, split: str) -> list:
    """One split in the reference's layout; errors name the file, the line and the field."""
    try:
        return read_reference_split(run.data_dir, run.dataset_name, run.dataset_subset, split,
                                    student_record_query=run.student_record_query)
    except FileNotFoundError as err:
        raise ConfigError(f"data: {err}") from None
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None


def sample_eval(rows: list, run: RunConfig, split: str) -> list:
    """At most ``max_eval_data`` rows, a seeded sample without replacement (in file order)."""
    if not run.max_eval_data or run.max_eval_data >= len(rows):
        return rows
    picked = sorted(random.Random(f"perk_fast/eval/{run.seed}/{split}").sample(range(len(rows)), run.max_eval_data))
    return [rows[i] for i in picked]


# ------------------------------------------------------------------------------------ outputs
class RunLog:
    """The run folder's log, metrics (JSONL, TensorBoard, W&B) and evaluation files; rank 0 writes."""

    def __init__(self, run_dir: str, run: RunConfig, ctx: distributed.DistContext, config: Mapping) -> None:
        self.dir, self.run, self.ctx = run_dir, run, ctx
        self.tb = self.wandb = None
        if not ctx.is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(run_dir, "log.txt"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        LOG.addHandler(handler)
        self._handler = handler
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:
            LOG.info("TensorBoard logging off: tensorboard is not installed (pip install tensorboard)")
        if run.wandb_project:
            self.wandb = _wandb(run, config)

    def metrics(self, record: Mapping[str, Any], kind: str = "train") -> None:
        """Append the record's scalars to ``metrics.jsonl`` (main process only) and to TensorBoard / W&B
        when they are on, under ``<kind>/<key>`` at the record's ``step``."""
        if not self.ctx.is_main:
            return
        row = {"kind": kind, **{k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))}}
        with open(os.path.join(self.dir, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")
        step = int(record.get("step", 0))
        numbers = {f"{kind}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, finish the W&B run and detach the log-file handler."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        handler = getattr(self, "_handler", None)
        if handler is not None:
            LOG.removeHandler(handler)
            handler.close()


def _wandb(run: RunConfig, config: Mapping):
    try:
        import wandb
    except ImportError:
        LOG.info("W&B logging off: wandb is not installed (pip install wandb)")
        return None
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled")
    if not offline and not os.environ.get("WANDB_API_KEY") and not os.path.exists(os.path.expanduser("~/.netrc")):
        LOG.info("W&B logging off: not configured (set WANDB_API_KEY, run `wandb login`, or WANDB_MODE=offline)")
        return None
    return wandb.init(project=run.wandb_project, entity=run.wandb_entity, name=run.wandb_name, config=dict(config))


def new_run_dir(run: RunConfig, ctx: distributed.DistContext) -> str:
    """``<output_dir>/<wandb_name>_<timestamp>`` (rank 0's, on every rank)."""
    name = f"{run.wandb_name}_{time.strftime('%Y%m%d-%H%M%S')}"
    path = os.path.join(run.output_dir, name)
    path = distributed.broadcast_object(path, ctx)
    return path


# ------------------------------------------------------------------------------------ evaluation
def evaluate_split(pm: PerkModel, rows: list, run: RunConfig, *, progress: bool = True) -> tuple[list[dict], dict]:
    """Encode, answer and score ``rows``; returns (per-row records, metrics).

    ``accuracy`` / ``f1``: the reference's scoring of the raw output (EM after ``<output>``
    extraction, set-overlap F1 of the whole strings); ``exact_match`` / ``f1_token``: perk_fast's
    (on the answer cut by :func:`perk_fast.evaluate.cut_answer`, SQuAD F1). ``val_loss``: the mean
    outer loss of the targets from the encoded memories.
    """
    was_training = pm.training
    pm.train(False)
    records, loss_sum = [], 0.0
    starts = range(0, len(rows), run.eval_batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch")
    try:
        for start in starts:
            batch = rows[start : start + run.eval_batch_size]
            memory = encode(pm, [ex.context for ex in batch])
            with torch.no_grad():
                query = pm.query_batch([ex.question for ex in batch], [ex.answer for ex in batch],
                                       [ex.support for ex in batch], memory.n_docs)
                loss_sum += float(pm.outer_loss([t.to(pm.device) for t in memory.tensors], query)) * len(batch)
            outputs = pm.generate(memory, [ex.question for ex in batch], max_new_tokens=run.max_new_tokens)
            for ex, n_docs, output in zip(batch, memory.n_docs, outputs):
                answer = query_target(ex.answer, ex.support)
                prediction = cut_answer(output)
                records.append({"guid": ex.meta.get("guid"), "prompt": query_prompt(ex.question, n_docs),
                                "answer": answer, "output": output, "prediction": prediction,
                                "exact_match": exact_match(prediction, answer), "f1": f1_score(prediction, answer),
                                "reference_em": exact_match(output, answer),
                                "reference_f1": f1_score(output, answer, reference=True)})
    finally:
        pm.train(was_training)
    n = max(len(records), 1)
    metrics = {"accuracy": sum(r["reference_em"] for r in records) / n,
               "f1": sum(r["reference_f1"] for r in records) / n,
               "exact_match": sum(r["exact_match"] for r in records) / n,
               "f1_token": sum(r["f1"] for r in records) / n,
               "val_loss": loss_sum / n, "n": len(records)}
    return records, metrics


def write_eval(run_dir: str, step: int, records: list[dict], metrics: dict, prefix: str = "") -> None:
    """``outputs/<prefix>outputs_<step>.jsonl`` and ``evals/<prefix>eval_<step>.json``."""
    for sub in ("outputs", "evals"):
        os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    with open(os.path.join(run_dir, "outputs", f"{prefix}outputs_{step}.jsonl"), "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({k: v for k, v in r.items() if not k.startswith("reference_")}, ensure_ascii=False)
                     + "\n")
    with open(os.path.join(run_dir, "evals", f"{prefix}eval_{step}.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)


# ------------------------------------------------------------------------------------ checkpoints
class BestCheckpoints:
    """The best ``k`` evaluations by ``callback_monitor``, each saved as
    ``checkpoints/step=<step>-<monitor>=<value>`` (a PerkModel.save directory, with the trained base
    when the base is meta-trained); ``checkpoints/best.json`` lists them best first."""

    def __init__(self, run_dir: str, run: RunConfig, pm: PerkModel) -> None:
        self.dir = os.path.join(run_dir, "checkpoints")
        self.run, self.pm = run, pm
        self.kept: list[dict] = []  # {"step", "score", "path"}, best first
        index = os.path.join(self.dir, "best.json")
        if os.path.exists(index):
            with open(index) as fh:
                self.kept = json.load(fh)["best"]

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.run.monitor_mode == "min" else a > b

    def offer(self, step: int, score: float) -> None:
        """Save a checkpoint for ``step`` if ``score`` is among the ``save_top_k`` best so far (by
        ``callback_monitor``), delete the one it displaces and rewrite ``best.json``; NaN scores are never kept."""
        k = self.run.save_top_k
        if k == 0 or not math.isfinite(score):
            return
        if len(self.kept) >= k and not self._better(score, self.kept[-1]["score"]):
            return
        name = f"step={step}-{self.run.callback_monitor}={score:.4f}"
        save_perk(self.pm, os.path.join(self.dir, name))
        self.kept.append({"step": step, "score": score, "path": name})
        self.kept.sort(key=lambda x: x["score"], reverse=self.run.monitor_mode == "max")
        for dropped in self.kept[k:]:
            shutil.rmtree(os.path.join(self.dir, dropped["path"]), ignore_errors=True)
        self.kept = self.kept[:k]
        with open(os.path.join(self.dir, "best.json"), "w") as fh:
            json.dump({"monitor": self.run.callback_monitor, "mode": self.run.monitor_mode, "best": self.kept}, fh,
                      indent=2)


def save_perk(pm: PerkModel, path: str) -> None:
    """PerkModel.save, plus ``base/`` (save_pretrained) when base weights were trained."""
    pm.save(path)
    if any(p.requires_grad for p in pm.hf_model.parameters()):
        pm.hf_model.save_pretrained(os.path.join(path, "base"))
        pm.tokenizer.save_pretrained(os.path.join(path, "base"))


def _eval_interval(run: RunConfig, steps_per_epoch: int) -> int:
    """Optimiser steps between validation checks: a float is a fraction of an epoch, an int a step count
    (Lightning's reading of val_check_interval)."""
    v = run.val_check_interval
    if isinstance(v, float):
        return max(1, round(steps_per_epoch * v))
    return int(v)


class EarlyStopping:
    """Stop after ``patience`` evaluations without improvement of the monitored metric (min_delta 0)."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.best: float | None = None
        self.wait = 0

    def update(self, score: float) -> bool:
        """Record a validation score; True when ``patience`` checks in a row have not improved on the best."""
        if self.best is None or (score < self.best if self.run.monitor_mode == "min" else score > self.best):
            self.best, self.wait = score, 0
        else:
            self.wait += 1
        return self.run.patience is not None and self.wait >= self.run.patience


# ------------------------------------------------------------------------------------ recipes
def _device(ctx: distributed.DistContext) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _announce(run: RunConfig) -> None:
    for note in run.notes:
        LOG.info(note)


def train_run(run: RunConfig, perk: PerkConfig, config: Mapping, *, progress: bool = True) -> str:
    """``perk-fast train``: meta-train on the train split, evaluating on validation; returns the run folder."""
    ctx = distributed.setup()
    device = _device(ctx)
    if run.resume_from_checkpoint:
        if not run.checkpoint:
            raise ConfigError("config key resume_from_checkpoint=true needs checkpoint=<run>/checkpoints/last")
        last = os.path.abspath(run.checkpoint)
        if os.path.basename(last) != "last" or not os.path.exists(os.path.join(last, "trainer_state.json")):
            raise ConfigError(f"config key checkpoint={run.checkpoint!r}: resume needs a run's checkpoints/last "
                              "directory (with trainer_state.json)")
        run_dir = os.path.dirname(os.path.dirname(last))
    else:
        run_dir = new_run_dir(run, ctx)
    log = RunLog(run_dir, run, ctx, config)
    try:
        if ctx.is_main:
            from omegaconf import OmegaConf

            OmegaConf.save(OmegaConf.create(dict(config)), os.path.join(run_dir, "config.yaml"))
        _announce(run)
        LOG.info("run folder: %s", run_dir)
        train_rows = read_split(run, "train")
        val_rows = sample_eval(read_split(run, "validation"), run, "validation") if run.do_eval else []
        LOG.info("data: %d training examples, %d validation examples", len(train_rows), len(val_rows))
        pm = build_perk_model(run, perk, device)
        if run.load_checkpoint and run.checkpoint and not run.resume_from_checkpoint:
            load_meta(pm, run.checkpoint)
        groups = [{"params": "meta"}]
        if not run.peft_lora:
            groups.append({"params": "base", "lr": run.learning_rate})
        per_step = run.train_batch_size * run.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(train_rows) / per_step)
        total = run.max_steps or steps_per_epoch * run.num_train_epochs
        best = BestCheckpoints(run_dir, run, pm) if ctx.is_main else None
        stopper = EarlyStopping(run)

        def eval_fn(model: PerkModel, step: int) -> dict:
            records, metrics = evaluate_split(model, val_rows, run, progress=progress)
            write_eval(run_dir, step, records, metrics)
            monitored = {"val_loss": metrics["val_loss"], "val_accuracy": metrics["accuracy"],
                         "val_f1": metrics["f1"]}
            log.metrics({"step": step, **monitored, "exact_match": metrics["exact_match"]}, kind="eval")
            LOG.info("step %d: val_loss %.4f  val_accuracy %.4f  val_f1 %.4f", step, monitored["val_loss"],
                     monitored["val_accuracy"], monitored["val_f1"])
            best.offer(step, monitored[run.callback_monitor])
            return monitored

        def early_stop(result: dict) -> bool:
            stop = stopper.update(result[run.callback_monitor])
            if stop:
                LOG.info("early stopping: %s did not improve for %d evaluations", run.callback_monitor, run.patience)
            return stop

        def on_step(record: dict) -> None:
            log.metrics(record)

        if run.resume_from_checkpoint:  # replay the early-stopping state from the history
            with open(os.path.join(run_dir, "checkpoints", "last", "trainer_state.json")) as fh:
                for rec in json.load(fh)["history"]:
                    if rec.get("eval"):
                        stopper.update(rec["eval"][run.callback_monitor])
        meta_train(pm, train_rows, steps=total, batch_size=run.train_batch_size,
                   gradient_accumulation_steps=run.gradient_accumulation_steps, param_groups=groups,
                   eval_fn=eval_fn if run.do_eval and val_rows else None,
                   eval_every=_eval_interval(run, steps_per_epoch), on_step=on_step,
                   early_stop=early_stop if run.do_eval and val_rows else None,
                   checkpoint_dir=os.path.join(run_dir, "checkpoints"), checkpoint_every=_eval_interval(run, steps_per_epoch),
                   resume=run.resume_from_checkpoint, progress=progress)
        LOG.info("done: %s", run_dir)
        return run_dir
    finally:
        log.close()


def eval_run(run: RunConfig, perk: PerkConfig, config: Mapping, *, progress: bool = True) -> str:
    """``perk-fast eval``: score the validation and test splits with the meta-parameters of ``checkpoint``."""
    ctx = distributed.setup()
    if not ctx.is_main:  # evaluation runs on one process
        return ""
    if not run.checkpoint:
        raise ConfigError("config key checkpoint is not set: pass checkpoint=<run>/checkpoints/<dir>")
    run_dir = new_run_dir(run, ctx)
    log = RunLog(run_dir, run, ctx, config)
    try:
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(dict(config)), os.path.join(run_dir, "config.yaml"))
        _announce(run)
        pm = build_perk_model(run, perk, _device(ctx))
        load_meta(pm, run.checkpoint)
        step = _checkpoint_step(run.checkpoint)
        for split, prefix in (("validation", ""), ("test", "test_")):
            rows = sample_eval(read_split(run, split), run, split)
            records, metrics = evaluate_split(pm, rows, run, progress=progress)
            write_eval(run_dir, step, records, metrics, prefix=prefix)
            log.metrics({"step": step, **{k: v for k, v in metrics.items()}}, kind=f"eval_{split}")
            LOG.info("%s (%d rows): accuracy %.4f  f1 %.4f  exact_match %.4f  val_loss %.4f", split, len(rows),
                     metrics["accuracy"], metrics["f1"], metrics["exact_match"], metrics["val_loss"])
        return run_dir
    finally:
        log.close()


def _checkpoint_step(path: str) -> int:
    state = os.path.join(path, "trainer_state.json")
    if os.path.exists(state):
        with open(state) as fh:
            return int(json.load(fh)["step"])
    name = os.path.basename(os.path.normpath(path))
    head = name.split("-", 1)[0]
    return int(head[5:]) if head.startswith("step=") and head[5:].isdigit() else 0


def encode_run(run: RunConfig, perk: PerkConfig, config: Mapping, *, progress: bool = True) -> str:
    """``perk-fast encode``: the memories of a file of contexts (and answers to their questions)."""
    ctx = distributed.setup()
    if not ctx.is_main:
        return ""
    source = run.extras.get("contexts")
    if not source:
        raise ConfigError("encode needs +contexts=<file.jsonl> (rows with `context`, optionally `question`)")
    if not os.path.exists(str(source)):
        raise ConfigError(f"config key contexts={source!r}: file not found")
    run_dir = new_run_dir(run, ctx)
    log = RunLog(run_dir, run, ctx, config)
    try:
        _announce(run)
        pm = build_perk_model(run, perk, _device(ctx))
        if run.checkpoint:
            load_meta(pm, run.checkpoint)
        rows = _read_contexts(str(source))
        memory = encode(pm, [r["context"] for r in rows], batch_size=run.eval_batch_size, progress=progress)
        out = str(run.extras.get("memory_out") or os.path.join(run_dir, "memory"))
        memory.save(out)
        LOG.info("encoded %d contexts into %s", len(rows), out)
        if _truthy(run.extras.get("answer", False)):
            asked = [i for i, r in enumerate(rows) if r.get("question")]
            answers = []
            for start in range(0, len(asked), run.eval_batch_size):
                idx = asked[start : start + run.eval_batch_size]
                answers += pm.generate(memory.select(idx), [rows[i]["question"] for i in idx],
                                       max_new_tokens=run.max_new_tokens)
            with open(os.path.join(run_dir, "answers.jsonl"), "w", encoding="utf-8") as fh:
                for i, text in zip(asked, answers):
                    fh.write(json.dumps({"index": i, "question": rows[i]["question"], "output": text,
                                         "prediction": cut_answer(text)}, ensure_ascii=False) + "\n")
            LOG.info("answered %d questions: %s", len(asked), os.path.join(run_dir, "answers.jsonl"))
        return run_dir
    finally:
        log.close()


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)


def _read_contexts(path: str) -> list[dict]:
    """Rows ``{"context", "question"?}`` of a JSON / JSONL file (answers are not needed)."""
    rows = []
    opener = read_examples  # JSON lists and full examples go through the readers' checks
    if path.endswith((".jsonl", ".ndjson")):
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}: line {lineno}: field <row>: invalid JSON ({err.msg})") from None
                if not isinstance(row, dict) or "context" not in row:
                    raise ConfigError(f"{path}: line {lineno}: field 'context': missing")
                question = row.get("question", row.get("prompt"))
                if question is not None and not isinstance(question, str):
                    raise ConfigError(f"{path}: line {lineno}: field 'question': {type(question).__name__} is "
                                      "invalid; allowed: a string")
                rows.append({"context": row["context"], "question": question})
        return rows
    try:
        return [{"context": ex.context, "question": ex.question} for ex in opener(path)]
    except ValueError as err:
        raise ConfigError(f"contexts: {err}") from None


def export_run(run: RunConfig, perk: PerkConfig, config: Mapping, *, progress: bool = True) -> str:
    """``perk-fast export``: a memory (or the meta-learned initialisation) as a PEFT LoRA adapter."""
    out = run.extras.get("out")
    if not out:
        raise ConfigError("export needs +out=<adapter directory>")
    pm = build_perk_model(run, perk, torch.device("cpu"))
    if _truthy(run.extras.get("init", False)):
        if not run.checkpoint:
            raise ConfigError("export +init=true needs checkpoint=<perk_fast checkpoint directory>")
        load_meta(pm, run.checkpoint)
        pm.export_init_peft(str(out), base_model_name_or_path=run.model_name_or_path)
        LOG.info("exported the meta-learned initialisation of %s to %s", run.checkpoint, out)
        return str(out)
    source = run.extras.get("memory")
    if not source:
        raise ConfigError("export needs +memory=<saved Memory directory> (or +init=true with checkpoint=...)")
    index = _int(run.extras, "index", 0)
    try:
        memory = Memory.load(str(source), pm)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config key memory={source!r}: {err}") from None
    memory.to_peft(str(out), index=index, perk_model=pm, base_model_name_or_path=run.model_name_or_path)
    LOG.info("exported context %d of %s to %s", index, source, out)
    return str(out)


RECIPES: dict[str, Callable[..., str]] = {"train": train_run, "eval": eval_run, "encode": encode_run,
                                          "export": export_run}


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def setup_console_logging() -> None:
    """Log lines to stderr (rank 0 only when distributed)."""
    if any(isinstance(h, _Stderr) for h in LOG.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("[perk-fast] %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    if int(os.environ.get("RANK", "0")) != 0:
        LOG.setLevel(logging.WARNING)
