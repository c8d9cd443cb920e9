"""What a stage's outputs were made from, so a rerun never reuses (or silently redoes) stale work.

Each stage directory holds FINGERPRINT.json: the settings the stage reads, content hashes of its
input files, and the fingerprints of the stages it consumes (evaluation keeps one beside each outputs
file instead). A stage about to skip or resume compares the stored fingerprint with the one it would
write now; on any difference it stops with `StaleOutputsError`, naming each changed key with its old
and new value and the two ways on (a new workdir, or `--config.overwrite=<stage>` to delete that
stage's outputs and redo it).

A fingerprint is a plain JSON dict; `digest` names it by a short hash so downstream stages can
depend on it without copying it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "FINGERPRINT.json"
_CHUNK = 1 << 20
_SAMPLES = 16


class StaleOutputsError(RuntimeError):
    """A stage's finished or partial outputs were made from other settings or inputs."""


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (a directory: of its files' names and digests, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(child.relative_to(path)).encode() + b"\0" + file_digest(child).encode() + b"\n")
        return h.hexdigest()[:16]
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            h.update(block)
    return h.hexdigest()[:16]


# Files of a model directory that change nothing the model sees or says (its card, its licence, git's)
_NOT_MODEL_BEHAVIOUR = ("README", "LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
# Weight files are identified by samples (reading 6 GB per run to name a model would cost minutes)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def model_identity(path: str) -> str:
    """A model by content: everything in its directory that changes what the model sees or says.

    Weights (each safetensors or other weight file) by size and sixteen 1 MiB samples spread through
    the file, the header (every tensor's name, shape and offsets) included, so a 6 GB model is named by
    reading ~16 MiB a file; every other file whole: config.json, generation_config.json, the tokenizer's
    files (vocabulary, merges, tokenizer.json, tokenizer_config.json and the chat template it may hold,
    chat_template.jinja / .json, special tokens). Left out: hidden files and the model card or licence
    (README*, LICENSE*, *.md). The directory's location does not count: a copied model is the same model.
    A path that is not a local directory (a hub id) is its own identity."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return path
    h = hashlib.sha256()
    for child in sorted(directory.iterdir()):
        if (not child.is_file() or child.name.startswith(".") or child.suffix == ".md"
                or child.name.upper().startswith(_NOT_MODEL_BEHAVIOUR)):
            continue
        if child.suffix in _WEIGHT_SUFFIXES:
            size = child.stat().st_size
            h.update(child.name.encode() + b"\0" + str(size).encode() + b"\0")
            with open(child, "rb") as handle:
                for offset in sorted({0, *(i * size // _SAMPLES for i in range(1, _SAMPLES)), max(0, size - _CHUNK)}):
                    handle.seek(offset)
                    h.update(handle.read(_CHUNK))
        else:
            h.update(child.name.encode() + b"\0" + file_digest(child).encode() + b"\n")
    return f"local#{h.hexdigest()[:16]}"


def dataset_identity(spec: str) -> str:
    """A data spec by content: a local file's digest; a known name by the digest of the shared-data
    file it reads (or the hub id it would download, when that file is absent)."""
    from ssb_jax.data.datasets import KNOWN_DATASETS
    from ssb_jax.paths import shared_data_dir
    if spec in KNOWN_DATASETS:
        known = KNOWN_DATASETS[spec]
        shared_file = shared_data_dir().joinpath(*known.shared_parts)
        return f"{spec}#{file_digest(shared_file)}" if shared_file.exists() else f"{spec}#hub:{known.hub_name}"
    path = Path(spec)
    # content only: the same file moved elsewhere is the same input
    return f"file#{file_digest(path)}" if path.exists() else f"{spec}#missing"


def digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for every leaf that differs (missing leaves shown as <absent>)."""
    flat_old, flat_new = _flatten(json.loads(json.dumps(old, default=str))), _flatten(json.loads(json.dumps(new, default=str)))
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, "<absent>"), flat_new.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


def read(directory: str | os.PathLike, file_name: str = FINGERPRINT_FILE) -> dict | None:
    path = Path(directory) / file_name
    return json.loads(path.read_text()) if path.exists() else None


def check(directory: str | os.PathLike, stage: str, fingerprint: Mapping[str, Any], *, overwrite: bool = False,
          outputs: Iterable[str] | None = None, write: bool = True, file_name: str = FINGERPRINT_FILE,
          unchecked: Iterable[str] = ()) -> None:
    """Before a stage runs (or skips) in `directory`: record `fingerprint` if the directory holds no
    outputs; pass if the stored one matches; otherwise delete the outputs and record anew when
    `overwrite`, else raise StaleOutputsError naming what changed.

    `outputs`: the file names that count as outputs (default: anything in the directory); when given,
    the message names those files and `overwrite` deletes only them.
    `write`: False compares only (every process of a multi-host run compares, so all raise alike;
    only the main process deletes and records).
    `file_name`: the fingerprint's file in `directory` (several fingerprinted outputs may share one).
    `unchecked`: top-level keys left out of the comparison: recorded, but outputs made under another
    value of them stand (and their record is kept).
    """
    directory, unchecked = Path(directory), set(unchecked)
    fingerprint = json.loads(json.dumps(fingerprint, default=str))  # the form it is stored in
    try:
        stored = read(directory, file_name)
    except json.JSONDecodeError as error:
        stored = {f"unreadable {file_name}": f"{error.msg} at line {error.lineno}"}
    wanted = None if outputs is None else set(outputs)
    present = sorted(  # hidden names are temporary files of atomic writes
        p.name for p in directory.iterdir()
        if p.name != file_name and not p.name.startswith(".") and (wanted is None or p.name in wanted)
    ) if directory.exists() else []
    if stored == fingerprint:
        return
    if present and not overwrite:
        if stored is None:
            changed = [f"the outputs have no fingerprint: {file_name} is missing (made by an older ssb_jax, "
                       "or copied in)"]
        else:
            changed = differences({k: v for k, v in stored.items() if k not in unchecked},
                                  {k: v for k, v in fingerprint.items() if k not in unchecked})
            if not changed:  # only unchecked keys differ: the outputs stand
                return
        where = f"in {directory}" if outputs is None else ", ".join(str(directory / name) for name in present)
        raise StaleOutputsError(
            f"{stage}: the outputs {where} were made from other settings or inputs ("
            + "; ".join(changed) + f"). Use a new --config.workdir, or pass --config.overwrite={stage} "
            "to delete them and redo the stage")
    if not write:
        return
    if present:
        log.warning("%s: deleting the outputs in %s (--config.overwrite=%s)", stage, directory, stage)
        if outputs is None:
            shutil.rmtree(directory)
        else:
            for name in present:
                (directory / name).unlink()
    directory.mkdir(parents=True, exist_ok=True)
    from ssb_jax.data.records import write_json_atomic
    write_json_atomic(directory / file_name, fingerprint)
