"""Engine tests: meta-gradients, encoding, batching, training, persistence, errors."""
from __future__ import annotations

import pytest
import torch

from perk_fast import Memory, PerkConfig, PerkModel, encode, meta_train
from perk_fast.data import build_segments, make_micro_batches
from perk_fast.inner import InnerOptimizer, safe_sqrt

from tiny_models import (
    ANSWERS, CONTEXTS, QUESTIONS, TOKENIZER, flat_grads, perturb_lora_b, rel_err, tiny_gpt2, tiny_llama, tiny_qwen2,
)

FACTORIES = {"gpt2": tiny_gpt2, "qwen2": tiny_qwen2, "llama": tiny_llama}


def make(model="gpt2", dtype=torch.float64, seed=0, **cfg):
    base = dict(inner_steps=3, inner_lr=1e-2, segment_len=24, segments_per_step=2, lora_rank=4, lora_alpha=8.0,
                unroll="full", lm_head_loss="full")
    base.update(cfg)
    return PerkModel(FACTORIES[model](seed=seed, dtype=dtype), TOKENIZER, PerkConfig(**base))


# ---------------------------------------------------------------- inner optimiser
def test_functional_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    p0 = torch.randn(5, 7, dtype=torch.float64)
    grads = [torch.randn(5, 7, dtype=torch.float64) for _ in range(4)]
    cfg = PerkConfig(inner_weight_decay=0.05, inner_betas=(0.8, 0.9), inner_eps=1e-6)
    ref = p0.clone().requires_grad_(True)
    torch_opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    opt = InnerOptimizer(cfg)
    p, state = p0.clone(), opt.init_state([p0])[0]
    for t, g in enumerate(grads):
        ref.grad = g.clone()
        torch_opt.step()
        p, state = opt.update(p, g, state, torch.tensor(0.1, dtype=torch.float64), t)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-12, atol=1e-12)


def test_functional_sgd_matches_torch_sgd():
    torch.manual_seed(0)
    p0 = torch.randn(3, 4, dtype=torch.float64)
    g = torch.randn(3, 4, dtype=torch.float64)
    ref = p0.clone().requires_grad_(True)
    torch_opt = torch.optim.SGD([ref], lr=0.3, weight_decay=0.01)
    ref.grad = g.clone()
    torch_opt.step()
    opt = InnerOptimizer(PerkConfig(inner_optimizer="sgd", inner_weight_decay=0.01))
    p, _ = opt.update(p0, g, (), torch.tensor(0.3, dtype=torch.float64), 0)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-12, atol=1e-12)


def test_safe_sqrt_has_zero_derivative_at_zero():
    v = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    y = safe_sqrt(v)
    (g,) = torch.autograd.grad(y.sum(), v)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert torch.equal(g, torch.tensor([0.0, 0.25], dtype=torch.float64))


# ---------------------------------------------------------------- meta-gradients
def _meta_loss_fn(pm, contexts, questions, answers):
    params = list(pm.meta_parameters())

    def f():
        return pm.meta_loss(contexts, questions, answers, seed=3)

    return params, f


# AdamW's first step is sign(g) (up to eps): a function of g that is flat almost everywhere
# with jumps where a gradient element crosses zero, so finite differences through it
# only mean something when eps is large enough to make the update smooth. SGD is smooth.
SMOOTH_OPTIMIZERS = {"sgd": dict(inner_optimizer="sgd", inner_lr=0.3), "adamw": dict(inner_lr=3e-3, inner_eps=1e-2)}


@pytest.mark.parametrize("optimizer", list(SMOOTH_OPTIMIZERS))
@pytest.mark.parametrize("meta_grad", ["unrolled", "checkpointed"])
def test_full_meta_gradient_matches_finite_differences(meta_grad, optimizer):
    pm = make(meta_grad=meta_grad, **SMOOTH_OPTIMIZERS[optimizer])
    perturb_lora_b(pm)
    params, f = _meta_loss_fn(pm, CONTEXTS[:2], QUESTIONS[:2], ANSWERS[:2])
    grads = flat_grads(f(), params)
    gen = torch.Generator().manual_seed(7)
    # direction scaled to each tensor's magnitude so the learned LRs (~1e-3) move relatively as much
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * p.detach().abs().mean().clamp_min(1e-3)
                 for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    eps = 1e-4

    def at(h):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=h)
        try:
            with torch.no_grad():
                return f().item()
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(d, alpha=h)

    numeric = (-at(2 * eps) + 8 * at(eps) - 8 * at(-eps) + at(-2 * eps)) / (12 * eps)
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric), (analytic, numeric)


