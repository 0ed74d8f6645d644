"""Train the demo model shipped in ``perk_fast/assets/demo`` (CPU, seeded, reproducible).

    python -m perk_fast.demo_train                 # the shipped chain (mix), writes perk_fast/assets/demo
    python -m perk_fast.demo_train --checkpoint-dir C --resume   # go on where an interrupted chain stopped
    python -m perk_fast.demo_train --adopt recorded # the shipped files from the chain's recorded runs
    python -m perk_fast.demo_train --recipe binding --out /tmp/b  # the earlier, needles-only chain
    python -m perk_fast.demo_train --recipe direct --out /tmp/d   # the 2-hour chain from a fresh base
    python -m perk_fast.demo_train --recipe needles-first --out /tmp/n  # the same 2 hours, needles first
    python -m perk_fast.demo_train --recipe needle --out /tmp/x  # one run of a recipe (needle, multi)
    python -m perk_fast.demo_train --recipe needle --meta-steps 300 --eval-n 16 --out /tmp/x   # a quick look

The shipped model is the end of a *chain* of runs (``CHAINS["mix"]``), a d=96 Llama (265 k
weights) with a rank-16 memory, meta-trained on 2 gloo processes, 19,000 meta-steps in all:

* the ``binding`` chain (4 runs, 4,500 steps, 151 min): needles among 0 to 7 other people's codes
  (one asked) over documents shorter and longer than a segment. A curriculum run (single needles
  for its first 300 steps) and three continuations of it (``init_from``, 0.3x the learning rates);
* 1,000 steps with BabiLong-like qa1 and student-records recall added (46 min);
* the issue's mix (needles with 1 / 4 / 8 codes, qa1, qa2, records recall) with the token-weighting
  writer reset to uniform weights (``reset_meta``: trained on needles only, it gave qa1 answers
  weight 0), 2,000 steps (42 min), and the same mix 2,000 steps more (46 min);
* the same mix with the documents' ids in order (``shuffle_docs=False``; shuffled ids hide which of
  a story's moves came last), 2,000 steps (60 min), then 2,500 more three times (64, 63 and 68 min).

About 9 hours of training on 2 cores (541 min recorded, 7 of them paused while another job ran). Each
stage is an ordinary run (below); the chain writes all but the last under
``bench/results/demo_chain/<chain>`` (``--work-dir``), skips a stage already finished there (so it can
be split over sessions), and ends with the final held-out
evaluation (seed ``demo-final``, 100 examples per cell, stored as ``final_eval`` in
``train_report.json``; the predictions in ``bench/results/demo_eval``). The shipped files come from
the recorded runs ``bench/results/demo_curriculum{,2,3,4,5,8,9,12,13,14,15}`` (``--adopt recorded``: recipes
checked stage by stage, no retraining).

One run has three stages, every one from the seeded generators of :mod:`perk_fast.tasks` (here as
for ``--recipe needle``, the single-needle model shipped before the chain, now in
``bench/results/demo_needle``: needle in a haystack, contexts of ``train_len`` byte tokens, fact anywhere):

1. **Base LM.** A small Llama-shaped causal LM (d=64, 2 layers, RoPE, byte tokenizer, 124 k
   weights) learns the task's language as a plain language model on context segments
   (``doc_i: text<eos>``, what PERK's inner loop reads). No questions, no answers.
2. **PERK.** The LM gets a rank-8 LoRA memory on every projection and is meta-trained: each step
   writes ``meta_batch`` contexts into their own adapters (4 AdamW steps) and scores the questions
   from those memories. The meta-parameters (LoRA init, learned inner learning rates,
   token-weighting model) *and the base weights* are trained together, with second order through
   every inner step (``unroll="full"``). The joint base is not what makes the needle work: with a
   frozen base (``--base-lr 0``, the rest unchanged, 1000 steps) dev EM reaches 100 % by step 400
   as well, and the held-out table (seed ``demo-eval``, n = 50) reads PERK 100/100/100 % at 256
   tokens and 100/98/94 % (pre/mid/post) at 1024; the joint base gives a much lower outer loss
   (0.003 against 0.70 nats) and 100 % at 1024. With only 300 steps (cosine schedule over 300) the
   frozen base reached 25 % dev EM and the joint one 0 %. ``perk_fast.meta_train``
   optimises only the meta-parameters with one learning rate, so this script runs the same outer
   loop (``PerkModel.meta_loss`` on a batch, per-step seeds, warmup + cosine, clipping) over three
   AdamW groups: meta-parameters, learned learning rates (a small absolute step, they are ~1e-3),
   base weights. The joint step is exact: ``meta_grad="unrolled"`` and ``lm_head_loss="full"``
   (the chunked LM-head loss treats the head as frozen) carry the base's second-order terms too.
3. **FT-ICR baseline.** A copy of the stage-1 LM fine-tuned (all weights) with
   :func:`perk_fast.evaluate.finetune_in_context` on the *same* examples, steps and batch size,
   with the context in its prompt. No learning rate among 3e-4, 1e-3, 3e-3, 1e-2 learns to copy
   the code in that budget (dev EM 0 % at every one: ``python bench/demo_icr_lr.py``). A second
   copy, "FT-ICR 10x", gets 10x the steps (fresh examples after the shared ones; 407 s against
   PERK's 546 s on 2 cores): it does learn to read the code from its prompt at ``train_len``
   (100 %), which makes it the stronger baseline there, but not at 4x that length (0-2 %).

Run time of the single-needle recipe on 2 CPU cores: 16.8 min of training (LM 21 s, PERK 546 s, FT-ICR
36 s, FT-ICR 10x 407 s) and 65 s of held-out evaluation; a rerun on the same machine reproduced
that model's base, PERK base and meta-parameters bit for bit.

Held-out evaluation (seeds never used above) at ``train_len`` and 4x it, needle pre/mid/post, for
PERK, plain test-time training on the stage-1 base (a fresh PerkModel: no meta-learning) and
FT-ICR. Base weights are stored in fp16 (and rounded to fp16 *before* the final evaluation, so the
numbers are those of the saved files); meta-parameters stay fp32. ``train_report.json`` holds the
recipe, the stage times and the numbers; ``eval/`` the held-out predictions and ``sweep.png``.

Limit of that model: the memory holds *a* code, not a code per person. The single-needle model
answers the code in its memory whoever is asked about, so contexts with other people's codes in
them are answered at about chance (``python bench/demo_heldout.py``). An earlier run of this
script trained on ``--distractors 0,1,2,3`` (2000 steps) did not learn to tell the needles apart
either (dev EM 47 / 38 / 19 % with 1 / 2 / 3 other needles, about chance), while single needles
stayed at 100 %; the binding chain (above) is what teaches it.

The multi-task experiment (``--recipe multi``, not the shipped model; its run, models, checkpoint and
numbers are in ``bench/results/demo_multi``): a d=96 model (265 k weights) meta-trained on a cycle of
needles among 0 / 1 / 3 / 5 / 7 other people's codes, BabiLong-like qa1 and qa2 and student-records
recall, over documents of 64 / 128 / 256 bytes (segments of 128), 1,200 steps x 8 contexts of 256
tokens on 2 gloo processes (58 min of training on 2 cores, resumed once from its step-200
checkpoint). It did not learn the tasks: held-out exact match stays far below the single-needle
model (the README has the table and what limits it).

Binding codes to people: a curriculum (``--warmup-mix needle:0 --warmup-meta-steps 300``, then needles
among 0-7 others) and its continuation (``--init-from``: a finished run's models go on for more steps on
fresh examples, ``demo-train/after-<steps>``) bring the same d=96 model from chance to 87-97 % on
needles among 3 others after 4,500 meta-steps, with single needles at 100 % (``bench/results/demo_curriculum*``;
README).

Seeds (string seeds of ``tasks.generate``; ``SEEDS``): ``demo-lm`` (LM corpus), ``demo-train``
(PERK and FT-ICR examples), ``demo-dev`` (monitoring during training, used for the recipe choices),
``demo-eval`` (each run's own held-out evaluation, which recipe choices also looked at),
``demo-final`` (the shipped model's final evaluation, ``--adopt``; which run to ship was decided
after seeing it) and ``demo-fresh`` (the demo's default, ``python -m perk_fast.demo``: used by no
training, run evaluation or choice).
"""
from __future__ import annotations

import argparse
import copy
import functools
import dataclasses
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field

import torch

from .config import PerkConfig
from .data import build_segments, pad_rows
from .evaluate import evaluate, evaluate_in_context, finetune_in_context, sweep
from .model import PerkModel
from .schedule import warmup_cosine
from .tasks import generate
from .tokenizer import ByteTokenizer
from .io import load_tensors, read_header, write_header
from .train import meta_train

_print = functools.partial(print, flush=True)
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
# held-out predictions of the shipped run live with the other results of the repository, not in the package
SHIPPED_EVAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results",
                                "demo_eval")
# the single-needle model, shipped before the binding chain (bench/demo_heldout.py and demo_icr_lr.py check it)
NEEDLE_ASSETS_DIR = os.path.join(os.path.dirname(SHIPPED_EVAL_DIR), "demo_needle", "assets")
ICR_LONG = "FT-ICR 10x"  # the name of the long FT-ICR baseline with the single-needle recipe


def icr_long_name(recipe: "DemoRecipe", steps_before: dict | None = None) -> str:
    """Table name of the long FT-ICR baseline: ``FT-ICR <k>x``, k (to one decimal) = its steps / PERK's
    meta-steps. For a continuation give ``steps_before`` (the report's ``steps_before``): k then counts
    the earlier runs' steps too, which is what the two models were trained for."""
    before = steps_before or {"perk": 0, "icr_long": 0}
    k = (before["icr_long"] + recipe.icr_long_steps) / (before["perk"] + recipe.meta_steps)
    return f"FT-ICR {round(k, 1):g}x"
# "final": the shipped model's held-out numbers (``final_evaluation``); no run trains or evaluates on
#   it, but the adoption of curriculum13, 14 and 15 was decided after their numbers on it were seen
# "fresh": the demo's default (``python -m perk_fast.demo``): no training, run evaluation or recipe
#   choice has used it (first evaluated after the last choice, curriculum17's, was made)
SEEDS = {"lm": "demo-lm", "train": "demo-train", "dev": "demo-dev", "eval": "demo-eval", "final": "demo-final",
         "fresh": "demo-fresh"}


