"""perk_fast against numbers the reference's own code computed (tools/golden_reference.py -> tests/fixtures/golden).

For each recorded case (the published experiment/meta_train.yaml; then at inner_lr 1e-2: as
published, a full unroll, weight_decay 0.1, first_order with the truncated loop, inner_opt sgd) a
PerkModel is built with ``PerkConfig.from_reference`` from the very config the reference composed --
no hand alignment -- and the recorded initial meta-parameters, and must reproduce, in fp64 and in
every meta_grad mode: the token ids and label masks, the inner loss of every step, the adapted
adapters, the outer loss and every meta-gradient (<= 1e-9 relative). The reference's Lightning
checkpoint imports with ``PerkModel.from_reference_checkpoint``.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import pytest
import torch

from perk_fast import PerkConfig, PerkModel

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "golden")
TOL = 1e-9
with open(os.path.join(FIXTURE, "golden.json")) as _fh:
    GOLDEN = json.load(_fh)
CONTEXT = ["Mary moved to the kitchen after lunch. Then she picked up the red apple and went to the garden."]
QUESTION, ANSWER = "Where is Mary?", "garden"
SUPPORT = ["Then she picked up the red apple and went to the garden."]


@pytest.fixture(scope="module")
def tensors():
    from safetensors.torch import load_file

    return load_file(os.path.join(FIXTURE, "golden.safetensors"))


def _base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(FIXTURE, "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _perk(case: str, tensors, **overrides) -> PerkModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_reference's notes (lora_r, inner_opt, ...) are tested elsewhere
        config = PerkConfig.from_reference(GOLDEN["cases"][case]["config"], **overrides)
    model, tokenizer = _base()
    pm = PerkModel(model, tokenizer, config).eval()  # eval: no dropout (the golden run had none), no shuffle
    steps = config.inner_steps
    with torch.no_grad():
        for i, site in enumerate(pm.sites):
            pm.lora_A[i].copy_(tensors[f"{case}/init/A/{site.name}"])
            pm.lora_B[i].copy_(tensors[f"{case}/init/B/{site.name}"])
            pm.inner_lrs[2 * i].copy_(tensors[f"{case}/init/lr/A/{site.name}"][:steps])
            pm.inner_lrs[2 * i + 1].copy_(tensors[f"{case}/init/lr/B/{site.name}"][:steps])
        for name, p in pm.weighting.named_parameters():
            p.copy_(tensors[f"{case}/init/weighting/{name}"])
    return pm


def _rel(a, b) -> float:
    b = b.to(a)
    norm = b.norm().item()
    return (a - b).norm().item() / norm if norm > 0 else (a - b).norm().item()


@pytest.mark.parametrize("case", list(GOLDEN["cases"]))
def test_tokens_and_label_masks_are_the_references(case, tensors):
    pm = _perk(case, tensors)
    (seg,) = pm.segment_contexts([CONTEXT])
    (ids, labels), = seg.segments
    assert ids == tensors[f"{case}/tokens/train_input_ids"][0].tolist()
    assert labels == tensors[f"{case}/tokens/train_labels"][0].tolist()
    q_ids, q_labels = pm.query_batch([QUESTION], [ANSWER], [SUPPORT], [seg.n_docs])
    assert q_ids[0].tolist() == tensors[f"{case}/tokens/input_ids"][0].tolist()
    assert q_labels[0].tolist() == tensors[f"{case}/tokens/labels"][0].tolist()


@pytest.mark.parametrize("meta_grad", ["unrolled", "checkpointed", "recomputed"])
@pytest.mark.parametrize("case", list(GOLDEN["cases"]))
def test_meta_step_reproduces_the_reference(case, meta_grad, tensors):
    record = GOLDEN["cases"][case]
    pm = _perk(case, tensors, meta_grad=meta_grad)
    steps = pm.config.inner_steps
    # the adapted adapters (a no-graph inner loop: the same values)
    with torch.no_grad():
        adapted = pm.adapt(pm.segment_contexts([CONTEXT]), seed=None)
    for i, site in enumerate(pm.sites):
        for part, t in (("A", adapted[2 * i]), ("B", adapted[2 * i + 1])):
            err = _rel(t[0], tensors[f"{case}/adapted/{part}/{site.name}"])
            assert err <= TOL, f"adapted {part} of {site.name}: {err:.2e}"
    loss = pm.meta_loss([CONTEXT], [QUESTION], [ANSWER], [SUPPORT], seed=0)
    assert pm.last_inner_losses == pytest.approx(record["inner_losses"], rel=TOL, abs=0)
    assert loss.item() == pytest.approx(record["outer_loss"], rel=TOL, abs=0)
    names = dict(pm.named_meta_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, list(names.values()), allow_unused=True)))
    worst = []
    for i, site in enumerate(pm.sites):
        for part, name in (("A", f"lora_A.{i}"), ("B", f"lora_B.{i}")):
            worst.append((_rel(grads[name], tensors[f"{case}/grad/{part}/{site.name}"]), name))
        for row, part in ((2 * i, "A"), (2 * i + 1, "B")):
            ref = tensors[f"{case}/grad/lr/{part}/{site.name}"]
            assert ref[steps].item() == 0.0  # the reference's (T+1)-th rate is never used
            worst.append((_rel(grads["inner_lrs"][row], ref[:steps]), f"inner_lrs[{row}]"))
    for name, _ in pm.weighting.named_parameters():
        g = grads[f"weighting.{name}"]
        ref = tensors[f"{case}/grad/weighting/{name}"]
        worst.append((_rel(torch.zeros_like(ref) if g is None else g, ref), f"weighting.{name}"))
    worst.sort(reverse=True)
    assert worst[0][0] <= TOL, f"{case}: worst meta-gradient differences {worst[:3]}"


def test_the_cases_differ_where_the_reference_says_they_do(tensors):
    """The golden numbers themselves: what the mapping fixes is visible in the reference's output."""
    def grad(case, key):
        return tensors[f"{case}/grad/{key}"]

    site = next(k for k in tensors if k.startswith("truncated_lr/grad/A/")).split("/grad/A/", 1)[1]
    # first_order is ignored by the truncated loop: the very same numbers
    assert torch.equal(grad("first_order_truncated", f"A/{site}"), grad("truncated_lr", f"A/{site}"))
    # inner_opt is never read: the very same numbers
    assert torch.equal(grad("inner_opt_sgd", f"A/{site}"), grad("truncated_lr", f"A/{site}"))
    # weight_decay drives the inner AdamW: other adapted weights
    assert _rel(tensors[f"weight_decay_0.1/adapted/B/{site}"], tensors[f"truncated_lr/adapted/B/{site}"]) > 1e-4
    # the full unroll differs from the truncated one in its meta-gradient
    assert _rel(grad("full_unroll", f"A/{site}"), grad("truncated_lr", f"A/{site}")) > 1e-6


