"""Evaluation of PERK memories and of the baselines it is compared with, all scored alike.

Three systems answer the same questions and go through the same scoring path
(:mod:`perk_fast.evaluate.scoring`):

* ``evaluate(perk_model, data)`` -- PERK: each context is written into its memory by
  :func:`perk_fast.encode` (T inner steps), then the question alone (no context in the prompt)
  is answered with :meth:`PerkModel.generate`.
* Plain test-time training (TTT, no meta-learning) needs no code of its own: it is
  ``evaluate(PerkModel(base, tokenizer, config), data)`` with a *fresh* PerkModel, whose
  meta-parameters are the defaults -- PEFT initialisation of the LoRA (B = 0), every learned
  learning rate at ``config.inner_lr``, the weighting model's zero-initialised output (every
  token weight ln(2)/3). The inner loop then is ordinary AdamW (or SGD) fine-tuning of an
  untrained adapter on the context, which is exactly that baseline. Build it on a separate
  copy of the base model (a PerkModel patches its model's projections).
* ``evaluate_in_context(hf_model, tokenizer, data)`` -- in-context reading: the documents are
  in the prompt (:func:`in_context_prompt`). With a model trained by
  :func:`finetune_in_context` (:mod:`perk_fast.evaluate.icr`) this is the paper's FT-ICR baseline
  (the same base fine-tuned, with the same budget, to answer with the context in its prompt).

Scoring (``perk_fast.metrics``): the generated continuation is first cut by
:func:`cut_answer` -- generation already stops at EOS (decoded without special tokens); the text
is cut right after the first ``</output>`` when it has an ``<output>`` tag (the support format
``<support>...</support>\\n<output>...</output>`` spans two lines), otherwise at the first newline
(answers are one line; a model that keeps going starts a new line), then stripped. The gold
string is the training target (the answer, or the support + output form when the example has
support facts). Exact match is normalised EM after ``<output>`` extraction, F1 is token F1.

``sweep`` (:mod:`perk_fast.evaluate.sweeps`) runs systems over context lengths and needle
positions (pre / mid / post), prints a table and saves it as JSON and, when matplotlib is
installed, a PNG plot (:mod:`perk_fast.evaluate.plots`).
"""
from .icr import finetune_in_context, in_context_batch
from .plots import plot_sweep
from .scoring import cut_answer, evaluate, evaluate_in_context, in_context_prompt
from .sweeps import format_sweep_table, sweep

__all__ = [
    "cut_answer", "in_context_prompt", "evaluate", "evaluate_in_context", "finetune_in_context",
    "in_context_batch", "sweep", "format_sweep_table", "plot_sweep",
]
