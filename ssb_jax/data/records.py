"""Crash-safe, append-only JSONL store keyed by record id, for resumable pipelines.

Each `append` writes its whole batch with one write call, then flush + fsync. A process
killed mid-write leaves at most a torn final line (no trailing newline, or unparsable
JSON at the very end); the next open truncates that tail, so every stored line is a
whole record and the missing ids are simply written again. A malformed line anywhere
before the end is not a crash artifact and raises `RecordStoreError`.

Caveat: the kernel may cut a very large write short when the process is SIGKILLed
(page granularity), so a killed batch can leave a prefix of its records as whole
lines. Those records are complete and count as done; resuming by id (write what is
not in `done_ids()`) therefore still reaches the same final content.

One writer per file: ids are cached in memory after the first read.

A failed write (a full disk, say) is a `WriteError`, an OSError naming the file; an append rolls its
batch back and an atomic write leaves the old file, so rerunning after freeing space resumes.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)


class RecordStoreError(ValueError):
    """The store file is corrupt before its last line, or a record is invalid."""


class DuplicateRecordError(RecordStoreError):
    """A record's id is already stored (or repeated within the batch)."""


def _valid_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


class RecordStore:
    def __init__(self, path: str | os.PathLike, id_key: str = "id"):
        self.path = Path(path)
        self.id_key = id_key
        self._ids: set[str | int] | None = None

    # -- reading ---------------------------------------------------------------

    def _scan(self) -> tuple[list[dict], set]:
        """Read every record, truncating a torn final line; returns (records, ids)."""
        records: list[dict] = []
        ids: set = set()
        if not self.path.exists():
            return records, ids
        torn: tuple[int, int, str] | None = None  # (line number, byte offset, reason)
        offset = 0
        with open(self.path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if torn is not None:
                    raise RecordStoreError(f"{self.path}:{torn[0]}: {torn[2]}")
                if not raw.endswith(b"\n"):
                    torn = (line_number, offset, "line has no trailing newline")
                else:
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as error:
                        torn = (line_number, offset, f"malformed JSON ({error})")
                    else:
                        self._check_stored_record(record, line_number, ids)
                        ids.add(record[self.id_key])
                        records.append(record)
                offset += len(raw)
        if torn is not None:
            self._truncate(torn[1])
            logger.warning("%s: removed torn last line %d (%s)", self.path, torn[0], torn[2])
        return records, ids

    def _check_stored_record(self, record: Any, line_number: int, ids: set) -> None:
        where = f"{self.path}:{line_number}"
        if not isinstance(record, dict) or not _valid_id(record.get(self.id_key)):
            raise RecordStoreError(f"{where}: record has no valid {self.id_key!r}")
        if record[self.id_key] in ids:
            raise RecordStoreError(f"{where}: duplicate id {record[self.id_key]!r}")

    def _truncate(self, size: int) -> None:
        with open(self.path, "r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())

    def _loaded_ids(self) -> set:
        if self._ids is None:
            _, self._ids = self._scan()
        return self._ids

    def done_ids(self) -> frozenset:
        """Ids already stored (repairs a torn last line on first call)."""
        return frozenset(self._loaded_ids())

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._loaded_ids()

    def __len__(self) -> int:
        return len(self._loaded_ids())

    def read_all(self) -> list[dict]:
        """Every stored record, in write order."""
        records, self._ids = self._scan()
        return records

    # -- writing ---------------------------------------------------------------

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append a batch durably; refuses (writes nothing) if any id is already stored.

        Returns the number of records written.
        """
        batch = list(records)
        if not batch:
            return 0
        stored = self._loaded_ids()
        batch_ids: list = []
        seen: set = set()
        for record in batch:
            if not isinstance(record, Mapping) or not _valid_id(record.get(self.id_key)):
                raise RecordStoreError(f"record without a valid {self.id_key!r}: {record!r:.200}")
            record_id = record[self.id_key]
            if record_id in stored or record_id in seen:
                raise DuplicateRecordError(f"{self.path}: id {record_id!r} is already stored")
            seen.add(record_id)
            batch_ids.append(record_id)
        # json.dumps escapes newlines inside strings, so one record is one line.
        data = "".join(json.dumps(dict(record), ensure_ascii=False) + "\n" for record in batch)
        payload = data.encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with naming_write_errors(self.path), open(self.path, "ab") as handle:
            start = handle.seek(0, os.SEEK_END)
            try:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException:
                # Roll back a partial batch when the failure is ours (e.g. disk full).
                handle.truncate(start)
                raise
        stored.update(batch_ids)
        return len(batch)


class WriteError(OSError):
    """A write that failed (a full disk, a quota, an I/O error), naming the file; `errno` is the cause's."""


@contextlib.contextmanager
def naming_write_errors(path):
    """`with naming_write_errors(path):` an OSError while writing `path` (write, flush and fsync name no
    file: "[Errno 28] No space left on device") becomes a WriteError naming it, with what to do when the
    disk is full. Every writer of a run's files may use it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        hint = ("; free space there (or use another --config.workdir), then rerun the same command: the run resumes"
                if error.errno in (errno.ENOSPC, errno.EDQUOT) else "")
        raise WriteError(error.errno, f"cannot write {path}: {error.strerror or error}{hint}") from error


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write JSON so readers see the old file or the new one, never a partial one."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` by a durable temp-file rename (readers never see a partial file)."""
    path = Path(path)
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                                 dir=path.parent)
        try:
            # mkstemp makes the file 0600; keep the old file's mode, else a usual 0644.
            os.chmod(temp_name, path.stat().st_mode & 0o777 if path.exists() else 0o644)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except BaseException:
            try:
                os.unlink(temp_name)
            except FileNotFoundError:
                pass
            raise
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


def merge_record_files(sources: Iterable[str | os.PathLike], destination: str | os.PathLike,
                       order: Mapping[Any, int], id_key: str = "id") -> list[dict]:
    """Merge per-process stores (and `destination` itself, when it exists) into `destination`,
    atomically: one record per id, sorted by `order[id]` (ids not in `order` go last, in the
    order read). Two different records with the same id are an error (the shards overlapped).
    Returns the merged records."""
    destination = Path(destination)
    merged: dict[Any, dict] = {}
    where: dict[Any, Path] = {}
    paths = [destination] + [Path(p) for p in sources if Path(p) != destination]
    for path in paths:
        if not path.exists():
            continue
        for record in RecordStore(path, id_key).read_all():
            key = record[id_key]
            if key in merged and merged[key] != record:
                raise RecordStoreError(f"id {key!r} has different records in {where[key]} and {path}")
            merged.setdefault(key, record)
            where.setdefault(key, path)
    last = len(order)
    records = sorted(merged.values(), key=lambda r: order.get(r[id_key], last))
    write_text_atomic(destination, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def order_records(path: str | os.PathLike, order: Mapping[Any, int], id_key: str = "id") -> bool:
    """Put the store at `path` in `order[id]` order (ids not in `order` last), atomically, when it is not
    already: a stage that appends each record as its rows finish leaves them in completion order, and ends
    by putting them in input order, so the finished file does not depend on the sampler's timing.
    Call from one process while no other writes. Returns whether the file was rewritten."""
    path = Path(path)
    if not path.exists():
        return False
    last = len(order)
    positions = [order.get(r[id_key], last) for r in RecordStore(path, id_key).read_all()]
    if positions == sorted(positions):
        return False
    merge_record_files([], path, order, id_key)
    return True


# ----------------------------------------------------------------------------- one store, several writers
#
# In a multi-process stage each process appends to its own shard file beside the store; the main
# process folds the shards into the store at barriers (ssb_jax.distributed), so one file never has
# two writers.

def shard_path(path: str | os.PathLike, index: int, count: int) -> Path:
    """records.jsonl -> records.process-1-of-4.jsonl: the file process 1 of 4 appends to."""
    path = Path(path)
    return path.with_name(f"{path.stem}.process-{index}-of-{count}{path.suffix}")


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """Every shard file of `path` on disk (from any process count)."""
    path = Path(path)
    return sorted(path.parent.glob(f"{path.stem}.process-*-of-*{path.suffix}"))


def fold_shards(path: str | os.PathLike, order: Mapping[Any, int] | None = None) -> list[dict] | None:
    """Merge every shard file of `path` into it (ordered by `order`, else by id) and delete the
    shards. Call from one process while no other writes. Returns the merged records, or None
    when there were no shards."""
    shards = shard_paths(path)
    if not shards:
        return None
    if order is None:
        ids = {r["id"] for s in [path, *shards] if Path(s).exists() for r in RecordStore(s).read_all()}
        order = {i: n for n, i in enumerate(sorted(ids, key=str))}
    records = merge_record_files(shards, path, order)
    for shard in shards:
        shard.unlink()
    return records


class ShardedRecordStore:
    """One process's view of a store that several processes fill: ids count as done when they are in
    the merged file or in this process's shard; appends go to the shard. With one process it is the
    plain store."""

    def __init__(self, path: str | os.PathLike, index: int = 0, count: int = 1):
        self.merged = RecordStore(path)
        self.own = RecordStore(shard_path(path, index, count)) if count > 1 else self.merged

    def __contains__(self, record_id: object) -> bool:
        return record_id in self.own or record_id in self.merged

    def done_ids(self) -> frozenset:
        return self.merged.done_ids() | self.own.done_ids()

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        return self.own.append(records)

    def read_all(self) -> list[dict]:
        """The merged records, then this process's shard."""
        merged = self.merged.read_all()
        return merged if self.own is self.merged else merged + self.own.read_all()