@dataclass
class DemoRecipe:
    """Everything that defines the demo model (stored in ``train_report.json``)."""

    # data: one task (``task`` with ``distractors`` needles cycled) or, with ``mix``, a cycle of task specs
    # ("needle:3" = a needle among 3 other people's codes; "qa1", "qa2", "records_recall"), each over the
    # document sizes of ``doc_mix`` (shorter and longer than a segment)
    task: str = "needle"
    train_len: int = 256
    doc_tokens: int = 120
    distractors: tuple[int, ...] = (0,)
    mix: tuple[str, ...] | None = None
    doc_mix: tuple[int, ...] | None = None
    eval_tasks: tuple[str, ...] | None = None
    # curriculum: the first ``warmup_meta_steps`` meta-steps draw from ``warmup_mix`` (task specs, cycled
    # like ``mix``, over the same document sizes); the rest from ``mix`` / ``distractors``
    warmup_mix: tuple[str, ...] | None = None
    warmup_meta_steps: int = 0
    eval_doc_tokens: int | None = None
    eval_lengths: tuple[int, ...] = (256, 1024)
    eval_positions: tuple[str, ...] = ("pre", "mid", "post")
    max_new_tokens: int = 8  # generated tokens per answer (dev and held-out evaluation): >= the longest answer
    # base model (transformers LlamaConfig fields)
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 192
    max_position_embeddings: int = 4096
    # stage 1: language model
    lm_contexts: int = 2000
    lm_steps: int = 400
    lm_batch: int = 32
    lm_lr: float = 3e-3
    # stage 2: PERK
    perk: dict = field(default_factory=lambda: dict(
        inner_steps=4, inner_lr=1e-3, inner_optimizer="adamw", unroll="full", meta_grad="unrolled",
        segment_len=128, segments_per_step=16, lora_rank=8, lora_alpha=32.0, lm_head_loss="full",
        outer_weight_decay=0.01, warmup_proportion=0.03, max_grad_norm=1.0, seed=0,
    ))
    meta_steps: int = 1000
    meta_batch: int = 8
    meta_lr: float = 1e-3
    lr_lr: float = 5e-5
    base_lr: float = 3e-4
    # stage 3: FT-ICR (same examples, steps and batch as stage 2), and FT-ICR with icr_long_steps
    # (10x the examples: about PERK's wall-clock; 0 skips it)
    icr_lr: float = 1e-3
    icr_long_steps: int = 10000
    # evaluation
    eval_n: int = 100
    dev_n: int = 24
    dev_every: int = 200
    eval_seed: str = SEEDS["eval"]
    seed: int = 0
    threads: int = 2
    ranks: int = 1  # processes of the PERK stage (torch.distributed, gloo); 1 thread each when > 1
    # continue an earlier run (the ``out`` folder of a finished one): its stage-1 base replaces stage 1,
    # PERK, FT-ICR and the long FT-ICR each go on from that run's model for ``meta_steps`` /
    # ``meta_steps`` / ``icr_long_steps`` more steps (fresh optimisers and schedules: a warm restart)
    # on examples that continue its data stream (a seed of their own, never the earlier examples)
    init_from: str | None = None
    # meta-parameters of the continued run put back to their initial values before training:
    # "weighting" (the token-weighting model's output layer: every token weighted ln(2)/3 again),
    # "inner_lrs" (every learned inner learning rate back at perk["inner_lr"]). A writer meta-learned
    # on one task weights the facts of another near zero (bench/demo_probe.py measures it)
    reset_meta: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        positive = ("train_len", "doc_tokens", "max_new_tokens", "hidden_size", "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "lm_contexts", "lm_steps", "lm_batch",
                    "meta_steps", "meta_batch", "dev_n", "dev_every", "threads", "ranks")
        for name in positive + ("icr_long_steps", "eval_n", "seed"):
            value = getattr(self, name)
            low = 1 if name in positive else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DemoRecipe.{name}={value!r} is invalid: allowed an integer >= {low}")
        for name in ("lm_lr", "meta_lr", "lr_lr", "icr_lr", "base_lr"):
            value = getattr(self, name)
            low_ok = value >= 0 if name == "base_lr" else value > 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low_ok:
                raise ValueError(f"DemoRecipe.{name}={value!r} is invalid: allowed a number "
                                 f"{'>= 0 (0 freezes the base)' if name == 'base_lr' else '> 0'}")
        if not self.distractors or any(not isinstance(d, int) or d < 0 for d in self.distractors):
            raise ValueError(f"DemoRecipe.distractors={self.distractors!r} is invalid: allowed a non-empty tuple "
                             "of integers >= 0")
        if isinstance(self.warmup_meta_steps, bool) or not isinstance(self.warmup_meta_steps, int) or not (
                0 <= self.warmup_meta_steps < self.meta_steps):
            raise ValueError(f"DemoRecipe.warmup_meta_steps={self.warmup_meta_steps!r} is invalid: allowed an integer "
                             f"in [0, meta_steps={self.meta_steps})")
        if (self.warmup_mix is None) != (self.warmup_meta_steps == 0):
            raise ValueError(f"DemoRecipe.warmup_mix={self.warmup_mix!r} and warmup_meta_steps="
                             f"{self.warmup_meta_steps} disagree: give both (a curriculum) or neither")
        for name in ("mix", "eval_tasks", "warmup_mix"):
            specs = getattr(self, name)
            if specs is not None:
                if not specs:
                    raise ValueError(f"DemoRecipe.{name}=() is invalid: allowed None or task specs")
                for spec in specs:
                    task_spec(spec, where=f"DemoRecipe.{name}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(f"DemoRecipe.init_from={self.init_from!r} is invalid: allowed None or the folder of "
                             "an earlier run")
        if not isinstance(self.reset_meta, tuple) or any(r not in RESETTABLE for r in self.reset_meta) or len(
                set(self.reset_meta)) != len(self.reset_meta):
            raise ValueError(f"DemoRecipe.reset_meta={self.reset_meta!r} is invalid: allowed a tuple of distinct "
                             f"names from {RESETTABLE}")
        if self.reset_meta and self.init_from is None:
            raise ValueError(f"DemoRecipe.reset_meta={self.reset_meta!r} needs init_from: a fresh run starts from "
                             "initial meta-parameters already")
        if self.doc_mix is not None and (not self.doc_mix or any(not isinstance(d, int) or d < 8
                                                                  for d in self.doc_mix)):
            raise ValueError(f"DemoRecipe.doc_mix={self.doc_mix!r} is invalid: allowed None or integers >= 8")

    def tasks_for_eval(self) -> tuple[str, ...]:
        """The evaluation table's task specs (the single task when there is no mix)."""
        if self.eval_tasks:
            return self.eval_tasks
        return (f"{self.task}:{self.distractors[0]}",) if self.task == "needle" else (self.task,)

    def perk_config(self) -> PerkConfig:
        """The recipe's ``perk`` dict as a validated :class:`PerkConfig` (a bad field raises there)."""
        return PerkConfig(**self.perk)

    def to_dict(self) -> dict:
        """Every field as plain JSON-able values (what ``train_report.json`` records as the recipe)."""
        return dataclasses.asdict(self)


RESETTABLE = ("weighting", "inner_lrs")


# ----------------------------------------------------------------------------- models
def reset_meta_parameters(perk_model: PerkModel, names) -> None:
    """Put meta-parameter groups of ``perk_model`` back to their initial values, in place:
    ``"weighting"`` zeroes the weighting model's output layer (``fc2``, zero-initialised: every token
    weight is ln(2)/3 again; ``fc1`` keeps its features), ``"inner_lrs"`` sets every learned inner
    learning rate to ``config.inner_lr``. ValueError names an unknown group or one the model lacks."""
    for name in names:
        if name not in RESETTABLE:
            raise ValueError(f"reset {name!r} is invalid: allowed one of {RESETTABLE}")
        with torch.no_grad():
            if name == "weighting":
                if perk_model.weighting is None:
                    raise ValueError("reset 'weighting': this PerkModel has no weighting model (weighted_loss=False)")
                perk_model.weighting.fc2.weight.zero_()
                perk_model.weighting.fc2.bias.zero_()
            else:
                if not isinstance(perk_model.inner_lrs, torch.nn.Parameter):
                    raise ValueError("reset 'inner_lrs': this PerkModel does not learn its inner learning rates")
                perk_model.inner_lrs.fill_(perk_model.config.inner_lr)