CASES = [
    dict(unroll="full"),
    dict(unroll="truncated", unroll_start=1),
    dict(unroll="first_order"),
    dict(unroll="full", weighted_loss=False),
    dict(unroll="full", inner_optimizer="sgd", inner_lr=0.2),
    dict(unroll="truncated", unroll_start=2, learn_inner_lr=False),
    dict(unroll="full", lora_dropout=0.25),
    dict(unroll="full", segment_recency=0.6),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("model", ["gpt2", "qwen2"])
def test_checkpointed_equals_unrolled(model, case):
    grads, losses = {}, {}
    for meta_grad in ("unrolled", "checkpointed", "recomputed"):
        pm = make(model, meta_grad=meta_grad, **case)
        perturb_lora_b(pm)
        pm.train()
        loss = pm.meta_loss(CONTEXTS, QUESTIONS, ANSWERS, seed=11)
        grads[meta_grad] = flat_grads(loss, list(pm.meta_parameters()))
        losses[meta_grad] = loss.item()
    assert losses["checkpointed"] == pytest.approx(losses["unrolled"], rel=1e-12)
    assert rel_err(grads["checkpointed"], grads["unrolled"]) <= 1e-9
    # recomputed rebuilds every g_t with the same passes: the same numbers as checkpointed, bit for bit
    assert losses["recomputed"] == losses["checkpointed"]
    assert all(torch.equal(a, b) for a, b in zip(grads["recomputed"], grads["checkpointed"]))


@pytest.mark.parametrize("unroll", ["full", "truncated", "first_order"])
@pytest.mark.parametrize("meta_grad", ["unrolled", "checkpointed", "recomputed"])
def test_zero_initialised_b_gives_finite_meta_gradients(meta_grad, unroll):
    pm = make(meta_grad=meta_grad, unroll=unroll, unroll_start=1)
    assert all((b == 0).all() for b in pm.lora_B)
    loss = pm.meta_loss(CONTEXTS[:2], QUESTIONS[:2], ANSWERS[:2])
    grads = flat_grads(loss, list(pm.meta_parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_dropout_masks_are_replayed_and_change_the_loss():
    pm = make(lora_dropout=0.3)
    perturb_lora_b(pm)
    pm.train()
    a = pm.meta_loss(CONTEXTS[:1], QUESTIONS[:1], ANSWERS[:1], seed=1).item()
    b = pm.meta_loss(CONTEXTS[:1], QUESTIONS[:1], ANSWERS[:1], seed=1).item()
    c = pm.meta_loss(CONTEXTS[:1], QUESTIONS[:1], ANSWERS[:1], seed=2).item()
    pm.eval()
    d = pm.meta_loss(CONTEXTS[:1], QUESTIONS[:1], ANSWERS[:1], seed=1).item()
    assert a == b and a != c and d != a


# ---------------------------------------------------------------- encode / batching
def _inner_loss_of(pm, params, contexts):
    segs = pm.segment_contexts(contexts)
    total = 0.0
    with torch.no_grad():
        for mb in make_micro_batches(segs, pm.config.segments_per_step, TOKENIZER.pad_token_id):
            total += pm.inner_loss(params, mb, seed=None, second_order=False).item()
    return total


@pytest.mark.parametrize("model", ["gpt2", "qwen2", "llama"])
def test_encode_lowers_the_inner_loss(model):
    pm = make(model, dtype=torch.float32, inner_steps=4, inner_lr=1e-2)
    before = _inner_loss_of(pm, [p.detach() for p in pm.initial_adapters(len(CONTEXTS))], CONTEXTS)
    memory = encode(pm, CONTEXTS)
    after = _inner_loss_of(pm, memory.tensors, CONTEXTS)
    assert after < 0.98 * before  # a random 32-wide model with rank-4 memories learns slowly


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("model", ["gpt2", "qwen2"])
def test_batched_encoding_equals_single_context_encoding(model, dtype):
    # contexts of different lengths: padding, batching and grouping must not change a memory.
    # fp32: AdamW's near-sign first step amplifies the rounding of differently padded
    # matmuls, so the bound is rounding-sized relative to the adapter scale, not exact.
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-3, atol=2e-5)
    pm = make(model, dtype=dtype, inner_lr=2e-2)
    perturb_lora_b(pm)
    together = encode(pm, CONTEXTS)
    for i, ctx in enumerate(CONTEXTS):
        alone = encode(pm, [ctx])
        for t_all, t_one in zip(together.tensors, alone.tensors):
            torch.testing.assert_close(t_all[i : i + 1], t_one, **tol)
    split = encode(pm, CONTEXTS, batch_size=2)
    for a, b in zip(together.tensors, split.tensors):
        torch.testing.assert_close(a, b, **tol)


def test_batched_meta_loss_is_mean_of_single_context_losses():
    pm = make(dtype=torch.float64)
    perturb_lora_b(pm)
    together = pm.meta_loss(CONTEXTS, QUESTIONS, ANSWERS).item()
    alone = [pm.meta_loss([c], [q], [a]).item() for c, q, a in zip(CONTEXTS, QUESTIONS, ANSWERS)]
    assert together == pytest.approx(sum(alone) / len(alone), rel=1e-10)


def test_micro_batch_size_does_not_change_the_memory():
    mems = []
    for k in (1, 2, 16):
        pm = make(dtype=torch.float64, segments_per_step=k)
        perturb_lora_b(pm)
        mems.append(encode(pm, CONTEXTS))
    for other in mems[1:]:
        for a, b in zip(mems[0].tensors, other.tensors):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_generate_batched_equals_single_and_broadcast():
    pm = make(dtype=torch.float32, inner_lr=2e-2)
    perturb_lora_b(pm, std=0.2)
    memory = encode(pm, CONTEXTS)
    batched = pm.generate(memory, QUESTIONS, max_new_tokens=6)
    singles = [pm.generate(memory.select(i), [q], max_new_tokens=6)[0] for i, q in enumerate(QUESTIONS)]
    assert batched == singles
    many = pm.generate(memory.select(1), ["Q one?", "A longer second question here?"], max_new_tokens=4)
    assert len(many) == 2


def test_segments_are_split_and_prefix_masked():
    segs = build_segments(TOKENIZER, ["x" * 50, "short"], segment_len=16)
    assert all(len(ids) <= 16 for ids, _ in segs.segments)
    prefix = TOKENIZER.encode("doc_0:")
    for ids, labels in segs.segments[:-1]:
        assert ids[: len(prefix)] == prefix and labels[: len(prefix)] == [-100] * len(prefix)
    assert segs.segments[-1][0][: len(prefix) - 2] == TOKENIZER.encode("doc_1:")[: len(prefix) - 2]
    assert sum(1 for ids, _ in segs.segments if ids[-1] == TOKENIZER.eos_token_id) == 2


def _piece_texts(segs, n_prefix):
    return [TOKENIZER.decode([t for t in ids[n_prefix:] if t != TOKENIZER.eos_token_id]) for ids, _ in segs.segments]


def test_long_documents_are_split_at_sentence_ends_so_no_fact_straddles_two_segments():
    from perk_fast.tasks import generate

    n_prefix = len(TOKENIZER.encode("doc_0:"))
    for ex in generate("needle", 6, seed="split", context_tokens=400, doc_tokens=200, n_distractors=3):
        for split_len in (48, 64, 100):
            segs = build_segments(TOKENIZER, ex.context, segment_len=split_len)
            assert all(len(ids) <= split_len for ids, _ in segs.segments)
            texts = " ".join(_piece_texts(segs, n_prefix))
            for doc in ex.context:
                for sentence in doc.split(". "):
                    sentence = sentence.rstrip(".")
                    # every sentence (every fact) lies whole inside one piece
                    assert any(sentence in piece for piece in _piece_texts(segs, n_prefix)), (split_len, sentence)
            assert sum(len(d) for d in ex.context) <= len(texts)  # nothing lost
            assert sum(1 for ids, _ in segs.segments if ids[-1] == TOKENIZER.eos_token_id) == len(ex.context)
    # the token split (the older behaviour) cuts a fact
    doc = "Some filler words here. The secret code of Fred is 1251. More filler follows it."
    cut = build_segments(TOKENIZER, [doc], segment_len=40, long_documents="split_tokens")
    assert not any("The secret code of Fred is 1251" in t for t in _piece_texts(cut, n_prefix))
    whole = build_segments(TOKENIZER, [doc], segment_len=40)
    assert any("The secret code of Fred is 1251." in t for t in _piece_texts(whole, n_prefix))


def test_a_sentence_longer_than_a_segment_is_cut_inside_and_nothing_is_lost():
    doc = "Short one. " + "y" * 70 + ". Tail sentence here."
    segs = build_segments(TOKENIZER, [doc], segment_len=30)
    n_prefix = len(TOKENIZER.encode("doc_0:"))
    assert all(len(ids) <= 30 for ids, _ in segs.segments)
    body = [t for ids, _ in segs.segments for t in ids[n_prefix:]]
    assert TOKENIZER.decode([t for t in body if t != TOKENIZER.eos_token_id]).replace(" ", "") == doc.replace(" ", "")
    assert body[-1] == TOKENIZER.eos_token_id and body.count(TOKENIZER.eos_token_id) == 1
    with pytest.raises(ValueError, match="long_documents='pieces' is invalid: allowed 'split', 'split_tokens'"):
        build_segments(TOKENIZER, [doc], segment_len=30, long_documents="pieces")
    with pytest.raises(ValueError, match="PerkConfig.long_documents='pieces' is invalid"):
        PerkConfig(long_documents="pieces")


# ---------------------------------------------------------------- training
def _kv_task(n, seed):
    import random

    rng = random.Random(seed)
    names = ["ann", "bob", "cid", "dan", "eve", "fay"]
    out = []
    for _ in range(n):
        name, value = rng.choice(names), rng.randint(10, 99)
        out.append({"context": [f"{name} has {value}.", "filler text here."], "question": f"{name}?", "answer": str(value)})
    return out


def test_meta_train_lowers_the_outer_loss(tmp_path):
    pm = make(dtype=torch.float32, unroll="truncated", unroll_start=1, inner_steps=2, meta_grad="checkpointed",
              outer_lr=3e-3, warmup_proportion=0.0)
    data = _kv_task(4, seed=0)
    before = sum(pm.meta_loss([d["context"]], [d["question"]], [d["answer"]]).item() for d in data)
    history = meta_train(pm, data, steps=12, batch_size=2, progress=False)
    after = sum(pm.meta_loss([d["context"]], [d["question"]], [d["answer"]]).item() for d in data)
    assert len(history) == 12 and history[-1]["inner_loss_first"] is not None
    assert after < before


def test_meta_train_resumes_exactly(tmp_path):
    data = _kv_task(6, seed=1)
    evals = []

    def eval_fn(model, step):
        evals.append(step)
        return {"step": step}

    full = make(dtype=torch.float64, inner_steps=2, outer_lr=1e-3)
    h_full = meta_train(full, data, steps=4, batch_size=2, progress=False, eval_fn=eval_fn, eval_every=2)
    assert evals == [2, 4] and h_full[1]["eval"] == {"step": 2}

    def interrupt(model, step):
        raise KeyboardInterrupt

    broken = make(dtype=torch.float64, inner_steps=2, outer_lr=1e-3)
    with pytest.raises(KeyboardInterrupt):
        meta_train(broken, data, steps=4, batch_size=2, progress=False, checkpoint_dir=str(tmp_path),
                   eval_fn=interrupt, eval_every=2)
    resumed = make(dtype=torch.float64, inner_steps=2, outer_lr=1e-3)
    h_res = meta_train(resumed, data, steps=4, batch_size=2, progress=False, checkpoint_dir=str(tmp_path), resume=True)
    assert [h["step"] for h in h_res] == [1, 2, 3, 4]
    assert [h["loss"] for h in h_res] == [h["loss"] for h in h_full]
    for (n1, p1), (n2, p2) in zip(full.named_meta_parameters(), resumed.named_meta_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)


# ---------------------------------------------------------------- persistence
def test_perk_model_and_memory_round_trip(tmp_path):
    pm = make(dtype=torch.float32)
    perturb_lora_b(pm)
    with torch.no_grad():
        pm.inner_lrs.mul_(1.5)
    pm.save(tmp_path / "pm")
    loaded = PerkModel.load(tmp_path / "pm", tiny_gpt2(seed=0), TOKENIZER)
    for (n1, p1), (n2, p2) in zip(pm.named_meta_parameters(), loaded.named_meta_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    memory = encode(pm, CONTEXTS[:2])
    memory.save(tmp_path / "mem")
    back = Memory.load(tmp_path / "mem", loaded)
    assert back.n_docs == memory.n_docs
    for a, b in zip(memory.tensors, back.tensors):
        assert torch.equal(a, b)
    assert loaded.generate(back, QUESTIONS[:2], max_new_tokens=3) == pm.generate(memory, QUESTIONS[:2], max_new_tokens=3)


def test_memory_of_another_model_is_rejected(tmp_path):
    pm = make(dtype=torch.float32)
    memory = encode(pm, CONTEXTS[:1])
    memory.save(tmp_path / "mem")
    other = make(dtype=torch.float32, seed=5)
    with pytest.raises(ValueError, match="different base model"):
        Memory.load(tmp_path / "mem", other)
    with pytest.raises(ValueError, match="different base model"):
        other.generate(memory, QUESTIONS[:1])
    qwen = make("qwen2", dtype=torch.float32)
    with pytest.raises(ValueError, match="different base model"):
        PerkModel.load(_saved(pm, tmp_path / "pm"), qwen.hf_model, TOKENIZER)


def _saved(pm, path):
    pm.save(path)
    return path


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("inner_steps", 0, "inner_steps=0"),
        ("inner_lr", -1e-3, "inner_lr=-0.001"),
        ("unroll", "sideways", "unroll='sideways'"),
        ("inner_optimizer", "lion", "inner_optimizer='lion'"),
        ("meta_grad", "magic", "meta_grad='magic'"),
        ("lora_dropout", 1.0, "lora_dropout=1.0"),
        ("lora_rank", 0, "lora_rank=0"),
    ],
)
def test_bad_config_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        PerkConfig(**{field: value})


def test_unroll_start_beyond_steps_is_rejected():
    with pytest.raises(ValueError, match="unroll_start=5"):
        PerkConfig(inner_steps=4, unroll="truncated", unroll_start=5)


def test_bad_api_inputs_raise_clear_errors():
    pm = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        pm.meta_loss([""], ["q?"], ["a"])
    with pytest.raises(ValueError, match="contexts is empty"):
        encode(pm, [])
    with pytest.raises(ValueError, match=r"contexts\[0\] is empty"):
        encode(pm, [[]])
    with pytest.raises(ValueError, match=r"questions\[0\] is empty"):
        pm.meta_loss(["ctx"], ["  "], ["a"])
    with pytest.raises(ValueError, match="2 questions for 1 contexts"):
        pm.meta_loss(["ctx"], ["q?", "q2?"], ["a"])
    memory = encode(pm, ["ctx one", "ctx two"])
    with pytest.raises(ValueError, match="3 questions for a memory of 2"):
        pm.generate(memory, ["a?", "b?", "c?"])
    with pytest.raises(ValueError, match=r"questions\[0\] is empty"):
        pm.generate(memory, ["", "b?"])


def test_unsupported_model_names_its_type():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, vocab_size=100, is_decoder=True))
    with pytest.raises(ValueError, match="model type 'bert'"):
        PerkModel(model, TOKENIZER, PerkConfig())
    with pytest.raises(ValueError, match=r"model type 'gpt2': target modules \['nope'\]"):
        PerkModel(tiny_gpt2(), TOKENIZER, PerkConfig(target_modules=["c_attn", "nope"]))
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        PerkModel(tiny_gpt2(), TOKENIZER, PerkConfig(layers=[0, 7]))


