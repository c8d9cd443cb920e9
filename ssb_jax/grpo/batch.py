"""GRPO's rollout batch: each sample as one right-padded sequence, prompt then completion.

The log-prob of completion token j is read at position prompt_len - 1 + j: `completion_index`
[rows, A] holds those positions, `completion_ids` [rows, A] the tokens and `completion_mask` which are
real. The update's fields (`old_logprobs`, `ref_logprobs` [rows, A], `advantages` [rows]) are filled
after the log-prob pass (ssb_jax.grpo.run).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Sharding

from ssb_jax.sampling.driver import bucket_for
from ssb_jax.typed_batch import TypedBatch, array_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutBatch(TypedBatch):
    """Samples as sequences of `length` tokens with `completion_len` completion slots (module docstring)."""
    tokens: Any = array_field("batch", "length", dtype=np.int32)
    positions: Any = array_field("batch", "length", dtype=np.int32)
    mask: Any = array_field("batch", "length", dtype=np.bool_)
    completion_index: Any = array_field("batch", "completion_len", dtype=np.int32)
    completion_ids: Any = array_field("batch", "completion_len", dtype=np.int32)
    # the update's fields (the log-prob pass reads none of them)
    completion_mask: Any = array_field("batch", "completion_len", dtype=np.bool_, optional=True)
    old_logprobs: Any = array_field("batch", "completion_len", dtype=np.float32, optional=True)
    advantages: Any = array_field("batch", dtype=np.float32, optional=True)
    ref_logprobs: Any = array_field("batch", "completion_len", dtype=np.float32, optional=True)  # with a KL term

    SEQUENCE_FIELDS = ("tokens", "positions", "mask", "completion_index", "completion_ids")
    UPDATE_FIELDS = SEQUENCE_FIELDS + ("completion_mask", "old_logprobs", "advantages")

    @classmethod
    def program_fields(cls, update: bool, reference: bool = False) -> tuple[str, ...]:
        """The fields the update (`reference`: with its KL term) or the log-prob pass reads."""
        if not update:
            return cls.SEQUENCE_FIELDS
        return cls.UPDATE_FIELDS + (("ref_logprobs",) if reference else ())

    def for_program(self, update: bool, reference: bool = False) -> RolloutBatch:
        """This batch with only the fields that program reads (program_fields)."""
        names = self.program_fields(update, reference)
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"the GRPO {'update' if update else 'log-prob pass'} reads {missing}, "
                             "which this batch lacks")
        return RolloutBatch(**{name: getattr(self, name) for name in names})

    @classmethod
    def abstract(cls, rows: int, length: int, completion_len: int, *, update: bool = True, reference: bool = False,
                 sharding: Sharding | None = None) -> RolloutBatch:
        """ShapeDtypeStructs of that program's batch (program_fields), for lowering it without data;
        `sharding` for every field (the rows over the data axes: sharding.batch_sharding)."""
        sizes = {"batch": rows, "length": length, "completion_len": completion_len}
        return cls.abstract_fields(cls.program_fields(update, reference), sizes, sharding)


def rollout_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, max_len: int,
                  length_buckets: Sequence[int], rows: int | None = None) -> RolloutBatch:
    """A RolloutBatch (numpy) of samples (prompt ids, completion ids): tokens/positions/mask [rows, T]
    with T the smallest bucket holding the longest sample, completion_index/ids/mask [rows, max_len].
    Rows past the samples (padding up to `rows`) hold one token and no completion: they weigh nothing."""
    rows = len(prompts) if rows is None else rows
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    T = bucket_for(longest, length_buckets)
    if T is None:
        raise ValueError(f"a sample of {longest} tokens is longer than the largest length bucket {length_buckets[-1]}")
    tokens = np.zeros((rows, T), np.int32)
    mask = np.zeros((rows, T), bool)
    mask[:, 0] = True
    index = np.zeros((rows, max_len), np.int32)
    ids = np.zeros((rows, max_len), np.int32)
    completion_mask = np.zeros((rows, max_len), bool)
    for r, (prompt, completion) in enumerate(zip(prompts, completions)):
        completion = list(completion)[:max_len]
        n, m = len(prompt), len(completion)
        tokens[r, :n + m] = list(prompt) + completion
        mask[r, :n + m] = True
        index[r, :m] = np.arange(n - 1, n - 1 + m)
        ids[r, :m] = completion
        completion_mask[r, :m] = True
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()
    return RolloutBatch(tokens=tokens, positions=positions, mask=mask, completion_index=index, completion_ids=ids,
                        completion_mask=completion_mask)
