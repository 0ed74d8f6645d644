"""A self-contained byte-level tokenizer for the small models perk_fast trains from scratch.

Ids 0..255 are the UTF-8 bytes; the ids after them are whole-string special tokens:

    256  eos_token   "<|endoftext|>"
    257  pad_token   "<|pad|>"
    258  "<support>"    259  "</support>"    260  "<output>"    261  "</output>"

The four markers of PERK's answer format (``<support>...</support>\\n<output>...</output>``) are
single ids so that a tiny model emits them in one step. As in Hugging Face tokenizers, a special
token's text found inside the input is encoded as its id (the engine may append ``eos_token`` to a
string, as the reference does), and ``decode`` restores the text. ``skip_special_tokens`` drops only
eos and pad: the markers are content that the scoring (``metrics.extract_output``) relies on.

Counting: text without special-token strings encodes to exactly ``len(text.encode("utf-8"))`` ids,
which is what ``tasks.byte_length`` counts.

The API is the part of ``transformers.PreTrainedTokenizer`` that perk_fast uses: ``encode``,
``__call__`` (with padding / truncation / ``return_tensors="pt"``), ``decode``, ``batch_decode``,
``convert_tokens_to_ids``, the special-token attributes, ``save_pretrained`` / ``from_pretrained``.
``bos_token_id`` is None and ``add_special_tokens=True`` adds nothing (GPT-2's behaviour).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Sequence

__all__ = ["ByteTokenizer", "BatchEncoding"]

_N_BYTES = 256
_CONFIG_NAME = "tokenizer_config.json"
_DEFAULT_MARKERS = ("<support>", "</support>", "<output>", "</output>")
_PADDING_CHOICES = (False, True, "longest", "max_length", "do_not_pad")


class BatchEncoding(dict):
    """The dict returned by ``ByteTokenizer.__call__``; keys are also readable as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


