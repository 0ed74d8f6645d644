"""Tiny random Hugging Face models and helpers shared by the engine tests."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from perk_fast.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
VOCAB = TOKENIZER.vocab_size
SPECIAL = dict(bos_token_id=None, eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id)


def tiny_gpt2(seed: int = 0, layers: int = 2, hidden: int = 32, dtype=torch.float32, vocab: int = VOCAB):
    """2-layer GPT-2 (Conv1D projections), random weights."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=256, **SPECIAL)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_qwen2(seed: int = 0, layers: int = 2, hidden: int = 32, dtype=torch.float32, vocab: int = VOCAB):
    """2-layer Qwen2 (nn.Linear projections, GQA, biases on q/k/v), random weights."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=256,
                      tie_word_embeddings=False, **SPECIAL)
    return keep_norm_dtype(Qwen2ForCausalLM(cfg).to(dtype).eval())


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, dtype=torch.float32, vocab: int = VOCAB):
    """2-layer Llama, random weights."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=256, **SPECIAL)
    return keep_norm_dtype(LlamaForCausalLM(cfg).to(dtype).eval())


def _rms_forward(self, hidden_states):
    # HF's RMSNorm computes in fp32 even inside a float64 model (~1e-7 noise in fp64
    # comparisons); this keeps the input dtype, same maths.
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def keep_norm_dtype(model):
    """Make every RMSNorm of ``model`` compute in its input dtype (for fp64 tests)."""
    import types

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_forward, module)
    return model


def perturb_lora_b(pm, std: float = 0.05, seed: int = 1):
    """Move the zero-initialised LoRA B off zero (AdamW's first step is a kink at g = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in pm.lora_B:
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b) * std)


def flat_grads(loss, params):
    """Gradients of ``loss`` w.r.t. ``params`` with zeros for unused ones."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def rel_err(a_list, b_list) -> float:
    """max over tensors of ||a - b|| / max(||b||, tiny)."""
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(a_list, b_list))


CONTEXTS = [
    ["Alice moved to the kitchen. The cat sat on the mat.", "Bob took the apple to the garden."],
    "The secret code of Mallory is 4721.",
    ["Carol went to the office.", "Dave went to the hallway.", "Erin is in the bathroom today."],
]
QUESTIONS = ["Where is Alice?", "What is the code of Mallory?", "Where is Erin?"]
ANSWERS = ["kitchen", "4721", "bathroom"]


def bos_bpe_tokenizer(vocab_size: int = 320):
    """A real Hugging Face fast tokenizer (byte-level BPE trained here) that adds BOS, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [c if isinstance(c, str) else " ".join(c) for c in CONTEXTS] + QUESTIONS + ANSWERS
    texts += ["You have memorized 3 documents.", "Answer: doc_0: doc_1: doc_2:", "<support> </support> <output>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=64)
