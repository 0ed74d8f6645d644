"""PerkModel: a frozen Hugging Face causal LM plus PERK's meta-parameters.

Meta-parameters (``PerkModel.meta_parameters()``):

* the LoRA initialisation ``lora_A[i]`` (r, in) and ``lora_B[i]`` (out, r) per target projection;
* the learned inner learning rates ``inner_lrs`` (2 * sites, T): one per adapter tensor and step;
* the token-weighting model (when ``weighted_loss``).

They are fp32 (fp64 when the base is fp64) even when the base model is bf16.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .config import PerkConfig
from .data import (
    IGNORE,
    build_query,
    build_segments,
    check_text,
    make_micro_batches,
    pad_id,
    pad_rows,
    query_prompt,
)
from .inner import run_inner_loop
from .lora import ActiveAdapters, AdapterSlot, init_lora_tensors, inject_lora
from .loss import WeightingModel, lm_head_loss_sum
from .metagrad import checkpointed_inner_loop

_FORMAT_VERSION = 1


def model_fingerprint(hf_model: nn.Module) -> dict[str, Any]:
    """What identifies a base model: its config (hashed) and a digest of its embeddings.

    The digest samples the first rows of the input embeddings rounded to bf16, so it
    survives fp32/fp64/bf16 casts and device moves but tells differently
    initialised or trained weights apart.
    """
    cfg = hf_model.config.to_dict()
    volatile = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
                "attn_implementation", "_attn_implementation_autoset", "use_cache", "architectures"}
    stable = {k: v for k, v in cfg.items() if k not in volatile}
    config_hash = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    emb = hf_model.get_input_embeddings().weight.detach()[:64].to("cpu", torch.bfloat16).contiguous()
    weights_hash = hashlib.sha256(emb.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    return {"model_type": cfg.get("model_type"), "config_sha": config_hash, "weights_sha": weights_hash}


def read_header(path: str | os.PathLike, name: str, fmt: str) -> dict[str, Any]:
    """The JSON header ``name`` of a saved directory, checked to be of format ``fmt``."""
    header_path = os.path.join(path, name)
    if not os.path.exists(header_path):
        raise FileNotFoundError(f"{header_path} not found: not a saved {fmt.split('.')[-1]} directory")
    with open(header_path) as fh:
        header = json.load(fh)
    if header.get("format") != fmt:
        raise ValueError(f"{header_path}: format {header.get('format')!r} is not a {fmt}")
    return header


def check_fingerprint(expected: dict[str, Any], hf_model: nn.Module, what: str) -> None:
    """Raise ValueError if ``hf_model`` is not the base model ``expected`` describes."""
    actual = model_fingerprint(hf_model)
    if expected != actual:
        raise ValueError(
            f"{what} belongs to a different base model: saved for {expected}, but this model is {actual}"
        )


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
        if not isinstance(hf_model, nn.Module) or not hasattr(hf_model, "config"):
            raise TypeError(f"hf_model must be a transformers model, got {type(hf_model).__name__}")
        model_type = getattr(hf_model.config, "model_type", type(hf_model).__name__)
        prefix = getattr(hf_model, "base_model_prefix", "")
        if not prefix or not isinstance(getattr(hf_model, prefix, None), nn.Module):
            raise ValueError(f"model type {model_type!r}: no decoder body (base_model_prefix) found; need a *ForCausalLM")
        head = hf_model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"model type {model_type!r}: no output embeddings (LM head) found; need a *ForCausalLM")
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"model type {model_type!r}: LM heads with a bias are not supported")
        attn = getattr(hf_model.config, "_attn_implementation", None)
        if attn not in (None, "eager", "sdpa"):
            raise ValueError(
                f"model type {model_type!r} uses attn_implementation={attn!r}; PERK's second-order passes need "
                "'sdpa' or 'eager' (fused kernels are still used where no second order is needed)"
            )
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
        self._inner_losses: list[torch.Tensor] = []
        super().train(False)

    # ------------------------------------------------------------------ basics
    @property
    def body(self) -> nn.Module:
        """The decoder without its LM head (its output is the final normed hidden state)."""
        return getattr(self.hf_model, self.hf_model.base_model_prefix)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.hf_model.get_output_embeddings().weight

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def meta_dtype(self) -> torch.dtype:
        return self.lora_A[0].dtype

    def train(self, mode: bool = True) -> "PerkModel":
        """Training mode enables LoRA dropout and doc-id shuffling; the base stays in eval."""
        super().train(mode)
        self.hf_model.eval()
        return self

    def to(self, *args: Any, **kwargs: Any) -> "PerkModel":
        """Like ``nn.Module.to``; meta-parameters stay fp32 when the base goes to fp16/bf16."""
        super().to(*args, **kwargs)
        for t in self._meta_tensors():
            if t.dtype in (torch.float16, torch.bfloat16):
                t.data = t.data.float()
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

    def record_inner_loss(self, step: int, value: torch.Tensor) -> None:
        """Called by the inner loop once per step (kept as tensors: no host sync here)."""
        if step == 0:
            self._inner_losses = []
        self._inner_losses.append(value)

    def inner_lr_table(self) -> torch.Tensor:
        """(2 * sites, T) learning rates, row 2i for A_i and 2i+1 for B_i."""
        return self.inner_lrs

    def initial_adapters(self, n_contexts: int) -> list[torch.Tensor]:
        """The meta-initialisation broadcast to ``n_contexts`` contexts: [A_0, B_0, A_1, ...]."""
        out = []
        for a, b in zip(self.lora_A, self.lora_B):
            out.append(a.unsqueeze(0).expand(n_contexts, *a.shape))
            out.append(b.unsqueeze(0).expand(n_contexts, *b.shape))
        return out

    def pass_seed(self, seed: int | None, step: int | str, micro_batch: int = 0) -> int | None:
        """Seed of one forward pass's dropout masks, derived from the call's seed."""
        if seed is None or not self.training or self.config.lora_dropout == 0:
            return None
        tag = f"{seed}:{step}:{micro_batch}".encode()
        return int.from_bytes(hashlib.blake2b(tag, digest_size=7).digest(), "little")

    # ------------------------------------------------------------------ forward passes
    @contextlib.contextmanager
    def adapters_active(self, params: Sequence[torch.Tensor], dropout_seed: int | None = None):
        """Make the projections use ``params`` ([A_0, B_0, ...], context-major rows)."""
        pairs = [(params[2 * i], params[2 * i + 1]) for i in range(len(self.sites))]
        self._slot.active = ActiveAdapters(pairs, self.config.lora_scale, self.config.lora_dropout, dropout_seed)
        try:
            yield
        finally:
            self._slot.active = None

    def hidden_states(
        self, input_ids: torch.Tensor, params: Sequence[torch.Tensor], *, seed: int | None, second_order: bool
    ) -> torch.Tensor:
        """Final hidden states (rows, L, d) of the adapted model.

        ``second_order``: the pass will be differentiated twice, so attention must
        use a twice-differentiable path (math SDPA); otherwise fused SDPA backends
        are allowed.
        """
        attention = contextlib.nullcontext()
        if second_order:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            attention = sdpa_kernel(SDPBackend.MATH)
        with self.adapters_active(params, seed), attention:
            return self.body(input_ids=input_ids, use_cache=False).last_hidden_state

    def inner_loss(self, params: Sequence[torch.Tensor], mb, *, seed: int | None, second_order: bool) -> torch.Tensor:
        """Token-weighted inner loss of one micro-batch: sum over its contexts of their partial means."""
        if mb.contexts.numel() != params[0].shape[0] or not torch.equal(
            mb.contexts, torch.arange(params[0].shape[0], device=mb.contexts.device)
        ):
            params = [p.index_select(0, mb.contexts) for p in params]
        hidden = self.hidden_states(mb.input_ids, params, seed=seed, second_order=second_order)
        d = hidden.shape[-1]
        h = hidden[:, :-1]
        labels = mb.labels[:, 1:]
        if self.weighting is not None:
            w = self.weighting(hidden)[:, 1:]
        else:
            w = torch.ones(labels.shape, dtype=self.meta_dtype, device=labels.device)
        w = w * mb.row_scale.to(w.dtype)[:, None]
        return lm_head_loss_sum(
            h.reshape(-1, d), self.lm_head_weight, labels.reshape(-1), w.reshape(-1),
            mode=self.config.lm_head_loss, chunk_size=self.config.lm_head_chunk_size,
        )

    def outer_loss(self, params: Sequence[torch.Tensor], query: tuple[torch.Tensor, torch.Tensor], *, seed=None):
        """Mean over contexts of the mean CE on each question's target tokens."""
        input_ids, labels = query
        hidden = self.hidden_states(input_ids, params, seed=self.pass_seed(seed, "outer"), second_order=False)
        d = hidden.shape[-1]
        labels = labels[:, 1:]
        counts = (labels != IGNORE).sum(1).clamp_min(1)
        w = (1.0 / (counts.to(self.meta_dtype) * labels.shape[0]))[:, None].expand(labels.shape)
        return lm_head_loss_sum(
            hidden[:, :-1].reshape(-1, d), self.lm_head_weight, labels.reshape(-1), w.reshape(-1),
            mode=self.config.lm_head_loss, chunk_size=self.config.lm_head_chunk_size,
        )

    # ------------------------------------------------------------------ data
    def _check_batch(self, contexts, questions, answers=None, supports=None) -> None:
        if isinstance(contexts, str) or not isinstance(contexts, Sequence):
            raise TypeError("contexts must be a list of contexts (each a string or a list of documents)")
        n = len(contexts)
        if n == 0:
            raise ValueError("contexts is empty: pass at least one context")
        for name, values in (("questions", questions), ("answers", answers), ("supports", supports)):
            if values is None:
                continue
            if isinstance(values, str) or not isinstance(values, Sequence):
                raise TypeError(f"{name} must be a list with one entry per context")
            if len(values) != n:
                raise ValueError(f"{len(values)} {name} for {n} contexts: pass one per context")
        for i, q in enumerate(questions or []):
            check_text(q, f"questions[{i}]")
        for i, a in enumerate(answers or []):
            check_text(a, f"answers[{i}]")

    def segment_contexts(self, contexts, rng: random.Random | None = None):
        """Tokenise contexts into segments (doc ids permuted when ``rng`` is given)."""
        return [
            build_segments(self.tokenizer, c, self.config.segment_len, rng, where=f"contexts[{i}]")
            for i, c in enumerate(contexts)
        ]

    def query_batch(self, questions, answers, supports, n_docs) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (input ids, labels) of the question rows."""
        rows = [
            build_query(self.tokenizer, q, a, None if supports is None else supports[i], n_docs[i])
            for i, (q, a) in enumerate(zip(questions, answers))
        ]
        pad = pad_id(self.tokenizer)
        ids = pad_rows([r[0] for r in rows], pad).to(self.device)
        labels = pad_rows([r[1] for r in rows], IGNORE).to(self.device)
        return ids, labels

    # ------------------------------------------------------------------ PERK
    def next_seed(self) -> int:
        """A fresh per-call seed (doc-id shuffle, dropout masks) from ``config.seed`` and a counter."""
        self._calls += 1
        return self.config.seed * 1_000_003 + self._calls

    def adapt(self, segments, *, seed: int | None) -> list[torch.Tensor]:
        """Adapted adapters [A_0, B_0, ...] of the contexts, differentiable w.r.t. the meta-parameters."""
        micro = make_micro_batches(segments, self.config.segments_per_step, pad_id(self.tokenizer), self.device)
        if self.config.meta_grad in ("checkpointed", "recomputed"):
            return checkpointed_inner_loop(self, micro, len(segments), seed=seed)
        # under no_grad nothing is differentiated: the same values without any graph
        return run_inner_loop(
            self, self.initial_adapters(len(segments)), micro, differentiable=torch.is_grad_enabled(), seed=seed
        )

    def meta_loss(self, contexts, questions, answers, supports=None, *, seed: int | None = None) -> torch.Tensor:
        """Outer loss of a batch of B contexts, differentiable w.r.t. ``meta_parameters()``.

        Each context is written into its own adapter by ``inner_steps`` steps of the
        inner optimiser (its own loss, exactly as if alone), then question i is scored
        with memory i; the result is the mean over contexts. ``seed`` fixes the doc-id
        permutation and the dropout masks of this call (default: a fresh one).
        """
        self._check_batch(contexts, questions, answers, supports)
        seed = self.next_seed() if seed is None else seed
        rng = random.Random(seed) if (self.training and self.config.shuffle_docs) else None
        segments = self.segment_contexts(contexts, rng)
        adapted = self.adapt(segments, seed=seed)
        query = self.query_batch(questions, answers, supports, [s.n_docs for s in segments])
        return self.outer_loss(adapted, query, seed=seed)

    def generate(self, memory, questions: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers: question i from memory i (or one memory for all questions)."""
        from .memory import Memory

        if not isinstance(memory, Memory):
            raise TypeError(f"memory must be a perk_fast.Memory (from encode), got {type(memory).__name__}")
        check_fingerprint(memory.fingerprint, self.hf_model, "memory")
        if isinstance(questions, str) or not isinstance(questions, Sequence) or len(questions) == 0:
            raise ValueError("questions must be a non-empty list of strings")
        for i, q in enumerate(questions):
            check_text(q, f"questions[{i}]")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: allowed an integer >= 1")
        n = len(questions)
        if len(memory) == 1 and n > 1:
            memory = memory.expand(n)
        elif len(memory) != n:
            raise ValueError(f"{n} questions for a memory of {len(memory)} contexts: pass one per context, or one memory")
        prompts = [self.tokenizer.encode(query_prompt(q, memory.n_docs[i]), add_special_tokens=False)
                   for i, q in enumerate(questions)]
        pad = pad_id(self.tokenizer)
        length = max(len(p) for p in prompts)
        ids = torch.full((n, length), pad, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: generation continues every row at the end
            ids[i, length - len(p):] = torch.tensor(p)
            mask[i, length - len(p):] = 1
        params = [t.to(self.device) for t in memory.tensors]
        with torch.no_grad(), self.adapters_active(params, None):
            out = self.hf_model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
            )
        return [self.tokenizer.decode(row[length:], skip_special_tokens=True).strip() for row in out.tolist()]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the meta-parameters (safetensors) and a JSON header into directory ``path``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in self.named_meta_parameters()}
        if not isinstance(self.inner_lrs, nn.Parameter):
            tensors["inner_lrs"] = self.inner_lrs.detach().cpu().contiguous()
        save_file(tensors, os.path.join(path, "meta_parameters.safetensors"))
        header = {
            "format": "perk_fast.PerkModel",
            "version": _FORMAT_VERSION,
            "config": self.config.to_dict(),
            "base_model": model_fingerprint(self.hf_model),
            "sites": [s.name for s in self.sites],
        }
        with open(os.path.join(path, "perk_model.json"), "w") as fh:
            json.dump(header, fh, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike, hf_model: nn.Module, tokenizer: Any) -> "PerkModel":
        """Rebuild a PerkModel saved with :meth:`save` on ``hf_model`` (checked to be the same base)."""
        from safetensors.torch import load_file

        header = read_header(path, "perk_model.json", "perk_fast.PerkModel")
        check_fingerprint(header["base_model"], hf_model, f"PerkModel at {path}")
        model = cls(hf_model, tokenizer, PerkConfig.from_dict(header["config"]))
        tensors = load_file(os.path.join(path, "meta_parameters.safetensors"))
        model.load_meta_state(tensors)
        return model

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