class ByteTokenizer:
    """Byte-level tokenizer: 256 byte ids followed by whole-string special tokens.

    Args:
        eos_token: text of the end-of-sequence token (id 256).
        pad_token: text of the padding token (id 257).
        markers: further special tokens (ids 258, 259, ...); by default PERK's answer markers.
            Pass ``()`` for a plain byte tokenizer with only eos and pad.
        model_max_length: longest sequence a model takes; only ``truncation=True`` without
            ``max_length`` reads it.
        name_or_path: recorded name (``from_pretrained`` sets it to the directory).
    """

    padding_side = "right"
    truncation_side = "right"

    def __init__(
        self,
        *,
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|pad|>",
        markers: Sequence[str] = _DEFAULT_MARKERS,
        model_max_length: int = 1 << 30,
        name_or_path: str = "byte-tokenizer",
    ) -> None:
        specials = [eos_token, pad_token, *markers]
        for i, tok in enumerate(specials):
            if not isinstance(tok, str) or not tok:
                raise ValueError(
                    f"special token {i}: {tok!r} is invalid; allowed: a non-empty string")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special tokens {specials!r} are invalid; allowed: distinct strings")
        if not isinstance(model_max_length, int) or model_max_length < 1:
            raise ValueError(
                f"model_max_length={model_max_length!r} is invalid; allowed: an integer >= 1")
        self._specials: tuple[str, ...] = tuple(specials)
        self._special_to_id = {tok: _N_BYTES + i for i, tok in enumerate(specials)}
        # Longest first so that a token that is a prefix of another never wins the match.
        alternation = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({alternation})")
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = None
        self.unk_token = None
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path

    # ------------------------------------------------------------------ vocabulary
    @property
    def eos_token_id(self) -> int:
        """Id of the end-of-sequence token."""
        return self._special_to_id[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        """Id of the padding token."""
        return self._special_to_id[self.pad_token]

    @property
    def bos_token_id(self) -> None:
        """There is no beginning-of-sequence token."""
        return None

    @property
    def unk_token_id(self) -> None:
        """Every string is encodable, so there is no unknown token."""
        return None

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes plus the special tokens."""
        return _N_BYTES + len(self._specials)

    def __len__(self) -> int:
        """Number of ids (same as ``vocab_size``)."""
        return self.vocab_size

    @property
    def all_special_tokens(self) -> list[str]:
        """Texts of all special tokens, in id order."""
        return list(self._specials)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of all special tokens."""
        return [self._special_to_id[t] for t in self._specials]

    def get_vocab(self) -> dict[str, int]:
        """Token text -> id, as Hugging Face tokenizers report it (bytes as latin-1 characters, then
        the special tokens); what ``stop_strings`` generation matches against."""
        vocab = {chr(i): i for i in range(_N_BYTES)}
        vocab.update({text: _N_BYTES + k for k, text in enumerate(self._specials)})
        return vocab

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Id(s) -> token text(s) (the inverse of :meth:`get_vocab`)."""
        inverse = {i: t for t, i in self.get_vocab().items()}
        if isinstance(ids, int):
            return inverse[ids]
        return [inverse[int(i)] for i in ids]

    def _convert_id_to_token(self, index: int) -> str:
        """One id's token text (the hook Hugging Face's stop-string matching calls)."""
        return self.convert_ids_to_tokens(int(index))

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Token texts back to a string: byte tokens are decoded together as UTF-8."""
        specials = set(self._specials)
        out, pending = [], bytearray()
        for token in tokens:
            if token in specials:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
                out.append(token)
            else:
                pending += token.encode("latin-1")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Map a special token's text (or a single character of one byte) to its id."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        if token in self._special_to_id:
            return self._special_to_id[token]
        raw = token.encode("utf-8")
        if len(raw) == 1:
            return raw[0]
        raise ValueError(
            f"token {token!r} is not in the vocabulary; allowed: a special token "
            f"{list(self._specials)!r} or a one-byte character")

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Encode ``text`` to ids: UTF-8 bytes, special-token strings as their single id.

        ``add_special_tokens`` is accepted for compatibility and adds nothing (no bos; eos is
        the caller's business, as with GPT-2's tokenizer).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:  # odd pieces are the captured special tokens
                ids.append(self._special_to_id[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = False,
        *,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """Tokenize one text or a list of texts.

        Returns a ``BatchEncoding`` (a dict) with ``input_ids`` and, unless disabled,
        ``attention_mask``: lists for one text, lists of lists for a batch; with
        ``return_tensors="pt"`` int64 tensors of shape (L,) -> (1, L) for one text and (B, L)
        for a batch (HF's convention), which needs equal lengths (use ``padding``).

        ``padding``: False / "do_not_pad", True / "longest" (pad to the longest in the batch), or
        "max_length" (pad to ``max_length``). Pads with ``pad_token_id`` on ``padding_side``.
        ``truncation=True`` cuts to ``max_length`` (or ``model_max_length``) on
        ``truncation_side``.
        """
        if padding not in _PADDING_CHOICES:
            raise ValueError(f"padding={padding!r} is invalid; allowed: {_PADDING_CHOICES}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is invalid; allowed: None, 'pt'")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length={max_length!r} is invalid; allowed: None or an integer >= 1")
        if padding == "max_length" and max_length is None:
            raise ValueError("max_length=None is invalid with padding='max_length'; allowed: an integer >= 1")

        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            rows = [r[-limit:] if self.truncation_side == "left" else r[:limit] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest", "max_length") and rows:
            width = max_length if padding == "max_length" else max(len(r) for r in rows)
            width = max(width, max(len(r) for r in rows))
            for r, m in zip(rows, masks):
                fill = width - len(r)
                if self.padding_side == "left":
                    r[:0] = [self.pad_token_id] * fill
                    m[:0] = [0] * fill
                else:
                    r.extend([self.pad_token_id] * fill)
                    m.extend([0] * fill)

        out = BatchEncoding()
        if return_tensors == "pt":
            import torch  # lazy: the tokenizer itself does not need torch

            if len({len(r) for r in rows}) > 1:
                raise ValueError(
                    f"padding={padding!r} is invalid with return_tensors='pt' for texts of "
                    f"different lengths; allowed: True, 'longest', 'max_length'")
            out["input_ids"] = torch.tensor(rows, dtype=torch.long)
            if return_attention_mask:
                out["attention_mask"] = torch.tensor(masks, dtype=torch.long)
            return out
        out["input_ids"] = rows[0] if single else rows
        if return_attention_mask:
            out["attention_mask"] = masks[0] if single else masks
        return out

    # ------------------------------------------------------------------ decoding
    def decode(
        self,
        ids: Iterable[int] | int,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Decode ids to text; invalid UTF-8 byte runs become U+FFFD (``errors="replace"``).

        Accepts a list, a 1-D tensor / array (anything with ``tolist``) or a single int.
        ``skip_special_tokens`` drops eos and pad (the answer markers are kept).
        ``clean_up_tokenization_spaces`` is accepted for compatibility and ignored.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        skip = {self.eos_token_id, self.pad_token_id} if skip_special_tokens else set()
        pieces: list[str] = []
        run = bytearray()
        for tok in ids:
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < self.vocab_size:
                raise ValueError(f"token id {tok!r} is invalid; allowed: integers in [0, {self.vocab_size})")
            if tok < _N_BYTES:
                run.append(tok)
                continue
            # A special token ends the byte run: decode the run on its own (the bytes of a
            # character never straddle a special token in text we encoded).
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if tok not in skip:
                pieces.append(self._specials[tok - _N_BYTES])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def batch_decode(
        self,
        sequences: Iterable[Iterable[int]],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """Decode each row of a list of id lists or of a 2-D tensor."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str]:
        """Write ``tokenizer_config.json`` into ``save_directory`` (created if needed).

        Returns the tuple of written paths, like Hugging Face.
        """
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, _CONFIG_NAME)
        config = {
            "tokenizer_class": type(self).__name__,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "markers": list(self._specials[2:]),
            "model_max_length": self.model_max_length,
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return (path,)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ByteTokenizer":
        """Load a tokenizer written by ``save_pretrained``; ``name_or_path`` becomes ``directory``."""
        path = os.path.join(directory, _CONFIG_NAME)
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("tokenizer_class") != cls.__name__:
            raise ValueError(
                f"{path}: tokenizer_class={config.get('tokenizer_class')!r} is invalid; "
                f"allowed: {cls.__name__!r}")
        return cls(
            eos_token=config["eos_token"],
            pad_token=config["pad_token"],
            markers=tuple(config["markers"]),
            model_max_length=config["model_max_length"],
            name_or_path=str(directory),
        )

    def __repr__(self) -> str:
        return (f"ByteTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"specials={list(self._specials)!r})")
