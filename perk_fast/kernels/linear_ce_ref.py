"""Pure-PyTorch twin of :mod:`perk_fast.kernels.linear_ce`, plus a full-logits reference.

Two kinds of code live here:

* ``linear_ce_forward_torch`` / ``linear_ce_double_backward_torch``: the chunked primitives the
  autograd Functions in ``linear_ce.py`` call when the Triton path is not taken (CPU, or backend
  ``torch``). They have exactly the signatures of the Triton launchers. Tokens are processed
  ``chunk_size`` rows at a time and every vocabulary-wide intermediate is computed *in place* in one
  reused (chunk_size, V) logits buffer (two in the double backward), so no full (N, V) tensor exists
  at any point -- the memory saving is real on CPU too.
* ``linear_cross_entropy_full``: the obvious full-logits implementation with plain autograd. Tests and
  benchmarks compare against it; it is what a model's ``lm_head`` + ``F.cross_entropy`` costs.

Notation (per token i): z_i = H_i W^T (V,), lse_i = logsumexp(z_i), P_i = softmax(z_i),
CE_i = lse_i - z_{i, y_i} (0 at ignored labels), r_i = P_i - e_{y_i}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "sum", "mean", "mean_all")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of losses, log-sum-exps and softmax maths: fp32 for half/bf16 inputs, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk_targets(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, target): valid marks non-ignored tokens, target is the label with ignored ones set to 0
    so that gather / scatter stay in range."""
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def linear_ce_forward_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked forward: per-token ``lse`` (N,), ``ce`` (N,) and, if ``compute_grad``,
    ``grad_ce`` (N, d) = r_i W = dCE_i/dH_i (zero rows at ignored tokens).

    ``grad_ce`` is computed here, while the chunk's logits are in hand, so the first backward is a
    row scaling (no logits recomputation): the same trade Liger-Kernel makes.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    lse = hidden.new_empty(n, dtype=acc)
    ce = hidden.new_empty(n, dtype=acc)
    grad_ce = hidden.new_empty(n, d) if compute_grad else None
    valid_all, target_all = _chunk_targets(labels, ignore_index)
    logits = hidden.new_empty(min(chunk_size, n), vocab)  # the only vocabulary-wide buffer
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z = torch.mm(hidden[start:end], weight.t(), out=logits[: end - start])
        zf = z if z.dtype == acc else z.to(acc)
        valid = valid_all[start:end, None]
        target = target_all[start:end, None]
        z_target = zf.gather(1, target)
        row_max = zf.amax(1, keepdim=True)
        zf.sub_(row_max).exp_()  # zf = exp(z - max), in place
        sum_exp = zf.sum(1, keepdim=True)
        lse_c = row_max + sum_exp.log()
        lse[start:end] = lse_c.squeeze(1)
        ce[start:end] = torch.where(valid, lse_c - z_target, 0.0).squeeze(1)
        if compute_grad:
            # softmax, with ignored rows divided by +inf so they become exactly 0
            zf.div_(torch.where(valid, sum_exp, float("inf")))
            zf.scatter_add_(1, target, -valid.to(acc))  # P - e_y on valid rows
            torch.mm(zf.to(hidden.dtype), weight, out=grad_ce[start:end])
    return lse, ce, grad_ce


def linear_ce_double_backward_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    adj_hidden: torch.Tensor | None,
    scale_p: torch.Tensor | None,
    scale_r: torch.Tensor | None,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked double-backward products, with q_i = adj_hidden_i W^T:

        hbar_i = [scale_p_i (P_i * q_i - P_i (P_i . q_i)) + scale_r_i (P_i - e_{y_i})] W   (N, d)
        t_i    = P_i . q_i - q_{i, y_i}                                                    (N,)

    ``scale_p`` goes with ``adj_hidden`` (both given or both None); ``scale_r`` may be None.
    Both scales must already be 0 at ignored tokens; ``t`` is 0 there and None without ``adj_hidden``.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    acc = lse.dtype
    hbar = hidden.new_empty(n, d)
    t = lse.new_empty(n) if adj_hidden is not None else None
    valid_all, target_all = _chunk_targets(labels, ignore_index)
    rows = min(chunk_size, n)
    logits = hidden.new_empty(rows, vocab)
    adj_logits = hidden.new_empty(rows, vocab) if adj_hidden is not None else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        z = torch.mm(hidden[start:end], weight.t(), out=logits[: end - start])
        p = z if z.dtype == acc else z.to(acc)
        p.sub_(lse[start:end, None]).exp_()  # softmax from the saved log-sum-exp
        target = target_all[start:end, None]
        if adj_hidden is not None:
            q = torch.mm(adj_hidden[start:end], weight.t(), out=adj_logits[: end - start])
            q = q if q.dtype == acc else q.to(acc)
            # batched row dot products without a (rows, V) temporary
            p_dot_q = torch.bmm(p.unsqueeze(1), q.unsqueeze(2)).view(-1, 1)
            t_c = torch.where(valid_all[start:end, None], p_dot_q - q.gather(1, target), 0.0)
            t[start:end] = t_c.squeeze(1)
            out = q.sub_(p_dot_q).mul_(p).mul_(scale_p[start:end, None])
            if scale_r is not None:
                out.addcmul_(p, scale_r[start:end, None])
        else:
            out = p.mul_(scale_r[start:end, None])
        if scale_r is not None:
            out.scatter_add_(1, target, -scale_r[start:end, None])
        torch.mm(out.to(hidden.dtype), weight, out=hbar[start:end])
    return hbar, t


def linear_cross_entropy_full(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Full-logits reference: materialises the (N, V) logits and lets autograd do everything."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; choose one of {REDUCTIONS}")
    acc = acc_dtype(hidden.dtype)
    logits = (hidden @ weight.t()).to(acc)  # (N, V)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if token_weights is not None:
        loss = loss * token_weights.to(acc)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (labels != ignore_index).sum().clamp(min=1)
    return loss.sum() / max(labels.shape[0], 1)
