import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssb_jax.data.records import (
    DuplicateRecordError, RecordStore, RecordStoreError, ShardedRecordStore, fold_shards, merge_record_files,
    shard_path, shard_paths, write_json_atomic)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Appends records r0..r{total-1} in batches, skipping ids already stored (resumable).
WRITER_SCRIPT = """
import sys
from ssb_jax.data.records import RecordStore
path, total, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = RecordStore(path)
done = store.done_ids()
todo = [i for i in range(total) if f"r{i}" not in done]
for start in range(0, len(todo), batch_size):
    chunk = todo[start:start + batch_size]
    store.append([{"id": f"r{i}", "n": i, "text": f"trace {i} \\n" * 1500} for i in chunk])
"""


def _run_writer(path, total, batch_size, **popen_kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path), str(total),
                             str(batch_size)], env=env, **popen_kwargs)


def test_append_and_read_all(tmp_path):
    path = tmp_path / "sub" / "store.jsonl"
    store = RecordStore(path)
    assert store.done_ids() == frozenset() and store.read_all() == []
    assert store.append([{"id": "a", "x": 1}, {"id": 2, "text": "line1\nline2 ünï"}]) == 2
    assert store.append([]) == 0
    store.append([{"id": "c"}])
    reopened = RecordStore(path)
    assert reopened.done_ids() == {"a", 2, "c"}
    assert reopened.read_all() == [{"id": "a", "x": 1}, {"id": 2, "text": "line1\nline2 ünï"},
                                   {"id": "c"}]
    assert "a" in reopened and len(reopened) == 3
    assert path.read_bytes().count(b"\n") == 3  # embedded newlines stay escaped


def test_duplicates_refused_and_nothing_written(tmp_path):
    path = tmp_path / "store.jsonl"
    store = RecordStore(path)
    store.append([{"id": "a"}])
    before = path.read_bytes()
    with pytest.raises(DuplicateRecordError):
        store.append([{"id": "b"}, {"id": "a"}])
    with pytest.raises(DuplicateRecordError):
        store.append([{"id": "c"}, {"id": "c"}])
    with pytest.raises(DuplicateRecordError):
        RecordStore(path).append([{"id": "a"}])  # also across reopen
    with pytest.raises(RecordStoreError):
        store.append([{"no_id": 1}])
    with pytest.raises(RecordStoreError):
        store.append([{"id": True}])
    assert path.read_bytes() == before
    assert store.done_ids() == {"a"}


@pytest.mark.parametrize("torn_tail", [
    b'{"id": "c", "te',  # cut mid-record
    b'{"id": "c"}',  # whole JSON but the newline never made it
    b'{"id": "c", "te\n',  # unparsable last line
    b"\x00\x00\x00",  # zero-filled tail
])
def test_torn_last_line_is_truncated(tmp_path, torn_tail):
    path = tmp_path / "store.jsonl"
    RecordStore(path).append([{"id": "a"}, {"id": "b"}])
    whole = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(torn_tail)
    store = RecordStore(path)
    assert store.done_ids() == {"a", "b"}
    assert path.read_bytes() == whole
    store.append([{"id": "c"}])
    assert [r["id"] for r in RecordStore(path).read_all()] == ["a", "b", "c"]