def test_layers_and_targets_select_sites():
    pm = PerkModel(tiny_qwen2(), TOKENIZER, PerkConfig(layers=[1], target_modules=["q_proj", "v_proj"], lora_rank=2))
    assert [s.name for s in pm.sites] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert pm.inner_lrs.shape == (4, pm.config.inner_steps)


def test_meta_parameters_are_exactly_the_meta_learned_tensors():
    pm = make(dtype=torch.float32)
    names = [n for n, _ in pm.named_meta_parameters()]
    n_sites = len(pm.sites)
    assert sum(n.startswith("lora_A.") for n in names) == n_sites
    assert sum(n.startswith("lora_B.") for n in names) == n_sites
    assert "inner_lrs" in names and sum(n.startswith("weighting.") for n in names) == 4
    assert not any(p.requires_grad for p in pm.hf_model.parameters())
    frozen_lr = make(dtype=torch.float32, learn_inner_lr=False, weighted_loss=False)
    assert [n for n, _ in frozen_lr.named_meta_parameters() if not n.startswith("lora_")] == []


def test_no_active_memory_leaves_the_base_model_unchanged():
    base = tiny_qwen2(dtype=torch.float64)
    ids = torch.randint(0, 250, (2, 9))
    before = base(ids).logits
    pm = PerkModel(base, TOKENIZER, PerkConfig())
    after = pm.hf_model(ids).logits
    assert torch.equal(before, after)


