"""From text to tensors: context segments, question prompts, micro-batches.

A context (a string, or a list of documents) becomes segments
``"doc_{i}:" + " " + text + EOS`` of at most ``segment_len`` tokens. The ``doc_{i}:``
prefix is label-masked (-100); a document longer than a segment is split and every
piece repeats its prefix. In training the doc ids are a random permutation (the
documents keep their order, their labels are shuffled), as in the reference.

The question row is ``"You have memorized {N} documents.\\n{question}\\nAnswer:"``
followed by ``" " + target + EOS`` where the target is the answer, or
``<support>{support}</support>\\n<output>{answer}</output>`` when support facts are
given; only the target tokens carry labels.

Every training row is right-padded. The model is causal, so a real token never attends to a
pad that follows it: padding changes no result, and no attention mask is needed. Prompts that
are continued by generation are left-padded instead (:func:`left_pad`), with a mask.

This module turns text into tensors and nothing more: it knows tokenizers, not models.
"""
from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

IGNORE = -100


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's end-of-sequence id (required)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; PERK segments end with EOS")
    return int(eos)


def pad_id(tokenizer: Any) -> int:
    """Padding id: the tokenizer's pad token, else EOS (pads never reach a loss)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_id(tokenizer)


def as_documents(context: Any, where: str = "context") -> list[str]:
    """Normalise a context to a non-empty list of non-empty documents."""
    if isinstance(context, str):
        docs = [context]
    elif isinstance(context, Sequence) and not isinstance(context, (bytes, bytearray)):
        docs = list(context)
    else:
        raise TypeError(f"{where} must be a string or a list of strings, got {type(context).__name__}")
    if not docs:
        raise ValueError(f"{where} is empty: a context needs at least one document")
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise TypeError(f"{where}[{i}] must be a string, got {type(doc).__name__}")
        if not doc.strip():
            raise ValueError(f"{where}[{i}] is an empty document")
    return docs


@dataclass
class ContextSegments:
    """One context, tokenised: its segments and its loss normaliser."""

    segments: list[tuple[list[int], list[int]]]  # (input ids, labels) per segment
    n_docs: int

    @property
    def n_positions(self) -> int:
        """Positions of the context packed into one row, shifted: sum(len) - 1.

        The inner loss of a context is its weighted CE sum divided by this count,
        the reference's "mean over all positions" of its packed row, independent of
        padding, batching and micro-batching.
        """
        return max(sum(len(ids) for ids, _ in self.segments) - 1, 1)


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text when it adds its special tokens (Llama's BOS; none
    for GPT-2 and Qwen2). Every row perk_fast builds starts with them, as the reference's
    tokenizer calls (``add_special_tokens=True``) do."""
    try:
        with_special = list(tokenizer.encode("a", add_special_tokens=True))
    except TypeError:  # a tokenizer without the argument adds nothing
        return []
    plain = _token_ids(tokenizer, "a")
    extra = len(with_special) - len(plain)
    if extra > 0 and with_special[extra:] == plain:
        return with_special[:extra]
    return []


LONG_DOCUMENT_MODES = ("split", "split_tokens", "truncate")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _document_pieces(tokenizer: Any, text: str, eos: int, room: int, mode: str) -> list[list[int]]:
    """The token pieces of one document, each <= ``room`` tokens, EOS at the end of the last.

    ``split``: whole sentences packed greedily into pieces (a sentence is never cut unless it alone
    exceeds ``room``, and then into token pieces), so that a fact stays in one piece with its
    subject. ``split_tokens``: consecutive ``room``-token pieces, cut anywhere. ``truncate``: one
    piece, the head."""
    body = _token_ids(tokenizer, " " + text) + [eos]
    if len(body) <= room:
        return [body]
    if mode == "truncate":
        return [body[:room]]
    if mode == "split_tokens":
        return [body[start : start + room] for start in range(0, len(body), room)]
    sentences = [part for part in _SENTENCE_END.split(text.strip()) if part]
    pieces: list[list[int]] = []
    current: list[int] = []
    for k, sentence in enumerate(sentences):
        ids = _token_ids(tokenizer, " " + sentence) + ([eos] if k == len(sentences) - 1 else [])
        if len(current) + len(ids) <= room:
            current += ids
            continue
        if current:
            pieces.append(current)
        current = []
        if len(ids) <= room:
            current = ids
        else:  # one sentence longer than a segment: token pieces, the last one open for what follows
            chunks = [ids[start : start + room] for start in range(0, len(ids), room)]
            pieces.extend(chunks[:-1])
            current = chunks[-1]
    if current:
        pieces.append(current)
    return pieces


