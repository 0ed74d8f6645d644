"""PerkModel: a frozen Hugging Face causal LM plus PERK's meta-parameters.

Meta-parameters (``PerkModel.meta_parameters()``):

* the LoRA initialisation ``lora_A[i]`` (r, in) and ``lora_B[i]`` (out, r) per target projection;
* the learned inner learning rates ``inner_lrs`` (2 * sites, T): one per adapter tensor and step;
* the token-weighting model (when ``weighted_loss``).

They are fp32 (fp64 when the base is fp64) even when the base model is bf16.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import hf
from .config import PerkConfig, check_int
from .data import (
    IGNORE,
    build_segments,
    check_batch,
    check_text,
    make_micro_batches,
    pad_id,
    prompt_ids,
    query_batch,
    query_prompt,
    segment_contexts,
)
from .engine import InnerProblem, adapt
from .generation import generate_continuations
from .inner import InnerOptimizer
from .io import check_fingerprint, load_tensors, model_fingerprint, read_header, save_tensors, write_header
from .lora import ActiveAdapters, AdapterSlot, find_sites, init_lora_tensors, inject_lora
from .loss import WeightingModel, lm_head_loss_sum
from .memory import Memory
from .seeds import call_seed, context_rng, pass_seed, row_keys

__all__ = ["PerkModel", "model_fingerprint"]

_FORMAT_VERSION = 1


class PerkModel(nn.Module):
    """A frozen HF causal LM with batched LoRA memories and PERK's meta-parameters.

    Args:
        hf_model: a transformers causal LM (GPT-2, Qwen2, Llama families; others with
            ``PerkConfig.target_modules``). Its weights are frozen and it stays in eval
            mode (its own dropout would make inner steps unreplayable).
        tokenizer: its tokenizer (``encode``, ``decode``, ``eos_token_id``).
        config: a :class:`PerkConfig` (default ``PerkConfig()``).
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any, config: PerkConfig | None = None) -> None:
        super().__init__()
        config = PerkConfig() if config is None else config
        if not isinstance(config, PerkConfig):
            raise TypeError(f"config must be a PerkConfig, got {type(config).__name__}")
        hf.check_causal_lm(hf_model)
        head = hf.lm_head(hf_model)
        self.config = config
        self.tokenizer = tokenizer
        self.hf_model = hf_model
        for p in hf_model.parameters():
            p.requires_grad_(False)
        self._slot = AdapterSlot()
        self.sites = inject_lora(hf_model, config, self._slot)

        base_dtype = head.weight.dtype
        meta_dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
        device = head.weight.device
        gen = torch.Generator().manual_seed(config.seed)
        a_list, b_list = [], []
        for site in self.sites:
            a, b = init_lora_tensors(site, config.lora_rank, gen, meta_dtype)
            a_list.append(nn.Parameter(a.to(device)))
            b_list.append(nn.Parameter(b.to(device)))
        self.lora_A = nn.ParameterList(a_list)
        self.lora_B = nn.ParameterList(b_list)
        lrs = torch.full((2 * len(self.sites), config.inner_steps), config.inner_lr, dtype=meta_dtype, device=device)
        if config.learn_inner_lr:
            self.inner_lrs = nn.Parameter(lrs)
        else:
            self.register_buffer("inner_lrs", lrs)
        if config.weighted_loss:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.weighting = WeightingModel(head.weight.shape[1], config.weight_hidden).to(device, meta_dtype)
        else:
            self.weighting = None
        self._calls = 0
        self._inner_losses: list[torch.Tensor] = []  # of the latest inner loop (see last_inner_losses)
        super().train(False)

    # ------------------------------------------------------------------ basics
    @property
    def body(self) -> nn.Module:
        """The decoder without its LM head (its output is the final normed hidden state)."""
        return hf.decoder_body(self.hf_model)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return hf.lm_head(self.hf_model).weight

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def segment_len(self) -> int:
        """Tokens per segment: ``config.segment_len``, or the tokenizer's ``model_max_length`` when None."""
        if self.config.segment_len is not None:
            return self.config.segment_len
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 4 <= limit <= 10**7:
            raise ValueError(f"PerkConfig.segment_len=None means the tokenizer's model_max_length, but "
                             f"{type(self.tokenizer).__name__} reports {limit!r}; set PerkConfig.segment_len")
        return limit

    @property
    def meta_dtype(self) -> torch.dtype:
        return self.lora_A[0].dtype

    def train(self, mode: bool = True) -> "PerkModel":
        """Training mode enables LoRA dropout and doc-id shuffling; the base stays in eval."""
        super().train(mode)
        self.hf_model.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        """``.to`` / ``.half()`` / ``.bfloat16()`` / ``.cuda()`` apply to the base; the meta-parameters
        follow device moves but keep their fp32 (fp64) values exactly when the base goes to 16 bits."""
        saved = [(t, t.data) for t in self._meta_tensors()]
        super()._apply(fn, recurse)
        for t, old in saved:
            if t.dtype in (torch.float16, torch.bfloat16):
                t.data = old.to(t.device)  # the exact values, not a 16-bit round trip
        return self

    def _meta_tensors(self) -> Iterator[torch.Tensor]:
        yield from self.lora_A
        yield from self.lora_B
        yield self.inner_lrs
        if self.weighting is not None:
            yield from self.weighting.parameters()

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        """Exactly the meta-learned tensors: LoRA init, learned LRs (if learned), weighting model."""
        yield from self.lora_A
        yield from self.lora_B
        if isinstance(self.inner_lrs, nn.Parameter):
            yield self.inner_lrs
        if self.weighting is not None:
            yield from self.weighting.parameters()

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``meta_parameters()`` with stable names (used by checkpoints)."""
        ids = {id(p) for p in self.meta_parameters()}
        for name, p in self.named_parameters():
            if id(p) in ids:
                yield name, p

    @property
    def last_inner_losses(self) -> list[float]:
        """Inner loss (summed over contexts) at each step of the latest inner loop."""
        return [float(v) for v in self._inner_losses]

    def initial_adapters(self, n_contexts: int) -> list[torch.Tensor]:
        """The meta-initialisation broadcast to ``n_contexts`` contexts: [A_0, B_0, A_1, ...]."""
        out = []
        for a, b in zip(self.lora_A, self.lora_B):
            out.append(a.unsqueeze(0).expand(n_contexts, *a.shape))
            out.append(b.unsqueeze(0).expand(n_contexts, *b.shape))
        return out

    def site_weights(self) -> list[torch.Tensor]:
        """The weights of the adapted projections (what identifies the base for a memory)."""
        return [site.module.weight for site in self.sites]

    def fingerprint(self) -> dict[str, Any]:
        """The base model's identity (architecture + a digest of the adapted projections' weights)."""
        return model_fingerprint(self.hf_model, self.site_weights())

    def lora_settings(self) -> dict[str, Any]:
        """What a Memory records of its LoRA: rank, alpha, rsLoRA, scale, weight layouts, coverage."""
        cfg = self.config
        return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "rslora": cfg.lora_rslora, "scale": cfg.lora_scale,
                "layouts": [s.layout for s in self.sites], "all_layers": cfg.layers is None}

    def init_tensors(self) -> list[nn.Parameter]:
        """The shared initial adapters in the engine's order: [A_0, B_0, A_1, B_1, ...]."""
        return [x for pair in zip(self.lora_A, self.lora_B) for x in pair]

    def _pass_seed(self, seed: int | None, step: int | str) -> int | None:
        """Dropout seed of one forward pass (inner ``step`` or ``"outer"``) of call ``seed``
        (None: no dropout in this pass)."""
        if seed is None or not self.training or self.config.lora_dropout == 0:
            return None
        return pass_seed(seed, step)

    def _dropout_keys(self, seed: int | None, row_ids) -> torch.Tensor | None:
        if seed is None or self.config.lora_dropout == 0:
            return None
        if not row_ids:
            raise ValueError("dropout needs the rows' (context, segment) ids; build micro-batches with make_micro_batches")
        return torch.tensor(row_keys(seed, row_ids), dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ forward passes
    @contextlib.contextmanager
    def adapters_active(self, params: Sequence[torch.Tensor], dropout_keys: torch.Tensor | None = None):
        """Make the projections use ``params`` ([A_0, B_0, ...], context-major rows); with
        ``dropout_keys`` (rows,) the LoRA inputs get the dropout masks of those row keys."""
        if len(params) != 2 * len(self.sites):
            raise ValueError(f"{len(params)} adapter tensors for {len(self.sites)} projections: pass [A_0, B_0, ...]")
        pairs = [(params[2 * i], params[2 * i + 1]) for i in range(len(self.sites))]
        outer = self._slot.active
        self._slot.active = ActiveAdapters(pairs, self.config.lora_scale, self.config.lora_dropout, dropout_keys)
        try:
            yield
        finally:
            self._slot.active = outer  # a nested use restores the adapters around it

    def hidden_states(
        self, input_ids: torch.Tensor, params: Sequence[torch.Tensor], *, seed: int | None, second_order: bool,
        row_ids=None,
    ) -> torch.Tensor:
        """Final hidden states (rows, L, d) of the adapted model.

        ``seed``: the pass seed of the dropout masks (None: no dropout); ``row_ids`` the rows'
        (global context index, segment index) that key them. ``second_order``: the pass will be
        differentiated twice, so attention must use a twice-differentiable path (math SDPA);
        otherwise fused SDPA backends are allowed.
        """
        hf.check_runtime(self.hf_model)
        attention = contextlib.nullcontext()
        if second_order:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            attention = sdpa_kernel(SDPBackend.MATH)
        with self.adapters_active(params, self._dropout_keys(seed, row_ids)), attention:
            return self.body(input_ids=input_ids, use_cache=False).last_hidden_state

    def inner_loss(self, params: Sequence[torch.Tensor], mb, *, seed: int | None, second_order: bool) -> torch.Tensor:
        """Token-weighted inner loss of one micro-batch: sum over its contexts of their partial means."""
        if mb.contexts.numel() != params[0].shape[0] or not torch.equal(
            mb.contexts, torch.arange(params[0].shape[0], device=mb.contexts.device)
        ):
            params = [p.index_select(0, mb.contexts) for p in params]
        hidden = self.hidden_states(mb.input_ids, params, seed=seed, second_order=second_order, row_ids=mb.row_ids)
        d = hidden.shape[-1]
        h = hidden[:, :-1]
        labels = mb.labels[:, 1:]
        if self.weighting is not None:
            w = self.weighting(hidden)[:, 1:]
        else:
            w = torch.ones(labels.shape, dtype=self.meta_dtype, device=labels.device)
        scale = mb.row_scale
        if self.config.segment_recency:  # later segments written more strongly (PerkConfig.segment_recency)
            r = self.config.segment_recency
            scale = scale * (1.0 - r + r * mb.row_position)
        w = w * scale.to(w.dtype)[:, None]
        if mb.token_scale is not None:  # a per-token schedule (MicroBatch.token_scale)
            if mb.token_scale.shape != mb.labels.shape:
                raise ValueError(f"MicroBatch.token_scale has shape {tuple(mb.token_scale.shape)}, the labels "
                                 f"{tuple(mb.labels.shape)}")
            w = w * mb.token_scale[:, 1:].to(w.dtype)
        return lm_head_loss_sum(
            h.reshape(-1, d), self.lm_head_weight, labels.reshape(-1), w.reshape(-1),
            mode=self.config.lm_head_loss, chunk_size=self.config.lm_head_chunk_size,
        )

    def outer_loss(self, params: Sequence[torch.Tensor], query: tuple[torch.Tensor, torch.Tensor], *, seed=None,
                   context_ids: Sequence[int] | None = None, normalizer: int | None = None):
        """Mean over contexts of the mean CE on each question's target tokens.

        ``normalizer``: divide the sum of the per-context means by this count instead of the
        number of rows (a slice of a larger batch contributes its share of the batch mean).
        """
        input_ids, labels = query
        ids = range(input_ids.shape[0]) if context_ids is None else context_ids
        hidden = self.hidden_states(input_ids, params, seed=self._pass_seed(seed, "outer"), second_order=False,
                                    row_ids=[(c, -2) for c in ids])
        d = hidden.shape[-1]
        labels = labels[:, 1:]
        counts = (labels != IGNORE).sum(1).clamp_min(1)
        rows = labels.shape[0] if normalizer is None else normalizer
        w = (1.0 / (counts.to(self.meta_dtype) * rows))[:, None].expand(labels.shape)
        return lm_head_loss_sum(
            hidden[:, :-1].reshape(-1, d), self.lm_head_weight, labels.reshape(-1), w.reshape(-1),
            mode=self.config.lm_head_loss, chunk_size=self.config.lm_head_chunk_size,
        )

    # ------------------------------------------------------------------ data
    def segment_contexts(self, contexts, rng: random.Random | None = None):
        """Tokenise contexts into segments (doc ids permuted when ``rng`` is given)."""
        return segment_contexts(self.tokenizer, contexts, self.segment_len, rng, self.config.long_documents)

    def query_batch(self, questions, answers, supports, n_docs) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (input ids, labels) of the question rows."""
        return query_batch(self.tokenizer, questions, answers, supports, n_docs, self.device)

    # ------------------------------------------------------------------ PERK
    def next_seed(self) -> int:
        """A fresh per-call seed (doc-id shuffle, dropout masks) from ``config.seed`` and a counter."""
        self._calls += 1
        return call_seed(self.config.seed, self._calls)

    def trainable_base_parameters(self) -> list[nn.Parameter]:
        """Base-model weights that currently require grad (trained jointly with the meta-parameters)."""
        return [p for p in self.hf_model.parameters() if p.requires_grad]

    def inner_problem(self, segments, *, seed: int | None, context_ids: Sequence[int] | None = None) -> InnerProblem:
        """The engine's view of writing ``segments`` (one entry per context) into their adapters.

        The loss of a micro-batch is :meth:`inner_loss` with the dropout masks of (``seed``, step,
        each row's global context index ``context_ids[i]`` and segment); the meta-gradient reaches
        the LoRA initialisation, the learned learning rates, the token-weighting model and any base
        weights that require grad.
        """
        cfg = self.config
        base = self.trainable_base_parameters()
        if base and cfg.lm_head_loss == "chunked" and hf.lm_head(self.hf_model).weight.requires_grad:
            raise ValueError("the LM head is being trained, but lm_head_loss='chunked' treats it as frozen: use "
                             "PerkConfig(lm_head_loss='full') to train the base jointly")
        micro = make_micro_batches(segments, cfg.segments_per_step, pad_id(self.tokenizer), self.device,
                                   context_ids=context_ids)

        def loss(adapters, mb, step, second_order):
            return self.inner_loss(adapters, mb, seed=self._pass_seed(seed, step), second_order=second_order)

        return InnerProblem(
            loss=loss, micro_batches=micro, init=self.init_tensors(), n_contexts=len(segments), lrs=self.inner_lrs,
            optimizer=InnerOptimizer(cfg), second_order=[cfg.second_order_step(t) for t in range(cfg.inner_steps)],
            weights=(list(self.weighting.parameters()) if self.weighting is not None else []) + base,
        )

    def adapt(self, segments, *, seed: int | None, context_ids: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Adapted adapters [A_0, B_0, ...] of the contexts, differentiable w.r.t. the meta-parameters."""
        result = adapt(self.inner_problem(segments, seed=seed, context_ids=context_ids), self.config.meta_grad,
                       snapshots=self.config.recompute_snapshots)
        self._inner_losses = result.losses
        return result.adapters

    def meta_loss(self, contexts, questions, answers, supports=None, *, seed: int | None = None,
                  context_ids: Sequence[int] | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Outer loss of a batch of B contexts, differentiable w.r.t. ``meta_parameters()``.

        Each context is written into its own adapter by ``inner_steps`` steps of the
        inner optimiser (its own loss, exactly as if alone), then question i is scored
        with memory i; the result is the mean over contexts. ``seed`` fixes the doc-id
        permutations and the dropout masks of this call (default: a fresh one).

        A slice of a larger batch (another process or micro-batch has the rest) passes
        ``context_ids``, the contexts' indices in that batch (default 0..B-1: they key each
        context's randomness, so a context draws the same whatever it is computed with), and
        ``batch_size``, the size of that batch: the result is then this slice's share of the
        batch mean (the sum over the slice divided by ``batch_size``).
        """
        check_batch(contexts, questions, answers, supports)
        ids = list(range(len(contexts))) if context_ids is None else [int(i) for i in context_ids]
        if len(ids) != len(contexts):
            raise ValueError(f"{len(ids)} context_ids for {len(contexts)} contexts: pass one per context")
        check_int("batch_size", batch_size, allow_none=True)
        seed = self.next_seed() if seed is None else seed
        shuffle = self.training and self.config.shuffle_docs
        segments = [
            build_segments(self.tokenizer, c, self.segment_len, context_rng(seed, g) if shuffle else None,
                           where=f"contexts[{i}]", long_documents=self.config.long_documents)
            for i, (c, g) in enumerate(zip(contexts, ids))
        ]
        adapted = self.adapt(segments, seed=seed, context_ids=ids)
        query = self.query_batch(questions, answers, supports, [s.n_docs for s in segments])
        return self.outer_loss(adapted, query, seed=seed, context_ids=ids, normalizer=batch_size)

    def _memory_params(self, memory: Memory, rows: int, what: str = "rows") -> list[torch.Tensor]:
        """The memory's tensors on this model's device, one context per row group (broadcast when it has one)."""
        if not isinstance(memory, Memory):
            raise TypeError(f"memory must be a perk_fast.Memory (from encode), got {type(memory).__name__}")
        memory.check_compatible(self)
        if len(memory) == 1 and rows > 1:
            memory = memory.expand(rows)
        elif len(memory) != rows:
            raise ValueError(f"{rows} {what} for a memory of {len(memory)} contexts: pass one per context, or one memory")
        return [t.to(self.device) for t in memory.tensors]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, memory: Memory | None = None, **kwargs: Any):
        """The base model's forward with row i using memory i (or one memory for every row).

        Returns a ``transformers`` ``CausalLMOutput`` (``logits``; ``loss`` when ``labels`` are
        given, HF's shifted mean cross-entropy). Without ``memory`` it is the plain base model.
        Other keyword arguments go to the base model's forward.
        """
        from transformers.modeling_outputs import CausalLMOutput

        if memory is None:
            out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        else:
            params = self._memory_params(memory, input_ids.shape[0])
            with self.adapters_active(params, None):
                out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        return CausalLMOutput(loss=getattr(out, "loss", None), logits=out.logits)

    def generate(self, memory, questions: Sequence[str], max_new_tokens: int = 32, **generate_kwargs: Any):
        """Answers: question i from memory i (or one memory for all questions), no context in the prompt.

        Greedy by default; every ``transformers`` generation option passes through
        (``do_sample``, ``temperature``, ``num_beams``, ``num_return_sequences``, ``stop_strings``,
        ``generation_config``, ...). Returns one string per question, or a list of
        ``num_return_sequences`` strings per question when that is above 1.
        """
        if isinstance(questions, str) or not isinstance(questions, Sequence) or len(questions) == 0:
            raise ValueError("questions must be a non-empty list of strings")
        for i, q in enumerate(questions):
            check_text(q, f"questions[{i}]")
        check_int("max_new_tokens", max_new_tokens)
        n = len(questions)
        params = self._memory_params(memory, n, "questions")
        n_docs = memory.n_docs if len(memory) == n else memory.n_docs * n
        prompts = [prompt_ids(self.tokenizer, query_prompt(q, n_docs[i])) for i, q in enumerate(questions)]
        if "stop_strings" in generate_kwargs:
            generate_kwargs.setdefault("tokenizer", self.tokenizer)
        per_row = int(generate_kwargs.get("num_return_sequences") or 1)
        beams = int(generate_kwargs.get("num_beams") or 1)
        config = generate_kwargs.get("generation_config")
        if config is not None:
            per_row = int(generate_kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
            beams = int(generate_kwargs.get("num_beams") or config.num_beams or 1)
        # HF repeats each row for its beams / samples next to each other: the rows stay context-major
        expand = max(per_row, beams)
        if expand > 1:
            params = [t.repeat_interleave(expand, dim=0) for t in params]
        with self.adapters_active(params, None):
            new = generate_continuations(self.hf_model, prompts, pad_id=pad_id(self.tokenizer),
                                         eos_id=self.tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                                         **generate_kwargs)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        if per_row > 1:
            return [texts[i * per_row : (i + 1) * per_row] for i in range(n)]
        return texts

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the meta-parameters (safetensors) and a JSON header into directory ``path``.

        The header holds the PerkConfig, the base model's fingerprint and name, and the adapted
        projections; the base model itself is not written (load it as usual and pass it to :meth:`load`).
        """
        tensors = dict(self.named_meta_parameters())
        if not isinstance(self.inner_lrs, nn.Parameter):
            tensors["inner_lrs"] = self.inner_lrs
        save_tensors(path, "meta_parameters.safetensors", tensors)
        write_header(path, "perk_model.json", {
            "format": "perk_fast.PerkModel",
            "version": _FORMAT_VERSION,
            "config": self.config.to_dict(),
            "base_model": self.fingerprint(),
            "base_model_name_or_path": getattr(self.hf_model.config, "_name_or_path", None) or None,
            "sites": [s.name for s in self.sites],
        })

    save_pretrained = save

    @classmethod
    def load(cls, path: str | os.PathLike, hf_model: nn.Module, tokenizer: Any) -> "PerkModel":
        """Rebuild a PerkModel saved with :meth:`save` on ``hf_model`` (checked to be the same base)."""
        header = read_header(path, "perk_model.json", "perk_fast.PerkModel")
        config = PerkConfig.from_dict(header["config"])
        hf.check_causal_lm(hf_model)
        weights = [module.weight for _, module, *_ in find_sites(hf_model, config)]
        check_fingerprint(header["base_model"], hf_model, f"PerkModel at {path}", weights)
        model = cls(hf_model, tokenizer, config)
        model.load_meta_state(load_tensors(path, "meta_parameters.safetensors"))
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, hf_model: nn.Module | None = None, tokenizer: Any = None,
                        **hf_kwargs: Any) -> "PerkModel":
        """:meth:`load` under the Hugging Face name. Without ``hf_model`` / ``tokenizer`` the base is
        loaded from the name recorded at save time (``base_model_name_or_path``) with
        ``AutoModelForCausalLM`` / ``AutoTokenizer`` (``hf_kwargs`` go to the model's from_pretrained)."""
        if hf_model is None or tokenizer is None:
            header = read_header(path, "perk_model.json", "perk_fast.PerkModel")
            name = header.get("base_model_name_or_path")
            if not name:
                raise ValueError(f"PerkModel at {path} records no base_model_name_or_path: pass hf_model and tokenizer")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            hf_model = hf_model if hf_model is not None else AutoModelForCausalLM.from_pretrained(name, **hf_kwargs)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name)
        return cls.load(path, hf_model, tokenizer)

    @classmethod
    def from_reference_checkpoint(cls, path: str | os.PathLike, hf_model: nn.Module, tokenizer: Any,
                                  config: PerkConfig | None = None) -> "PerkModel":
        """A PerkModel holding the meta-parameters of a reference Lightning checkpoint (``.ckpt``).

        The checkpoint is read weights-only (anything but tensors and plain containers is refused,
        naming what was found). ``config`` defaults to ``PerkConfig.from_reference`` of the
        checkpoint's hyper-parameters. ``hf_model`` must be the base the checkpoint was trained on
        (its adapted projections are compared with the checkpoint's copy). The reference keeps
        T + 1 learned rates per tensor; the first T are used (the last never was).
        """
        from .refckpt import read_reference_checkpoint

        ckpt = read_reference_checkpoint(path)
        if config is None:
            from .config import REFERENCE_KEYS

            config = PerkConfig.from_reference({k: v for k, v in ckpt.hyper_parameters.items() if k in REFERENCE_KEYS})
        model = cls(hf_model, tokenizer, config)
        model.load_reference_checkpoint(path, _parsed=ckpt)
        return model

    def load_reference_checkpoint(self, path: str | os.PathLike, *, _parsed=None) -> None:
        """Copy the meta-parameters of a reference ``.ckpt`` into this PerkModel (see
        :meth:`from_reference_checkpoint`); every projection, shape and base weight is checked."""
        from .refckpt import read_reference_checkpoint

        ckpt = _parsed if _parsed is not None else read_reference_checkpoint(path)
        steps = self.config.inner_steps
        with torch.no_grad():
            for i, site in enumerate(self.sites):
                missing = [what for what, table in (("lora_A", ckpt.lora_a), ("lora_B", ckpt.lora_b),
                                                    ("learned rates of lora_A", ckpt.lrs_a),
                                                    ("learned rates of lora_B", ckpt.lrs_b)) if site.name not in table]
                if missing:
                    raise ValueError(f"{path}: no {', '.join(missing)} for projection {site.name}")
                base = ckpt.base.get(f"{site.name}.weight")
                if base is not None and (base.shape != site.module.weight.shape or not torch.equal(
                        base.to(site.module.weight), site.module.weight.detach())):
                    raise ValueError(f"{path} was trained on another base model: its {site.name}.weight differs "
                                     "from this model's")
                for name, dest, src in (("lora_A", self.lora_A[i], ckpt.lora_a[site.name]),
                                        ("lora_B", self.lora_B[i], ckpt.lora_b[site.name])):
                    if tuple(src.shape) != tuple(dest.shape):
                        raise ValueError(f"{path}: {name} of {site.name} has shape {tuple(src.shape)}, this PerkModel "
                                         f"{tuple(dest.shape)} (lora_rank={self.config.lora_rank})")
                    dest.copy_(src)
                for row, lrs in ((2 * i, ckpt.lrs_a[site.name]), (2 * i + 1, ckpt.lrs_b[site.name])):
                    if lrs.numel() not in (steps, steps + 1):
                        raise ValueError(f"{path}: {lrs.numel()} learned rates for {site.name}, expected "
                                         f"{steps + 1} (inner_steps={steps}, the reference keeps one more)")
                    self.inner_lrs[row].copy_(lrs[:steps])
            if self.weighting is not None:
                own = dict(self.weighting.named_parameters())
                if set(own) != set(ckpt.weighting):
                    raise ValueError(f"{path}: weighting model parameters {sorted(ckpt.weighting)} do not match "
                                     f"{sorted(own)}")
                for name, p in own.items():
                    p.copy_(ckpt.weighting[name])

    def init_memory(self) -> Memory:
        """The meta-learned initialisation as a one-context Memory (what every context starts from)."""
        return Memory([t.detach().unsqueeze(0).clone() for t in self.init_tensors()], [0], self.fingerprint(),
                      [s.name for s in self.sites], {"kind": "meta-learned initialisation"}, self.lora_settings())

    def export_init_peft(self, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> None:
        """Write the meta-learned LoRA initialisation as a PEFT adapter directory (:meth:`Memory.to_peft`)."""
        self.init_memory().to_peft(path, perk_model=self, base_model_name_or_path=base_model_name_or_path)

    def load_meta_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved meta-parameters in place (names and shapes must match exactly)."""
        own = dict(self.named_meta_parameters())
        if "inner_lrs" in tensors and "inner_lrs" not in own:
            own["inner_lrs"] = self.inner_lrs
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"meta-parameters do not match: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, t in own.items():
                if t.shape != tensors[name].shape:
                    raise ValueError(f"meta-parameter {name}: saved shape {tuple(tensors[name].shape)} != {tuple(t.shape)}")
                t.copy_(tensors[name])
