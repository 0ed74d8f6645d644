"""bench/demo_recency.py: its --weights parsing and the suffix schedule it tries (step t writes only the
segments j >= floor(t S / T)), against the plain loss row by row."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from perk_fast.data import make_micro_batches

from test_engine import make
from tiny_models import CONTEXTS, TOKENIZER, perturb_lora_b

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("demo_recency", os.path.join(_ROOT, "bench", "demo_recency.py"))
recency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recency)


def test_weights_are_parsed_and_bad_ones_named():
    assert recency.parse_weights("r=0, r=0.5,suffix") == ["r=0", "r=0.5", "suffix"]
    for bad, msg in (("r=1.5", "r must lie in"), ("recent", "allowed r=<0..1> or suffix"), ("", "is empty")):
        with pytest.raises(ValueError, match=msg):
            recency.parse_weights(bad)


def test_suffix_schedule_drops_the_early_segments_at_later_steps():
    pm = make(inner_steps=4, segments_per_step=16)
    perturb_lora_b(pm)
    segs = pm.segment_contexts(CONTEXTS[:2])
    plain = pm.inner_problem(segs, seed=None)
    suffix = recency.suffix_problem(pm)(segs, seed=None)
    (mb,) = plain.micro_batches
    params = [p.detach() for p in pm.initial_adapters(2)]
    counts = [len(s.segments) for s in segs]
    with torch.no_grad():
        for step in range(4):
            keep = torch.tensor([1.0 if j >= 0 and j >= step * counts[c] // 4 else 0.0 for c, j in mb.row_ids],
                                dtype=mb.row_scale.dtype)
            want = pm.inner_loss(params, type(mb)(**{**mb.__dict__, "row_scale": mb.row_scale * keep}), seed=None,
                                 second_order=False)
            got = suffix.loss(params, mb, step, False)
            assert got.item() == pytest.approx(want.item(), rel=1e-12), step
        assert suffix.loss(params, mb, 0, False).item() == pytest.approx(plain.loss(params, mb, 0, False).item(),
                                                                         rel=1e-12)
        assert suffix.loss(params, mb, 3, False).item() < plain.loss(params, mb, 3, False).item()
    assert max(counts) >= 4  # the later steps really drop rows
    assert make_micro_batches(segs, 16, TOKENIZER.pad_token_id)[0].row_ids == mb.row_ids
