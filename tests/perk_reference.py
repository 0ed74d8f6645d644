"""An independent PERK meta-loss, built the way the reference repository builds it.

Everything that is being checked is re-implemented here without perk_fast's engine:

* one context at a time (the reference's batch size 1), all its segments as the rows of
  one right-padded batch;
* a fresh copy of the Hugging Face base model (same class and config, sharing the frozen
  weights' storage), with LoRA added by plain ``nn.Module`` wrappers of our own:
  ``y = base(x) + s * (x Aᵀ) Bᵀ`` (PEFT's formula, s = ``config.lora_scale``);
* the ``higher`` library's unrolled inner loop: ``higher.innerloop_ctx`` over the decoder
  body, a differentiable AdamW (``TorchAdamW`` below) or higher's own ``DifferentiableSGD``,
  the learned per-step learning rates passed as tensors through ``override``, truncated /
  first-order steps by detaching the gradients in ``grad_callback`` (the update path
  p_{t+1}(p_t, lr_t) stays on the tape), everything else second order;
* full (tokens x vocab) logits and ``F.cross_entropy`` for both losses.

Only the tokenisation is shared with perk_fast (``perk_fast.data.build_segments`` /
``build_query``): it is not what is being checked.

Semantics (those of DESIGN.md section 1):

* inner loss of a context = sum over its segments and positions t of
  ``CE(h_t W_headᵀ, y_{t+1}) * w_{t+1}`` divided by ``ContextSegments.n_positions``, with h the
  final hidden state of the adapted model and ``w = softplus_{beta=3}(fc2(gelu(fc1(h))))``
  (1 without the weighting model);
* the learning rate of adapter tensor i at step t is ``inner_lrs[i, t]``, tensors ordered
  ``[A_0, B_0, A_1, B_1, ...]`` in ``PerkModel.sites`` order; every context starts from the
  shared initialisation ``lora_A[i]``, ``lora_B[i]``;
* outer loss = mean over contexts of the mean CE on the target tokens of the question row,
  computed with that context's adapted LoRA.

Why a custom AdamW: higher 0.2.1 has no AdamW, and its ``DifferentiableAdam`` differs from
``torch.optim.AdamW`` twice: L2 weight decay added to the gradient (not decoupled) and eps
added to the *uncorrected* ``sqrt(v)`` (torch adds it after dividing by ``sqrt(1 - b2^t)``).
``TorchAdamW`` is a ``higher.optim.DifferentiableOptimizer`` subclass that follows torch's
AdamW exactly and guards ``sqrt`` at v = 0 the way higher does (a gradient hook from
``higher.optim._maybe_mask`` that zeroes the adjoint of v where v == 0).

Qwen2 / Llama: their forward slices ``self.layers[:n]``, which higher's patched ``ModuleList``
cannot rebuild; every ``ModuleList`` of the copy is switched to ``_SliceToList``, whose slices
are plain lists. LoRA dropout is not reproduced (raise if it would be active).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Sequence

import higher
import higher.optim
import torch
import torch.nn.functional as F
from torch import nn

from perk_fast.data import IGNORE, build_query, build_segments, pad_id, pad_rows
from perk_fast.seeds import context_rng

__all__ = ["ReferencePerk", "reference_meta_loss", "TorchAdamW", "LoraProjection"]


# --------------------------------------------------------------------------- optimiser
class TorchAdamW(higher.optim.DifferentiableOptimizer):
    """``torch.optim.AdamW`` as a differentiable ``higher`` optimiser.

    Per tensor, at step k = 1, 2, ...::

        p <- p (1 - lr wd)
        m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g²
        p <- p - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)

    ``lr`` may be a tensor (a learned learning rate passed through ``override``).
    """

    def _update(self, grouped_grads, **kwargs) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                k = state["step"]
                p = p * (1 - lr * wd)
                m = state["exp_avg"] * beta1 + (1 - beta1) * g
                v = state["exp_avg_sq"] * beta2 + (1 - beta2) * (g * g)
                # sqrt'(0) = inf: zero the adjoint of v where v == 0 (higher's own guard)
                higher.optim._maybe_mask(v, v == 0)
                state["exp_avg"], state["exp_avg_sq"] = m, v
                denom = v.sqrt() / math.sqrt(1 - beta2**k) + eps
                group["params"][p_idx] = p - (lr / (1 - beta1**k)) * (m / denom)


higher.register_optim(torch.optim.AdamW, TorchAdamW)


# --------------------------------------------------------------------------- model surgery
class LoraProjection(nn.Module):
    """A frozen projection plus a LoRA branch: ``base(x) + scale * (x Aᵀ) Bᵀ``.

    ``base`` is the original ``nn.Linear`` or GPT-2 ``Conv1D`` (its own forward handles the
    (in, out) storage of Conv1D). A (r, in) and B (out, r) are the module's parameters,
    so ``higher`` treats them as fast weights.
    """

    def __init__(self, base: nn.Module, lora_a: nn.Parameter, lora_b: nn.Parameter, scale: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        low_rank = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return y + (self.scale * low_rank).to(y.dtype)


class _SliceToList(nn.ModuleList):
    """A ModuleList whose slices are plain lists (higher's patched ModuleList cannot rebuild one)."""

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return list(self._modules.values())[idx]
        return super().__getitem__(idx)


def fresh_base_copy(hf_model: nn.Module) -> nn.Module:
    """A new instance of ``hf_model``'s class and config holding the same (frozen) weights.

    Built on the meta device, then the weights are *assigned* (shared storage, no copy);
    non-persistent buffers and tensor attributes left on the meta device are taken from
    ``hf_model``. Nothing of perk_fast's projection patching comes along.
    """
    config = copy.deepcopy(hf_model.config)
    with torch.device("meta"):
        model = type(hf_model)(config)
    model.load_state_dict(hf_model.state_dict(), strict=False, assign=True)
    sources = dict(hf_model.named_modules())
    for name, module in model.named_modules():
        src = sources[name]
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[key] = src._buffers[key]
        for key, val in list(vars(module).items()):
            if isinstance(val, torch.Tensor) and val.is_meta:
                setattr(module, key, getattr(src, key))
        for key, param in list(module._parameters.items()):
            if param is not None and param.is_meta:  # tied weights absent from the state dict
                module._parameters[key] = src._parameters[key]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _decoder_body(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


# --------------------------------------------------------------------------- losses
def _weights(hidden: torch.Tensor, weighting: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
    """softplus_{beta=3}(fc2(gelu(fc1(h)))), (rows, L); None without a weighting model."""
    if weighting is None:
        return None
    h = hidden.to(weighting["fc1.weight"].dtype)
    z = F.linear(F.gelu(F.linear(h, weighting["fc1.weight"], weighting["fc1.bias"])),
                 weighting["fc2.weight"], weighting["fc2.bias"])
    return F.softplus(z.squeeze(-1), beta=3.0)


def _token_ce(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-position next-token CE from full logits: (rows, L-1), 0 at ignored labels."""
    logits = F.linear(hidden[:, :-1], head).to(dtype)
    target = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         ignore_index=IGNORE, reduction="none")
    return ce.view(target.shape)


# --------------------------------------------------------------------------- the reference
class ReferencePerk:
    """The reference PERK meta-loss over a fresh copy of ``pm``'s base model.

    Build once, call :meth:`meta_loss` many times; every call clones ``pm``'s current
    meta-parameters into new leaf tensors (returned by name) so gradients can be compared.
    """

    def __init__(self, pm: Any) -> None:
        self.pm = pm
        self.config = pm.config
        self.model = fresh_base_copy(pm.hf_model)
        self.body = _decoder_body(self.model)
        for module in self.body.modules():
            if type(module) is nn.ModuleList:
                module.__class__ = _SliceToList
        self.head = self.model.get_output_embeddings().weight
        # same maths, other summation order: reversed segment rows (a probe of rounding noise)
        self.reverse_segments = False
        self.meta_dtype = pm.lora_A[0].dtype
        self.loss_dtype = torch.float64 if self.head.dtype == torch.float64 else torch.float32
        self.projections: list[LoraProjection] = []
        modules = dict(self.body.named_modules())
        prefix = self.model.base_model_prefix + "."
        device = self.head.device
        for site in pm.sites:  # pm.sites only fixes which projections, and their order
            name = site.name[len(prefix):] if site.name.startswith(prefix) else site.name
            parent_name, _, leaf = name.rpartition(".")
            parent = modules[parent_name] if parent_name else self.body
            base = getattr(parent, leaf)
            rank = self.config.lora_rank
            a = nn.Parameter(torch.zeros(rank, 1, dtype=self.meta_dtype, device=device))
            b = nn.Parameter(torch.zeros(1, rank, dtype=self.meta_dtype, device=device))
            wrapped = LoraProjection(base, a, b, self.config.lora_scale)
            setattr(parent, leaf, wrapped)
            self.projections.append(wrapped)

    # ------------------------------------------------------------------ meta-parameters
    def clone_meta_parameters(self) -> dict[str, torch.Tensor]:
        """Fresh leaf copies of ``pm``'s meta-parameters, installed into the LoRA wrappers."""
        pm = self.pm
        leaves: dict[str, torch.Tensor] = {}
        for i, proj in enumerate(self.projections):
            proj.lora_a = nn.Parameter(pm.lora_A[i].detach().clone())
            proj.lora_b = nn.Parameter(pm.lora_B[i].detach().clone())
            leaves[f"lora_A.{i}"] = proj.lora_a
            leaves[f"lora_B.{i}"] = proj.lora_b
        leaves["inner_lrs"] = pm.inner_lrs.detach().clone().requires_grad_(isinstance(pm.inner_lrs, nn.Parameter))
        if pm.weighting is not None:
            for name, p in pm.weighting.named_parameters():
                leaves[f"weighting.{name}"] = p.detach().clone().requires_grad_(True)
        return leaves

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = []
        for proj in self.projections:
            groups += [{"params": [proj.lora_a]}, {"params": [proj.lora_b]}]
        if cfg.inner_optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.inner_lr, betas=cfg.inner_betas, eps=cfg.inner_eps,
                                     weight_decay=cfg.inner_weight_decay)
        return torch.optim.SGD(groups, lr=cfg.inner_lr, momentum=0.0, weight_decay=cfg.inner_weight_decay)

    # ------------------------------------------------------------------ one context
    def _hidden(self, fbody: nn.Module, input_ids: torch.Tensor, second_order: bool) -> torch.Tensor:
        attention = contextlib.nullcontext()
        if second_order:  # fused SDPA backends have no double backward
            from torch.nn.attention import SDPBackend, sdpa_kernel

            attention = sdpa_kernel(SDPBackend.MATH)
        with attention:
            return fbody(input_ids=input_ids, use_cache=False).last_hidden_state

    def context_loss(self, segments, query, leaves: dict[str, torch.Tensor]) -> torch.Tensor:
        """Outer loss of one context: T higher steps on its segments, then the question's mean CE."""
        cfg = self.config
        tok = self.pm.tokenizer
        device = self.head.device
        rows = segments.segments[::-1] if self.reverse_segments else segments.segments
        ids = pad_rows([s for s, _ in rows], pad_id(tok)).to(device)
        labels = pad_rows([l for _, l in rows], IGNORE).to(device)
        n_positions = segments.n_positions
        weighting = None
        if self.pm.weighting is not None:
            weighting = {k[len("weighting."):]: v for k, v in leaves.items() if k.startswith("weighting.")}
        lrs = leaves["inner_lrs"]
        n_tensors = 2 * len(self.projections)

        def detach_grads(grads):
            return [None if g is None else g.detach() for g in grads]

        opt = self._optimizer()
        with higher.innerloop_ctx(self.body, opt, copy_initial_weights=False) as (fbody, diffopt):
            for t in range(cfg.inner_steps):
                second_order = cfg.unroll == "full" or (cfg.unroll == "truncated" and t >= cfg.unroll_start)
                # higher always builds the double-backward graph (create_graph=True), so every
                # inner pass needs twice-differentiable attention, even when its gradient is detached
                hidden = self._hidden(fbody, ids, second_order=True)
                ce = _token_ce(hidden, self.head, labels, self.loss_dtype)
                w = _weights(hidden, weighting)
                if w is not None:
                    ce = ce * w[:, 1:].to(ce.dtype)
                inner = ce.sum() / n_positions
                diffopt.step(
                    inner,
                    override={"lr": [lrs[i, t] for i in range(n_tensors)]},
                    grad_callback=None if second_order else detach_grads,
                )
            q_ids, q_labels = (x.to(device).unsqueeze(0) for x in query)
            hidden = self._hidden(fbody, q_ids, second_order=False)
            ce = _token_ce(hidden, self.head, q_labels, self.loss_dtype)
            return ce.sum() / (q_labels[:, 1:] != IGNORE).sum().clamp_min(1)

    def encode_context(self, segments) -> list[torch.Tensor]:
        """Test-time encoding of one context as the reference does it: ``higher`` with
        ``track_higher_grads=False`` over the copied base, T steps; returns [A_0, B_0, ...]."""
        cfg = self.config
        tok = self.pm.tokenizer
        device = self.head.device
        ids = pad_rows([s for s, _ in segments.segments], pad_id(tok)).to(device)
        labels = pad_rows([l for _, l in segments.segments], IGNORE).to(device)
        leaves = self.clone_meta_parameters()
        weighting = None
        if self.pm.weighting is not None:
            weighting = {k[len("weighting."):]: v for k, v in leaves.items() if k.startswith("weighting.")}
        lrs = leaves["inner_lrs"].detach()
        n_tensors = 2 * len(self.projections)
        opt = self._optimizer()
        with higher.innerloop_ctx(self.body, opt, copy_initial_weights=False, track_higher_grads=False) as (
                fbody, diffopt):
            for t in range(cfg.inner_steps):
                hidden = fbody(input_ids=ids, use_cache=False).last_hidden_state
                ce = _token_ce(hidden, self.head, labels, self.loss_dtype)
                w = _weights(hidden, weighting)
                if w is not None:
                    ce = ce * w[:, 1:].to(ce.dtype)
                diffopt.step(ce.sum() / segments.n_positions, override={"lr": [lrs[i, t] for i in range(n_tensors)]})
            names = {id(p): n for n, p in self.body.named_parameters()}
            fast = dict(zip([n for n, _ in self.body.named_parameters()], fbody.parameters()))
        out = []
        for proj in self.projections:
            out.append(fast[names[id(proj.lora_a)]].detach())
            out.append(fast[names[id(proj.lora_b)]].detach())
        return out

    # ------------------------------------------------------------------ the batch
    def meta_loss(
        self,
        contexts: Sequence[Any],
        questions: Sequence[str],
        answers: Sequence[str],
        supports: Sequence[Any] | None = None,
        rng_seed: int | None = None,
        backward: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(outer loss, {meta-parameter name: leaf}) for a batch, one context at a time.

        Doc ids are shuffled exactly when ``pm`` would (training mode and
        ``shuffle_docs``), context i's from ``perk_fast.seeds.context_rng(rng_seed, i)`` (the
        permutation is part of the data, like the tokenisation). ``backward=True`` backpropagates
        each context's share as soon as it is computed (the reference's batch-size-1
        memory profile) and returns the loss detached; the gradients are in the leaves' ``.grad``.
        """
        pm, cfg = self.pm, self.config
        if pm.training and cfg.lora_dropout > 0:
            raise NotImplementedError("the reference does not reproduce LoRA dropout: use pm.eval() or lora_dropout=0")
        shuffle = pm.training and cfg.shuffle_docs
        if shuffle and rng_seed is None:
            raise ValueError("pm is in training mode (doc ids shuffled): pass the same rng_seed as meta_loss's seed")
        tok = pm.tokenizer
        segments = [build_segments(tok, c, cfg.segment_len, context_rng(rng_seed, i) if shuffle else None,
                                   where=f"contexts[{i}]") for i, c in enumerate(contexts)]
        leaves = self.clone_meta_parameters()
        total = None
        for i, seg in enumerate(segments):
            support = None if supports is None else supports[i]
            row_ids, row_labels = build_query(tok, questions[i], answers[i], support, seg.n_docs)
            query = (torch.tensor(row_ids), torch.tensor(row_labels))
            loss = self.context_loss(seg, query, leaves) / len(segments)
            if backward:
                loss.backward()
                loss = loss.detach()
            total = loss if total is None else total + loss
        return total, leaves


def reference_meta_loss(pm, contexts, questions, answers, supports=None, rng_seed=None):
    """One-shot :meth:`ReferencePerk.meta_loss` (builds the base-model copy each call)."""
    return ReferencePerk(pm).meta_loss(contexts, questions, answers, supports, rng_seed=rng_seed)
