"""perk_fast: PERK made fast and memory-efficient.

PERK learns a long context into a small LoRA adapter (the memory) with a few
gradient steps, then answers questions from that memory alone. ``meta_train``
teaches a model to do this well; ``encode`` writes many contexts at once.
"""
from .config import PerkConfig
from .encode import encode
from .memory import Memory
# `perk_fast.evaluate` is the function (the module stays importable as `from perk_fast.evaluate import ...`)
from .evaluate import evaluate, evaluate_in_context, finetune_in_context, sweep
from .metrics import exact_match, f1_score, score
from .model import PerkModel
from .readers import read_examples, write_jsonl
from .tasks import Example, generate
from .tokenizer import ByteTokenizer
from .train import meta_train

__all__ = [
    "PerkConfig", "PerkModel", "Memory", "encode", "meta_train",
    "evaluate", "evaluate_in_context", "finetune_in_context", "sweep",
    "Example", "generate", "read_examples", "write_jsonl", "score", "exact_match", "f1_score", "ByteTokenizer",
]
__version__ = "0.1.0"