def test_reference_checkpoint_imports(tensors):
    model, tokenizer = _base()
    # the reference's hyper-parameters carry lora_r, which it never reads: the import says so
    with pytest.warns(UserWarning, match=r"lora_r=16 is ignored: the reference never reads it"):
        pm = PerkModel.from_reference_checkpoint(os.path.join(FIXTURE, "reference.ckpt"), model, tokenizer)
    assert pm.config.lora_rank == 4 and pm.config.inner_steps == 4
    for i, site in enumerate(pm.sites):
        assert torch.equal(pm.lora_A[i], tensors[f"ckpt/A/{site.name}"].to(pm.lora_A[i]))
        assert torch.equal(pm.lora_B[i], tensors[f"ckpt/B/{site.name}"].to(pm.lora_B[i]))
        assert torch.equal(pm.inner_lrs[2 * i], tensors[f"ckpt/lr/A/{site.name}"][:4].to(pm.inner_lrs))
    for name, p in pm.weighting.named_parameters():
        assert torch.equal(p, tensors[f"ckpt/weighting/{name}"].to(p))


def test_reference_checkpoint_of_another_base_is_refused():
    model, tokenizer = _base()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(0.1)
    with pytest.raises(ValueError, match="another base model"), pytest.warns(UserWarning, match="lora_r=16"):
        PerkModel.from_reference_checkpoint(os.path.join(FIXTURE, "reference.ckpt"), model, tokenizer)


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lora_rank=4)}, path)
    model, tokenizer = _base()
    with pytest.raises(ValueError, match="refused to unpickle"):
        PerkModel.from_reference_checkpoint(path, model, tokenizer)
