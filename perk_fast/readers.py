"""Readers for the reference repository's data formats (eric11eca/perk), and a JSONL writer.

A file is JSON (a list of rows, or one row object, as in the reference's ``data_samples/``) or
JSONL (one row per line; blank lines are skipped). ``.jsonl`` / ``.ndjson`` files are read as
JSONL, ``.json`` as JSON, anything else as JSON when it parses as a whole and as JSONL otherwise.
Row formats:

* ``babilong``: ``{"context": [str], "question", "answer", "support": [str]}`` -- one Example.
  ``support`` may be missing or null; an optional ``meta`` object is kept verbatim (this is what
  ``write_jsonl`` writes, so files round-trip).
* ``student_records``: ``{"database": [{"Student Id", "Student Name", "Year", "School", "Major",
  "Grade"}], "questions": [{"question", "answer", "support"?}]}`` -- one Example per question;
  each record is rendered with ``tasks.render_record`` and the lines are grouped into documents
  (one record per document, as the reference does, unless ``doc_tokens`` is given).
* ``longgorilla``: ``{"context": [str] | str, "question" | "prompt", "answer" | "api_call"}``;
  an optional ``location`` becomes ``meta["position"]``.

Answers that are numbers are converted with ``str`` (the reference does the same for records).
Any malformed row raises ValueError naming the file, the row (``line N`` of a JSONL file,
``index N`` of a JSON list) and the field.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

from .tasks import RECORD_KEYS, Example, byte_length, render_record

__all__ = ["FORMATS", "RECORD_QUERIES", "read_examples", "read_reference_split", "write_jsonl", "detect_format"]

FORMATS = ("babilong", "student_records", "longgorilla")
RECORD_QUERIES = ("recall", "relation", "count", "aggregate", "sort")


class _Row:
    """Where a row came from, for error messages."""

    def __init__(self, path: str, where: str) -> None:
        self.path, self.where = path, where

    def error(self, field: str | None, problem: str) -> ValueError:
        """A ValueError naming the file, the row and the field (None: the row as a whole)."""
        label = "<row>" if field is None else repr(field)
        return ValueError(f"{self.path}: {self.where}: field {label}: {problem}")


def _iter_rows(path: str) -> Iterator[tuple[_Row, Any]]:
    """Yield (location, parsed row) for every row of a JSON or JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ext = os.path.splitext(path)[1].lower()
    as_jsonl = ext in (".jsonl", ".ndjson")
    if not as_jsonl:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if ext == ".json":
                raise ValueError(f"{path}: line {err.lineno}: field <row>: invalid JSON ({err.msg})") from err
            as_jsonl = True
        else:
            if isinstance(data, list):
                for i, row in enumerate(data):
                    yield _Row(path, f"index {i}"), row
            else:
                yield _Row(path, "top-level object"), data
            return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {lineno}: field <row>: invalid JSON ({err.msg})") from err
        yield _Row(path, f"line {lineno}"), row


def detect_format(row: dict) -> str:
    """Guess a row's format from its keys: ``database`` -> student_records; ``prompt`` /
    ``api_call`` / ``location`` -> longgorilla; ``context`` with ``support`` -> babilong;
    ``context`` without it -> longgorilla (the same Example either way)."""
    if not isinstance(row, dict):
        raise ValueError(f"row of type {type(row).__name__} is invalid; allowed: a JSON object")
    if "database" in row:
        return "student_records"
    if {"prompt", "api_call", "location"} & row.keys():
        return "longgorilla"
    if "context" in row:
        return "babilong" if "support" in row or "meta" in row else "longgorilla"
    raise ValueError(f"row with keys {sorted(row)} is invalid; allowed: the keys of one of {FORMATS}")


def _get(obj: dict, loc: _Row, *names: str, prefix: str = "") -> Any:
    """The value of the first of ``names`` present in ``obj``; ValueError naming them if none."""
    for name in names:
        if name in obj:
            return obj[name]
    raise loc.error(prefix + " | ".join(names), "missing")


