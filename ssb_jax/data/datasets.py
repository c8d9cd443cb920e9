"""Math problem sets (GSM8K, MATH500, AIME 2024 or any local JSONL/Parquet) as `Problem`s.

Known datasets are read from the shared data folder (`ssb_jax.paths`); only when a
shared file is missing and no path was given do the loaders fall back to the
Hugging Face Hub (`datasets` is imported lazily, so offline use never needs it).

Bad input is never dropped silently: with `on_bad_line="error"` (default) a malformed
JSON line, a line that is not UTF-8 (named with its byte offset), a missing field or a
duplicate id raises `DataError` naming the file, the line (or Parquet row) and the field;
with `on_bad_line="skip"` such records are skipped, counted on the returned `ProblemList`
and logged. A file that yields no problem at all (empty, or every record skipped) is a
`DataError` naming the file.
"""
from __future__ import annotations

import codecs
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

from ssb_jax.evaluation.grading import gsm8k_gold
from ssb_jax.paths import shared_data_dir

logger = logging.getLogger(__name__)

QUESTION_FIELDS = ("question", "problem", "Problem")
ANSWER_FIELDS = ("answer", "Answer")
ID_FIELDS = ("unique_id", "id")

OnBadLine = Literal["error", "skip"]


class DataError(ValueError):
    """A dataset file holds a record that cannot be turned into a Problem."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    source: str
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)


class ProblemList(list):
    """A list of Problems that also reports the records skipped while loading."""

    def __init__(self, problems: Iterable[Problem] = (), skipped_lines: Iterable[str] = ()):
        super().__init__(problems)
        self.skipped_lines: list[str] = list(skipped_lines)

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)


@dataclass(frozen=True)
class _KnownDataset:
    shared_parts: tuple[str, ...]
    hub_name: str
    hub_config: str | None
    hub_split: str


KNOWN_DATASETS: dict[str, _KnownDataset] = {
    "gsm8k_train": _KnownDataset(("gsm8k", "train.jsonl"), "openai/gsm8k", "main", "train"),
    "gsm8k_test": _KnownDataset(("gsm8k", "test.jsonl"), "openai/gsm8k", "main", "test"),
    "math500": _KnownDataset(("math500", "test.jsonl"), "HuggingFaceH4/MATH-500", None, "test"),
    "aime24": _KnownDataset(("aime24", "test.jsonl"), "HuggingFaceH4/aime_2024", None, "train"),
}


# ---------------------------------------------------------------------------
# Raw record readers: yield (location, record-or-error) pairs
# ---------------------------------------------------------------------------

def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    # read as bytes so a non-UTF-8 byte is one bad line (named with its offset), not a crash mid-file
    offset = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line_start, offset = offset, offset + len(raw)
            location = f"{path}:{line_number}"
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, line_start = raw[len(codecs.BOM_UTF8):], line_start + len(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield location, DataError(f"{location}: not UTF-8: byte 0x{raw[error.start]:02x} at byte offset "
                                          f"{line_start + error.start} of the file")
                continue
            if not line.strip():
                continue  # blank lines hold no record
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as error:
                yield location, DataError(f"{location}: malformed JSON ({error.msg})")


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from error
    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path}: cannot be read as Parquet ({reason})") from error
    for row_index, row in enumerate(rows):
        yield f"{path}: row {row_index}", row


def _hub_records(known: _KnownDataset) -> Iterator[tuple[str, Any]]:
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(
            f"shared data file for {known.hub_name} is missing and the `datasets` package "
            "is not installed to fetch it from the Hugging Face Hub") from error
    if known.hub_config is None:
        rows = load_dataset(known.hub_name, split=known.hub_split)
    else:
        rows = load_dataset(known.hub_name, known.hub_config, split=known.hub_split)
    for row_index, row in enumerate(rows):
        yield f"hf:{known.hub_name}[{known.hub_split}]: row {row_index}", dict(row)


def _records_from_path(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_records(path)
    if suffix == ".parquet":
        return _parquet_records(path)
    raise ValueError(f"unsupported dataset file type {path} (expected .jsonl or .parquet)")


# ---------------------------------------------------------------------------
# Record -> Problem
# ---------------------------------------------------------------------------

def _pick_field(record: Mapping[str, Any], location: str, named: str | None,
                candidates: tuple[str, ...], role: str) -> str:
    names = (named,) if named else candidates
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if isinstance(value, str) and not value.strip():
                raise DataError(f"{location}: field {name!r} ({role}) is empty")
            return name
    tried = ", ".join(repr(n) for n in names)
    raise DataError(f"{location}: missing field {names[0]!r} ({role}; looked for {tried})")


def _text_value(value: Any, location: str, name: str) -> Any:
    """A bytes value (a Parquet binary column) as text; other values unchanged."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{location}: field {name!r} is not UTF-8: byte 0x{value[error.start]:02x} at byte "
                        f"offset {error.start} of the value") from None


def _scalar(value: Any, location: str, name: str, role: str) -> Any:
    """A field's value when it is text or a finite number; a list, object, boolean or NaN is an error
    (written as a gold, "{'v': 4}" would be an answer nobody can give)."""
    import math
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        kind = {dict: "a JSON object", list: "a JSON array", bool: "a boolean"}.get(type(value), type(value).__name__)
        raise DataError(f"{location}: field {name!r} ({role}) is {kind}, expected text or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{location}: field {name!r} ({role}) is {value}, expected text or a finite number")
    return value


