"""PerkConfig.from_reference maps the reference's keys the way the reference's *code* reads them.

Each case is a departure that a side-by-side run against the reference's own module found
(README "Reference config keys"); the golden test (tests/test_golden_reference.py) checks the
numbers end to end.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from perk_fast import PerkConfig, PerkModel, encode, meta_train
from perk_fast.data import build_segments, build_query
from perk_fast.train import _build_groups

from tiny_models import CONTEXTS, TOKENIZER, bos_bpe_tokenizer, tiny_gpt2, tiny_llama


def _map(keys, **overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = PerkConfig.from_reference(keys, **overrides)
    return cfg, [str(w.message) for w in caught]


def test_weight_decay_drives_the_inner_adamw_too():
    cfg, _ = _map({"weight_decay": 0.1})
    assert cfg.inner_weight_decay == 0.1 and cfg.outer_weight_decay == 0.1


@pytest.mark.parametrize("funct, expected, warned", [("truncated", "truncated", True), ("default", "first_order", False)])
def test_first_order_is_read_only_by_the_full_unroll(funct, expected, warned):
    cfg, notes = _map({"first_order": True, "inner_funct": funct, "unroll_start": 2})
    assert cfg.unroll == expected
    assert any("first_order=true is ignored" in n for n in notes) == warned


def test_inner_opt_is_never_read_adamw_always():
    cfg, notes = _map({"inner_opt": "sgd"})
    assert cfg.inner_optimizer == "adamw" and any("inner_opt='sgd'" in n for n in notes)
    assert _map({"inner_opt": "sgd"}, inner_optimizer="sgd")[0].inner_optimizer == "sgd"  # still available
    assert not _map({"inner_opt": "adam"})[1]


@pytest.mark.parametrize("order", [("lora_r", "lora_rank"), ("lora_rank", "lora_r")])
def test_lora_rank_wins_whatever_the_key_order(order):
    values = {"lora_r": 16, "lora_rank": 256}
    cfg, notes = _map({k: values[k] for k in order})
    assert cfg.lora_rank == 256 and any("lora_r=16 is ignored" in n for n in notes)


def test_lora_dropout_is_the_references_fixed_point_one_and_encoding_stays_deterministic():
    cfg, _ = _map({"n_inner_iter": 2, "lora_rank": 4, "inner_lr": 1e-2})
    assert cfg.lora_dropout == 0.1
    pm = PerkModel(tiny_gpt2(), TOKENIZER, cfg.replace(segment_len=96))
    a, b = encode(pm, CONTEXTS[:2]), encode(pm, CONTEXTS[:2])
    assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    pm.train()  # training mode: the masks act (and are a function of the call's seed)
    one = pm.meta_loss(CONTEXTS[:1], ["q?"], ["a"], seed=1).item()
    assert one == pm.meta_loss(CONTEXTS[:1], ["q?"], ["a"], seed=1).item() != pm.meta_loss(
        CONTEXTS[:1], ["q?"], ["a"], seed=2).item()


def test_documents_are_whole_rows_cut_at_model_max_length_with_a_warning():
    cfg, _ = _map({"lora_rank": 4})
    assert cfg.long_documents == "truncate" and cfg.segment_len is None
    pm = PerkModel(tiny_gpt2(), TOKENIZER, cfg)
    saved, TOKENIZER.model_max_length = TOKENIZER.model_max_length, 40
    try:
        assert pm.segment_len == 40
        long_doc = "x" * 100
        with pytest.warns(UserWarning, match=r"1 document\(s\) longer than segment_len=40 were cut"):
            segs = pm.segment_contexts([[long_doc, "short one"]])[0]
        assert len(segs.segments) == 2 and len(segs.segments[0][0]) == 40  # one row per document
        split = PerkModel(tiny_gpt2(), TOKENIZER, cfg.replace(long_documents="split")).segment_contexts([[long_doc]])
        assert len(split[0].segments) == 3  # perk_fast's option: nothing lost
    finally:
        TOKENIZER.model_max_length = saved


def test_an_unusable_model_max_length_is_named():
    cfg, _ = _map({"lora_rank": 4})
    pm = PerkModel(tiny_gpt2(), TOKENIZER, cfg)
    saved, TOKENIZER.model_max_length = TOKENIZER.model_max_length, int(1e30)  # HF's "unknown"
    try:
        with pytest.raises(ValueError, match="segment_len=None means the tokenizer's model_max_length"):
            pm.segment_contexts(["text"])
    finally:
        TOKENIZER.model_max_length = saved


def test_bos_starts_every_row_when_the_tokenizer_adds_it():
    tok = bos_bpe_tokenizer()
    segs = build_segments(tok, ["The cat sat on the mat.", "Bob took the apple."], 16)
    for ids, labels in segs.segments:
        assert ids[0] == tok.bos_token_id and labels[0] == -100
    ids, labels = build_query(tok, "Where is Alice?", "kitchen", None, 2)
    reference = tok("You have memorized 2 documents.\nWhere is Alice?\nAnswer: kitchen</s>")["input_ids"]
    assert ids == reference  # the reference tokenises the whole row with special tokens
    assert labels[: ids.index(tok.encode(" kitchen", add_special_tokens=False)[0])] == [-100] * (
        ids.index(tok.encode(" kitchen", add_special_tokens=False)[0]))
    # generation prompts start with BOS too
    pm = PerkModel(tiny_llama(vocab=len(tok)), tok, PerkConfig(inner_steps=2, segment_len=32, lora_rank=2))
    seen = []
    original = pm.hf_model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"])
        return original(**kwargs)

    pm.hf_model.generate = spy
    pm.generate(encode(pm, ["Bob took the apple."]), ["Who took it?"], max_new_tokens=1)
    assert seen[0][0, 0].item() == tok.bos_token_id


def test_outer_adamw_exempts_biases_norms_and_learned_rates():
    pm = PerkModel(tiny_gpt2(), TOKENIZER, PerkConfig(lora_rank=2, outer_weight_decay=0.1))
    groups = _build_groups(pm, [{"params": "meta"}, {"params": "base", "lr": 1e-4}])
    names = {id(p): n for n, p in pm.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "inner_lrs" in exempt and "weighting.fc1.bias" in exempt and "weighting.fc1.weight" in decayed
    assert "lora_A.0" in decayed and "hf_model.transformer.h.0.ln_1.weight" in exempt
    assert "hf_model.transformer.h.0.attn.c_attn.bias" in exempt
    assert "hf_model.transformer.h.0.attn.c_attn.weight" in decayed
    plain = PerkModel(tiny_gpt2(), TOKENIZER, PerkConfig(lora_rank=2, outer_decay_exempt=False))
    assert len(_build_groups(plain, None)) == 1
    # meta_train still runs with the split groups
    meta_train(pm, [{"context": "a b c", "question": "q?", "answer": "a"}], steps=1, progress=False)


def test_bad_reference_values_name_the_key():
    for keys, match in (({"n_inner_iter": "four"}, "n_inner_iter='four'"), ({"inner_grad_accum": 4.5},
                        "inner_grad_accum=4.5"), ({"dyna_lr": "maybe"}, "dyna_lr='maybe'"),
                        ({"inner_funct": "sideways"}, "inner_funct='sideways'")):
        with pytest.raises(ValueError, match=match):
            PerkConfig.from_reference(keys)
    assert _map({"inner_grad_accum": 4.0})[0]  # meta_test.yaml's `4.` is an integer in YAML's eyes