def test_malformed_earlier_line_is_an_error(tmp_path):
    path = tmp_path / "store.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", oops\n{"id": "c"}\n')
    with pytest.raises(RecordStoreError, match=r"store.jsonl:2"):
        RecordStore(path).done_ids()
    assert path.read_bytes().endswith(b'{"id": "c"}\n')  # nothing truncated
    path.write_bytes(b'{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(RecordStoreError, match=r"store.jsonl:2: duplicate id 'a'"):
        RecordStore(path).read_all()


def test_write_json_atomic(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_json_atomic(path, {"accuracy": 0.5, "name": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"accuracy": 0.5, "name": "ü"}
    write_json_atomic(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == [1, 2]  # old content intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp left


def _assert_whole_unique_lines(path):
    data = path.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.splitlines()]
    ids = [record["id"] for record in records]
    assert len(ids) == len(set(ids))
    return ids


def test_kill_minus_nine_then_resume_matches_uninterrupted_run(tmp_path):
    total, batch_size = 300, 12  # ~25 KB records, ~300 KB per batch write
    reference = tmp_path / "reference.jsonl"
    assert _run_writer(reference, total, batch_size).wait(timeout=120) == 0

    path = tmp_path / "killed.jsonl"
    kills = 0
    for threshold in (1_000_000, 3_000_000, 5_000_000):
        writer = _run_writer(path, total, batch_size)
        deadline = time.monotonic() + 60
        while (writer.poll() is None and time.monotonic() < deadline
               and (not path.exists() or path.stat().st_size < threshold)):
            time.sleep(0.001)
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGKILL)
            kills += 1
        writer.wait(timeout=30)
        store = RecordStore(path)
        done = store.done_ids()  # repairs a torn tail, if any
        ids = _assert_whole_unique_lines(path)
        assert set(ids) == done
        # Records are whole and in order: a prefix of the reference run.
        assert ids == [f"r{i}" for i in range(len(ids))]
    assert kills >= 1, "writer finished before it could be killed; raise the record size"

    assert _run_writer(path, total, batch_size).wait(timeout=120) == 0
    assert path.read_bytes() == reference.read_bytes()
    assert len(RecordStore(path).done_ids()) == total


def test_process_shards_fold_into_one_ordered_store(tmp_path):
    """Three 'processes' each append their share to their own shard; folding gives one store in the
    given order, deletes the shards, and keeps what the store already held."""
    import random
    path = tmp_path / "records.jsonl"
    RecordStore(path).append([{"id": "q7", "v": 7}])  # from an earlier (folded) run
    order = {f"q{i}": i for i in range(12)}
    ids = [f"q{i}" for i in range(12) if i != 7]
    random.Random(0).shuffle(ids)
    for index in range(3):
        store = ShardedRecordStore(path, index, 3)
        mine = ids[index::3]
        store.append([{"id": i, "v": int(i[1:])} for i in mine])
        assert all(i in store for i in mine) and "q7" in store and store.done_ids() >= set(mine) | {"q7"}
        assert shard_path(path, index, 3).exists()
    assert len(shard_paths(path)) == 3
    merged = fold_shards(path, order)
    assert [r["id"] for r in merged] == [f"q{i}" for i in range(12)]
    assert [r["v"] for r in RecordStore(path).read_all()] == list(range(12))
    assert shard_paths(path) == [] and fold_shards(path, order) is None
    single = ShardedRecordStore(path)  # one process: the plain store
    assert single.own is single.merged and len(single.read_all()) == 12


def test_fold_refuses_conflicting_records(tmp_path):
    path = tmp_path / "records.jsonl"
    ShardedRecordStore(path, 0, 2).append([{"id": "a", "v": 1}])
    ShardedRecordStore(path, 1, 2).append([{"id": "a", "v": 2}])
    with pytest.raises(RecordStoreError, match="'a' has different records"):
        merge_record_files(shard_paths(path), path, {"a": 0})
    ShardedRecordStore(path, 1, 2).own.path.write_text(json.dumps({"id": "a", "v": 1}) + "\n")
    assert [r["v"] for r in fold_shards(path)] == [1]  # the same record twice is one record



# --- a full disk names the file and loses nothing ------------------------------------------------------------

def _disk_full(monkeypatch):
    import errno

    def no_space(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)  # as a full disk fails the flush to the device


def test_a_full_disk_while_appending_names_the_file_and_rolls_the_batch_back(tmp_path, monkeypatch):
    import errno

    from ssb_jax.data.records import WriteError
    path = tmp_path / "round_1" / "curate" / "records.jsonl"
    store = RecordStore(path)
    store.append([{"id": "a"}])
    before = path.read_bytes()
    _disk_full(monkeypatch)
    with pytest.raises(WriteError) as error:
        store.append([{"id": "b"}, {"id": "c"}])
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC and isinstance(error.value, OSError)
    assert f"cannot write {path}: No space left on device; free space there" in message and "\n" not in message
    assert path.read_bytes() == before  # the batch was rolled back
    monkeypatch.undo()
    assert store.append([{"id": "b"}, {"id": "c"}]) == 2  # after freeing space the same batch goes in
    assert [r["id"] for r in RecordStore(path).read_all()] == ["a", "b", "c"]


def test_a_full_disk_during_an_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from ssb_jax.data.records import WriteError
    path = tmp_path / "curation_summary.json"
    write_json_atomic(path, {"kept": 1})
    _disk_full(monkeypatch)
    with pytest.raises(WriteError, match=rf"^\[Errno 28\] cannot write {path}: No space left on device"):
        write_json_atomic(path, {"kept": 2})
    assert json.loads(path.read_text()) == {"kept": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["curation_summary.json"]  # no temp file left


def test_a_full_disk_while_logging_training_metrics_names_the_file(tmp_path, monkeypatch):
    from ssb_jax.data.records import WriteError
    from ssb_jax.training.metrics import append_record
    path = tmp_path / "metrics.jsonl"
    append_record(path, {"step": 1})
    real_open = Path.open

    def full_disk_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        def no_space(text):
            raise OSError(28, os.strerror(28))
        handle.write = no_space
        return handle
    monkeypatch.setattr(Path, "open", full_disk_open)
    with pytest.raises(WriteError, match=rf"cannot write {path}: No space left on device"):
        append_record(path, {"step": 2})


def test_the_command_line_says_where_a_full_disk_that_names_no_file_was(tmp_path):
    """A library's own write error (orbax, safetensors) may name no file: the CLI's line names the workdir."""
    from types import SimpleNamespace

    from ssb_jax.data.records import WriteError
    from ssb_jax.pipeline.cli import _disk_full_hint
    config = SimpleNamespace(workdir=str(tmp_path / "run"))
    hint = _disk_full_hint(OSError(28, os.strerror(28)), config)
    assert f"while writing under --config.workdir={config.workdir}: free space there" in hint
    named = WriteError(28, f"cannot write {tmp_path / 'run' / 'records.jsonl'}: No space left on device")
    assert _disk_full_hint(named, config) == ""
    assert _disk_full_hint(OSError(2, "No such file", "x"), config) == ""
    assert _disk_full_hint(ValueError("bad"), config) == ""
