"""bench/demo_recency.py: its --weights parsing, the suffix schedule it tries (step t writes only the
segments j >= floor(t S / T)) against the plain loss row by row, and the token schedule (each label
token weighted by its place in the context) against a hand computation, through the
``MicroBatch.token_scale`` hook of the inner loss."""
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
    assert recency.parse_weights("r=0, r=0.5,suffix,t=0.75") == ["r=0", "r=0.5", "suffix", "t=0.75"]
    for bad, msg in (("r=1.5", "r must lie in"), ("t=-0.1", "t must lie in"), ("r=abc", "'abc' is not a number"),
                     ("recent", r"allowed r=<0\.\.1>, t=<0\.\.1> or suffix"), ("", "is empty")):
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


def test_token_scale_hook_of_the_inner_loss():
    pm = make(inner_steps=2, segments_per_step=16)
    perturb_lora_b(pm)
    (mb,) = pm.inner_problem(pm.segment_contexts(CONTEXTS[:2]), seed=None).micro_batches
    params = [p.detach() for p in pm.initial_adapters(2)]
    replace = lambda **kw: type(mb)(**{**mb.__dict__, **kw})  # noqa: E731
    with torch.no_grad():
        plain = pm.inner_loss(params, mb, seed=None, second_order=False)
        ones = pm.inner_loss(params, replace(token_scale=torch.ones(mb.labels.shape, dtype=torch.float64)),
                             seed=None, second_order=False)
        assert torch.equal(ones, plain)  # bit for bit
        c = torch.linspace(0.5, 2.0, mb.labels.shape[0], dtype=torch.float64)
        by_token = pm.inner_loss(params, replace(token_scale=c[:, None].expand(mb.labels.shape).contiguous()),
                                 seed=None, second_order=False)
        by_row = pm.inner_loss(params, replace(row_scale=mb.row_scale * c), seed=None, second_order=False)
        assert by_token.item() == pytest.approx(by_row.item(), rel=1e-12)
        with pytest.raises(ValueError, match="token_scale has shape"):
            pm.inner_loss(params, replace(token_scale=torch.ones(3, 4, dtype=torch.float64)), seed=None,
                          second_order=False)


@pytest.mark.parametrize("segments_per_step", [2, 16])
def test_token_positions_by_hand(segments_per_step):
    pm = make(inner_steps=2, segments_per_step=segments_per_step)
    segs = pm.segment_contexts(CONTEXTS[:2])
    counts = [len(s.segments) for s in segs]
    assert max(counts) >= 3
    for mb in pm.inner_problem(segs, seed=None).micro_batches:
        got = recency.token_positions(mb)
        for r, (c, j) in enumerate(mb.row_ids):
            real = [i for i in range(mb.labels.shape[1]) if mb.labels[r, i] != -100]
            want = torch.zeros(mb.labels.shape[1], dtype=torch.float64)
            for k, i in enumerate(real, start=1):
                want[i] = (j + k / len(real)) / counts[c]
            assert torch.allclose(got[r], want, rtol=0, atol=1e-12), (c, j)


def test_token_schedule_weights_each_label_by_its_place():
    pm = make(inner_steps=2, segments_per_step=16)
    perturb_lora_b(pm)
    segs = pm.segment_contexts(CONTEXTS[:2])
    plain = pm.inner_problem(segs, seed=None)
    (mb,) = plain.micro_batches
    params = [p.detach() for p in pm.initial_adapters(2)]
    with torch.no_grad():
        flat = recency.token_problem(pm, 0.0)(segs, seed=None)
        assert flat.loss(params, mb, 0, False).item() == pytest.approx(plain.loss(params, mb, 0, False).item(),
                                                                       rel=1e-12)
        x = 0.75
        tok = recency.token_problem(pm, x)(segs, seed=None)
        scale = 1 - x + x * recency.token_positions(mb)
        want = pm.inner_loss(params, type(mb)(**{**mb.__dict__, "token_scale": scale}), seed=None,
                             second_order=False)
        assert tok.loss(params, mb, 1, False).item() == pytest.approx(want.item(), rel=1e-12)
        assert tok.loss(params, mb, 1, False).item() < plain.loss(params, mb, 1, False).item()


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_bad_lr_scale_is_named(bad, capsys):
    with pytest.raises(SystemExit):
        recency.main(["--lr-scale", bad, "--weights", "r=0"])
    assert f"--lr-scale {float(bad)} is invalid" in capsys.readouterr().err


def test_bad_segment_len_is_named(capsys):
    with pytest.raises(SystemExit):
        recency.main(["--segment-len", "2", "--weights", "r=0"])
    assert "--segment-len 2 is invalid" in capsys.readouterr().err
