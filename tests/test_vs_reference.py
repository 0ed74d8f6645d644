"""perk_fast's meta-gradients against the independent ``higher`` reference (tests/perk_reference.py).

fp64 tiny random GPT-2 and Qwen2 (2 layers, hidden 32, byte vocabulary), B = 3 contexts of
different lengths (11, 6 and 7 segments of <= 16 tokens; 1-3 documents) and
``segments_per_step = 2`` (so the contexts have different numbers of micro-batches), T = 3 steps, learned (randomised) learning rates, LoRA B
and the weighting model's fc2 moved off zero so every meta-parameter gets a real gradient.
For every optimiser / unroll mode / weighting case and both meta-gradient strategies, the loss
and every meta-parameter's gradient must equal the reference's to a relative error of 1e-8.

fp64 hygiene (DESIGN.md section 5): Qwen2's RMSNorm computes in fp32 even in an fp64 model, so
its forward is replaced by a dtype-keeping one for both implementations; attention is SDPA
(the math kernel wherever a second derivative is taken).
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2 import modeling_qwen2

from perk_fast import PerkConfig, PerkModel
from perk_fast.tokenizer import ByteTokenizer

from perk_reference import ReferencePerk, TorchAdamW

REL_TOL = 1e-8

CONTEXTS = [
    ["The red fox lives in a den under the old oak.", "Its cubs play by the river at dawn.", "Owls watch."],
    ["Mara keeps bees; the hives stand behind the barn."],
    ["Tin melts at 232 C.", "Lead melts at 327 C, zinc at 420 C."],
]
QUESTIONS = ["Where does the fox live?", "Who keeps bees?", "When does tin melt?"]
ANSWERS = ["in a den", "Mara", "232 C"]


def _rmsnorm_keep_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(autouse=True)
def fp64_rmsnorm(monkeypatch):
    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", _rmsnorm_keep_dtype)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny fp64 models: a second thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return ByteTokenizer()


def tiny_model(kind: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(1234)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                         bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="sdpa")
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                          tie_word_embeddings=False, attn_implementation="sdpa")
        model = Qwen2ForCausalLM(cfg)
    return model.double().eval()


def make_pm(kind, tokenizer, *, move_b=True, **overrides) -> PerkModel:
    settings = dict(inner_steps=3, inner_lr=1e-2, lora_rank=4, lora_alpha=8.0, segment_len=16,
                    segments_per_step=2, unroll="full", unroll_start=1, seed=7)
    settings.update(overrides)
    pm = PerkModel(tiny_model(kind, len(tokenizer)), tokenizer, PerkConfig(**settings)).eval()
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        # learned LRs differ per tensor and step, so a mis-indexed LR shows
        pm.inner_lrs.mul_(0.5 + torch.rand(pm.inner_lrs.shape, generator=gen, dtype=pm.inner_lrs.dtype))
        if move_b:  # B = 0 makes the first AdamW step a kink and hides A's second-order terms
            for b in pm.lora_B:
                b.copy_(0.05 * torch.randn(b.shape, generator=gen, dtype=b.dtype))
        if pm.weighting is not None:  # zero fc2 would leave fc1 without gradient
            fc2 = pm.weighting.fc2.weight
            fc2.copy_(0.2 * torch.randn(fc2.shape, generator=gen, dtype=fc2.dtype))
    return pm


def perk_grads(pm, seed=0, supports=None):
    params = dict(pm.named_meta_parameters())
    try:
        loss = pm.meta_loss(CONTEXTS, QUESTIONS, ANSWERS, supports, seed=seed)
    except ModuleNotFoundError as err:
        if "metagrad" in str(err):
            pytest.fail(f"meta_grad={pm.config.meta_grad!r} needs perk_fast/metagrad.py, which is missing: {err}")
        raise
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), _materialize(dict(zip(params, grads)), params)


def _materialize(grads, params):
    """Unused meta-parameters (the weighting model under first_order) get a zero gradient."""
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in grads.items()}


def reference_grads(pm, seed=None, supports=None):
    loss, leaves = ReferencePerk(pm).meta_loss(CONTEXTS, QUESTIONS, ANSWERS, supports, rng_seed=seed)
    names = [n for n, _ in pm.named_meta_parameters()]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return loss.detach(), _materialize(dict(zip(names, grads)), leaves)


def assert_same(loss, grads, ref_loss, ref_grads, zero=()):
    """Loss and every gradient equal to REL_TOL; names in ``zero`` must have no gradient at all."""
    assert torch.isfinite(ref_loss)
    assert abs(loss.item() - ref_loss.item()) <= REL_TOL * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    worst = []
    for name, g_ref in ref_grads.items():
        g = grads[name]
        assert g.shape == g_ref.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite meta-gradient"
        ref_norm = g_ref.norm().item()
        if name in zero:
            assert ref_norm == 0 and g.norm().item() == 0, f"{name}: expected no gradient"
            continue
        assert ref_norm > 0, f"{name}: the reference gradient is zero, the test checks nothing"
        rel = (g - g_ref).norm().item() / ref_norm
        worst.append((rel, name))
    worst.sort(reverse=True)
    assert worst[0][0] <= REL_TOL, f"relative meta-gradient errors (worst first): {worst[:4]}"


# Inner learning rates are large enough that the second-order terms carry most of the
# meta-gradient (see test_second_order_terms_matter) yet small enough that the inner loop stays
# well conditioned: SGD at lr 0.5-2 on the weighted loss drives the token weights so hard that
# fp64 rounding grows to ~1e-7 between *any* two implementations (unrolled vs reference included).
CASES = {
    "adamw-full-weighted": dict(inner_optimizer="adamw", unroll="full", weighted_loss=True),
    "adamw-full-unweighted": dict(inner_optimizer="adamw", unroll="full", weighted_loss=False),
    "adamw-truncated-weighted": dict(inner_optimizer="adamw", unroll="truncated", weighted_loss=True),
    "adamw-first_order-weighted": dict(inner_optimizer="adamw", unroll="first_order", weighted_loss=True),
    "sgd-full-weighted": dict(inner_optimizer="sgd", inner_lr=0.1, unroll="full", weighted_loss=True),
    "sgd-truncated-unweighted": dict(inner_optimizer="sgd", inner_lr=1.0, unroll="truncated", weighted_loss=False),
}


@pytest.mark.parametrize("meta_grad", ["unrolled", "checkpointed", "recomputed"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_meta_gradient_matches_reference(kind, case, meta_grad, tokenizer):
    pm = make_pm(kind, tokenizer, meta_grad=meta_grad, **CASES[case])
    ref = reference_grads(pm)
    # first order: the weighting model acts only through (detached) inner gradients
    zero = [n for n in ref[1] if n.startswith("weighting.")] if pm.config.unroll == "first_order" else []
    assert_same(*perk_grads(pm), *ref, zero=zero)


def test_second_order_terms_matter(tokenizer):
    """The cases above would catch a dropped second-order term: it changes the gradient by O(1)."""
    full = reference_grads(make_pm("gpt2", tokenizer, unroll="full"))[1]
    first = reference_grads(make_pm("gpt2", tokenizer, unroll="first_order"))[1]
    lora = [n for n in full if n.startswith("lora_")]
    assert min((full[n] - first[n]).norm() / full[n].norm() for n in lora) > 0.05


@pytest.mark.parametrize("meta_grad", ["unrolled", "checkpointed", "recomputed"])
@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_zero_lora_b_gives_finite_meta_gradient(kind, meta_grad, tokenizer):
    """PEFT's B = 0 start: A's first gradients and AdamW's v are exactly 0 (sqrt'(0) must not leak NaN)."""
    pm = make_pm(kind, tokenizer, move_b=False, meta_grad=meta_grad)
    assert all(bool((b == 0).all()) for b in pm.lora_B)
    loss, grads = perk_grads(pm)
    ref_loss, ref = reference_grads(pm)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"{name}: non-finite meta-gradient at B = 0"
    assert_same(loss, grads, ref_loss, ref)


def test_training_mode_shuffled_doc_ids_and_supports(tokenizer):
    """Training mode shuffles doc ids from the call's seed; supports change the target format."""
    pm = make_pm("gpt2", tokenizer, unroll="truncated").train()
    supports = [["The fox lives in a den."], None, ["Tin melts at 232 C."]]
    ref = reference_grads(pm, seed=5, supports=supports)
    assert_same(*perk_grads(pm, seed=5, supports=supports), *ref)