def meta_state_for_steps(perk_model: PerkModel, steps: int) -> dict[str, torch.Tensor]:
    """A copy of ``perk_model``'s meta-parameters for a PerkModel with ``steps`` inner steps: the
    learned inner learning rates (one column per step) keep their first ``steps`` columns, and steps
    beyond the learned ones take the last learned step's rates; the other meta-parameters do not
    depend on the number of steps. ValueError names a bad ``steps``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: allowed an integer >= 1 (inner steps)")
    state = {k: v.detach().clone() for k, v in perk_model.named_meta_parameters()}
    lrs = state.get("inner_lrs")
    if lrs is not None:
        if steps > lrs.shape[1]:
            lrs = torch.cat([lrs, lrs[:, -1:].expand(-1, steps - lrs.shape[1])], dim=1)
        state["inner_lrs"] = lrs[:, :steps].contiguous()
    return state


def meta_state_for_model(earlier: PerkModel, target: PerkModel) -> dict[str, torch.Tensor]:
    """``earlier``'s meta-parameters carried over to ``target``, a PerkModel on the same base whose
    memory may have more inner steps (:func:`meta_state_for_steps`) and a higher LoRA rank. A
    higher rank keeps the learned components as the first ones and takes ``target``'s own fresh
    initialisation for the new ones: A rows kaiming-uniform, B columns zero, so the initial memory
    writes exactly what the earlier one wrote (at the same LoRA scale, which check_continuation
    demands) and the inner steps can use the new directions. ValueError names a lower rank (it would
    drop learned components) or a different set of LoRA sites."""
    state = meta_state_for_steps(earlier, target.config.inner_steps)
    mine = dict(target.named_meta_parameters())
    if set(state) != set(mine):
        raise ValueError(f"the earlier memory's meta-parameters {sorted(set(state) ^ set(mine))} are not the "
                         "target's: the two PerkModels adapt different sites")
    r0, r1 = earlier.config.lora_rank, target.config.lora_rank
    if r1 < r0:
        raise ValueError(f"lora_rank={r1} is lower than the earlier memory's {r0}: a continuation may keep or "
                         "grow the rank, not drop learned components")
    if r1 > r0:
        for name, value in list(state.items()):
            fresh = mine[name].detach().clone()
            if name.startswith("lora_A."):
                fresh[:r0] = value
            elif name.startswith("lora_B."):
                fresh[:, :r0] = value
            else:
                continue
            state[name] = fresh
    return state


def build_base(recipe: DemoRecipe, tokenizer: ByteTokenizer) -> torch.nn.Module:
    """A randomly initialised Llama-shaped LM (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads, num_key_value_heads=recipe.num_attention_heads,
        intermediate_size=recipe.intermediate_size, max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(cfg).eval()


def round_to_fp16(model: torch.nn.Module) -> torch.nn.Module:
    """Round every weight to fp16 in place (kept fp32): what the fp16 files will hold."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def save_base(model: torch.nn.Module, path: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` with fp16 weights."""
    half = copy.deepcopy(model).half()
    half.save_pretrained(path)


def load_base(path: str) -> torch.nn.Module:
    """Load a base saved by :func:`save_base` (fp32 in memory), frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------- data
BABI_KW = {"n_people": 2, "n_distractors": 2, "with_support": False}


def task_spec(spec: str, where: str = "task spec") -> tuple[str, dict]:
    """``"needle:3"`` -> ("needle", {"n_distractors": 3}); ``"qa1"`` -> ("qa1", the demo's story size); ..."""
    from .tasks import TASKS

    task, _, arg = spec.partition(":")
    if task not in TASKS:
        raise ValueError(f"{where}: task {task!r} in {spec!r} is invalid: allowed one of {TASKS}")
    if task == "needle":
        if arg and not arg.isdigit():
            raise ValueError(f"{where}: {spec!r} is invalid: allowed needle:<number of other needles>")
        return task, {"n_distractors": int(arg or 0)}
    if arg:
        raise ValueError(f"{where}: {spec!r} takes no argument")
    return task, dict(BABI_KW) if task in ("qa1", "qa2", "qa3") else {}


def spec_label(spec: str) -> str:
    """Table name of a spec: ``needle:3`` -> ``needle (4 codes)``."""
    task, kw = task_spec(spec)
    if task == "needle":
        k = kw["n_distractors"] + 1
        return f"needle ({k} code{'s' if k > 1 else ''})"
    return task


def _mixed_examples(recipe: DemoRecipe, n: int, seed: str, length: int, **kw) -> list:
    """Example i: spec ``mix[i % m]`` with documents of ``doc_mix[(i // m) % d]`` tokens; each (spec,
    size) pair has its own seed stream, so the examples do not depend on ``n``."""
    mix, docs = recipe.mix, recipe.doc_mix or (recipe.doc_tokens,)
    buckets = {}
    order = []
    for i in range(n):
        key = (mix[i % len(mix)], docs[(i // len(mix)) % len(docs)])
        order.append((key, buckets.get(key, 0)))
        buckets[key] = buckets.get(key, 0) + 1
    made = {}
    for (spec, doc), count in buckets.items():
        task, task_kw = task_spec(spec)
        made[(spec, doc)] = generate(task, count, seed=f"{seed}/{spec}/{doc}", context_tokens=length, doc_tokens=doc,
                                     **{**task_kw, **kw})
    return [made[key][j] for key, j in order]


def task_examples(recipe: DemoRecipe, n: int, seed: str, context_tokens: int | None = None, **kw) -> list:
    """``n`` examples at ``context_tokens`` (default ``train_len``). With ``recipe.mix``: cycling through
    its task specs and ``doc_mix`` document sizes. Otherwise cycling through ``recipe.distractors``:
    example i has ``distractors[i % k]`` further needles (other people, other codes), so the memory must
    bind each code to its person. Each count has its own seed stream (``<seed>/d<count>``)."""
    length = recipe.train_len if context_tokens is None else context_tokens
    if recipe.mix:
        return _mixed_examples(recipe, n, seed, length, **kw)
    k = len(recipe.distractors)
    parts = [generate(recipe.task, (n - j + k - 1) // k, seed=f"{seed}/d{d}", context_tokens=length,
                      doc_tokens=recipe.doc_tokens, n_distractors=d, **kw)
             for j, d in enumerate(recipe.distractors)]
    return [parts[i % k][i // k] for i in range(n)]


# ----------------------------------------------------------------------------- stage 1
def train_seed(steps_before: int = 0) -> str:
    """The seed of the training examples: ``SEEDS["train"]``, or for a run continuing one that
    already took ``steps_before`` meta-steps a stream of its own (``.../after-<steps>``)."""
    return SEEDS["train"] if not steps_before else f"{SEEDS['train']}/after-{steps_before}"


def training_examples(recipe: DemoRecipe, seed: str = SEEDS["train"]) -> list:
    """The PERK stage's examples in visiting order, ``meta_batch`` per step: ``warmup_meta_steps``
    steps of the curriculum's ``warmup_mix`` (its own seed stream), then the recipe's tasks."""
    warm = recipe.warmup_meta_steps * recipe.meta_batch
    rest = task_examples(recipe, recipe.meta_steps * recipe.meta_batch - warm, seed)
    if not warm:
        return rest
    return _mixed_examples(dataclasses.replace(recipe, mix=recipe.warmup_mix), warm, seed + "/warmup",
                           recipe.train_len) + rest


def read_earlier_run(path: str) -> dict:
    """The ``train_report.json`` of the earlier run a recipe's ``init_from`` names, after checking
    that the folder holds every model a continuation starts from (FileNotFoundError names what is
    missing)."""
    need = ["train_report.json", "tokenizer", "base", os.path.join("perk", "base"), "icr"]
    missing = [p for p in need if not os.path.exists(os.path.join(path, p))]
    if missing:
        raise FileNotFoundError(f"init_from={path!r}: missing {missing} (the output folder of a finished "
                                "`python -m perk_fast.demo_train` run holds them)")
    with open(os.path.join(path, "train_report.json"), encoding="utf-8") as fh:
        return json.load(fh)


def check_continuation(recipe: DemoRecipe, earlier: dict) -> None:
    """Raise ValueError when ``recipe`` cannot continue the run whose ``train_report.json`` is
    ``earlier``: its model shape and memory kind must match (the number of inner steps may differ and
    the LoRA rank may grow at the same LoRA scale: :func:`meta_state_for_model`)."""
    before = earlier["recipe"]
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings"):
        if before[name] != getattr(recipe, name):
            raise ValueError(f"init_from={recipe.init_from!r}: its {name}={before[name]} differs from the "
                             f"recipe's {getattr(recipe, name)}")
    for name in ("inner_optimizer", "segment_len"):  # inner_steps and lora_rank may grow: meta_state_for_model
        if before["perk"].get(name) != recipe.perk.get(name):
            raise ValueError(f"init_from={recipe.init_from!r}: its perk {name}={before['perk'].get(name)!r} "
                             f"differs from the recipe's {recipe.perk.get(name)!r}")
    was, now = PerkConfig(**before["perk"]), recipe.perk_config()
    if now.lora_rank < was.lora_rank:
        raise ValueError(f"init_from={recipe.init_from!r}: the recipe's perk lora_rank={now.lora_rank} is lower "
                         f"than the earlier run's {was.lora_rank} (a continuation may grow the rank, not drop "
                         "learned components)")
    if abs(now.lora_scale - was.lora_scale) > 1e-9 * was.lora_scale:
        keep = was.lora_scale * (now.lora_rank ** 0.5 if now.lora_rslora else now.lora_rank)
        raise ValueError(f"init_from={recipe.init_from!r}: the recipe's LoRA scale {now.lora_scale:g} (lora_rank="
                         f"{now.lora_rank}, lora_alpha={now.lora_alpha:g}) differs from the earlier run's "
                         f"{was.lora_scale:g}: the learned memory would write something else; lora_alpha={keep:g} "
                         "keeps it")
    if recipe.icr_long_steps and not os.path.exists(os.path.join(recipe.init_from, "icr_long")):
        raise ValueError(f"init_from={recipe.init_from!r}: the earlier run has no long FT-ICR (icr_long/) to "
                         "continue; give icr_long_steps=0")


def steps_so_far(report: dict) -> dict:
    """Steps each system of the run behind ``report`` was trained for, its earlier runs included:
    ``{"perk": ..., "icr": ..., "icr_long": ...}``."""
    before = report.get("steps_before") or {"perk": 0, "icr": 0, "icr_long": 0}
    recipe = report["recipe"]
    return {"perk": before["perk"] + recipe["meta_steps"], "icr": before["icr"] + recipe["meta_steps"],
            "icr_long": before["icr_long"] + recipe["icr_long_steps"]}


def lm_rows(recipe: DemoRecipe, tokenizer: ByteTokenizer) -> list[list[int]]:
    """Context segments of the LM corpus, as PERK's inner loop sees them (random doc ids)."""
    segment_len = recipe.perk["segment_len"]
    rng = random.Random(f"{SEEDS['lm']}/doc-ids")
    rows = []
    for ex in task_examples(recipe, recipe.lm_contexts, SEEDS["lm"]):
        rows += [ids for ids, _ in build_segments(tokenizer, ex.context, segment_len, rng).segments]
    return rows


def pretrain_lm(model, tokenizer, recipe: DemoRecipe, log=_print) -> list[dict]:
    """Plain next-token training on :func:`lm_rows` (AdamW, warmup + cosine)."""
    rows = lm_rows(recipe, tokenizer)
    rng = random.Random(f"{SEEDS['lm']}/batches")
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lm_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, recipe.lm_steps // 20)
    history = []
    model.train()
    for step in range(recipe.lm_steps):
        for g in opt.param_groups:
            g["lr"] = recipe.lm_lr * warmup_cosine(step, recipe.lm_steps, warmup)
        batch = [rows[rng.randrange(len(rows))] for _ in range(recipe.lm_batch)]
        ids = pad_rows(batch, tokenizer.pad_token_id)
        labels = pad_rows(batch, -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        if (step + 1) % 100 == 0 or step + 1 == recipe.lm_steps:
            log(f"  lm step {step + 1}/{recipe.lm_steps}  loss {history[-1]['loss']:.4f} nats/byte")
    model.eval()
    return history


# ----------------------------------------------------------------------------- stage 2
def meta_train_joint(perk_model: PerkModel, dataset: list, recipe: DemoRecipe, *, dev=None, log=_print,
                     checkpoint_dir: str | None = None, resume: bool = False) -> list[dict]:
    """PERK's outer loop (:func:`perk_fast.meta_train`) over the meta-parameters and, when
    ``base_lr > 0``, the base weights, in three AdamW groups: LoRA initialisation and weighting model
    at ``meta_lr``, learned learning rates at ``lr_lr`` without decay, base weights at ``base_lr``.
    The dataset is visited in order (one example per context, ``meta_batch`` per step); dev exact
    match every ``dev_every`` steps and at the end.
    """
    from . import distributed

    if recipe.ranks > 1 and not distributed.context().active:
        return _meta_train_spawned(perk_model, dataset, recipe, dev=dev, log=log, checkpoint_dir=checkpoint_dir,
                                   resume=resume)
    cfg = perk_model.config
    meta = ["lora"] + (["weighting"] if perk_model.weighting is not None else [])
    groups = [{"params": meta, "lr": recipe.meta_lr, "weight_decay": cfg.outer_weight_decay}]
    if isinstance(perk_model.inner_lrs, torch.nn.Parameter):
        groups.append({"params": "inner_lrs", "lr": recipe.lr_lr, "weight_decay": 0.0})
    if recipe.base_lr > 0:
        groups.append({"params": "base", "lr": recipe.base_lr, "weight_decay": cfg.outer_weight_decay})
    start = time.perf_counter()
    recent: list[float] = []
    skipped = [0]  # steps the gradient-spike guard skipped in this process (perk.grad_spike_factor)

    def dev_eval(model: PerkModel, step: int) -> dict:
        if dev is None or (step % recipe.dev_every and step != recipe.meta_steps):
            return {}
        scored = evaluate(model, dev, max_new_tokens=recipe.max_new_tokens, progress=False)
        return {"dev_exact_match": scored["exact_match"]}

    def report(record: dict) -> None:
        recent.append(record["loss"])
        del recent[:-50]
        if record.get("skipped"):  # the gradient-spike guard (perk.grad_spike_factor) skipped this step
            skipped[0] += 1
            log(f"  meta step {record['step']} skipped: gradient norm {record['grad_norm']:.4g} over the guard's "
                f"limit {record['spike_limit'] if record['spike_limit'] is None else format(record['spike_limit'], '.4g')}")
        dev_em = record.get("eval", {}).get("dev_exact_match")
        if record["step"] % 50 == 0 or dev_em is not None:
            msg = (f"  meta step {record['step']}/{recipe.meta_steps}  loss {sum(recent) / len(recent):.4f}"
                   f"  {time.perf_counter() - start:.0f}s")
            if dev_em is not None:
                msg += f"  dev EM {100 * dev_em:.1f}%"
            if "skipped" in record:
                msg += f"  {skipped[0]} skipped"
            log(msg)

    history = meta_train(perk_model, dataset, steps=recipe.meta_steps, batch_size=recipe.meta_batch,
                         param_groups=groups, shuffle=False, eval_fn=dev_eval, eval_every=recipe.dev_every,
                         on_step=report, progress=False, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=100 if checkpoint_dir else None, resume=resume)
    for record in history:
        record.update(record.pop("eval", None) or {})
    return history


def _meta_train_spawned(perk_model: PerkModel, dataset: list, recipe: DemoRecipe, *, dev=None, log=_print,
                        checkpoint_dir: str | None = None, resume: bool = False) -> list:
    """The PERK stage on ``recipe.ranks`` gloo processes (1 thread each), started here: every rank
    loads the stage-1 base and meta-parameters from a temporary directory, meta-trains its slice of
    each batch (``perk_fast.meta_train``), and rank 0 writes the result back."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        perk_model.hf_model.save_pretrained(os.path.join(tmp, "base"))
        perk_model.save(os.path.join(tmp, "perk"))
        torch.save({"dataset": dataset, "dev": dev, "checkpoint_dir": checkpoint_dir, "resume": resume},
                   os.path.join(tmp, "data.pt"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log(f"  meta-training on {recipe.ranks} processes (torch.distributed, gloo, 1 thread each)")
        mp.spawn(_rank_worker, args=(recipe.ranks, port, tmp, recipe.to_dict()), nprocs=recipe.ranks, join=True)
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "result", "base"), dtype=torch.float32)
        with torch.no_grad():
            perk_model.hf_model.load_state_dict(trained.state_dict())
            perk_model.load_meta_state(load_tensors(os.path.join(tmp, "result"), "meta_parameters.safetensors"))
        with open(os.path.join(tmp, "result", "history.json")) as fh:
            return json.load(fh)


def _rank_worker(rank: int, world: int, port: int, tmp: str, recipe_dict: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from . import distributed

    distributed.setup()  # the process group first: meta_train_joint then trains here, it does not spawn again
    try:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        recipe = recipe_from_dict(recipe_dict)
        base = load_base(os.path.join(tmp, "base"))
        perk_model = PerkModel.load(os.path.join(tmp, "perk"), base, ByteTokenizer())
        data = torch.load(os.path.join(tmp, "data.pt"), weights_only=False)
        history = meta_train_joint(perk_model, data["dataset"], recipe, dev=data["dev"],
                                   log=_print if rank == 0 else (lambda *a, **k: None),
                                   checkpoint_dir=data["checkpoint_dir"], resume=data["resume"])
        if rank == 0:
            out = os.path.join(tmp, "result")
            perk_model.hf_model.save_pretrained(os.path.join(out, "base"))
            perk_model.save(out)
            with open(os.path.join(out, "history.json"), "w") as fh:
                json.dump(history, fh)
        torch.distributed.barrier()  # every rank leaves together, after rank 0 has saved
    finally:
        # the group is torn down here, not at the spawned process's exit: a rank whose gloo threads
        # outlived the group was seen to abort ("terminate called without an active exception")
        distributed.teardown()


def recipe_from_dict(fields: dict) -> DemoRecipe:
    """A DemoRecipe from its ``to_dict()`` (lists become tuples again)."""
    fields = dict(fields)
    for key in ("distractors", "eval_lengths", "eval_positions", "mix", "doc_mix", "eval_tasks", "warmup_mix",
                "reset_meta"):
        if fields.get(key) is not None:
            fields[key] = tuple(fields[key])
    return DemoRecipe(**fields)


RUN_FILES = ("train_report.json", "tokenizer", "base", "icr", os.path.join("perk", "perk_model.json"),
             os.path.join("perk", "meta_parameters.safetensors"), os.path.join("perk", "base"))


def load_run(assets_dir: str) -> dict:
    """The models of a finished run in ``assets_dir`` (the shipped demo's by default in
    :func:`perk_fast.demo.load_demo`): ``perk`` (the meta-trained PerkModel), ``ttt`` (a fresh
    PerkModel on the stage-1 base), ``icr``, ``icr_long`` (None when the recipe had none),
    ``tokenizer``, ``recipe``, ``report``. FileNotFoundError names what is missing."""
    missing = [p for p in RUN_FILES if not os.path.exists(os.path.join(assets_dir, p))]
    if missing:
        raise FileNotFoundError(
            f"demo assets missing in {assets_dir}: {missing}; train them with `python -m perk_fast.demo_train`"
        )
    with open(os.path.join(assets_dir, "train_report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    recipe = recipe_from_dict(report["recipe"])
    tokenizer = ByteTokenizer.from_pretrained(os.path.join(assets_dir, "tokenizer"))
    perk = PerkModel.load(os.path.join(assets_dir, "perk"), load_base(os.path.join(assets_dir, "perk", "base")),
                          tokenizer)
    # the TTT baseline writes its memories as the PERK model does (a chain's test-time fields included)
    ttt = PerkModel(load_base(os.path.join(assets_dir, "base")), tokenizer,
                    recipe.perk_config().replace(**report.get("test_time_perk", {})))
    icr = load_base(os.path.join(assets_dir, "icr"))
    icr_long = None
    if recipe.icr_long_steps:
        path = os.path.join(assets_dir, "icr_long")
        if not os.path.exists(path):
            raise FileNotFoundError(f"demo assets missing in {assets_dir}: ['icr_long'] (the recipe has "
                                    f"icr_long_steps={recipe.icr_long_steps}); train them with "
                                    "`python -m perk_fast.demo_train`")
        icr_long = load_base(path)
    return {"perk": perk, "ttt": ttt, "icr": icr, "icr_long": icr_long, "tokenizer": tokenizer, "recipe": recipe,
            "report": report}


# ----------------------------------------------------------------------------- evaluation
def cell_positions(recipe: DemoRecipe, spec: str, length: int, *, n: int, seed: str) -> list[str]:
    """The fact positions evaluated for ``spec`` at ``length``: ``recipe.eval_positions`` when the
    relevant units of every one of the ``n`` examples fit in a third of the context, else
    ``["random"]`` (a story of ~130 tokens cannot lie in the middle third of 256)."""
    task, kw = task_spec(spec)
    probe = generate(task, n, seed=seed, context_tokens=length, position="random",
                     doc_tokens=recipe.eval_doc_tokens or recipe.doc_tokens, **kw)
    if all(3 * e.meta["facts_tokens"] <= e.meta["context_tokens"] for e in probe):
        return list(recipe.eval_positions)
    return ["random"]


def eval_systems(perk_model, ttt_model, icr_model, tokenizer, recipe: DemoRecipe, *, n: int, seed: str,
                 icr_long_model=None, out_dir: str | None = None, verbose: bool = True,
                 lengths: tuple[int, ...] | None = None, steps_before: dict | None = None) -> dict:
    """The demo's tables: PERK, plain TTT, FT-ICR (and the long FT-ICR, named by :func:`icr_long_name`
    with ``steps_before``) over ``eval_lengths`` x ``eval_positions``, one table per evaluation task.
    Returns ``{"results": {task label: {system: {length: {position: summary}}}}, "table": text, ...}``
    (one task: the sweep's own report)."""
    systems = {
        "PERK": perk_model,
        "TTT (no meta)": ttt_model,
        "FT-ICR": functools.partial(evaluate_in_context, icr_model, tokenizer,
                                    max_new_tokens=recipe.max_new_tokens, progress=False),
    }
    if icr_long_model is not None:
        systems[icr_long_name(recipe, steps_before)] = functools.partial(
            evaluate_in_context, icr_long_model, tokenizer, max_new_tokens=recipe.max_new_tokens, progress=False)
    lengths = recipe.eval_lengths if lengths is None else lengths
    if not recipe.mix and not recipe.eval_tasks:
        return sweep(systems, task=recipe.task, lengths=lengths, positions=recipe.eval_positions, n=n,
                     seed=seed, max_new_tokens=recipe.max_new_tokens, out_dir=out_dir, verbose=verbose,
                     doc_tokens=recipe.doc_tokens)
    reports, tables = {}, []
    doc = recipe.eval_doc_tokens or recipe.doc_tokens
    for spec in recipe.tasks_for_eval():
        task, kw = task_spec(spec)
        label = spec_label(spec)
        sub = None if out_dir is None else os.path.join(out_dir, spec.replace(":", "-"))
        where = {length: cell_positions(recipe, spec, length, n=n, seed=f"{seed}/{spec}") for length in lengths}
        rep = sweep(systems, task=task, lengths=lengths, positions=where, n=n, seed=f"{seed}/{spec}",
                    max_new_tokens=recipe.max_new_tokens, out_dir=sub, verbose=False, doc_tokens=doc, **kw)
        reports[label] = rep["results"]
        anywhere = [length for length, p in where.items() if p == ["random"]]
        note = (f"; at {', '.join(map(str, anywhere))} tokens the facts take more than a third of the context: "
                "placed anywhere" if anywhere else "")
        tables.append(f"{label} (documents of {doc} tokens, segments of {perk_model.config.segment_len}{note})\n"
                      + rep["table"])
    table = "\n\n".join(tables)
    if verbose:
        print(table)
    return {"task": "mix", "seed": seed, "n": n, "lengths": list(lengths), "positions": list(recipe.eval_positions),
            "metric": "exact_match", "results": reports, "table": table}


# ----------------------------------------------------------------------------- main
def machine_info() -> dict:
    """What a run's report records of the machine: Python, torch, the CPU (its model name where
    /proc/cpuinfo has one, and the vector ISA torch's kernels use), the core count. Two runs of one
    seeded recipe on different CPUs can round float sums differently, and a long second-order run
    then drifts apart (README, "Reproducing a stage")."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_model": model,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count()}


def train(recipe: DemoRecipe, out_dir: str, log=_print, eval_dir: str | None = None,
          checkpoint_dir: str | None = None, resume: bool = False) -> dict:
    """Run the three stages, evaluate on held-out seeds, write the models and report to ``out_dir``
    and the held-out predictions, ``sweep.json`` and ``sweep.png`` to ``eval_dir`` (default
    ``out_dir/eval``)."""
    eval_dir = os.path.join(out_dir, "eval") if eval_dir is None else eval_dir
    torch.set_num_threads(recipe.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = ByteTokenizer()
    resumed_from = None
    if resume:  # read (and checked) before stage 1, so that a missing checkpoint fails at once
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (the folder holding last/)")
        state = os.path.join(checkpoint_dir, "last", "trainer_state.json")
        if not os.path.exists(state):
            raise FileNotFoundError(f"--resume: no checkpoint at {state}")
        with open(state, encoding="utf-8") as fh:
            resumed_from = json.load(fh)["step"]
        log(f"resuming the PERK stage after step {resumed_from} ({checkpoint_dir}); stage 1 runs again")
    times = {}
    t_all = time.perf_counter()
    earlier, before = None, {"perk": 0, "icr": 0, "icr_long": 0}
    if recipe.init_from is not None:
        earlier = read_earlier_run(recipe.init_from)
        check_continuation(recipe, earlier)
        before = steps_so_far(earlier)

    if earlier is None:
        log(f"[1/3] base LM: Llama d={recipe.hidden_size} x {recipe.num_hidden_layers} layers, "
            f"{recipe.lm_steps} steps")
        t = time.perf_counter()
        base = build_base(recipe, tokenizer)
        lm_history = pretrain_lm(base, tokenizer, recipe, log=log)
        round_to_fp16(base)
    else:
        log(f"[1/3] base LM: the stage-1 base of {recipe.init_from} (continuing after {before['perk']} PERK "
            f"steps, {before['icr']} FT-ICR steps, {before['icr_long']} long FT-ICR steps)")
        t = time.perf_counter()
        base = load_base(os.path.join(recipe.init_from, "base"))
        lm_history = []
    times["lm_s"] = time.perf_counter() - t
    n_params = sum(p.numel() for p in base.parameters())

    seed = train_seed(before["perk"])
    dataset = training_examples(recipe, seed)
    dev = task_examples(recipe, recipe.dev_n, SEEDS["dev"])

    log(f"[2/3] PERK meta-training: {recipe.meta_steps} steps x {recipe.meta_batch} contexts "
        f"(base {'trained jointly' if recipe.base_lr > 0 else 'frozen'})")
    t = time.perf_counter()
    if earlier is None:
        perk_base = copy.deepcopy(base)
        perk_model = PerkModel(perk_base, tokenizer, recipe.perk_config())
    else:
        perk_base = load_base(os.path.join(recipe.init_from, "perk", "base"))
        # load() checks that the meta-parameters belong to this base; the recipe's PerkConfig then
        # carries them (it may change, e.g., the unroll mode, but not their shapes: check_continuation)
        # (on a copy of the base: one PerkModel per HF model)
        earlier_perk = PerkModel.load(os.path.join(recipe.init_from, "perk"), copy.deepcopy(perk_base), tokenizer)
        perk_model = PerkModel(perk_base, tokenizer, recipe.perk_config())
        steps, earlier_steps = perk_model.config.inner_steps, earlier_perk.config.inner_steps
        perk_model.load_meta_state(meta_state_for_model(earlier_perk, perk_model))
        rank, earlier_rank = perk_model.config.lora_rank, earlier_perk.config.lora_rank
        if rank != earlier_rank:
            log(f"  LoRA rank {earlier_rank} -> {rank}: the learned components are kept, components "
                f"{earlier_rank + 1}-{rank} start fresh (A kaiming-uniform, B zero; scale "
                f"{perk_model.config.lora_scale:g} unchanged)")
        if steps != earlier_steps:
            log(f"  inner steps {earlier_steps} -> {steps}: " + (
                f"steps {earlier_steps + 1}-{steps} start from the learned rates of step {earlier_steps}"
                if steps > earlier_steps else f"the learned rates of the first {steps} steps are kept"))
        del earlier_perk
        if recipe.reset_meta:
            reset_meta_parameters(perk_model, recipe.reset_meta)
            log(f"  meta-parameters reset to their initial values: {', '.join(recipe.reset_meta)}")
    meta_history = meta_train_joint(perk_model, dataset, recipe, dev=dev, log=log, checkpoint_dir=checkpoint_dir,
                                    resume=resume)
    for p in perk_base.parameters():
        p.requires_grad_(False)
    round_to_fp16(perk_base)
    times["perk_s"] = time.perf_counter() - t

    log(f"[3/3] FT-ICR baseline: same {recipe.meta_steps} steps x {recipe.meta_batch} examples, context in prompt")
    t = time.perf_counter()
    icr = copy.deepcopy(base) if earlier is None else load_base(os.path.join(recipe.init_from, "icr"))
    icr_history = finetune_in_context(icr, tokenizer, dataset, steps=recipe.meta_steps, batch_size=recipe.meta_batch,
                                      lr=recipe.icr_lr, seed=recipe.seed, progress=False)
    for p in icr.parameters():
        p.requires_grad_(False)
    round_to_fp16(icr)
    times["icr_s"] = time.perf_counter() - t
    icr_long, icr_long_history = None, []
    if recipe.icr_long_steps:
        log(f"      {icr_long_name(recipe, before)}: {recipe.icr_long_steps} steps x {recipe.meta_batch} examples "
            "(the same ones first)")
        t = time.perf_counter()
        icr_long = copy.deepcopy(base) if earlier is None else load_base(os.path.join(recipe.init_from, "icr_long"))
        long_data = task_examples(recipe, recipe.icr_long_steps * recipe.meta_batch, seed)
        icr_long_history = finetune_in_context(icr_long, tokenizer, long_data, steps=recipe.icr_long_steps,
                                               batch_size=recipe.meta_batch, lr=recipe.icr_lr, seed=recipe.seed,
                                               progress=False)
        icr_long.requires_grad_(False)
        round_to_fp16(icr_long)
        times["icr_long_s"] = time.perf_counter() - t
    times["train_total_s"] = time.perf_counter() - t_all

    log(f"saving to {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    save_base(base, os.path.join(out_dir, "base"))
    save_base(perk_base, os.path.join(out_dir, "perk", "base"))
    perk_model.save(os.path.join(out_dir, "perk"))
    save_base(icr, os.path.join(out_dir, "icr"))
    if icr_long is not None:
        save_base(icr_long, os.path.join(out_dir, "icr_long"))

    final = None
    t = time.perf_counter()
    if recipe.eval_n:
        log(f"held-out evaluation (seed {recipe.eval_seed!r}, n={recipe.eval_n} per cell)")
        ttt_model = PerkModel(load_base(os.path.join(out_dir, "base")), tokenizer, recipe.perk_config())
        final = eval_systems(perk_model, ttt_model, icr, tokenizer, recipe, n=recipe.eval_n, seed=recipe.eval_seed,
                             icr_long_model=icr_long, out_dir=eval_dir, steps_before=before)
    else:
        log("held-out evaluation skipped (--eval-n 0)")
    times["eval_s"] = time.perf_counter() - t

    report = {
        "recipe": recipe.to_dict(),
        "seeds": SEEDS,
        "base_parameters": n_params,
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "threads": recipe.threads,
        # a resumed PERK stage: perk_s counts this process only (the log holds the earlier part)
        "perk_resumed_from_step": resumed_from,
        "machine": machine_info(),
        "lm_final_loss": (sum(r["loss"] for r in lm_history[-20:]) / 20 if lm_history
                          else earlier["lm_final_loss"]),
        # a continuation (recipe.init_from): the steps of the earlier runs, and their reports' summaries
        "steps_before": before,
        "earlier_run": None if earlier is None else {
            "init_from": recipe.init_from, "times_s": earlier["times_s"],
            "perk_history": earlier["perk_history"], "eval": earlier.get("eval"),
            "earlier_run": earlier.get("earlier_run")},
        "perk_history": meta_history[:: max(1, len(meta_history) // 100)] + meta_history[-1:],
        # the steps the gradient-spike guard skipped (perk.grad_spike_factor; the sampled history may miss them)
        **({"perk_skipped_steps": [r["step"] for r in meta_history if r.get("skipped")]}
           if recipe.perk.get("grad_spike_factor") is not None else {}),
        "icr_final_loss": sum(r["loss"] for r in icr_history[-20:]) / 20,
        "icr_long_final_loss": (sum(r["loss"] for r in icr_long_history[-20:]) / 20) if icr_long_history else None,
        "eval": None if final is None else {k: final[k] for k in ("task", "seed", "n", "lengths", "positions",
                                                                  "metric", "results", "table")},
    }
    with open(os.path.join(out_dir, "train_report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
    log(f"training {times['train_total_s'] / 60:.1f} min (LM {times['lm_s']:.0f}s, PERK {times['perk_s']:.0f}s, "
        f"FT-ICR {times['icr_s']:.0f}s"
        + (f", {icr_long_name(recipe, before)} {times['icr_long_s']:.0f}s" if "icr_long_s" in times else "") + "); "
        f"evaluation {times['eval_s']:.0f}s")
    return report


@dataclass(frozen=True)
class ChainArgs:
    """The command line of a chain (``--recipe mix``): where it writes, and how it resumes."""

    name: str
    out: str
    eval_out: str | None
    work_dir: str | None
    checkpoint_dir: str | None
    resume: bool
    final_n: int
    adopt: tuple[str, ...] | None = None


_CHAIN_ONLY = ("work_dir", "final_n", "adopt")
_RUN_ARGS = ("out", "eval_out", "recipe", "checkpoint_dir", "resume") + _CHAIN_ONLY


def _parse(argv=None) -> "tuple[DemoRecipe, str, str | None, str | None, bool] | ChainArgs":
    names = sorted(RECIPES) + sorted(CHAINS)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=SHIPPED_CHAIN, choices=names)
    chosen, _ = pre.parse_known_args(argv)
    is_chain = chosen.recipe in CHAINS
    recipe = CHAINS[chosen.recipe][-1].recipe if is_chain else RECIPES[chosen.recipe]
    ap = argparse.ArgumentParser(prog="python -m perk_fast.demo_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=SHIPPED_CHAIN, choices=names,
                    help=f"{SHIPPED_CHAIN} (default): the shipped model, a chain of {len(CHAINS[SHIPPED_CHAIN])} runs "
                         "(needles, qa1 / qa2, records recall); binding: the earlier needles-only chain; needle: the "
                         "single-needle model; multi: the multi-task experiment (bench/results/demo_multi); direct: the 2-hour "
                         "chain from a fresh base; needles-first: the same 2 hours with 1,000 needles-only steps "
                         "first (both need --out)")
    ap.add_argument("--work-dir", default=None,
                    help="a chain's stages but the last (default bench/results/demo_chain/NAME for the shipped "
                         "assets, OUT/stages otherwise); finished stages there are not trained again")
    ap.add_argument("--final-n", type=int, default=FINAL_EVAL_N,
                    help=f"a chain: examples per cell of the final held-out evaluation (seed {SEEDS['final']!r}; "
                         "0 skips it)")
    ap.add_argument("--adopt", default=None,
                    help="a chain: comma-separated folders of runs already trained, one per stage in order, or "
                         "'recorded' for the chain's recorded runs in bench/results; checks their recipes, copies "
                         "the last one's models to --out and runs the final evaluation (no training)")
    ap.add_argument("--out", default=ASSETS_DIR, help="output directory (default: the shipped assets)")
    ap.add_argument("--eval-out", default=None,
                    help="where the held-out predictions go (default: bench/results/demo_eval for the shipped "
                         "assets, OUT/eval otherwise)")
    for name in ("lm_contexts", "lm_batch", "lm_steps", "meta_steps", "icr_long_steps", "meta_batch", "eval_n",
                 "dev_n", "dev_every", "threads", "ranks", "hidden_size", "num_hidden_layers", "intermediate_size",
                 "train_len", "doc_tokens"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(recipe, name))
    for name in ("meta_lr", "base_lr", "lr_lr", "icr_lr", "lm_lr"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(recipe, name))
    ap.add_argument("--distractors", default=",".join(map(str, recipe.distractors)),
                    help="distractor-needle counts cycled through the training examples, e.g. 0,1,2,3")
    ap.add_argument("--eval-seed", default=recipe.eval_seed, help="seed of the held-out evaluation data")
    for name, what in (("mix", "task specs cycled through the training examples, e.g. needle:0,needle:3,qa1"),
                       ("eval_tasks", "task specs of the evaluation tables"),
                       ("warmup_mix", "curriculum: task specs of the first --warmup-meta-steps meta-steps")):
        value = getattr(recipe, name)
        ap.add_argument("--" + name.replace("_", "-"), default=None if value is None else ",".join(value), help=what)
    ap.add_argument("--doc-mix", default=None if recipe.doc_mix is None else ",".join(map(str, recipe.doc_mix)),
                    help="document sizes (bytes) cycled through the examples of a mix, e.g. 64,128,256")
    ap.add_argument("--warmup-meta-steps", type=int, default=recipe.warmup_meta_steps,
                    help="curriculum: meta-steps drawn from --warmup-mix before the recipe's tasks (0: none)")
    ap.add_argument("--perk", default="{}", help="JSON dict of PerkConfig fields overriding the recipe's")
    ap.add_argument("--init-from", default=None,
                    help="continue an earlier run (its --out folder): its stage-1 base replaces stage 1, and PERK, "
                         "FT-ICR and the long FT-ICR go on from its models for --meta-steps / --meta-steps / "
                         "--icr-long-steps more steps on fresh examples")
    ap.add_argument("--reset-meta", default="",
                    help="with --init-from: comma list of meta-parameters put back to their initial values "
                         f"before training, from {', '.join(RESETTABLE)}")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="PERK-stage checkpoints every 100 steps (checkpoint-dir/last); with --resume, continue there")
    ap.add_argument("--resume", action="store_true", help="resume the PERK stage from --checkpoint-dir (stage 1 is "
                    "re-run: it is seeded and reproduces the same base)")
    args = ap.parse_args(argv)
    if args.resume and args.checkpoint_dir is None:
        ap.error("--resume needs --checkpoint-dir")
    eval_out = args.eval_out
    if eval_out is None and os.path.abspath(args.out) == os.path.abspath(ASSETS_DIR):
        eval_out = SHIPPED_EVAL_DIR
    defaults = vars(ap.parse_args(["--recipe", args.recipe]))
    if is_chain:
        changed = [k for k, v in vars(args).items() if k not in _RUN_ARGS and v != defaults[k]]
        if changed:
            ap.error(f"--recipe {args.recipe} is a chain of {len(CHAINS[args.recipe])} recorded runs: its recipe "
                     f"cannot be changed on the command line (given: "
                     f"{', '.join('--' + k.replace('_', '-') for k in changed)}); use --recipe needle or multi "
                     "(--init-from continues a finished run)")
        if args.final_n < 0:
            ap.error(f"--final-n {args.final_n} is invalid: allowed an integer >= 0")
        if args.recipe != SHIPPED_CHAIN and os.path.abspath(args.out) == os.path.abspath(ASSETS_DIR):
            ap.error(f"--recipe {args.recipe} is not the shipped chain ({SHIPPED_CHAIN}): give --out DIR (the "
                     f"default, {ASSETS_DIR}, holds the shipped model)")
        return ChainArgs(args.recipe, args.out, eval_out, args.work_dir, args.checkpoint_dir, args.resume,
                         args.final_n, None if not args.adopt else tuple(args.adopt.split(",")))
    given = [k for k in _CHAIN_ONLY if getattr(args, k) != defaults[k]]
    if given:
        ap.error(f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply to a chain "
                 f"({', '.join(sorted(CHAINS))}), not to --recipe {args.recipe}")
    changes = {k: v for k, v in vars(args).items() if k not in _RUN_ARGS + ("perk",)}
    changes["distractors"] = tuple(int(x) for x in args.distractors.split(","))
    for name in ("mix", "eval_tasks", "warmup_mix"):
        changes[name] = None if not changes[name] else tuple(changes[name].split(","))
    changes["doc_mix"] = None if not changes["doc_mix"] else tuple(int(x) for x in changes["doc_mix"].split(","))
    changes["reset_meta"] = tuple(x for x in args.reset_meta.split(",") if x)
    perk = dict(recipe.perk, **json.loads(args.perk))
    try:
        recipe = dataclasses.replace(recipe, perk=perk, **changes)
    except ValueError as err:  # the recipe's own check names the bad value: say it as a usage error
        ap.error(str(err))
    return recipe, args.out, eval_out, args.checkpoint_dir, args.resume


MULTI_PERK = dict(
    inner_steps=4, inner_lr=1e-3, inner_optimizer="adamw", unroll="full", meta_grad="unrolled",
    segment_len=128, segments_per_step=16, lora_rank=16, lora_alpha=32.0, lm_head_loss="full",
    outer_weight_decay=0.01, warmup_proportion=0.03, max_grad_norm=1.0, seed=0,
)
# needle: the single-needle model (shipped before the binding chain; bench/results/demo_needle). multi: the
# multi-task experiment (needles among 0-7 other people's codes,
# BabiLong-like qa1 / qa2, student-records recall; documents of 64 / 128 / 256 bytes, segments of 128:
# some split over two; a 2-layer d=96 model); its measured run is in bench/results/demo_multi
RECIPES = {
    "needle": DemoRecipe(),
    "multi": DemoRecipe(
        mix=("needle:0", "needle:1", "needle:3", "needle:5", "needle:7", "qa1", "qa2", "records_recall"),
        doc_mix=(64, 128, 256), eval_tasks=("needle:0", "needle:3", "qa1", "qa2", "records_recall"),
        eval_doc_tokens=192, train_len=256, eval_lengths=(256, 1024), hidden_size=96, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=288, lm_contexts=2000, lm_steps=600, perk=MULTI_PERK,
        meta_steps=1200, meta_batch=8, icr_long_steps=2400, dev_n=40, dev_every=250, eval_n=30, ranks=2,
        max_new_tokens=32,
    ),
}


# ----------------------------------------------------------------------------- chains of runs
@dataclass(frozen=True)
class ChainStage:
    """One run of a chain: ``recipe`` continues the previous stage's output (``init_from`` is filled in
    when the chain runs; the first stage trains from scratch)."""

    name: str
    recipe: DemoRecipe
    recorded: str | None = None  # the folder of this stage's recorded run (bench/results/...), for --adopt recorded


# The binding recipe: needles among 0-7 other people's codes, over documents shorter and longer than a
# segment; d=96 (265 k weights), rank-16 memory, 2 gloo ranks. A curriculum run (single needles for the
# first 300 steps) and three continuations at 0.3x its learning rates (a warm restart at the full rates
# forgets what was learned): 4,500 meta-steps in all. The recipes are those of the recorded runs
# bench/results/demo_curriculum{,2,3,4} (tests/test_demo.py checks them field by field).
_BINDING = DemoRecipe(
    doc_tokens=192, mix=("needle:0", "needle:1", "needle:3", "needle:5", "needle:7"), doc_mix=(64, 128, 256),
    eval_tasks=("needle:0", "needle:3"), hidden_size=96, intermediate_size=288, lm_steps=600, perk=dict(MULTI_PERK),
    meta_steps=1000, meta_lr=3e-4, lr_lr=1.5e-5, base_lr=9e-5, icr_long_steps=2000, eval_n=30, dev_n=40,
    dev_every=250, ranks=2,
)
_RESULTS = os.path.dirname(SHIPPED_EVAL_DIR)  # bench/results of the repository
# a chain's first stage from a fresh base: single needles for 300 steps, then its mix, at 1/0.3 x the
# continuations' learning rates
_FIRST_STAGE = dict(warmup_mix=("needle:0",), warmup_meta_steps=300, meta_lr=1e-3, lr_lr=5e-5, base_lr=3e-4)
_BINDING_STAGES = (
    ChainStage("curriculum", dataclasses.replace(_BINDING, dev_every=200, **_FIRST_STAGE),
               os.path.join(_RESULTS, "demo_curriculum", "assets")),
    ChainStage("to-2500", dataclasses.replace(_BINDING, meta_steps=1500, icr_long_steps=3000),
               os.path.join(_RESULTS, "demo_curriculum2", "assets")),
    ChainStage("to-3500", _BINDING, os.path.join(_RESULTS, "demo_curriculum3", "assets")),
    ChainStage("to-4500", _BINDING, os.path.join(_RESULTS, "demo_curriculum4", "assets")),
)
# The mix recipe (issue's task mix): needles with 1, 4 and 8 codes, BabiLong-like qa1 (twice) and qa2,
# student-records recall (twice), same model and memory as the binding chain; answers of up to 32 tokens
# (records), documents of 192 tokens in the evaluation.
_MIX = dataclasses.replace(
    _BINDING, mix=("needle:0", "needle:3", "needle:7", "qa1", "qa1", "qa2", "records_recall", "records_recall"),
    eval_tasks=("needle:0", "needle:3", "qa1", "qa2", "records_recall"), meta_steps=2000, icr_long_steps=4000,
    dev_every=500, eval_doc_tokens=192, max_new_tokens=32)
_MIX_ORDERED = dataclasses.replace(_MIX, perk=dict(MULTI_PERK, shuffle_docs=False))
# the second stage of both 2-hour chains: 4,000 steps of the ordered mix at the continuations' rates
_MIX_TO_5000 = dataclasses.replace(_MIX_ORDERED, meta_steps=4000, icr_long_steps=8000, dev_every=1000)
CHAINS = {
    "binding": _BINDING_STAGES,
    # the binding chain, then 1,000 steps with qa1 and records added (its token-weighting writer, trained on
    # needles only, then gives qa1 answers weight 0), then the mix with that writer reset to uniform weights,
    # then the same mix 2,000 steps more, 9,500 meta-steps by then (bench/results/demo_curriculum{5,8,9})
    "mix": _BINDING_STAGES + (
        ChainStage("qa-records", dataclasses.replace(
            _BINDING, mix=("needle:0", "needle:1", "needle:3", "needle:5", "needle:7", "qa1", "records_recall"),
            eval_tasks=("needle:0", "needle:3", "qa1", "records_recall"), eval_doc_tokens=192, max_new_tokens=32),
            os.path.join(_RESULTS, "demo_curriculum5", "assets")),
        # (init_from is replaced by the previous stage's folder when the chain runs; a reset needs one)
        ChainStage("mix", dataclasses.replace(_MIX, reset_meta=("weighting",), init_from=os.path.join(
            _RESULTS, "demo_curriculum5", "assets")),
                   os.path.join(_RESULTS, "demo_curriculum8", "assets")),
        ChainStage("mix-to-9500", _MIX, os.path.join(_RESULTS, "demo_curriculum9", "assets")),
        # then the same mix with the documents' ids in order (shuffle_docs=False: the memory can tell
        # which move came last), 2,000 + 2,500 + 2,500 + 2,500 steps (bench/results/demo_curriculum{12,13,14,15};
        # curriculum14 gives the long FT-ICR 6,000 steps so that the chain's is 2x PERK's again, curriculum15
        # 5,000 to keep it there)
        ChainStage("ordered-to-11500", _MIX_ORDERED, os.path.join(_RESULTS, "demo_curriculum12", "assets")),
        ChainStage("ordered-to-14000", dataclasses.replace(_MIX_ORDERED, meta_steps=2500),
                   os.path.join(_RESULTS, "demo_curriculum13", "assets")),
        ChainStage("ordered-to-16500", dataclasses.replace(_MIX_ORDERED, meta_steps=2500, icr_long_steps=6000),
                   os.path.join(_RESULTS, "demo_curriculum14", "assets")),
        ChainStage("ordered-to-19000", dataclasses.replace(_MIX_ORDERED, meta_steps=2500, icr_long_steps=5000),
                   os.path.join(_RESULTS, "demo_curriculum15", "assets")),
    ),
    # the 2-hour budget in one chain from a fresh base: the mix with ordered ids from the start (after
    # 300 single-needle steps), 1,000 meta-steps at the first stage's rates, then 4,000 at 0.3x
    # (bench/results/demo_direct2{a,}; ~99 min of training on 2 cores). Not the shipped model: the README
    # compares them ("The 2 hours in one run")
    "direct": (
        ChainStage("direct-1000", dataclasses.replace(_MIX_ORDERED, meta_steps=1000, icr_long_steps=2000,
                                                      dev_every=500, **_FIRST_STAGE),
                   os.path.join(_RESULTS, "demo_direct2a", "assets")),
        ChainStage("direct-to-5000", _MIX_TO_5000, os.path.join(_RESULTS, "demo_direct2", "assets")),
    ),
    # the same 2-hour budget spent the chain's way: the binding chain's first stage (1,000 needles-only
    # meta-steps), then 4,000 of the ordered mix at 0.3x with the token-weighting writer reset (trained on
    # needles, it would weight qa1 answers 0); bench/results/demo_bind2{a,}. Not the shipped model
    "needles-first": (
        ChainStage("curriculum", _BINDING_STAGES[0].recipe, os.path.join(_RESULTS, "demo_bind2a", "assets")),
        ChainStage("mix-to-5000", dataclasses.replace(_MIX_TO_5000, reset_meta=("weighting",), init_from=os.path.join(
            _RESULTS, "demo_bind2a", "assets")),
                   os.path.join(_RESULTS, "demo_bind2", "assets")),
    ),
}
SHIPPED_CHAIN = "mix"
# PerkConfig fields a chain's result is used with at test time: its memories are written that way, by the
# last stage's meta-parameters as trained. The shipped chain writes later segments more strongly
# (segment_recency=0.5, chosen on bench/demo_recency.py's seed probe-order: qa1 61 -> 72 % at 256 tokens and
# 60 -> 63 % at 1,024, n = 300; README, "Writing later documents more strongly")
TEST_TIME_PERK = {"mix": {"segment_recency": 0.5}}
FINAL_EVAL_N = 100  # examples per cell of the shipped model's final held-out tables


def _same_recipe(report: dict, recipe: DemoRecipe) -> bool:
    """Whether ``report`` (a train_report.json) is a finished run of ``recipe``: the same fields, and
    ``init_from`` the same folder."""
    mine = json.loads(json.dumps(recipe.to_dict()))
    theirs = dict(report.get("recipe", {}))
    defaults = json.loads(json.dumps(DemoRecipe().to_dict()))
    a, b = mine.pop("init_from"), theirs.pop("init_from", None)  # compared as folders, below
    for name in [k for k in mine if k not in theirs and mine[k] == defaults[k]]:
        mine.pop(name)  # a field added after that run was written: its default is what the run did
    same_start = (a is None and b is None) or (a is not None and b is not None
                                               and os.path.realpath(a) == os.path.realpath(b))
    return mine == theirs and same_start


def chain_stages(name: str, final_n: int = 0) -> tuple[ChainStage, ...]:
    """The stages of chain ``name``; ValueError names an unknown chain or a bad ``final_n``."""
    if name not in CHAINS:
        raise ValueError(f"chain {name!r} is unknown: allowed {sorted(CHAINS)}")
    if isinstance(final_n, bool) or not isinstance(final_n, int) or final_n < 0:
        raise ValueError(f"final_n={final_n!r} is invalid: allowed an integer >= 0 (0 skips the final evaluation)")
    return CHAINS[name]


def default_work_dir(name: str, out_dir: str) -> str:
    """Where a chain's stages other than the last go: ``bench/results/demo_chain/<name>`` for the
    shipped assets, ``<out_dir>/stages`` otherwise."""
    if os.path.abspath(out_dir) == os.path.abspath(ASSETS_DIR):
        return os.path.join(os.path.dirname(SHIPPED_EVAL_DIR), "demo_chain", name)
    return os.path.join(out_dir, "stages")


def train_chain(name: str, out_dir: str, *, work_dir: str | None = None, eval_dir: str | None = None,
                checkpoint_dir: str | None = None, resume: bool = False, final_n: int = FINAL_EVAL_N,
                log=_print) -> dict:
    """Run the chain ``CHAINS[name]``: stage k continues stage k-1 (``init_from``); the last stage
    writes ``out_dir``, the others ``work_dir/<stage>/assets`` (every stage's own held-out predictions:
    ``work_dir/<stage>/eval``). Then :func:`final_evaluation` on
    ``SEEDS["final"]`` with ``final_n`` examples per cell (0: skipped). Returns the last report.

    Split over sessions: a stage whose folder already holds a finished run of the same recipe (same
    fields, same ``init_from``) is not trained again, so a rerun goes on at the first unfinished
    stage; with ``checkpoint_dir`` each stage checkpoints its PERK stage under
    ``checkpoint_dir/<stage>``, and ``resume=True`` continues the unfinished stage from there.
    """
    stages = chain_stages(name, final_n)
    work = default_work_dir(name, out_dir) if work_dir is None else work_dir
    previous, report, done_stages = None, None, []
    for k, stage in enumerate(stages):
        last = k == len(stages) - 1
        recipe = dataclasses.replace(stage.recipe, init_from=previous)
        dest = out_dir if last else os.path.join(work, stage.name, "assets")
        path = os.path.join(dest, "train_report.json")
        head = f"chain {name}, stage {k + 1}/{len(stages)} ({stage.name}, {recipe.meta_steps} meta-steps)"
        done = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                done = json.load(fh)
            if not _same_recipe(done, recipe):
                raise ValueError(f"{head}: {dest} holds a run of another recipe; move it away or give another "
                                 "work_dir / out_dir")
        if done is not None:
            log(f"{head}: already trained in {dest}")
            report = done
        else:
            log(f"{head} -> {dest}")
            ckpt = None if checkpoint_dir is None else os.path.join(checkpoint_dir, stage.name)
            state = None if ckpt is None else os.path.join(ckpt, "last", "trainer_state.json")
            stage_resume = resume and state is not None and os.path.exists(state)
            report = train(recipe, dest, log=log, eval_dir=os.path.join(work, stage.name, "eval"),
                           checkpoint_dir=ckpt, resume=stage_resume)
        previous = dest
        done_stages.append(stage_summary(stage.name, report))
    apply_test_time(name, out_dir)
    if final_n:
        report = final_evaluation(out_dir, n=final_n, eval_dir=eval_dir, chain=(name, done_stages), log=log)
    return report


def adopt_chain(name: str, runs: list[str], out_dir: str = ASSETS_DIR, *, eval_dir: str | None = None,
                final_n: int = FINAL_EVAL_N, log=_print) -> dict:
    """Make ``out_dir`` the result of chain ``name`` from runs already trained, one folder per stage
    in order, or ``["recorded"]`` for the stages' recorded runs in bench/results (``ChainStage.recorded``),
    instead of training them again: each run's
    recipe must be its stage's (same fields, ``init_from`` the previous run's folder; ValueError
    names the first that is not). The last run's models are copied to ``out_dir`` (its old content
    is replaced), then :func:`final_evaluation` as :func:`train_chain` ends. Returns the report."""
    import shutil

    stages = chain_stages(name, final_n)
    if list(runs) == ["recorded"]:
        missing = [st.name for st in stages if st.recorded is None]
        if missing:
            raise ValueError(f"chain {name!r}: stages {missing} have no recorded run; give one folder per stage")
        runs = [st.recorded for st in stages]
    if len(runs) != len(stages):
        raise ValueError(f"chain {name!r} has {len(stages)} stages, {len(runs)} runs given")
    previous, summaries = None, []
    for stage, run in zip(stages, runs):
        report = read_earlier_run(run)
        if not _same_recipe(report, dataclasses.replace(stage.recipe, init_from=previous)):
            raise ValueError(f"{run} is not stage {stage.name!r} of chain {name!r}: its recipe (or the run it "
                             f"continues, {report['recipe'].get('init_from')!r}) differs")
        summaries.append(stage_summary(stage.name, report))
        previous = run
    if os.path.realpath(previous) != os.path.realpath(out_dir):
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        shutil.copytree(previous, out_dir, ignore=shutil.ignore_patterns("eval"))
    elif TEST_TIME_PERK.get(name):
        raise ValueError(f"chain {name!r} sets test-time fields {TEST_TIME_PERK[name]} on its result: adopt its last "
                         f"run {previous} into another out_dir, not in place")
    fields = apply_test_time(name, out_dir)
    log(f"chain {name}: {out_dir} holds the models of {previous}"
        + (f", used with {fields} at test time" if fields else ""))
    if not final_n:
        return read_earlier_run(out_dir)
    return final_evaluation(out_dir, n=final_n, eval_dir=eval_dir, chain=(name, summaries), log=log)


def apply_test_time(name: str, assets_dir: str) -> dict:
    """Give the PerkModel in ``assets_dir`` chain ``name``'s test-time PerkConfig fields
    (:data:`TEST_TIME_PERK`; none: nothing changes) and record them in its report as ``test_time_perk``
    (:func:`load_run` gives the TTT baseline the same). Returns the fields."""
    fields = dict(TEST_TIME_PERK.get(name, {}))
    if not fields:
        return fields
    perk_dir = os.path.join(assets_dir, "perk")
    header = read_header(perk_dir, "perk_model.json", "perk_fast.PerkModel")
    header["config"] = PerkConfig.from_dict({**header["config"], **fields}).to_dict()
    write_header(perk_dir, "perk_model.json", header)
    report_path = os.path.join(assets_dir, "train_report.json")
    with open(report_path, encoding="utf-8") as fh:
        report = json.load(fh)
    report["test_time_perk"] = fields
    with open(report_path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
    return fields


def stage_summary(name: str, report: dict) -> dict:
    """What a chain's report keeps of one stage: its meta-steps, training and evaluation times."""
    return {"stage": name, "meta_steps": report["recipe"]["meta_steps"], "init_from": report["recipe"].get("init_from"),
            "train_total_s": report["times_s"]["train_total_s"], "eval_s": report["times_s"].get("eval_s")}


def final_evaluation(assets_dir: str, *, n: int = FINAL_EVAL_N, seed: str = SEEDS["final"],
                     eval_dir: str | None = None, chain: tuple[str, list[dict]] | None = None, log=_print) -> dict:
    """Evaluate the finished run in ``assets_dir`` on held-out seed ``seed`` (every system, every
    table of its recipe, ``n`` examples per cell), as loaded from its files (:func:`load_run`, what ``load_demo``
    gives); store the tables in its ``train_report.json`` as ``final_eval`` (``eval`` stays the
    run's own) and the predictions in ``eval_dir`` (default ``assets_dir/eval``). ``chain``: (name,
    :func:`stage_summary` of every stage) when the run is the last of a chain, stored as ``chain``.
    Returns the report."""
    from transformers.utils import logging as hf_logging

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is invalid: allowed an integer >= 1 (examples per cell)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    run = load_run(assets_dir)
    torch.set_num_threads(run["recipe"].threads)
    log(f"final held-out evaluation of {assets_dir} (seed {seed!r}, n={n} per cell)")
    t = time.perf_counter()
    table = eval_systems(run["perk"], run["ttt"], run["icr"], run["tokenizer"], run["recipe"], n=n, seed=seed,
                         icr_long_model=run["icr_long"], out_dir=os.path.join(assets_dir, "eval") if eval_dir is None
                         else eval_dir, steps_before=run["report"].get("steps_before"))
    report = dict(run["report"])
    report["final_eval"] = {k: table[k] for k in ("task", "seed", "n", "lengths", "positions", "metric", "results",
                                                  "table")}
    report["final_eval"]["seconds"] = round(time.perf_counter() - t, 1)
    if chain is not None:
        report["chain"] = {"name": chain[0], "stages": chain[1],
                           "train_total_s": round(sum(st["train_total_s"] for st in chain[1]), 1)}
    with open(os.path.join(assets_dir, "train_report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
    return report


def training_minutes(report: dict) -> float:
    """Training minutes of the run behind ``report``: of every stage when it ends a chain (``chain``),
    else of the run and the earlier runs its report records."""
    if report.get("chain"):
        return report["chain"]["train_total_s"] / 60
    total, r = 0.0, report
    while r is not None:
        total += r["times_s"]["train_total_s"]
        r = r.get("earlier_run")
    return total / 60


def main(argv=None) -> dict:
    """``python -m perk_fast.demo_train``: train a recipe or a chain (or adopt recorded runs with
    ``--adopt``) and return its report (the dict written to ``train_report.json``)."""
    parsed = _parse(argv)
    if isinstance(parsed, ChainArgs) and parsed.adopt:
        return adopt_chain(parsed.name, list(parsed.adopt), parsed.out, eval_dir=parsed.eval_out,
                           final_n=parsed.final_n)
    if isinstance(parsed, ChainArgs):
        return train_chain(parsed.name, parsed.out, work_dir=parsed.work_dir, eval_dir=parsed.eval_out,
                           checkpoint_dir=parsed.checkpoint_dir, resume=parsed.resume, final_n=parsed.final_n)
    recipe, out, eval_out, checkpoint_dir, resume = parsed
    return train(recipe, out, eval_dir=eval_out, checkpoint_dir=checkpoint_dir, resume=resume)


if __name__ == "__main__":
    main()