def build_segments(
    tokenizer: Any, context: Any, segment_len: int, rng: random.Random | None = None, where: str = "context",
    long_documents: str = "split",
) -> ContextSegments:
    """Tokenise a context into label-masked ``doc_i:`` segments of <= ``segment_len`` tokens.

    ``rng`` given: doc ids are a random permutation (training); else 0..N-1. A document longer
    than a segment is, with ``long_documents='split'``, cut at sentence ends into pieces that each
    repeat the prefix (whole sentences packed into each piece: a fact is not separated from its
    subject; only a sentence longer than a segment is cut inside), with ``'split_tokens'`` cut into
    consecutive pieces anywhere (nothing lost, but a sentence may straddle two pieces), or with
    ``'truncate'`` kept as one row cut at ``segment_len`` (the reference's behaviour: its tail and
    EOS are lost; a warning names the cut documents). Rows start with the tokenizer's leading
    special tokens (:func:`leading_special_ids`), label-masked like the prefix.
    """
    if long_documents not in LONG_DOCUMENT_MODES:
        raise ValueError(f"long_documents={long_documents!r} is invalid: allowed "
                         + ", ".join(repr(m) for m in LONG_DOCUMENT_MODES))
    docs = as_documents(context, where)
    eos = eos_id(tokenizer)
    lead = leading_special_ids(tokenizer)
    doc_ids = list(range(len(docs)))
    if rng is not None:
        rng.shuffle(doc_ids)
    segments, cut = [], []
    for index, (doc_id, text) in enumerate(zip(doc_ids, docs)):
        prefix = lead + _token_ids(tokenizer, f"doc_{doc_id}:")
        room = segment_len - len(prefix)
        if room < 1:
            raise ValueError(
                f"segment_len={segment_len} leaves no room after the {len(prefix)}-token prefix 'doc_{doc_id}:'"
            )
        pieces = _document_pieces(tokenizer, text, eos, room, long_documents)
        if long_documents == "truncate":
            n_body = len(_token_ids(tokenizer, " " + text)) + 1
            if n_body > room:
                cut.append(f"{where}[{index}] ({len(prefix) + n_body} tokens)")
        for piece in pieces:
            segments.append((prefix + piece, [IGNORE] * len(prefix) + piece))
    if cut:
        warnings.warn(f"{len(cut)} document(s) longer than segment_len={segment_len} were cut (their tail is not "
                      f"learned; long_documents='split' keeps it): {', '.join(cut[:5])}"
                      + (" ..." if len(cut) > 5 else ""), stacklevel=3)
    return ContextSegments(segments, len(docs))


def query_prompt(question: str, n_docs: int) -> str:
    """The reference's question prompt."""
    return f"You have memorized {n_docs} documents.\n{question}\nAnswer:"


def query_target(answer: str, support: Any = None) -> str:
    """The reference's target: the answer, or support + output tags."""
    if support is None or (not isinstance(support, str) and len(support) == 0) or support == "":
        return answer
    if not isinstance(support, str):
        support = "\n".join(str(s) for s in support)  # the reference joins support facts with newlines
    return f"<support>{support}</support>\n<output>{answer}</output>"


def check_text(value: Any, where: str) -> str:
    """A non-empty string, else a clear error naming ``where``."""
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where} is empty")
    return value


def check_batch(contexts: Any, questions: Any, answers: Any = None, supports: Any = None) -> None:
    """Check a batch of contexts and its per-context lists; errors name the bad entry."""
    if isinstance(contexts, str) or not isinstance(contexts, Sequence):
        raise TypeError("contexts must be a list of contexts (each a string or a list of documents)")
    n = len(contexts)
    if n == 0:
        raise ValueError("contexts is empty: pass at least one context")
    for name, values in (("questions", questions), ("answers", answers), ("supports", supports)):
        if values is None:
            continue
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list with one entry per context")
        if len(values) != n:
            raise ValueError(f"{len(values)} {name} for {n} contexts: pass one per context")
    for i, q in enumerate(questions or []):
        check_text(q, f"questions[{i}]")
    for i, a in enumerate(answers or []):
        check_text(a, f"answers[{i}]")


def segment_contexts(
    tokenizer: Any, contexts: Sequence[Any], segment_len: int, rng: random.Random | None = None,
    long_documents: str = "split",
) -> list[ContextSegments]:
    """:func:`build_segments` of every context (doc ids permuted from ``rng`` when given)."""
    return [build_segments(tokenizer, c, segment_len, rng, where=f"contexts[{i}]", long_documents=long_documents)
            for i, c in enumerate(contexts)]


def example_field(example: Any, name: str, index: int, required: bool = True) -> Any:
    """Field ``name`` of dataset entry ``index`` (a mapping or an object with attributes)."""
    value = example.get(name) if isinstance(example, Mapping) else getattr(example, name, None)
    if value is None and required:
        raise ValueError(f"dataset[{index}] has no {name!r}: every example needs context, question and answer")
    return value


