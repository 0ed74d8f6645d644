"""Every seed perk_fast derives, in one place, so that a run replays exactly.

A *call seed* identifies one ``meta_loss`` / meta-training step (``call_seed(config.seed, k)``);
from it come the doc-id shuffles and the LoRA dropout masks of that call. A *pass seed* fixes
the dropout masks of one forward pass (an inner step, or the outer pass). The data order of an
epoch is a seeded permutation. All are pure functions of their arguments (no global RNG state is
read or consumed), so replays in the meta-gradient's backward and resumed runs draw the same values.

Randomness never depends on where a context is computed. A context is known by its *global
index* in the optimiser step's batch: its doc-id permutation comes from ``context_rng(seed,
index)``, and the dropout mask of each of its rows from a key of (pass seed, global index, the
row's segment index within the context) hashed together with the projection and the element's
position (:func:`keyed_uniform`, a counter-based generator, the same on CPU and CUDA). So one
process with B contexts, N processes with B/N each, or k accumulated micro-batches draw the same
masks and permutations, and padding or micro-batching never changes them.
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

import torch

__all__ = ["call_seed", "pass_seed", "site_seed", "epoch_order", "context_rng", "row_keys", "keyed_uniform"]

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


def context_rng(seed: int, context: int) -> random.Random:
    """The generator of context ``context``'s doc-id permutation in call ``seed``."""
    return random.Random(f"perk_fast/docs/{seed}/{context}")


def row_keys(seed: int, rows: Sequence[tuple[int, int]]) -> list[int]:
    """63-bit keys of rows ``(global context index, segment index)`` in the pass seeded ``seed``."""
    out = []
    for context, segment in rows:
        tag = f"{seed}:{context}:{segment}".encode()
        out.append(int.from_bytes(hashlib.blake2b(tag, digest_size=8).digest(), "little") & _MAX_SEED)
    return out


# splitmix64 (Steele, Lea, Flood 2014) in int64 arithmetic: products wrap modulo 2^64 and right
# shifts are made logical with a mask, so the bits equal the unsigned reference on every device.
def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GAMMA, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix(z: torch.Tensor) -> torch.Tensor:
    z = z + _GAMMA
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def keyed_uniform(keys: torch.Tensor, stream: int, length: int, features: int) -> torch.Tensor:
    """(rows, length, features) fp32 uniforms in [0, 1): element (r, t, k) is a hash of
    (``keys[r]``, ``stream``, t * features + k).

    A counter-based generator: an element's value depends only on its row key, the stream (the
    projection) and its own position, not on the tensor's shape -- a row padded to a longer
    length gets the same values at its real positions.
    """
    row = _splitmix(keys.to(torch.int64) ^ _splitmix(torch.tensor(stream, dtype=torch.int64, device=keys.device)))
    pos = torch.arange(length * features, dtype=torch.int64, device=keys.device).view(1, length, features)
    bits = _shr(_splitmix(row.view(-1, 1, 1) + pos), 40)  # the top 24 bits
    return bits.to(torch.float32) * (1.0 / (1 << 24))