def test_bf16_base_keeps_fp32_meta_parameters():
    pm = make(dtype=torch.float32).to(torch.bfloat16)
    assert pm.hf_model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in pm.meta_parameters())
    memory = encode(pm, CONTEXTS[:1])
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in memory.tensors)


def test_from_reference_maps_keys_and_reports_unknown(tmp_path):
    yaml_path = tmp_path / "ref.yaml"
    yaml_path.write_text(
        "# @package _global_\nn_inner_iter: 3\ninner_lr: 1e-4\ndyna_lr: false\ninner_funct: truncated\n"
        "unroll_start: 1\nfirst_order: false\nlora_rank: 8\nlora_alpha: 16\nweighted_loss: true\n"
        "weight_non_linearity: softplus\ninner_grad_accum: 2\nlearning_rate: 2e-5\nweight_decay: 0.1\n"
        "warmup_proportion: 0.05\nmax_grad_norm: 0.5\ninner_opt: adam\nmystery_key: 1\n"
    )
    with pytest.warns(UserWarning, match="mystery_key"):
        cfg = PerkConfig.from_reference(yaml_path)
    assert (cfg.inner_steps, cfg.inner_lr, cfg.learn_inner_lr, cfg.unroll, cfg.unroll_start) == (3, 1e-4, False,
                                                                                                 "truncated", 1)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.outer_lr, cfg.outer_weight_decay) == (8, 16.0, 2e-5, 0.1)
    assert (cfg.warmup_proportion, cfg.max_grad_norm, cfg.inner_optimizer) == (0.05, 0.5, "adamw")
    # the reference's truncated inner loop never reads first_order (tests/test_reference_mapping.py)
    assert PerkConfig.from_reference({"first_order": True, "inner_funct": "default"}).unroll == "first_order"
    with pytest.raises(ValueError, match="weight_non_linearity='sigmoid'"):
        PerkConfig.from_reference({"weight_non_linearity": "sigmoid"})


