"""PerkConfig: every knob of PERK in one validated dataclass.

Construction validates each field and raises ``ValueError`` naming the field, the
bad value and what is allowed. ``PerkConfig.from_reference`` maps the reference
repository's (YAML) config keys onto these fields.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

INNER_OPTIMIZERS = ("adamw", "sgd")
UNROLL_MODES = ("full", "truncated", "first_order")
META_GRADS = ("checkpointed", "recomputed", "unrolled")
LM_HEAD_LOSSES = ("chunked", "full")
LONG_DOCUMENTS = ("split", "split_tokens", "truncate")
DEFAULT_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"PerkConfig.{name}={value!r} is invalid: allowed {allowed}")


def check_int(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False) -> None:
    """Raise ValueError naming ``name`` and ``value`` unless it is an int >= ``minimum`` (or None if allowed).

    The one check behind every integer argument of the public API (batch sizes, steps, budgets).
    """
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r} is invalid: allowed {'None or ' if allow_none else ''}{allowed}")


@dataclass
class PerkConfig:
    """Configuration of the inner (test-time) and outer (meta-training) loops.

    Inner loop: ``inner_steps`` steps of ``inner_optimizer`` at ``inner_lr`` over the
    context's segments (``segments_per_step`` segments of each context per micro-batch;
    gradients of the micro-batches are summed). A document longer than ``segment_len``
    tokens (None: the tokenizer's ``model_max_length``) is, with ``long_documents='split'``,
    cut at sentence ends into several segments that each repeat its ``doc_i:`` prefix (nothing is
    lost, and a sentence is cut only when it alone exceeds a segment), with ``'split_tokens'``
    cut into consecutive pieces anywhere (what 'split' did before sentence packing: a fact can
    straddle two segments), or with ``'truncate'`` kept as one row cut at ``segment_len`` (the
    reference's behaviour; a warning says when a document is cut).
    ``shuffle_docs``: in training, number a context's documents ``doc_i`` in a random order
    (the reference's behaviour) instead of 0..N-1 (encoding always numbers them in order). The
    inner loss sums over segments, so the ids are the memory's only clue to the documents' order:
    a task answered by the *last* event (BabiLong's "where is X?") needs ``False``
    (``bench/demo_order_bound.py`` measures the bound shuffled ids put on it).
    ``segment_recency`` r in [0, 1] weights segment j of a context's S segments (in the context's
    order, whatever the ids) by ``1 - r + r (j + 1) / S`` in the inner loss: later documents are
    written more strongly, so that of two facts about one thing the memory holds the later one
    better (0, the default: every segment alike, the reference's loss).
    ``unroll`` chooses how meta-gradients flow through the inner loop: ``full``
    (second order through every step), ``truncated`` (first order before
    ``unroll_start``), ``first_order``. ``meta_grad`` chooses how they are computed:
    ``checkpointed`` (flat in context length, replay; keeps one adapter-sized tensor per
    step), ``recomputed`` (also constant in T: keeps nothing per step and recomputes the inner
    gradients along a binomial (revolve) schedule that may hold ``recompute_snapshots``
    optimiser states -- 3 adapter-sized tensors each with AdamW, 1 with SGD; 0 replays every
    step from the start, T(T+1)/2 extra first-order passes; the default 2 needs 6 at T = 4,
    48 at T = 16) or ``unrolled`` (one big graph). The schedule changes the cost, never the values.

    LM head: ``lm_head_loss='chunked'`` never holds more than ``lm_head_chunk_size``
    tokens' logits (default: a 256 MiB chunk); ``'full'`` materialises them (reference).

    Outer loop (``meta_train``): AdamW at ``outer_lr`` with ``outer_weight_decay``
    (``outer_decay_exempt``: not on biases, norm weights and the learned learning rates),
    linear warmup over ``warmup_proportion`` of the steps then cosine decay,
    gradient clipping at ``max_grad_norm``. ``grad_spike_factor`` (default None: off) turns on the
    gradient-spike guard: a step whose meta-gradient norm before clipping exceeds that factor times
    the median of the last ``grad_spike_window`` applied steps' norms (or is not finite) is skipped
    -- no optimiser update, the batch and the schedule still advance, the history entry says
    ``skipped`` -- and ``grad_spike_max_skips`` skips in a row end the run with an error. Clipping
    alone does not protect against such a step: AdamW's normalised update moves every weight by about
    the learning rate whatever the norm, in the spike's direction.
    """

    # inner loop
    inner_steps: int = 4
    inner_lr: float = 5e-5
    inner_optimizer: str = "adamw"
    inner_betas: tuple[float, float] = (0.9, 0.95)
    inner_eps: float = 1e-8
    inner_weight_decay: float = 0.01
    learn_inner_lr: bool = True
    unroll: str = "truncated"
    unroll_start: int = 2
    meta_grad: str = "checkpointed"
    recompute_snapshots: int = 2
    segment_len: int | None = 256
    long_documents: str = "split"
    segments_per_step: int = 16
    shuffle_docs: bool = True
    segment_recency: float = 0.0
    # memory (LoRA)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_rslora: bool = True
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    # token weighting
    weighted_loss: bool = True
    weight_hidden: int = 128
    lm_head_loss: str = "chunked"
    lm_head_chunk_size: int | None = None
    # outer loop
    outer_lr: float = 1e-5
    outer_betas: tuple[float, float] = (0.9, 0.95)
    outer_eps: float = 1e-8
    outer_weight_decay: float = 0.01
    warmup_proportion: float = 0.03
    max_grad_norm: float = 1.0
    grad_spike_factor: float | None = None
    grad_spike_window: int = 50
    grad_spike_max_skips: int = 10
    outer_decay_exempt: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        self.inner_betas = tuple(float(b) for b in self.inner_betas)
        self.outer_betas = tuple(float(b) for b in self.outer_betas)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = (self.target_modules,)
            self.target_modules = tuple(self.target_modules)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        self._validate()

    def _validate(self) -> None:
        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                _fail(name, v, f"an integer >= {minimum}")

        def real(name: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if ok:
                ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                lb = "(" if lo_open else "["
                rb = ")" if hi_open else "]"
                _fail(name, v, f"a finite number in {lb}{lo}, {hi}{rb}")

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            v = getattr(self, name)
            if v not in allowed:
                _fail(name, v, "one of " + ", ".join(repr(a) for a in allowed))

        pos_int("inner_steps")
        real("inner_lr", 0.0, lo_open=True)
        choice("inner_optimizer", INNER_OPTIMIZERS)
        for name in ("inner_betas", "outer_betas"):
            v = getattr(self, name)
            if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
                _fail(name, v, "two numbers in [0, 1)")
        real("inner_eps", 0.0, lo_open=True)
        real("inner_weight_decay", 0.0)
        choice("unroll", UNROLL_MODES)
        if isinstance(self.unroll_start, bool) or not isinstance(self.unroll_start, int) or self.unroll_start < 0:
            _fail("unroll_start", self.unroll_start, "an integer >= 0")
        if self.unroll == "truncated" and self.unroll_start > self.inner_steps:
            _fail("unroll_start", self.unroll_start, f"an integer in [0, inner_steps={self.inner_steps}] with unroll='truncated'")
        choice("meta_grad", META_GRADS)
        pos_int("recompute_snapshots", 0)
        if self.segment_len is not None:
            pos_int("segment_len", 4)
        choice("long_documents", LONG_DOCUMENTS)
        pos_int("segments_per_step")
        real("segment_recency", 0.0, 1.0)
        pos_int("lora_rank")
        real("lora_alpha", 0.0, lo_open=True)
        real("lora_dropout", 0.0, 1.0, hi_open=True)
        if self.target_modules is not None and (
            len(self.target_modules) == 0 or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            _fail("target_modules", self.target_modules, "None or a non-empty list of module names")
        if self.layers is not None and (len(self.layers) == 0 or min(self.layers) < 0):
            _fail("layers", self.layers, "None or a non-empty list of layer indices >= 0")
        pos_int("weight_hidden")
        choice("lm_head_loss", LM_HEAD_LOSSES)
        if self.lm_head_chunk_size is not None:
            pos_int("lm_head_chunk_size")
        real("outer_lr", 0.0)
        real("outer_eps", 0.0, lo_open=True)
        real("outer_weight_decay", 0.0)
        real("warmup_proportion", 0.0, 1.0)
        real("max_grad_norm", 0.0, lo_open=True)
        f = self.grad_spike_factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 1):
            _fail("grad_spike_factor", f, "None (the guard off) or a finite number > 1")
        pos_int("grad_spike_window")
        pos_int("grad_spike_max_skips")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "an integer")

    @property
    def lora_scale(self) -> float:
        """LoRA scale: alpha / sqrt(r) with rsLoRA, alpha / r otherwise."""
        return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_rslora else self.lora_rank)

    def second_order_step(self, step: int) -> bool:
        """Whether inner step ``step`` (0-based) is differentiated to second order."""
        if self.unroll == "full":
            return True
        if self.unroll == "first_order":
            return False
        return step >= self.unroll_start

    def replace(self, **changes: Any) -> "PerkConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PerkConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PerkConfig fields {unknown}; allowed: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_reference(cls, source: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> "PerkConfig":
        """Build a PerkConfig that computes what the reference repository's code computes for its config.

        ``source`` is a dict (e.g. a Hydra-composed config) or the path of a YAML file (Hydra
        ``# @package`` lines are fine). The mapping follows the reference's *code*, not its key
        names (README, "Reference config keys"): ``weight_decay`` is also the inner AdamW's decay;
        ``first_order`` only acts with the full unroll (``inner_funct: default``); ``inner_opt`` is
        never read (AdamW, a warning when it says otherwise); ``lora_r`` is never read (only
        ``lora_rank``); LoRA dropout is the reference's fixed 0.1; documents are whole rows cut at
        the tokenizer's ``model_max_length`` (``long_documents='truncate'``, ``segment_len=None``).
        Keys about the run (paths, logging, hardware, trainer) are left to the caller (the command
        line honours them); any other key is reported in a warning. ``overrides`` (PerkConfig
        fields) win over everything, e.g. ``long_documents='split'`` for perk_fast's splitting.
        """
        if isinstance(source, (str, os.PathLike)):
            import yaml

            with open(source) as fh:
                data = yaml.safe_load(fh) or {}
            if not isinstance(data, Mapping):
                raise ValueError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        elif isinstance(source, Mapping):
            data = source
        else:
            raise TypeError(f"from_reference expects a dict or a YAML path, got {type(source).__name__}")
        kwargs: dict[str, Any] = {"lora_dropout": 0.1, "long_documents": "truncate", "segment_len": None}
        notes: list[str] = []
        unknown = []
        for key, value in data.items():
            if key in REFERENCE_KEYS:
                REFERENCE_KEYS[key](kwargs, value, notes, key)
            elif key not in REFERENCE_RUN_KEYS:
                unknown.append(key)
        first_order = kwargs.pop("_first_order", False)
        if first_order:
            if kwargs.get("unroll") == "truncated":
                notes.append("first_order=true is ignored with inner_funct=truncated: the reference's truncated "
                             "inner loop never reads it (steps < unroll_start are first order there anyway)")
            else:
                kwargs["unroll"] = "first_order"
        for note in notes:
            warnings.warn(f"PerkConfig.from_reference: {note}", stacklevel=2)
        if unknown:
            warnings.warn(f"PerkConfig.from_reference: unknown reference keys ignored: {sorted(unknown)}", stacklevel=2)
        kwargs.update(overrides)
        return cls(**kwargs)


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"reference key {key}={value!r} is invalid: allowed {allowed}")


def _as_int(key: str, value: Any, minimum: int | None = None) -> int:
    """An int, or a float with an integral value (YAML ``4.``); else a ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise _bad(key, value, "an integer")
    if minimum is not None and int(value) < minimum:
        raise _bad(key, value, f"an integer >= {minimum}")
    return int(value)


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _bad(key, value, "a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _bad(key, value, "a number") from None


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(key, value, "true or false")


def _set(field_name: str, convert):
    """A handler that sets PerkConfig.``field_name`` to ``convert(reference key, value)``."""
    def apply(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
        kwargs[field_name] = convert(key, value)

    return apply


def _inner_opt(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    if str(value).lower() not in ("adam", "adamw"):
        notes.append(f"inner_opt={value!r} is not read by the reference, whose inner optimiser is always AdamW; "
                     "perk_fast follows it (inner_optimizer='adamw'; pass inner_optimizer='sgd' to override)")


def _inner_funct(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    mapping = {"default": "full", "full": "full", "truncated": "truncated"}
    if str(value).lower() not in mapping:
        raise _bad("inner_funct", value, "'default', 'truncated'")
    kwargs["unroll"] = mapping[str(value).lower()]


def _first_order(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    kwargs["_first_order"] = _as_bool("first_order", value)


def _lora_r(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    notes.append(f"lora_r={value!r} is ignored: the reference never reads it (its LoRA rank is lora_rank)")


def _weight_decay(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    decay = _as_float("weight_decay", value)
    kwargs["outer_weight_decay"] = decay
    kwargs["inner_weight_decay"] = decay  # the reference's inner AdamW groups use the same key


def _non_linearity(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    if str(value).lower() != "softplus":
        raise ValueError(
            f"reference key weight_non_linearity={value!r} is not supported: perk_fast implements 'softplus' (beta=3)"
        )


def _inner_grad_accum(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    # The reference splits a context's documents into `inner_grad_accum` chunks at test time and
    # averages per-chunk means. perk_fast sums exact per-context means over micro-batches sized in
    # segments (segments_per_step), so the value only affects memory, never the result.
    _as_int("inner_grad_accum", value, minimum=1)


def _weight_normalize(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    if _as_bool("weight_normalize", value):
        raise ValueError("reference key weight_normalize=True is not supported: perk_fast implements the default False")


def _packing(kwargs: dict[str, Any], value: Any, notes: list[str], key: str) -> None:
    if not _as_bool("packing", value):
        notes.append("packing=false: perk_fast always normalises a context's inner loss by its real positions "
                     "(the reference's packed normalisation), never by padded lengths")


# reference key -> how it sets PerkConfig fields (documented in README's table)
REFERENCE_KEYS = {
    "n_inner_iter": _set("inner_steps", lambda k, v: _as_int(k, v, 1)),
    "inner_lr": _set("inner_lr", _as_float),
    "dyna_lr": _set("learn_inner_lr", _as_bool),
    "inner_opt": _inner_opt,
    "inner_funct": _inner_funct,
    "unroll_start": _set("unroll_start", lambda k, v: _as_int(k, v, 0)),
    "first_order": _first_order,
    "lora_rank": _set("lora_rank", lambda k, v: _as_int(k, v, 1)),
    "lora_r": _lora_r,
    "lora_alpha": _set("lora_alpha", _as_float),
    "lora_dropout": _set("lora_dropout", _as_float),
    "weighted_loss": _set("weighted_loss", _as_bool),
    "weight_non_linearity": _non_linearity,
    "inner_grad_accum": _inner_grad_accum,
    "weight_normalize": _weight_normalize,
    "packing": _packing,
    "learning_rate": _set("outer_lr", _as_float),
    "weight_decay": _weight_decay,
    "adam_epsilon": _set("outer_eps", _as_float),
    "warmup_proportion": _set("warmup_proportion", _as_float),
    "max_grad_norm": _set("max_grad_norm", _as_float),
    "seed": _set("seed", lambda k, v: _as_int(k, v)),
}

# keys of the reference that describe the run (model, data, paths, logging, hardware, trainer):
# PerkConfig does not hold them; the command line (perk_fast.cli) honours or ignores each one
REFERENCE_RUN_KEYS = frozenset(
    {
        "model_name_or_path", "data_dir", "output_dir", "checkpoint", "load_checkpoint",
        "resume_from_checkpoint", "do_train", "do_eval", "wandb_name", "wandb_project", "wandb_entity",
        "wandb_api_key", "peft_lora", "bf16", "attn_implementation", "train_batch_size", "eval_batch_size",
        "num_train_epochs", "patience", "callback_monitor", "val_check_interval", "use_liger_kernel", "n_gpu",
        "gradient_accumulation_steps", "dataset_name", "dataset_subset", "max_eval_data", "num_workers",
        "weight_fuse", "weight_q_pool", "defaults", "device_idx", "student_record_query", "random_facts",
        "multi_task", "model_type", "experiment", "default",
    }
)
REFERENCE_IGNORED = REFERENCE_RUN_KEYS  # the name earlier releases used
