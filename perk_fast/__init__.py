"""perk_fast: PERK made fast and memory-efficient.

PERK learns a long context into a small LoRA adapter (the memory) with a few
gradient steps, then answers questions from that memory alone. ``meta_train``
teaches a model to do this well; ``encode`` writes many contexts at once.
"""
from .config import PerkConfig
from .encode import encode
from .memory import Memory
from .model import PerkModel
from .train import meta_train

__all__ = ["PerkConfig", "PerkModel", "Memory", "encode", "meta_train"]
__version__ = "0.1.0"
