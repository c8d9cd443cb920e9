"""Aligned teacher/student batches.

A record is a plain dict with "id", "teacher_prompt_ids" (hinted prompt, chat-rendered),
"student_prompt_ids" (the bare question, chat-rendered), "student_plain_prompt_ids" (the SSB
reference code's student input: system prompt and question as plain text, no chat template;
used with student_format="plain") and "solution_ids" (the sampled solution, ending with the stop
token when "solution_finish_reason" is "stop" or absent). The teacher sequence is
teacher_prompt ‖ solution, the student sequence is student_prompt ‖ solution; both are right
padded to a bucketed length. With stop_token_target=False (the reference code's targets) a
solution's final stop token is left out of both sequences.

The logit at position p predicts token p + 1, so solution token j is predicted at position
prompt_len - 1 + j of each sequence: `teacher_index` / `student_index` [B, A] hold those
positions, `answer_tokens` [B, A] the solution tokens and `answer_mask` [B, A] which are real.
Padded answer slots point at position 0 and are masked out. Rows beyond the records (a short
last batch) are all padding, so every step of a run has the same batch size.

A batch is a `DistillBatch` (a typed pytree, ssb_jax.typed_batch): the student sequence and the answer
positions always; the teacher sequence (online teacher) or the teacher's cached top-k arrays (cached
teacher, see ssb_jax.distill.teacher_cache) as optional fields; `row_valid` marks the rows that hold a
record. `DistillBatch.abstract(...)` gives the train step's input shapes for lowering.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Sharding

from ssb_jax.typed_batch import TypedBatch, array_field

STUDENT_PROMPT_KEYS = {"chat": "student_prompt_ids", "plain": "student_plain_prompt_ids"}
TEACHER_MODES = ("online", "cached")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class CachedTeacher:
    """The cached teacher's arrays per answer token (leading dimensions [..., n]; [B, A] in a batch):
    top-k log-probs of softmax(t / T) and their ids [..., k], the log of the tail mass outside them and
    the log-prob at T = 1 of the solution token."""
    logprobs: Any
    ids: Any
    tail_logprob: Any
    target_logprob: Any

    def arrays(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillBatch(TypedBatch):
    """Aligned teacher/student batch (see the module docstring); B rows, the student sequence of
    student_len, the teacher sequence of teacher_len, answer_len answer slots, topk cached ids."""
    student_tokens: Any = array_field("batch", "student_len", dtype=np.int32)
    student_positions: Any = array_field("batch", "student_len", dtype=np.int32)
    student_mask: Any = array_field("batch", "student_len", dtype=np.bool_)
    student_index: Any = array_field("batch", "answer_len", dtype=np.int32)
    answer_tokens: Any = array_field("batch", "answer_len", dtype=np.int32)
    answer_mask: Any = array_field("batch", "answer_len", dtype=np.bool_)
    # online teacher: the hinted sequence, read by the base model
    teacher_tokens: Any = array_field("batch", "teacher_len", dtype=np.int32, optional=True)
    teacher_positions: Any = array_field("batch", "teacher_len", dtype=np.int32, optional=True)
    teacher_mask: Any = array_field("batch", "teacher_len", dtype=np.bool_, optional=True)
    teacher_index: Any = array_field("batch", "answer_len", dtype=np.int32, optional=True)
    # cached teacher (CachedTeacher's arrays at the answer slots)
    teacher_topk_logprobs: Any = array_field("batch", "answer_len", "topk", dtype=np.float32, optional=True)
    teacher_topk_ids: Any = array_field("batch", "answer_len", "topk", dtype=np.int32, optional=True)
    teacher_tail_logprob: Any = array_field("batch", "answer_len", dtype=np.float32, optional=True)
    teacher_target_logprob: Any = array_field("batch", "answer_len", dtype=np.float32, optional=True)
    # host side: which rows hold a record (the rest pad a short last batch); the train step does not read it
    row_valid: Any = array_field("batch", dtype=np.bool_, optional=True)

    STUDENT_FIELDS = ("student_tokens", "student_positions", "student_mask", "student_index", "answer_tokens",
                      "answer_mask")
    ONLINE_TEACHER_FIELDS = ("teacher_tokens", "teacher_positions", "teacher_mask", "teacher_index")
    CACHED_TEACHER_FIELDS = ("teacher_topk_logprobs", "teacher_topk_ids", "teacher_tail_logprob",
                             "teacher_target_logprob")

    @classmethod
    def step_fields(cls, teacher_mode: str) -> tuple[str, ...]:
        """The fields the train step reads with this teacher mode."""
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, got {teacher_mode!r}")
        return cls.STUDENT_FIELDS + (cls.ONLINE_TEACHER_FIELDS if teacher_mode == "online"
                                     else cls.CACHED_TEACHER_FIELDS)

    def for_step(self, teacher_mode: str) -> DistillBatch:
        """This batch with only the fields the train step reads (step_fields)."""
        names = self.step_fields(teacher_mode)
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"the train step with a {teacher_mode} teacher reads {missing}, which this batch lacks")
        return DistillBatch(**{name: getattr(self, name) for name in names})

    @classmethod
    def abstract(cls, batch_size: int, student_len: int, teacher_len: int, answer_len: int, *,
                 teacher_mode: str = "online", topk: int = 0, sharding: Sharding | None = None) -> DistillBatch:
        """ShapeDtypeStructs of the train step's batch (step_fields), for lowering it without data;
        `sharding` for every field (the rows over the data axes: sharding.batch_sharding)."""
        if teacher_mode == "cached" and topk < 1:
            raise ValueError("a cached teacher's batch needs topk >= 1")
        sizes = {"batch": batch_size, "student_len": student_len, "teacher_len": teacher_len,
                 "answer_len": answer_len, "topk": topk}
        return cls.abstract_fields(cls.step_fields(teacher_mode), sizes, sharding)

    def cached_teacher(self) -> CachedTeacher:
        return CachedTeacher(logprobs=self.teacher_topk_logprobs, ids=self.teacher_topk_ids,
                             tail_logprob=self.teacher_tail_logprob, target_logprob=self.teacher_target_logprob)


def bucket_length(n: int, buckets: Sequence[int] = (), min_bucket: int = 16) -> int:
    """Smallest configured bucket >= n; without a list, the smallest quarter-power-of-two length
    (`quarter_power_of_two`) >= max(n, min_bucket)."""
    if buckets:
        for b in buckets:
            if b >= n:
                return int(b)
        raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")
    return quarter_power_of_two(max(int(n), int(min_bucket), 1))


def quarter_power_of_two(n: int) -> int:
    """The smallest length >= n of the form m * 2**e with m in {4, 5, 6, 7} (every length up to 8):
    ..., 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... Padding is under 25% of n (the next power of two
    padded up to 2x), for four compiled lengths per doubling instead of one."""
    if n <= 8:
        return max(int(n), 1)
    step = 1 << ((n - 1).bit_length() - 3)  # a quarter of the power of two below n
    return -(-n // step) * step


def quarter_power_of_two_buckets(minimum: int, maximum: int) -> list[int]:
    """Every `quarter_power_of_two` length from the one holding `minimum` up to the first that holds
    `maximum`: the training length buckets of a trainer that sizes them up front (GRPO, on-policy)."""
    buckets = [quarter_power_of_two(max(int(minimum), 1))]
    while buckets[-1] < maximum:
        buckets.append(quarter_power_of_two(buckets[-1] + 1))
    return buckets


def _prompt_keys(student_format: str) -> dict[str, str]:
    try:
        return {"teacher": "teacher_prompt_ids", "student": STUDENT_PROMPT_KEYS[student_format]}
    except KeyError:
        raise ValueError(f"student_format must be one of {sorted(STUDENT_PROMPT_KEYS)}, "
                         f"got {student_format!r}") from None


def check_record(record: Mapping, student_format: str = "chat") -> None:
    keys = _prompt_keys(student_format)
    missing = [k for k in (*keys.values(), "solution_ids") if k not in record]
    if missing:
        hint = (" (curated before student_format 'plain' existed: redo the curation, --config.overwrite=curate)"
                if missing == [STUDENT_PROMPT_KEYS["plain"]] else "")
        raise KeyError(f"record {record.get('id')!r} lacks {missing}{hint}")
    if len(record["solution_ids"]) == 0:
        raise ValueError(f"record {record.get('id')!r} has an empty solution")
    for k in keys.values():
        if len(record[k]) == 0:
            raise ValueError(f"record {record.get('id')!r} has an empty {k}")


def ends_with_stop(record: Mapping) -> bool:
    """Whether the solution's last id is its stop token: sampled solutions that stopped, and imported
    ones (which have no finish reason and end with the end-of-turn token)."""
    return record.get("solution_finish_reason", "stop") == "stop"


def truncated_solution(record: Mapping, max_seq_len: int = 0, student_format: str = "chat",
                       stop_token_target: bool = True) -> list[int]:
    """The solution (without its stop token unless stop_token_target), cut so that both sequences
    fit in max_seq_len (0: no limit)."""
    solution = list(record["solution_ids"])
    if not stop_token_target and ends_with_stop(record):
        solution = solution[:-1]
        if not solution:
            raise ValueError(f"record {record.get('id')!r}: the solution is only its stop token")
    if max_seq_len > 0:
        longest_prompt = max(len(record[key]) for key in _prompt_keys(student_format).values())
        room = max_seq_len - longest_prompt
        if room < 1:
            raise ValueError(f"record {record.get('id')!r}: prompt of {longest_prompt} tokens leaves no room "
                             f"for the solution within max_seq_len={max_seq_len}")
        solution = solution[:room]
    return solution


def _sequences(records, prompt_key, solutions, length):
    B = len(solutions)
    tokens = np.zeros((B, length), np.int32)
    mask = np.zeros((B, length), bool)
    for i, (rec, sol) in enumerate(zip(records, solutions)):
        seq = list(rec[prompt_key]) + sol
        tokens[i, :len(seq)] = seq
        mask[i, :len(seq)] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def build_batch(records: Sequence[Mapping], *, batch_size: int | None = None, buckets: Sequence[int] = (),
                min_bucket: int = 16, max_seq_len: int = 0, include_teacher: bool = True,
                teacher_cache: Callable[[object], CachedTeacher] | None = None,
                student_format: str = "chat", stop_token_target: bool = True) -> DistillBatch:
    """A DistillBatch of numpy arrays (see the module docstring). `teacher_cache(id)` (cached mode)
    returns that example's CachedTeacher of per-answer-token arrays ([n, k] and [n]), which fill the
    teacher_topk_logprobs / teacher_topk_ids / teacher_tail_logprob / teacher_target_logprob fields
    [B, A(, k)]."""
    records = list(records)
    if not records:
        raise ValueError("build_batch needs at least one record")
    for r in records:
        check_record(r, student_format)
    B = batch_size or len(records)
    if len(records) > B:
        raise ValueError(f"{len(records)} records do not fit a batch of {B}")
    prompt_keys = _prompt_keys(student_format)
    solutions = [truncated_solution(r, max_seq_len, student_format, stop_token_target) for r in records]
    A = bucket_length(max(len(s) for s in solutions), buckets, min_bucket)
    out = {}
    sides = ("teacher", "student") if include_teacher else ("student",)
    for side in sides:
        longest = max(len(r[prompt_keys[side]]) + len(s) for r, s in zip(records, solutions))
        length = bucket_length(longest, buckets, min_bucket)
        tokens, mask, positions = _sequences(records, prompt_keys[side], solutions, length)
        pad = B - len(records)
        if pad:
            tokens, mask, positions = (np.concatenate([x, np.zeros((pad, length), x.dtype)])
                                       for x in (tokens, mask, positions))
        out[f"{side}_tokens"], out[f"{side}_mask"], out[f"{side}_positions"] = tokens, mask, positions
    answer_tokens = np.zeros((B, A), np.int32)
    answer_mask = np.zeros((B, A), bool)
    indices = {side: np.zeros((B, A), np.int32) for side in ("teacher", "student")}
    for i, (rec, sol) in enumerate(zip(records, solutions)):
        n = len(sol)
        answer_tokens[i, :n] = sol
        answer_mask[i, :n] = True
        for side in ("teacher", "student"):
            indices[side][i, :n] = len(rec[prompt_keys[side]]) - 1 + np.arange(n)
    out["answer_tokens"], out["answer_mask"] = answer_tokens, answer_mask
    out["student_index"] = indices["student"]
    if include_teacher:
        out["teacher_index"] = indices["teacher"]
    if teacher_cache is not None:
        first = teacher_cache(records[0]["id"])
        k = first.logprobs.shape[-1]
        lp = np.zeros((B, A, k), np.float32)
        ids = np.zeros((B, A, k), np.int32)
        tail = np.full((B, A), -1e30, np.float32)
        target = np.zeros((B, A), np.float32)
        for i, (rec, sol) in enumerate(zip(records, solutions)):
            cached = first if i == 0 else teacher_cache(rec["id"])
            n = len(sol)
            if cached.logprobs.shape[0] < n:
                raise ValueError(f"teacher cache holds {cached.logprobs.shape[0]} tokens for record "
                                 f"{rec['id']!r}, whose solution has {n}; rebuild the cache")
            lp[i, :n], ids[i, :n] = cached.logprobs[:n], cached.ids[:n]
            tail[i, :n], target[i, :n] = cached.tail_logprob[:n], cached.target_logprob[:n]
        out.update(teacher_topk_logprobs=lp, teacher_topk_ids=ids, teacher_tail_logprob=tail,
                   teacher_target_logprob=target)
    out["row_valid"] = np.arange(B) < len(records)
    return DistillBatch(**out)
