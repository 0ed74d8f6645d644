"""Every seed perk_fast derives, in one place, so that a run replays exactly.

A *call seed* identifies one ``meta_loss`` / meta-training step (``call_seed(config.seed, k)``);
from it come the doc-id shuffles and the LoRA dropout masks of that call. A *pass seed* fixes
the dropout masks of one forward pass (an inner step's micro-batch, or the outer pass); a *site
seed* fixes the mask of one adapted projection inside that pass. The data order of an epoch is
a seeded permutation. All are pure functions of their arguments (no global RNG state is read or
consumed), so replays in the meta-gradient's backward and resumed runs draw the same values.
"""
from __future__ import annotations

import hashlib
import random

__all__ = ["call_seed", "pass_seed", "site_seed", "epoch_order"]

_CALL_STRIDE = 1_000_003  # a prime: distinct (base, index) pairs give distinct seeds for index < stride
_MAX_SEED = 2**63 - 1


def call_seed(base: int, index: int) -> int:
    """The seed of call / step ``index`` of a run seeded with ``base``."""
    return base * _CALL_STRIDE + index


def pass_seed(seed: int, step: int | str, micro_batch: int = 0) -> int:
    """The seed of one forward pass: inner ``step`` (or ``"outer"``) and ``micro_batch`` of call ``seed``."""
    tag = f"{seed}:{step}:{micro_batch}".encode()
    return int.from_bytes(hashlib.blake2b(tag, digest_size=7).digest(), "little")


def site_seed(seed: int, site_index: int) -> int:
    """The seed of the dropout mask of projection ``site_index`` within the pass seeded ``seed``."""
    return (seed * _CALL_STRIDE + site_index) % _MAX_SEED


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits ``n`` examples (a seeded permutation)."""
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order