def build_query(tokenizer: Any, question: str, answer: str, support: Any, n_docs: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a question row; labels only on the target + EOS."""
    prompt = prompt_ids(tokenizer, query_prompt(question, n_docs))
    target = _token_ids(tokenizer, " " + query_target(answer, support)) + [eos_id(tokenizer)]
    return prompt + target, [IGNORE] * len(prompt) + target


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of a prompt that starts a row: the tokenizer's leading special tokens, then the text."""
    return leading_special_ids(tokenizer) + _token_ids(tokenizer, text)


def query_batch(
    tokenizer: Any, questions: Sequence[str], answers: Sequence[str], supports: Sequence[Any] | None,
    n_docs: Sequence[int], device: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input ids, labels) of the question rows of a batch (:func:`build_query` each)."""
    rows = [
        build_query(tokenizer, q, a, None if supports is None else supports[i], n_docs[i])
        for i, (q, a) in enumerate(zip(questions, answers))
    ]
    ids = pad_rows([r[0] for r in rows], pad_id(tokenizer)).to(device)
    labels = pad_rows([r[1] for r in rows], IGNORE).to(device)
    return ids, labels


def left_pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to (n, L): (ids, attention mask). Generation then continues every row at L."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, length - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, length - len(r):] = 1
    return ids, mask


@dataclass
class MicroBatch:
    """Rows of segments for one inner forward, grouped context-major.

    ``contexts`` are the indices (into the batch of contexts) of the contexts that
    have rows here, ``rows_per_context`` rows each; ``row_scale`` (rows,) is
    1 / n_positions of each row's context (the per-context mean normaliser).
    ``row_ids[r]`` is (global index of the row's context, index of its segment in that
    context; -1 for a pad row): what keys the row's dropout mask. ``row_position`` (rows,)
    float64 is (j + 1) / S of a row holding segment j of its context's S segments (0 for a pad
    row): what ``PerkConfig.segment_recency`` weights by. ``token_scale`` (rows, L) float64, None by
    default (every position alike), multiplies the inner-loss weight of each label position; nothing
    in the library sets it: it is a hook for per-token schedules (``bench/demo_recency.py``).
    """

    input_ids: torch.Tensor  # (rows, L)
    labels: torch.Tensor  # (rows, L)
    contexts: torch.Tensor  # (C_active,)
    rows_per_context: int
    row_scale: torch.Tensor  # (rows,) float64
    index: int  # position of this micro-batch in the step
    row_ids: list[tuple[int, int]] = field(default_factory=list)
    row_position: torch.Tensor | None = None  # (rows,) float64
    token_scale: torch.Tensor | None = None  # (rows, L) float64

    @property
    def n_real_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids to one (n, L) LongTensor."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def make_micro_batches(
    contexts: list[ContextSegments], segments_per_step: int, pad: int, device: torch.device | str | None = None,
    context_ids: Sequence[int] | None = None,
) -> list[MicroBatch]:
    """Split the segments of every context into micro-batches.

    ``context_ids`` are the contexts' global indices (default 0..B-1), recorded in ``row_ids``.

    Micro-batch c holds segments ``[c*k, (c+1)*k)`` of each context that still has
    some (k = ``segments_per_step``); contexts with fewer get one-token pad rows
    (label -100, so they add nothing) to give every active context the same row
    count. A context's partition does not depend on the other contexts, so a
    context encoded alone or in a batch sums the same gradients.
    """
    k = segments_per_step
    context_ids = list(range(len(contexts))) if context_ids is None else list(context_ids)
    if len(context_ids) != len(contexts):
        raise ValueError(f"{len(context_ids)} context_ids for {len(contexts)} contexts")
    n_chunks = max((len(c.segments) + k - 1) // k for c in contexts)
    batches = []
    for chunk in range(n_chunks):
        parts = {ci: ctx.segments[chunk * k : (chunk + 1) * k] for ci, ctx in enumerate(contexts)}
        active = [ci for ci, part in parts.items() if part]
        per_ctx = max(len(parts[ci]) for ci in active)
        ids, labels, scale, row_ids, position = [], [], [], [], []
        for ci in active:
            real = len(parts[ci])
            part = parts[ci] + [([pad], [IGNORE])] * (per_ctx - real)
            ids += [seg_ids for seg_ids, _ in part]
            labels += [seg_labels for _, seg_labels in part]
            scale += [1.0 / contexts[ci].n_positions] * per_ctx
            row_ids += [(context_ids[ci], chunk * k + j if j < real else -1) for j in range(per_ctx)]
            n_seg = len(contexts[ci].segments)
            position += [(chunk * k + j + 1) / n_seg if j < real else 0.0 for j in range(per_ctx)]
        batches.append(
            MicroBatch(
                input_ids=pad_rows(ids, pad).to(device),
                labels=pad_rows(labels, IGNORE).to(device),
                contexts=torch.tensor(active, dtype=torch.long, device=device),
                rows_per_context=per_ctx,
                row_scale=torch.tensor(scale, dtype=torch.float64, device=device),
                index=chunk,
                row_ids=row_ids,
                row_position=torch.tensor(position, dtype=torch.float64, device=device),
            )
        )
    return batches
