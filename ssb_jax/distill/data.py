"""grain pipeline over curation records: seeded shuffle, epochs, batching, sharded by process.

The dataset is random access (grain.MapDataset): source -> this process's shard -> shuffle(seed)
-> repeat(epochs) (each epoch is a fresh permutation) -> batch (the last batch of the run may be
short; build_batch pads it with empty rows so every step has the same shape). Its iterator's
state ({"next_index": ...}) is a small JSON dict that the trainer checkpoints.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import grain
import jax

from ssb_jax.distill.batch import build_batch, check_record
from ssb_jax.distill.config import TrainConfig


def make_dataset(examples: Sequence[Mapping], tc: TrainConfig, *, teacher_cache: Callable | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    """A MapDataset of numpy batches (see ssb_jax.distill.batch) for this process."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if tc.batch_size % process_count:
        raise ValueError(f"batch_size {tc.batch_size} is not divisible by the {process_count} processes")
    local_batch = tc.batch_size // process_count
    examples = list(examples)
    if not examples:
        raise ValueError("no training examples")
    for r in examples:
        check_record(r)
    buckets, min_bucket = tc.length_buckets, tc.min_bucket
    if process_count > 1:
        # every process must build arrays of the same shape: pad everything to max_seq_len
        if tc.max_seq_len <= 0:
            raise ValueError("multi-process training needs TrainConfig.max_seq_len > 0 (fixed batch shapes)")
        buckets = (tc.max_seq_len,)
    ds = grain.MapDataset.source(examples)
    if process_count > 1:
        per_process = len(examples) // process_count
        ds = ds[process_index::process_count][:per_process]
    ds = ds.shuffle(seed=tc.seed).repeat(tc.epochs)
    batch_fn = functools.partial(build_batch, batch_size=local_batch, buckets=buckets, min_bucket=min_bucket,
                                 max_seq_len=tc.max_seq_len, include_teacher=tc.teacher_mode == "online",
                                 teacher_cache=teacher_cache if tc.teacher_mode == "cached" else None)
    ds = ds.batch(local_batch, drop_remainder=False, batch_fn=batch_fn)
    if tc.max_steps > 0:
        ds = ds[:tc.max_steps]
    return ds
