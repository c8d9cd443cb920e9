"""Which datasets an evaluation reads, from one comma-separated spec
("math500,amc23=/x/amc23/test.jsonl,/path/x.jsonl").

Each part is a known dataset name, `label=path` (or `label=known name`), or a bare local JSONL/Parquet
path labelled by the file's stem; the label names the outputs folder, so it must be a safe file name
and unique (also without case, as on macOS and Windows). Fields are detected as in curation (the caller's question/answer field names apply to
local files only; known datasets have their own).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ssb_jax.data.datasets import KNOWN_DATASETS, OnBadLine, ProblemList, load_problems
from ssb_jax.fingerprint import dataset_identity

if TYPE_CHECKING:
    from ssb_jax.evaluation.protocols import EvalConfig

# What may name a folder (a dataset label, a model): one path component of letters, digits, '.', '_' and '-',
# not starting with '.' (so never '.', '..' or a hidden name, which fingerprint checks pass over)
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
SAFE_NAME_RULE = "letters, digits, '.', '_' or '-', not starting with '.'"


def folder_key(name: str) -> str:
    """What a folder name is on every file system: names with equal keys are one folder somewhere
    (case-insensitive file systems: macOS, Windows; Windows drops trailing dots)."""
    return name.casefold().rstrip(".")
# known datasets the motif protocol grades by the bare gold string anywhere in the response, as MOTIF's code
# graded AIME24 (`y in x`; MATH500: `\boxed{y}` in x); local files opt in by label (EvalConfig.motif_contains_gold)
MOTIF_CONTAINS_GOLD_SOURCES = frozenset({"aime24"})


def dataset_specs(datasets: str) -> list[str]:
    """The comma-separated parts, as written (stripped)."""
    return [s.strip() for s in str(datasets).split(",") if s.strip()]


def dataset_name(spec: str) -> str:
    """The known name, or the file's stem for a local path."""
    return spec if spec in KNOWN_DATASETS else Path(spec).stem


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One part of EvalConfig.datasets."""
    label: str    # names the outputs folder and the table's rows
    source: str   # a known dataset name or a local file path
    part: str     # as written, for messages

    @property
    def known(self) -> bool:
        return self.source in KNOWN_DATASETS


def parse_datasets(datasets: str) -> list[DatasetSpec]:
    """Each comma-separated part: `label=source`, a known name, or a bare path labelled by its stem.
    Labels must be safe file names and unique. (A path holding '=' needs a label: `x=/p/a=b.jsonl`.)"""
    specs: list[DatasetSpec] = []
    for part in dataset_specs(datasets):
        label, has_label, source = (x.strip() for x in part.partition("="))
        if not has_label:
            label, source = dataset_name(part), part
        if not source:
            raise ValueError(f"datasets: {part!r} names no dataset after '='")
        if not SAFE_NAME.fullmatch(label):
            raise ValueError(f"datasets: the label {label!r} of {part!r} must be {SAFE_NAME_RULE} (it names the "
                             "outputs folder); give one as label=path")
        clash = next((s for s in specs if folder_key(s.label) == folder_key(label)), None)
        if clash is not None:
            same = (f"both labelled {label!r}" if clash.label == label else
                    f"labelled {clash.label!r} and {label!r}, one folder on case-insensitive file systems")
            raise ValueError(f"datasets: {clash.part!r} and {part!r} are {same}; give one another label as label=path")
        specs.append(DatasetSpec(label, source, part))
    return specs


def dataset_inputs(spec: DatasetSpec, question_field: str | None, answer_field: str | None) -> dict:
    """What a dataset's stored outputs depend on: its content, and the field names read from it."""
    fields = (None, None) if spec.known else (question_field or None, answer_field or None)
    return {"content": dataset_identity(spec.source), "question_field": fields[0], "answer_field": fields[1]}


def load_datasets(config: EvalConfig, *, on_bad_line: OnBadLine = "error", question_field: str | None = None,
                  answer_field: str | None = None) -> dict[str, ProblemList]:
    """{label: problems}. The field names apply to local files only (known datasets have their own)."""
    datasets: dict[str, ProblemList] = {}
    for spec in parse_datasets(config.datasets):
        if spec.known:
            problems = load_problems(spec.source, on_bad_line=on_bad_line)
        else:
            problems = load_problems(spec.source, question_field=question_field or None,
                                     answer_field=answer_field or None, on_bad_line=on_bad_line, name=spec.label)
        if config.max_problems:
            problems = ProblemList(problems[:config.max_problems], problems.skipped_lines)
        datasets[spec.label] = problems
    return datasets
