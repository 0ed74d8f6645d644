"""The learning-rate schedule of every outer loop: linear warmup, then cosine decay to zero.

One implementation serves meta-training (:func:`perk_fast.meta_train`), the FT-ICR baseline
(:func:`perk_fast.finetune_in_context`) and the demo's language-model pretraining. It differs
from ``transformers.get_cosine_schedule_with_warmup`` on purpose in one place: warmup step ``k``
(0-based) uses ``(k + 1) / warmup``, so the very first step already moves the parameters.
"""
from __future__ import annotations

import math

__all__ = ["warmup_steps", "warmup_cosine"]


def warmup_steps(total: int, proportion: float) -> int:
    """Warmup length for ``total`` steps: ``ceil(proportion * total)``."""
    return math.ceil(proportion * total)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Factor of the peak learning rate at 0-based ``step`` of ``total``.

    ``(step + 1) / warmup`` during the ``warmup`` first steps, then
    ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
