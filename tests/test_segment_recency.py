"""PerkConfig.segment_recency: segment j of a context's S segments weighted 1 - r + r (j + 1) / S in the
inner loss. Checked: the weights against a hand computation from the segments, r = 0 is the plain loss
bit for bit, batching and micro-batching never change a memory written with it, it is validated, and
it writes the later of two facts more strongly. (Exact meta-gradients in every meta_grad mode with it:
tests/test_engine.py::test_checkpointed_equals_unrolled.)"""
from __future__ import annotations

import math

import pytest
import torch

from perk_fast import PerkConfig, encode
from perk_fast.data import make_micro_batches

from test_engine import make
from tiny_models import CONTEXTS, TOKENIZER, perturb_lora_b


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, True, "0.5"])
def test_bad_segment_recency_is_named(value):
    with pytest.raises(ValueError, match=r"PerkConfig.segment_recency=.* is invalid"):
        PerkConfig(segment_recency=value)


def test_row_positions_are_segment_rank_over_segment_count():
    pm = make(segments_per_step=2)
    segs = pm.segment_contexts(CONTEXTS)
    counts = [len(s.segments) for s in segs]
    assert max(counts) > 2 and min(counts) < max(counts)  # several micro-batches, uneven contexts
    seen = {}
    for mb in make_micro_batches(segs, 2, TOKENIZER.pad_token_id):
        for (ctx, j), pos in zip(mb.row_ids, mb.row_position.tolist()):
            assert pos == (0.0 if j < 0 else (j + 1) / counts[ctx])
            if j >= 0:
                seen.setdefault(ctx, []).append(j)
    assert all(sorted(seen[c]) == list(range(counts[c])) for c in range(len(CONTEXTS)))


def _per_row_losses(pm, params, mb):
    """The inner loss of each row alone (r = 0 maths: the micro-batch with all other rows' scale zeroed)."""
    out = []
    for r in range(mb.input_ids.shape[0]):
        keep = torch.zeros_like(mb.row_scale)
        keep[r] = 1.0
        one = type(mb)(**{**mb.__dict__, "row_scale": mb.row_scale * keep})
        out.append(pm.inner_loss(params, one, seed=None, second_order=False))
    return out


@pytest.mark.parametrize("r", [0.3, 1.0])
def test_inner_loss_weights_each_segment_by_its_rank(r):
    plain, recent = make(segments_per_step=16), make(segments_per_step=16, segment_recency=r)
    perturb_lora_b(plain)
    recent.load_meta_state({n: p.detach() for n, p in plain.named_meta_parameters()})
    segs = plain.segment_contexts(CONTEXTS[:2])
    (mb,) = make_micro_batches(segs, 16, TOKENIZER.pad_token_id)
    params = [p.detach() for p in plain.initial_adapters(2)]
    with torch.no_grad():
        rows = _per_row_losses(plain, params, mb)
        want = sum(loss * (1 - r + r * (j + 1) / len(segs[c].segments)) for loss, (c, j) in zip(rows, mb.row_ids)
                   if j >= 0)
        got = recent.inner_loss(params, mb, seed=None, second_order=False)
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        assert plain.inner_loss(params, mb, seed=None, second_order=False).item() == pytest.approx(
            sum(rows).item(), rel=1e-12)


def test_zero_recency_is_the_plain_loss_bit_for_bit():
    a, b = make(), make(segment_recency=0.0)
    perturb_lora_b(a)
    perturb_lora_b(b)
    for x, y in zip(encode(a, CONTEXTS).tensors, encode(b, CONTEXTS).tensors):
        assert torch.equal(x, y)


def test_batching_and_micro_batching_never_change_a_recency_memory():
    mems = []
    for k in (1, 2, 16):
        pm = make(segments_per_step=k, segment_recency=0.5, inner_lr=2e-2)
        perturb_lora_b(pm)
        mems.append((pm, encode(pm, CONTEXTS)))
    for _, other in mems[1:]:
        for a, b in zip(mems[0][1].tensors, other.tensors):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    pm, together = mems[1]
    for i, ctx in enumerate(CONTEXTS):
        for t_all, t_one in zip(together.tensors, encode(pm, [ctx]).tensors):
            torch.testing.assert_close(t_all[i : i + 1], t_one, rtol=1e-9, atol=1e-11)


def test_recency_writes_the_later_document_more_strongly():
    """Two documents (one segment each) that say different things: with r = 1 the memory lowers the
    second one's loss by more than the first one's, relative to the plain memory (both from the same
    meta-parameters; losses judged with uniform token weights)."""
    docs = [["the cat sat on the red mat today.", "the dog ran to the blue door now."]]
    cfg = dict(inner_steps=4, inner_lr=3e-2, segment_len=64)
    plain, recent, judge = make(**cfg), make(**cfg, segment_recency=1.0), make(**cfg, weighted_loss=False)
    perturb_lora_b(plain)
    recent.load_meta_state({n: p.detach() for n, p in plain.named_meta_parameters()})
    (mb,) = make_micro_batches(judge.segment_contexts(docs), 16, TOKENIZER.pad_token_id)
    assert [j for _, j in mb.row_ids] == [0, 1]

    def row_losses(pm):
        with torch.no_grad():
            return [x.item() for x in _per_row_losses(judge, encode(pm, docs).tensors, mb)]

    (first_p, second_p), (first_r, second_r) = row_losses(plain), row_losses(recent)
    assert second_r - second_p < first_r - first_p
