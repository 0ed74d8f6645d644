"""Memories as PEFT adapters, PerkModel as a transformers-style model, identity checks and the edge
cases users hit (dtype casts, BOS, unsupported models, nesting, gradient checkpointing, devices)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from perk_fast import Memory, PerkConfig, PerkModel, encode

from tiny_models import CONTEXTS, QUESTIONS, TOKENIZER, VOCAB, perturb_lora_b, tiny_gpt2, tiny_llama, tiny_qwen2

FACTORIES = {"gpt2": tiny_gpt2, "qwen2": tiny_qwen2, "llama": tiny_llama}
CFG = dict(inner_steps=2, inner_lr=2e-2, segment_len=32, lora_rank=4, lora_alpha=8.0)


def _pm(kind="gpt2", **cfg):
    pm = PerkModel(FACTORIES[kind](), TOKENIZER, PerkConfig(**{**CFG, **cfg}))
    perturb_lora_b(pm, std=0.2)
    return pm


def _ids(rows=3, length=11, seed=0):
    return torch.randint(0, 250, (rows, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ PEFT export
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_memory_exported_to_peft_gives_perk_fasts_logits(kind, tmp_path):
    from peft import PeftModel

    pm = _pm(kind)
    memory = encode(pm, CONTEXTS)
    ids = _ids(1)
    with torch.no_grad():
        ours = pm(input_ids=ids, memory=memory.select(1)).logits
    memory.to_peft(tmp_path / "adapter", index=1, perk_model=pm, base_model_name_or_path="tiny")
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"use_rslora": true' in config and ('"fan_in_fan_out": true' in config) == (kind == "gpt2")
    peft_model = PeftModel.from_pretrained(FACTORIES[kind](), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    rel = ((ours - theirs).norm() / ours.norm()).item()
    assert rel <= 1e-5, rel
    # and the adapter differs from the bare base (the check is not vacuous)
    with torch.no_grad():
        bare = FACTORIES[kind]()(input_ids=ids).logits
    assert ((ours - bare).norm() / ours.norm()).item() > 1e-3
    back = Memory.from_peft(tmp_path / "adapter", pm)
    assert back.n_docs == [memory.n_docs[1]]
    for a, b in zip(back.tensors, memory.select(1).tensors):
        assert torch.equal(a, b)


def test_meta_learned_initialisation_exports_the_same_way(tmp_path):
    from peft import PeftModel

    pm = _pm("qwen2")
    pm.export_init_peft(tmp_path / "init")
    ids = _ids(2)
    with torch.no_grad():
        ours = pm(input_ids=ids, memory=pm.init_memory()).logits
        theirs = PeftModel.from_pretrained(tiny_qwen2(), str(tmp_path / "init")).eval()(input_ids=ids).logits
    assert ((ours - theirs).norm() / ours.norm()).item() <= 1e-5


def test_from_peft_refuses_other_settings(tmp_path):
    pm = _pm()
    encode(pm, CONTEXTS[:1]).to_peft(tmp_path / "a", perk_model=pm)
    other = _pm(lora_rank=2)
    with pytest.raises(ValueError, match="adapter settings"):
        Memory.from_peft(tmp_path / "a", other)


# ------------------------------------------------------------------ transformers-style calls
def test_perk_model_is_callable_like_a_transformers_model():
    from transformers.modeling_outputs import CausalLMOutput

    pm = _pm("llama")
    memory = encode(pm, CONTEXTS)
    ids = _ids(3)
    labels = ids.clone()
    out = pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, memory=memory)
    assert isinstance(out, CausalLMOutput) and out.loss is not None and out.logits.shape == (3, 11, VOCAB)
    for i in range(3):  # row i uses memory i
        row = pm(input_ids=ids[i : i + 1], memory=memory.select(i)).logits
        torch.testing.assert_close(out.logits[i : i + 1], row, rtol=1e-5, atol=1e-5)
    one = pm(input_ids=ids, memory=memory.select(0)).logits  # one memory for every row
    torch.testing.assert_close(one[2:], pm(input_ids=ids[2:], memory=memory.select(0)).logits, rtol=1e-5, atol=1e-5)
    assert pm(input_ids=ids).loss is None  # no labels, no memory: the base model
    with pytest.raises(ValueError, match="3 rows for a memory of 2 contexts"):
        pm(input_ids=ids, memory=memory.select([0, 1]))


def test_generate_takes_transformers_generation_options():
    from transformers import GenerationConfig

    pm = _pm("llama")
    memory = encode(pm, CONTEXTS)
    greedy = pm.generate(memory, QUESTIONS, max_new_tokens=5)
    assert pm.generate(memory, QUESTIONS, max_new_tokens=5, generation_config=GenerationConfig(do_sample=False)) \
        == greedy
    torch.manual_seed(0)
    sampled = pm.generate(memory, QUESTIONS, max_new_tokens=5, do_sample=True, temperature=1.5,
                          num_return_sequences=3)
    assert len(sampled) == 3 and all(len(s) == 3 for s in sampled)
    beams = pm.generate(memory, QUESTIONS, max_new_tokens=5, num_beams=3)
    assert len(beams) == 3 and all(isinstance(b, str) for b in beams)
    # beams with a memory per context: context i's answer does not depend on the others
    assert pm.generate(memory.select(2), QUESTIONS[2:], max_new_tokens=5, num_beams=3) == beams[2:]
    stopped = pm.generate(memory, QUESTIONS, max_new_tokens=8, stop_strings=["e"])
    assert all(len(s) <= len(g) + 1 for s, g in zip(stopped, pm.generate(memory, QUESTIONS, max_new_tokens=8)))


def test_save_pretrained_and_from_pretrained(tmp_path):
    pm = _pm()
    pm.save_pretrained(tmp_path / "pm")
    back = PerkModel.from_pretrained(tmp_path / "pm", tiny_gpt2(), TOKENIZER)
    for (n, p), (_, q) in zip(pm.named_meta_parameters(), back.named_meta_parameters()):
        assert torch.equal(p, q), n
    memory = encode(pm, CONTEXTS[:2])
    memory.save_pretrained(tmp_path / "mem")
    again = Memory.from_pretrained(tmp_path / "mem", back)
    assert again.lora == memory.lora and again.lora["rank"] == 4 and again.lora["rslora"] is True
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        PerkModel.from_pretrained(tmp_path / "pm")  # the tiny model has no name to load by


# ------------------------------------------------------------------ identity
def test_fingerprint_survives_harmless_differences_and_catches_other_weights(tmp_path):
    pm = _pm("qwen2")
    memory = encode(pm, CONTEXTS[:1])
    memory.save(tmp_path / "m")
    # a config flag, a new config default, another dtype: the same base
    same = tiny_qwen2()
    same.config.output_hidden_states = True
    same.config.some_new_default = 7
    Memory.load(tmp_path / "m", PerkModel(same, TOKENIZER, pm.config))
    Memory.load(tmp_path / "m", PerkModel(tiny_qwen2(dtype=torch.float64), TOKENIZER, pm.config))
    # one changed weight in a target projection (embeddings untouched): another base
    other = tiny_qwen2()
    with torch.no_grad():
        other.model.layers[1].self_attn.q_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="different base model"):
        Memory.load(tmp_path / "m", PerkModel(other, TOKENIZER, pm.config))
    # forward and generate check too, not only load
    wrong = PerkModel(tiny_qwen2(seed=3), TOKENIZER, pm.config)
    with pytest.raises(ValueError, match="different base model"):
        wrong.generate(memory, QUESTIONS[:1])
    with pytest.raises(ValueError, match="different base model"):
        wrong(input_ids=_ids(1), memory=memory)


def test_a_memory_of_another_rank_does_not_fit():
    memory = encode(_pm(lora_rank=4), CONTEXTS[:1])
    with pytest.raises(ValueError, match="rank 4"):
        _pm(lora_rank=2).generate(memory, QUESTIONS[:1])


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("cast", ["to_bf16", "to_fp16", "half", "bfloat16"])
def test_16_bit_casts_keep_meta_parameters_exact_fp32(cast):
    pm = _pm()
    with torch.no_grad():
        pm.inner_lrs.add_(1e-9)  # values a 16-bit round trip would change
    before = {n: p.detach().clone() for n, p in pm.named_meta_parameters()}
    {"to_bf16": lambda: pm.to(torch.bfloat16), "to_fp16": lambda: pm.to(torch.float16), "half": pm.half,
     "bfloat16": pm.bfloat16}[cast]()
    assert pm.hf_model.lm_head.weight.dtype in (torch.bfloat16, torch.float16)
    for n, p in pm.named_meta_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    memory = encode(pm, CONTEXTS[:1])
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in memory.tensors)


def test_memory_select_takes_negative_indices():
    memory = encode(_pm(), CONTEXTS)
    last = memory.select(-1)
    assert last.n_docs == memory.n_docs[-1:]
    assert all(torch.equal(a, b[-1:]) for a, b in zip(last.tensors, memory.tensors))
    with pytest.raises(IndexError, match="-4 out of range"):
        memory.select(-4)


def test_nested_adapters_active_restores_the_outer_adapters():
    pm = _pm()
    mem = encode(pm, CONTEXTS)
    outer, inner = [t for t in mem.select(0).tensors], [t for t in mem.select(1).tensors]
    ids = _ids(1)
    with torch.no_grad(), pm.adapters_active(outer):
        first = pm.hf_model(input_ids=ids).logits
        with pm.adapters_active(inner):
            pm.hf_model(input_ids=ids)
        again = pm.hf_model(input_ids=ids).logits
    assert torch.equal(first, again) and pm._slot.active is None


def _enable_hf_checkpointing(model) -> None:
    """transformers' checkpointing switch under its current name (the older one warns in 5.x)."""
    name = "activation_checkpointing_enable" if hasattr(model, "activation_checkpointing_enable") else \
        "gradient_checkpointing_enable"
    getattr(model, name)()