def test_reference_copy_computes_the_base_model(tokenizer):
    """The reference's fresh base copy (LoRA B = 0) reproduces the HF model's logits."""
    hf = tiny_model("qwen2", len(tokenizer))
    ids = torch.tensor([list(range(5, 30))])
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    pm = PerkModel(hf, tokenizer, PerkConfig(lora_rank=4, inner_steps=2))
    ref = ReferencePerk(pm)
    ref.clone_meta_parameters()
    with torch.no_grad():
        hidden = ref.body(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(hidden @ ref.head.t(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_reference_adamw_is_torch_adamw(weight_decay):
    """TorchAdamW (driven by higher) takes exactly torch.optim.AdamW's steps."""
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    start = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    kwargs = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)

    p = torch.nn.Parameter(start.clone())
    opt = torch.optim.AdamW([p], **kwargs)
    for _ in range(4):
        opt.zero_grad()
        ((p - target) ** 3).abs().sum().backward()
        opt.step()

    q = torch.nn.Parameter(start.clone())
    diffopt = TorchAdamW(torch.optim.AdamW([q], **kwargs), [q])
    params = [q]
    for _ in range(4):
        params = diffopt.step(((params[0] - target) ** 3).abs().sum(), params=params)
    torch.testing.assert_close(params[0].detach(), p.detach(), rtol=1e-14, atol=1e-15)
    assert math.isfinite(params[0].sum().item())