def _text(value: Any, loc: _Row, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise loc.error(field, f"{type(value).__name__} is invalid; allowed: a string")


def _str_list(value: Any, loc: _Row, field: str, *, allow_str: bool) -> list[str]:
    if allow_str and isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise loc.error(field, f"{type(value).__name__} is invalid; allowed: a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise loc.error(f"{field}[{i}]", f"{type(item).__name__} is invalid; allowed: a string")
    return list(value)


def _meta(row: dict, loc: _Row, fmt: str) -> dict:
    if "meta" in row:
        if not isinstance(row["meta"], dict):
            raise loc.error("meta", f"{type(row['meta']).__name__} is invalid; allowed: an object")
        return dict(row["meta"])
    return {"format": fmt, "source": loc.path, "row": loc.where}


def _read_babilong(row: dict, loc: _Row) -> list[Example]:
    support = row.get("support")
    if support is not None:
        support = _str_list(support, loc, "support", allow_str=True)
    return [Example(
        context=_str_list(_get(row, loc, "context"), loc, "context", allow_str=False),
        question=_text(_get(row, loc, "question"), loc, "question"),
        answer=_text(_get(row, loc, "answer"), loc, "answer"),
        support=support, meta=_meta(row, loc, "babilong"))]


def _read_longgorilla(row: dict, loc: _Row) -> list[Example]:
    meta = _meta(row, loc, "longgorilla")
    if "location" in row:
        meta["position"] = _text(row["location"], loc, "location")
    support = row.get("support")
    return [Example(
        context=_str_list(_get(row, loc, "context"), loc, "context", allow_str=True),
        question=_text(_get(row, loc, "question", "prompt"), loc, "question"),
        answer=_text(_get(row, loc, "answer", "api_call"), loc, "answer"),
        support=_str_list(support, loc, "support", allow_str=True) if support else None,
        meta=meta)]


def _group_lines(lines: list[str], doc_tokens: int | None,
                 count_tokens: Callable[[str], int]) -> list[str]:
    if doc_tokens is None:
        return list(lines)
    docs, cur, used = [], [], 0
    for line in lines:
        if cur and used + count_tokens(line) > doc_tokens:
            docs.append("\n".join(cur))
            cur, used = [], 0
        cur.append(line)
        used += count_tokens(line + "\n")
    if cur:
        docs.append("\n".join(cur))
    return docs


def _read_records(row: dict, loc: _Row, doc_tokens: int | None,
                  count_tokens: Callable[[str], int]) -> list[Example]:
    database = _get(row, loc, "database")
    if not isinstance(database, list):
        raise loc.error("database", f"{type(database).__name__} is invalid; allowed: a list of records")
    lines = []
    for i, rec in enumerate(database):
        if not isinstance(rec, dict):
            raise loc.error(f"database[{i}]", f"{type(rec).__name__} is invalid; allowed: an object")
        for key in RECORD_KEYS:
            if key not in rec:
                raise loc.error(f"database[{i}].{key}", "missing")
            _text(rec[key], loc, f"database[{i}].{key}")
        lines.append(render_record(rec))
    context = _group_lines(lines, doc_tokens, count_tokens)
    questions = _get(row, loc, "questions")
    if not isinstance(questions, list):
        raise loc.error("questions", f"{type(questions).__name__} is invalid; allowed: a list of objects")
    base = _meta(row, loc, "student_records")
    for key in ("database_id", "guid"):
        if key in row and "meta" not in row:
            base[key] = row[key]
    out = []
    for j, q in enumerate(questions):
        field = f"questions[{j}]"
        if not isinstance(q, dict):
            raise loc.error(field, f"{type(q).__name__} is invalid; allowed: an object")
        support = q.get("support")
        out.append(Example(
            context=list(context),
            question=_text(_get(q, loc, "question", prefix=f"{field}."), loc, f"{field}.question"),
            answer=_text(_get(q, loc, "answer", prefix=f"{field}."), loc, f"{field}.answer"),
            support=_str_list(support, loc, f"{field}.support", allow_str=True) if support else None,
            meta={**base, "question_index": j}))
    return out


def read_examples(path: str | os.PathLike, format: str | None = None, *,
                  doc_tokens: int | None = None,
                  count_tokens: Callable[[str], int] = byte_length) -> list[Example]:
    """Read a JSON / JSONL file of the reference's formats into Examples.

    Args:
        path: the file.
        format: one of ``FORMATS``, or None to detect it from each row's keys.
        doc_tokens: student records only -- group record lines into documents of at most this
            many tokens (``count_tokens``); None keeps one record per document.
    Raises ValueError naming the file, the row and the field of the first malformed row.
    """
    path = os.fspath(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format!r} is invalid; allowed: None or one of {FORMATS}")
    if doc_tokens is not None and (not isinstance(doc_tokens, int) or doc_tokens < 1):
        raise ValueError(f"doc_tokens={doc_tokens!r} is invalid; allowed: None or an integer >= 1")
    out: list[Example] = []
    for loc, row in _iter_rows(path):
        if not isinstance(row, dict):
            raise loc.error(None, f"{type(row).__name__} is invalid; allowed: a JSON object")
        if format is None:
            try:
                fmt = detect_format(row)
            except ValueError as err:
                raise loc.error(None, str(err)) from None
        else:
            fmt = format
        if fmt == "babilong":
            out.extend(_read_babilong(row, loc))
        elif fmt == "longgorilla":
            out.extend(_read_longgorilla(row, loc))
        else:
            out.extend(_read_records(row, loc, doc_tokens, count_tokens))
    return out


def _split_base(data_dir: str, dataset_name: str, dataset_subset: str | None) -> str:
    if dataset_subset in (None, "", "none"):
        return os.path.join(data_dir, dataset_name)
    return os.path.join(data_dir, dataset_name, dataset_subset)


def _require(path: str, layout: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the reference's layout is {layout}")


def read_reference_split(data_dir: str | os.PathLike, dataset_name: str, dataset_subset: str | None, split: str, *,
                         student_record_query: str | None = None) -> list[Example]:
    """One split of a dataset stored as the reference stores it, each Example's ``meta["guid"]``
    built as the reference builds it.

    * ``babilong`` / ``longgorilla``: ``<data_dir>/<dataset_name>/<dataset_subset>/<split>.jsonl``,
      guid ``<dataset_subset>_<line index>``.
    * ``student_records``: ``<...>/<split>/context.jsonl`` (``{database_id, database}``) joined line
      by line with ``<...>/<split>/<student_record_query>.jsonl`` (``{questions: [...]}``), one
      Example per question, guid the ``database_id``.

    ``dataset_subset`` ``"none"`` (or None) drops that level. A missing file, files of different
    lengths or a malformed row raise an error naming the file, the line and the field.
    """
    data_dir = os.fspath(data_dir)
    if dataset_name not in FORMATS:
        raise ValueError(f"dataset_name={dataset_name!r} is invalid; allowed: {', '.join(FORMATS)}")
    base = _split_base(data_dir, dataset_name, dataset_subset)
    subset = dataset_subset if dataset_subset not in (None, "") else "none"
    out: list[Example] = []
    if dataset_name in ("babilong", "longgorilla"):
        path = os.path.join(base, f"{split}.jsonl")
        _require(path, "<data_dir>/<dataset_name>/<dataset_subset>/{train,validation,test}.jsonl")
        read = _read_babilong if dataset_name == "babilong" else _read_longgorilla
        for index, (loc, row) in enumerate(_iter_rows(path)):
            if not isinstance(row, dict):
                raise loc.error(None, f"{type(row).__name__} is invalid; allowed: a JSON object")
            for ex in read(row, loc):
                ex.meta["guid"] = f"{subset}_{index}"
                out.append(ex)
        return out
    if student_record_query not in RECORD_QUERIES:
        raise ValueError(f"student_record_query={student_record_query!r} is invalid for dataset_name "
                         f"'student_records'; allowed: {', '.join(RECORD_QUERIES)} (set it with "
                         "+student_record_query=...)")
    layout = "<data_dir>/student_records/<dataset_subset>/<split>/{context,<student_record_query>}.jsonl"
    context_path = os.path.join(base, split, "context.jsonl")
    query_path = os.path.join(base, split, f"{student_record_query}.jsonl")
    _require(context_path, layout)
    _require(query_path, layout)
    contexts, queries = list(_iter_rows(context_path)), list(_iter_rows(query_path))
    if len(contexts) != len(queries):
        raise ValueError(f"{context_path} has {len(contexts)} rows but {query_path} has {len(queries)}: they are "
                         "joined line by line and must have as many")
    for (c_loc, c_row), (q_loc, q_row) in zip(contexts, queries):
        for loc, row in ((c_loc, c_row), (q_loc, q_row)):
            if not isinstance(row, dict):
                raise loc.error(None, f"{type(row).__name__} is invalid; allowed: a JSON object")
        if "database_id" not in c_row:
            raise c_loc.error("database_id", "missing")
        joined = {"database": _get(c_row, c_loc, "database"), "questions": _get(q_row, q_loc, "questions")}
        for ex in _read_records(joined, _Row(f"{context_path} + {query_path}", c_loc.where), None, byte_length):
            ex.meta.update(guid=str(c_row["database_id"]), source=query_path)
            out.append(ex)
    return out


def write_jsonl(examples: list[Example], path: str | os.PathLike) -> None:
    """Write Examples as JSONL rows ``{context, question, answer, support, meta}``;
    ``read_examples`` reads them back equal. ``meta`` must be JSON-serialisable."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            row = {"context": ex.context, "question": ex.question, "answer": ex.answer,
                   "support": ex.support, "meta": ex.meta}
            try:
                line = json.dumps(row, ensure_ascii=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"examples[{i}]: field 'meta': not JSON-serialisable ({err})") from err
            f.write(line + "\n")