def test_hf_gradient_checkpointing_is_refused():
    model = tiny_llama()
    _enable_hf_checkpointing(model)
    with pytest.raises(ValueError, match="gradient checkpointing") as err:
        PerkModel(model, TOKENIZER, PerkConfig(**CFG))
    # the error names the call that turns it off, and that call is enough
    (advice,) = re.findall(r"call hf_model\.(\w+)\(\)", str(err.value))
    getattr(model, advice)()
    PerkModel(model, TOKENIZER, PerkConfig(**CFG))
    pm = _pm("llama")
    _enable_hf_checkpointing(pm.hf_model)  # turned on later: refused at the next pass
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pm.meta_loss(CONTEXTS[:1], QUESTIONS[:1], ["kitchen"])


def test_a_model_dispatched_over_devices_is_refused():
    model = tiny_llama()
    model.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": 0}
    with pytest.raises(ValueError, match="dispatched over devices"):
        PerkModel(model, TOKENIZER, PerkConfig(**CFG))


def test_logit_soft_capping_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        PerkModel(Gemma2ForCausalLM(cfg), TOKENIZER, PerkConfig(**CFG, target_modules=["q_proj"]))


def test_quantised_linears_are_refused():
    class Linear8bitLt(nn.Linear):  # what bitsandbytes calls its 8-bit layer
        pass

    model = tiny_llama()
    old = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = Linear8bitLt(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match="bitsandbytes Linear8bitLt"):
        PerkModel(model, TOKENIZER, PerkConfig(**CFG))


