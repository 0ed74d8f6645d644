"""Answer scoring for PERK: normalised exact match and token F1 (fractions in [0, 1]).

The procedure, per (prediction, gold) pair:

1. lower-case both strings;
2. if *both* contain ``<output>...</output>``, keep only the first such span of each
   (``re.DOTALL``: the span may cover several lines); otherwise keep the whole strings;
3. normalise: drop ASCII punctuation, drop the articles a / an / the (whole words), collapse
   whitespace;
4. exact match = 1.0 if the normalised strings are equal else 0.0;
   token F1 (SQuAD) = 2PR / (P + R) with P, R from the multiset overlap of whitespace tokens;
   when either side has no tokens, F1 = 1.0 if both are empty else 0.0.

``score`` averages over pairs and reports fractions (0..1), as the reference's ``evaluate`` does.

``reference=True`` reproduces two quirks of the reference code (eric11eca/perk,
``perk/evaluate.py``) for side-by-side comparisons: its F1 is computed on the whole lower-cased
strings (step 2 is applied to exact match only) and counts the overlap over token *sets*
(a repeated token counts once).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

__all__ = ["normalize_answer", "extract_output", "exact_match", "f1_score", "score"]

_OUTPUT_RE = re.compile(r"<output>(.*?)</output>", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, remove ASCII punctuation, remove articles a/an/the, collapse whitespace.

    Punctuation goes first, so "the-end" becomes "theend" (no article left) while "the, end"
    becomes "end".
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def extract_output(pred: str, gold: str) -> tuple[str, str]:
    """Lower-case both strings and, when both contain ``<output>...</output>``, return the first
    span of each (stripped); otherwise return both whole (lower-cased)."""
    pred, gold = pred.lower(), gold.lower()
    pred_m, gold_m = _OUTPUT_RE.search(pred), _OUTPUT_RE.search(gold)
    if pred_m is None or gold_m is None:
        return pred, gold
    return pred_m.group(1).strip(), gold_m.group(1).strip()


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the normalised (``<output>``-extracted) prediction equals the gold answer, else 0.0."""
    pred, gold = extract_output(pred, gold)
    return float(normalize_answer(pred) == normalize_answer(gold))


def _token_f1(pred: str, gold: str, *, multiset: bool) -> float:
    pred_toks, gold_toks = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    if multiset:
        common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    else:
        common = len(set(pred_toks) & set(gold_toks))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_toks), common / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, gold: str, *, reference: bool = False) -> float:
    """Token F1 between the normalised (``<output>``-extracted) prediction and gold answer.

    SQuAD-style: overlap counted over token multisets. With ``reference=True``, the reference
    code's variant: whole strings (no extraction) and overlap over token sets.
    """
    if reference:
        return _token_f1(pred.lower(), gold.lower(), multiset=False)
    pred, gold = extract_output(pred, gold)
    return _token_f1(pred, gold, multiset=True)


def score(preds: Sequence[str], golds: Sequence[str], *, reference: bool = False) -> dict:
    """Mean exact match and F1 over paired predictions and gold answers.

    Returns ``{"exact_match": float, "f1": float, "n": int}`` with the means as fractions in
    [0, 1]; both are NaN when there are no pairs. ``reference`` is passed to ``f1_score``.
    Raises ValueError when the two sequences differ in length.
    """
    if isinstance(preds, str) or isinstance(golds, str):
        raise TypeError("preds and golds must be sequences of strings, not a single string")
    if len(preds) != len(golds):
        raise ValueError(
            f"len(preds)={len(preds)} is invalid; allowed: equal to len(golds)={len(golds)}")
    n = len(preds)
    if n == 0:
        return {"exact_match": float("nan"), "f1": float("nan"), "n": 0}
    em = sum(exact_match(p, g) for p, g in zip(preds, golds))
    f1 = sum(f1_score(p, g, reference=reference) for p, g in zip(preds, golds))
    return {"exact_match": em / n, "f1": f1 / n, "n": n}