def _to_problem(record: Any, location: str, index: int, source: str,
                question_field: str | None, answer_field: str | None) -> Problem:
    if not isinstance(record, Mapping):
        raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
    question_key = _pick_field(record, location, question_field, QUESTION_FIELDS, "question")
    answer_key = _pick_field(record, location, answer_field, ANSWER_FIELDS, "answer")
    question = str(_scalar(_text_value(record[question_key], location, question_key), location, question_key,
                           "question")).strip()
    raw_answer = _scalar(_text_value(record[answer_key], location, answer_key), location, answer_key, "answer")
    id_key = next((key for key in ID_FIELDS if record.get(key) not in (None, "")), None)
    if id_key is not None:
        _scalar(record[id_key], location, id_key, "id")
    extra = {key: value for key, value in record.items()
             if key not in (question_key, answer_key, id_key)
             and not (key in QUESTION_FIELDS and value == record[question_key])}
    if isinstance(raw_answer, str) and "####" in raw_answer:
        answer = gsm8k_gold(raw_answer)  # GSM8K schema: worked solution then "#### gold"
        extra.setdefault("solution", raw_answer)
    else:
        answer = str(raw_answer).strip()
    problem_id = str(record[id_key]) if id_key is not None else f"{source}-{index}"
    return Problem(id=problem_id, question=question, answer=answer, source=source, extra=extra)


_SKIP_WARNINGS = 10  # skipped records logged one by one; beyond that only counted


def _build_problems(records: Iterable[tuple[str, Any]], source: str, origin: str, *,
                    question_field: str | None = None, answer_field: str | None = None,
                    on_bad_line: OnBadLine = "error") -> ProblemList:
    """origin: the file (or hub dataset) the records come from, named when it yields no problem."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    problems: list[Problem] = []
    skipped: list[str] = []
    first_location_of_id: dict[str, str] = {}
    for index, (location, record) in enumerate(records):
        try:
            if isinstance(record, DataError):
                raise record
            problem = _to_problem(record, location, index, source, question_field, answer_field)
            if problem.id in first_location_of_id:
                raise DataError(f"{location}: duplicate id {problem.id!r} "
                                f"(first seen at {first_location_of_id[problem.id]})")
        except DataError as error:
            if on_bad_line == "error":
                raise
            skipped.append(str(error))
            if len(skipped) <= _SKIP_WARNINGS:
                logger.warning("skipped (on_bad_line=skip) %s", error)
            continue
        first_location_of_id[problem.id] = location
        problems.append(problem)
    if not problems:
        why = (f"all {len(skipped)} record(s) skipped as bad; first: {skipped[0]}" if skipped
               else "it holds no records")
        raise DataError(f"{origin}: no problems ({why})")
    if skipped:
        logger.warning("%s: skipped %d bad record(s); first: %s", source, len(skipped), skipped[0])
    return ProblemList(problems, skipped)


def known_dataset_file(name: str) -> Path | None:
    """The shared data file of a known dataset, or None when it is missing (then it comes from the hub)."""
    shared_file = shared_data_dir().joinpath(*KNOWN_DATASETS[name].shared_parts)
    return shared_file if shared_file.exists() else None


def _load_known(name: str, path: str | Path | None, on_bad_line: OnBadLine,
                question_field: str | None = None,
                answer_field: str | None = None) -> ProblemList:
    known = KNOWN_DATASETS[name]
    options = dict(question_field=question_field, answer_field=answer_field,
                   on_bad_line=on_bad_line)
    path = path if path is not None else known_dataset_file(name)
    if path is not None:
        return _build_problems(_records_from_path(Path(path)), name, str(path), **options)
    logger.info("%s not found; loading %s from the Hugging Face Hub",
                shared_data_dir().joinpath(*known.shared_parts), known.hub_name)
    return _build_problems(_hub_records(known), name, f"hf:{known.hub_name}[{known.hub_split}]", **options)


# ---------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------

def load_gsm8k(split: str = "train", path: str | Path | None = None,
               on_bad_line: OnBadLine = "error") -> ProblemList:
    """GSM8K `split` ("train" | "test"); answers are the gold after `####`, commas removed."""
    name = f"gsm8k_{split}"
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown GSM8K split {split!r}; expected 'train' or 'test'")
    return _load_known(name, path, on_bad_line)


def load_math500(path: str | Path | None = None, on_bad_line: OnBadLine = "error") -> ProblemList:
    """MATH500 test set; ids are the records' `unique_id`s."""
    return _load_known("math500", path, on_bad_line)


def load_aime24(path: str | Path | None = None, on_bad_line: OnBadLine = "error") -> ProblemList:
    """AIME 2024 (30 problems); answers stay as written ("025"), graders read them as numbers."""
    return _load_known("aime24", path, on_bad_line)


def load_problems(spec: str | Path, question_field: str | None = None,
                  answer_field: str | None = None,
                  on_bad_line: OnBadLine = "error", name: str | None = None) -> ProblemList:
    """Problems from a known name (see `KNOWN_DATASETS`) or a local .jsonl / .parquet path.

    Fields default to the first present of `QUESTION_FIELDS` / `ANSWER_FIELDS`. Ids are
    the record's `unique_id` / `id` when present, else `<dataset name>-<record index>`,
    where the dataset name is the known name, else `name`, else the file's stem.
    """
    if isinstance(spec, str) and spec in KNOWN_DATASETS:
        return _load_known(spec, None, on_bad_line, question_field, answer_field)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{spec!r} is neither a known dataset ({', '.join(KNOWN_DATASETS)}) nor an existing file")
    return _build_problems(_records_from_path(path), name or path.stem, str(path), question_field=question_field,
                           answer_field=answer_field, on_bad_line=on_bad_line)