def test_mixture_of_experts_projections_are_refused():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    model = Qwen2MoeForCausalLM(cfg)
    names = [n for n, m in model.named_modules() if n.endswith("gate_proj")]
    assert names, "the tiny MoE has no gate_proj"
    with pytest.raises(ValueError, match="mixture-of-experts"):
        PerkModel(model, TOKENIZER, PerkConfig(**CFG, target_modules=["gate_proj"]))
    PerkModel(Qwen2MoeForCausalLM(cfg), TOKENIZER, PerkConfig(**CFG, target_modules=["q_proj", "v_proj"]))


def test_perk_fast_works_on_cpu_without_triton(tmp_path):
    """triton is optional: with it unimportable, the package imports and encodes through the twins."""
    script = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import torch\n"
        "from perk_fast import PerkConfig, PerkModel, encode, kernels\n"
        "from tiny_models import TOKENIZER, tiny_gpt2\n"
        "pm = PerkModel(tiny_gpt2(), TOKENIZER, PerkConfig(inner_steps=2, segment_len=32, lora_rank=2))\n"
        "m = encode(pm, ['one context', 'two'])\n"
        "print('OK', len(m))\n"
        "from perk_fast.kernels import use_backend\n"
        "from perk_fast.kernels.lora import lora_linear\n"
        "x = torch.zeros(1, 20, 3); w = torch.zeros(2, 3); a = torch.zeros(1, 1, 3); b = torch.zeros(1, 2, 1)\n"
        "try:\n"
        "    with use_backend('triton'): lora_linear(x, w, None, a, b, scale=1.0)\n"
        "except RuntimeError as err: print('REFUSED', err)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 2" in proc.stdout and "REFUSED" in proc.stdout and "triton is not installed" in proc.stdout
