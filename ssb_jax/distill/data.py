"""grain pipeline over curation records: seeded shuffle, epochs, batching.

The dataset is random access (grain.MapDataset): source -> shuffle(seed) -> repeat(epochs) (each
epoch is a fresh permutation) -> batch (build_batch makes each group of records a DistillBatch of numpy
arrays; the last batch of the run may be short, and build_batch pads it with empty rows so every step
has the same shape). Its iterator's state ({"next_index": ...}) is a small JSON dict that the trainer
checkpoints.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import grain

from ssb_jax.distill.batch import build_batch, check_record
from ssb_jax.distill.config import TrainConfig


def make_dataset(examples: Sequence[Mapping], tc: TrainConfig, *,
                 teacher_cache: Callable | None = None) -> grain.MapDataset:
    """A MapDataset of DistillBatches (numpy; see ssb_jax.distill.batch) of the global batch size.

    Every process iterates the same global batches (same seed, same order, same shapes); the train
    step hands each device only its rows (ssb_jax.distill.step.TrainStep.place_batch), so a run
    on N processes sees exactly the batches of a run on one.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("no training examples")
    for r in examples:
        check_record(r, tc.student_format)
    ds = grain.MapDataset.source(examples).shuffle(seed=tc.seed).repeat(tc.epochs)
    batch_fn = functools.partial(build_batch, batch_size=tc.batch_size, buckets=tc.length_buckets,
                                 min_bucket=tc.min_bucket, max_seq_len=tc.max_seq_len,
                                 include_teacher=tc.teacher_mode == "online",
                                 teacher_cache=teacher_cache if tc.teacher_mode == "cached" else None,
                                 student_format=tc.student_format, stop_token_target=tc.stop_token_target)
    ds = ds.batch(tc.batch_size, drop_remainder=False, batch_fn=batch_fn)
    if tc.max_steps > 0:
        ds = ds[:tc.max_steps]
    return ds