# ---------------------------------------------------------------- swappable kernels
@pytest.mark.parametrize("meta_grad", ["unrolled", "checkpointed"])
def test_chunked_lm_head_loss_leaves_meta_gradients_unchanged(meta_grad):
    grads = {}
    for mode in ("full", "chunked"):
        pm = make(meta_grad=meta_grad, lm_head_loss=mode, lm_head_chunk_size=7, unroll="full")
        perturb_lora_b(pm)
        loss = pm.meta_loss(CONTEXTS, QUESTIONS, ANSWERS)
        grads[mode] = (loss.item(), flat_grads(loss, list(pm.meta_parameters())))
    assert grads["chunked"][0] == pytest.approx(grads["full"][0], rel=1e-12)
    assert rel_err(grads["chunked"][1], grads["full"][1]) <= 1e-9


def test_triton_backend_meta_gradient_equals_torch_backend():
    # Triton kernels run under the CPU interpreter without a GPU (conftest sets TRITON_INTERPRET=1),
    # compiled on CUDA tensors where there is one.
    from perk_fast.kernels import use_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            pm = make(dtype=torch.float64, lm_head_loss="chunked", lm_head_chunk_size=16, inner_steps=2,
                      meta_grad="checkpointed", unroll="full", inner_optimizer="sgd", inner_lr=0.3,
                      layers=(1,))  # one layer keeps the interpreter run short; kernel tests cover the grid
            pm.to(device)
            perturb_lora_b(pm)
            loss = pm.meta_loss(CONTEXTS[:2], QUESTIONS[:2], ANSWERS[:2])
            results[backend] = (loss.item(), [g.cpu() for g in flat_grads(loss, list(pm.meta_parameters()))])
    assert results["triton"][0] == pytest.approx(results["torch"][0], rel=1e-10)
    assert rel_err(results["triton"][1], results["torch"][1]) <= 1e-8
