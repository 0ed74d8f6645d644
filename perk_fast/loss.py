"""Losses of PERK: the token-weighting model, the weighted inner loss, the outer loss.

Both losses end in the LM head. That part is swappable (``PerkConfig.lm_head_loss``):

* ``chunked`` — ``perk_fast.kernels.linear_ce.linear_cross_entropy``: never holds more
  than one chunk of (tokens x vocab) logits, forward, backward and double backward
  (Triton on CUDA, a chunked PyTorch twin elsewhere).
* ``full`` — plain full logits + ``F.cross_entropy``; the reference path.

Both take per-token weights that may depend on the adapter (they are differentiable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightingModel(nn.Module):
    """Token weights ``w_t = softplus_{beta=3}(fc2(gelu(fc1(h_t))))``.

    fc1: hidden -> ``width``, fc2: ``width`` -> 1, fc2 zero-initialised so every
    weight starts at ln(2)/3. ``h`` is the final (normed) hidden state of the
    adapted model, not detached. Computed in the weighting model's dtype.
    """

    def __init__(self, hidden_size: int, width: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (...) positive weights."""
        h = hidden.to(self.fc1.weight.dtype)
        return F.softplus(self.fc2(F.gelu(self.fc1(h))).squeeze(-1), beta=3.0)


def labelled_tokens(hidden: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor):
    """(hidden, labels, token_weights) restricted to the rows whose label is not -100 (unchanged when
    every row has one). Differentiable (an index_select) to any order."""
    keep = labels != -100
    if bool(keep.all()):
        return hidden, labels, token_weights
    index = keep.nonzero().squeeze(1)
    return hidden.index_select(0, index), labels.index_select(0, index), token_weights.index_select(0, index)


def lm_head_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    mode: str = "chunked",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``sum_i token_weights_i * CE(hidden_i Wᵀ, labels_i)`` over tokens whose label != -100.

    hidden (N, d), weight (V, d) frozen, labels (N,), token_weights (N,). Returns a
    0-dim tensor in fp32 (fp64 when the inputs are fp64).

    The LM head runs only on the labelled tokens: the others (a question's prompt, a segment's
    ``doc_i:`` prefix, padding) are dropped first, so their logits are never computed, in the
    forward or in either backward (the same value; on CUDA, finding them costs one host sync).
    """
    hidden, labels, token_weights = labelled_tokens(hidden, labels, token_weights)
    if mode == "chunked":
        from .kernels.linear_ce import linear_cross_entropy

        return linear_cross_entropy(
            hidden, weight, labels, token_weights=token_weights, reduction="sum", chunk_size=chunk_size
        )
    if mode == "full":
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logits = (hidden @ weight.t()).to(out_dtype)
        ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
        return (ce * token_weights.to(out_dtype)).sum()
    raise ValueError(f"lm_head_loss mode={mode!r} is invalid: allowed 'chunked', 'full'")
