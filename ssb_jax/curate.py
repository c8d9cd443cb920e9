"""The curation stage: rollouts -> mixed groups -> hinted teacher solutions -> verified pairs.

For each question (in a seeded shuffled order): sample K rollouts under the tutor prompt and grade
them; keep the question only when at least one rollout is right and one wrong; show the model the
question with a correct trace and the trace of the most common wrong answer (the hinted prompt),
sample one solution, and keep the pair only if that solution is still right and ended with a stop
token (`solution_must_stop`). Each processed question becomes one JSONL record, appended as soon as
its rows have finished (its K rollouts and, when mixed, its teacher solution), so a killed run loses
only the questions in flight and resumes where it stopped; at the end the records are put in question
order (`data.records.order_records`), so the file does not depend on the order rows finished in.

The sampler is anything with `generate_ids(prompts, sampling, n=, seed=, ids=, on_finish=) -> [[Completion]]`
calling on_finish(prompt index, sample index, completion) for each row as it finishes: the rollout engine
(ssb_jax.engine), the static ssb_jax.sampling.driver.Sampler (per batch), or a scripted fake in tests.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import statistics
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ssb_jax import validate
from ssb_jax.data.datasets import Problem
from ssb_jax.data.records import RecordStore, ShardedRecordStore, order_records, write_json_atomic
from ssb_jax.evaluation.grading import (EXACT, GRADERS, LABEL_CORRECT, LABEL_NO_ANSWER, LABEL_WRONG,
                                        grade_response, normalize_answer)
from ssb_jax.model.tokenizer import encode_chat, encode_plain, stop_token_ids
from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
from ssb_jax.sampling.sampler import SamplingParams
from ssb_jax.settings import setting

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "curation_summary.json"
# no_wrong_answer: right rollouts beside rollouts without a boxed answer, under no_answer_is_wrong=False
VERDICTS = ("all_correct", "all_wrong", "no_wrong_answer", "teacher_failed", "kept", "prompt_too_long")


@dataclasses.dataclass(frozen=True)
class CurationConfig:
    num_rollouts: int = setting(4, "plain-prompt rollouts per question (>= 2, to see both a right and a wrong answer)")
    rollout_temperature: float = setting(0.8, "sampling temperature of the rollouts")
    rollout_top_k: int = setting(50, "top-k of the rollouts (0: off)")
    rollout_top_p: float = setting(1.0, "top-p of the rollouts (1.0: off)")
    rollout_max_new_tokens: int = setting(1024, "token budget of each rollout")
    solution_temperature: float = setting(0.4, "sampling temperature of the hinted teacher's solution")
    solution_top_k: int = setting(50, "top-k of the teacher's solution (0: off)")
    solution_top_p: float = setting(1.0, "top-p of the teacher's solution (1.0: off)")
    solution_max_new_tokens: int = setting(1024, "token budget of the teacher's solution")
    target_pairs: int = setting(256, "stop once this many pairs are kept (0: process all questions)")
    min_pairs: int = setting(0, "fewer kept pairs is a failed curation (warned, reported, exit 3); 0: half the target")
    max_questions: int = setting(0, "look at no more than this many questions (0: all)")
    shuffle: bool = setting(True, "visit the questions in a seeded random order")
    seed: int = setting(0, "seed of the question order and the rollouts")
    correct_choice: str = setting("first", "which correct rollout becomes the hint: first, shortest or random")
    no_answer_is_wrong: bool = setting(
        True,
        "a rollout without a \\boxed answer counts as wrong for mixing (and may be the wrong hint "
        "when no wrong rollout has an answer); False: such groups are skipped, as in the reference "
        "code")
    solution_must_stop: bool = setting(
        True,
        "keep a teacher solution only if it ended with a stop token (False: a truncated solution "
        "with the right last box is kept, as in the reference code)")
    questions_per_batch: int = setting(32, "questions per wave: handed to the sampler in one call, the kept pairs "
                                           "counted (and the target checked) after each wave; records are "
                                           "appended as each question finishes")
    grader: str = setting(
        "math_verify",
        "answer grader: math_verify (lenient), string_match (strict: normalized string equality) or "
        "exact (the reference code's: the last \\boxed{} verbatim equal to the gold string)")

    def __post_init__(self):
        validate.check_declared(self)  # finite numbers and each field's declared check
        validate.non_negative(self, "rollout_temperature", "solution_temperature", "rollout_top_k", "solution_top_k",
                              "target_pairs", "min_pairs", "max_questions")
        validate.positive(self, "rollout_max_new_tokens", "solution_max_new_tokens", "questions_per_batch")
        validate.probability(self, "rollout_top_p", "solution_top_p")
        if self.correct_choice not in ("first", "shortest", "random"):
            raise ValueError(f"correct_choice must be first, shortest or random, got {self.correct_choice!r}")
        if self.grader not in GRADERS:
            raise ValueError(f"grader must be one of {sorted(GRADERS)}, got {self.grader!r}")
        if self.num_rollouts < 2:
            raise ValueError(f"num_rollouts must be >= 2 to see both a right and a wrong answer, got {self.num_rollouts}")


def question_order(problems: Sequence[Problem], config: CurationConfig) -> list[Problem]:
    ordered = list(problems)
    if config.shuffle:
        random.Random(config.seed).shuffle(ordered)
    if config.max_questions:
        ordered = ordered[:config.max_questions]
    return ordered


def _question_rng(config: CurationConfig, problem_id: str) -> random.Random:
    """Per-question randomness, independent of processing order (so resumed runs agree)."""
    return random.Random(zlib.crc32(f"{config.seed}:{problem_id}".encode()))


def select_traces(rollouts: Sequence[dict], config: CurationConfig, rng: random.Random):
    """Pick (correct rollout, wrong rollout) from graded rollouts, or None when the group is not mixed.

    Each rollout is a dict with "text", "answer" (or None), "label", "num_tokens". The wrong trace
    carries the most common wrong answer (answers compared as the grader compares strings: normalized,
    or verbatim under the "exact" grader; ties broken by rng); a trace with no answer is chosen only
    when no wrong trace has one and `no_answer_is_wrong` (else such a group is not mixed).
    """
    correct = [r for r in rollouts if r["label"] == LABEL_CORRECT]
    wrong = [r for r in rollouts if r["label"] == LABEL_WRONG]
    no_answer = [r for r in rollouts if r["label"] == LABEL_NO_ANSWER]
    if config.no_answer_is_wrong and not wrong:
        wrong = no_answer
    if not correct or not wrong:
        return None
    if config.correct_choice == "first":
        chosen_correct = correct[0]
    elif config.correct_choice == "shortest":
        chosen_correct = min(correct, key=lambda r: r["num_tokens"])
    else:
        chosen_correct = rng.choice(correct)
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for r in wrong:  # dicts keep insertion order: the first trace of each answer represents it
        answer = r["answer"]
        groups[("" if answer is None else answer if config.grader == EXACT else normalize_answer(answer))].append(r)
    most = max(len(g) for g in groups.values())
    tied = [key for key, g in groups.items() if len(g) == most]
    chosen_key = tied[0] if len(tied) == 1 else rng.choice(sorted(tied))
    return chosen_correct, groups[chosen_key][0]


def _grade(completion, gold: str, config: CurationConfig) -> dict:
    result = grade_response(completion.text, gold, grader=config.grader)
    return {"text": completion.text, "answer": result.answer, "label": result.label,
            "num_tokens": len(completion.token_ids), "finish_reason": completion.finish_reason}


def _rollout_record(problem: Problem, prompt_ids: list[int], plain_ids: list[int], completions, tokenizer,
                    config: CurationConfig, prompts: PromptSet, limit) -> dict:
    """A question's record from its K rollouts: with its verdict when the question is done (not mixed, or
    its hinted prompt too long), else with the hinted prompt its teacher solution is sampled from."""
    graded = [_grade(c, problem.answer, config) for c in completions]
    record = {"id": problem.id, "question": problem.question, "gold": problem.answer,
              "source": problem.source, "student_prompt_ids": prompt_ids, "student_plain_prompt_ids": plain_ids,
              "rollouts": [{k: g[k] for k in ("answer", "label", "num_tokens", "finish_reason")} for g in graded]}
    labels = {g["label"] for g in graded}
    picked = select_traces(graded, config, _question_rng(config, problem.id))
    if picked is None:
        record["verdict"] = ("all_wrong" if LABEL_CORRECT not in labels else "all_correct"
                             if labels == {LABEL_CORRECT} else "no_wrong_answer")
        return record
    correct, wrong = picked
    messages = prompts.hinted_messages(problem.question, correct["text"], wrong["text"])
    record.update(correct_trace=correct["text"], wrong_trace=wrong["text"], wrong_answer=wrong["answer"],
                  hinted_messages=messages, teacher_prompt_ids=encode_chat(tokenizer, messages))
    if len(record["teacher_prompt_ids"]) > limit:
        record["verdict"] = "prompt_too_long"
    return record


def _with_solution(record: dict, completion, config: CurationConfig) -> dict:
    """A mixed question's record completed by its teacher solution, graded: kept or teacher_failed."""
    graded = _grade(completion, record["gold"], config)
    # ids as sampled (no re-tokenization drift), ending with the stop token when there is one
    record.update(solution_text=completion.text, solution_ids=list(completion.token_ids),
                  solution_answer=graded["answer"], solution_finish_reason=completion.finish_reason)
    ok = graded["label"] == LABEL_CORRECT and (completion.finish_reason == "stop" or not config.solution_must_stop)
    record["verdict"] = "kept" if ok else "teacher_failed"
    return record


def _curate(problems: Sequence[Problem], sampler, tokenizer, config: CurationConfig, prompts: PromptSet,
            append: Callable[[dict], None]) -> int:
    """Curate `problems`, handing each question's record to `append` as soon as everything it needs has
    finished: an over-long prompt's at once, a question that is not mixed when its K rollouts have, a mixed
    one when its teacher solution has. All rollouts go to the sampler in one call, then all teacher
    solutions in another (the rollout engine keeps its slots full across questions; a kill loses only the
    questions in flight). Returns the number of kept pairs."""
    stops = tuple(stop_token_ids(tokenizer))
    limit = getattr(sampler, "max_prompt_tokens", None) or float("inf")
    position = {p.id: i for i, p in enumerate(problems)}
    kept = 0

    def done(record: dict) -> None:
        nonlocal kept
        kept += record["verdict"] == "kept"
        append(record)

    todo = []
    for problem in problems:
        prompt_ids = encode_chat(tokenizer, prompts.student_messages(problem.question))
        if len(prompt_ids) > limit:  # recorded (and counted), not fatal to the run
            done({"id": problem.id, "question": problem.question, "gold": problem.answer, "source": problem.source,
                  "rollouts": [], "prompt_tokens": len(prompt_ids), "verdict": "prompt_too_long"})
        else:
            todo.append((problem, prompt_ids))

    k = config.num_rollouts
    rollouts, waiting_rows, hinted = [[None] * k for _ in todo], [k] * len(todo), []

    def rollout_finished(i: int, j: int, completion) -> None:
        rollouts[i][j] = completion
        waiting_rows[i] -= 1
        if waiting_rows[i]:
            return
        problem, prompt_ids = todo[i]
        plain_ids = encode_plain(tokenizer, prompts.student_messages(problem.question))
        record = _rollout_record(problem, prompt_ids, plain_ids, rollouts[i], tokenizer, config, prompts, limit)
        rollouts[i] = None  # the texts are in the record now
        if "verdict" in record:
            done(record)
        else:
            hinted.append(record)

    if todo:
        rollout_params = SamplingParams(
            max_new_tokens=config.rollout_max_new_tokens, temperature=config.rollout_temperature,
            top_k=config.rollout_top_k, top_p=config.rollout_top_p, stop_ids=stops)
        sampler.generate_ids([ids for _, ids in todo], rollout_params, n=k, seed=config.seed,
                             ids=[p.id for p, _ in todo], on_finish=rollout_finished)
    if hinted:
        hinted.sort(key=lambda r: position[r["id"]])  # the call does not depend on the order rollouts finished in
        solution_params = SamplingParams(
            max_new_tokens=config.solution_max_new_tokens, temperature=config.solution_temperature,
            top_k=config.solution_top_k, top_p=config.solution_top_p, stop_ids=stops)
        sampler.generate_ids([r["teacher_prompt_ids"] for r in hinted], solution_params, n=1, seed=config.seed + 1,
                             ids=[r["id"] for r in hinted],
                             on_finish=lambda i, j, completion: done(_with_solution(hinted[i], completion, config)))
    return kept


def run(problems: Sequence[Problem], sampler, tokenizer, config: CurationConfig, out_dir: str | Path, *,
        prompts: PromptSet = DEFAULT_PROMPTS) -> dict:
    """Curate until `target_pairs` are kept or the questions run out; resumable. Returns the summary.

    Under several JAX processes each one takes every process_count-th question of each wave of
    `questions_per_batch * process_count` questions, samples with its own (process-local) sampler
    and appends to its own shard; after each wave the processes add up their kept pairs, so all
    stop together. The shards are folded into records.jsonl in question order, so the records (and
    the first `target_pairs` kept pairs) do not depend on the number of processes.
    """
    import jax
    from ssb_jax import distributed
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index, count = jax.process_index(), jax.process_count()
    order = question_order(problems, config)
    position = {p.id: i for i, p in enumerate(order)}
    records_path = out_dir / RECORDS_FILE
    distributed.fold_process_shards([records_path], "curate:start", {records_path: position})
    store = ShardedRecordStore(records_path, index, count)
    # the fold above left every earlier record in the merged file: {id: kept?}
    stored_kept = {r["id"]: r.get("verdict") == "kept" for r in store.merged.read_all()}
    done = frozenset(stored_kept)
    if done:
        log.info("curation: resuming with %d questions done (%d pairs kept)", len(done), sum(stored_kept.values()))
    # Stop where an uninterrupted run stops: after the first whole wave that reaches the target, counting
    # each wave's pairs, stored or new. A wave cut short by a kill (some of its records stored) is
    # finished first, so resuming never stops inside a wave and the counts do not depend on where it was cut.
    wave = config.questions_per_batch * count
    kept = 0
    for begin in range(0, len(order), wave):
        if config.target_pairs and kept >= config.target_pairs:
            break
        share = order[begin:begin + wave][index::count]
        batch = [p for p in share if p.id not in done]
        wave_kept = sum(stored_kept.get(p.id, False) for p in share)
        if batch:
            wave_kept += _curate(batch, sampler, tokenizer, config, prompts, lambda record: store.append([record]))
        kept += distributed.sum_over_processes(wave_kept)
        log.info("curation: %d of %d questions looked at, %d pairs kept", min(begin + wave, len(order)), len(order),
                 kept)
    distributed.fold_process_shards([records_path], "curate:end", {records_path: position})
    if distributed.is_main_process():  # one process: the records are in the order they finished
        order_records(records_path, position)
    records = RecordStore(records_path).read_all()
    summary = summarize(records)
    summary["complete"] = ((config.target_pairs > 0 and kept >= config.target_pairs) or len(records) >= len(order))
    summary.update(target_pairs=config.target_pairs, max_questions=config.max_questions,
                   min_pairs=required_pairs(config))
    if distributed.is_main_process():
        write_json_atomic(out_dir / SUMMARY_FILE, summary)
    log.info("curation summary: %s", json.dumps({k: summary[k] for k in ("questions", "verdicts")}))
    return summary


def required_pairs(config: CurationConfig) -> int:
    """Kept pairs below which curation counts as failed."""
    return config.min_pairs or (config.target_pairs + 1) // 2


def finished(summary: dict, config: CurationConfig) -> bool:
    """Whether a stored summary is complete under this config (a larger target or question cap
    resumes the curation)."""
    return bool(summary.get("complete")) and all(
        summary.get(key) == getattr(config, key) for key in ("target_pairs", "max_questions"))


def shortfall(summary: dict, config: CurationConfig) -> str:
    """'kept 4 of 128 target pairs, fewer than min_pairs 64 ...' when curation fell short, else ''."""
    kept, needed = summary["verdicts"]["kept"], required_pairs(config)
    if kept >= needed:
        return ""
    return (f"kept {kept} pairs of the {config.target_pairs} targeted, fewer than the {needed} that count as "
            f"success (curate.min_pairs) after {summary['questions']} questions")


def _length_stats(lengths: Iterable[int]) -> dict[str, float]:
    lengths = sorted(lengths)
    if not lengths:
        return {"count": 0}
    return {"count": len(lengths), "mean": statistics.fmean(lengths), "median": statistics.median(lengths),
            "p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))], "max": lengths[-1]}


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    verdicts = collections.Counter(r["verdict"] for r in records)
    return {
        "questions": len(records),
        "verdicts": {v: verdicts.get(v, 0) for v in VERDICTS},
        "mixed": verdicts.get("kept", 0) + verdicts.get("teacher_failed", 0),
        "rollout_accuracy": (sum(x["label"] == LABEL_CORRECT for r in records for x in r["rollouts"])
                             / max(1, sum(len(r["rollouts"]) for r in records))),
        "rollout_tokens": _length_stats(x["num_tokens"] for r in records for x in r["rollouts"]),
        "solution_tokens": _length_stats(len(r["solution_ids"]) for r in records if "solution_ids" in r),
        "sampled_tokens": sampled_tokens(records),
    }


def sampled_tokens(records: Iterable[dict]) -> dict[str, int]:
    """Tokens the curation sampled: every rollout of every question looked at, plus every hinted teacher
    solution (kept or not); the x-axis "sampled tokens" of learning curves (ssb_jax.curves)."""
    records = list(records)
    rollouts = sum(x["num_tokens"] for r in records for x in r["rollouts"])
    solutions = sum(len(r["solution_ids"]) for r in records if "solution_ids" in r)
    return {"rollouts": rollouts, "solutions": solutions, "total": rollouts + solutions}


def kept_pairs(records: Iterable[dict], limit: int = 0) -> list[dict]:
    """The training examples: kept records in curation order, at most `limit` (0: all)."""
    pairs = [r for r in records if r.get("verdict") == "kept"]
    return pairs[:limit] if limit else pairs


# ----------------------------------------------------------------------------- reference format

def export_reference_format(records: Iterable[dict], teacher_path: str | Path, student_path: str | Path) -> int:
    """Write the original code's two line-aligned `messages` files; returns the number of pairs."""
    lines_t, lines_s = [], []
    for r in kept_pairs(records):
        system, user = r["hinted_messages"]
        lines_t.append(json.dumps({"messages": [system, user, {"role": "assistant", "content": r["solution_text"]}]}))
        student_system = {"role": "system", "content": system["content"]}
        lines_s.append(json.dumps({"messages": [student_system, {"role": "user", "content": r["question"]}]}))
    for path, lines in ((teacher_path, lines_t), (student_path, lines_s)):
        tmp = Path(str(path) + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)
    return len(lines_t)


def import_reference_format(teacher_path: str | Path, student_path: str | Path, tokenizer) -> list[dict]:
    """Records (verdict "kept") from the reference two-file format, tokenized with `tokenizer`.

    The assistant text is tokenized and the end-of-turn token appended, so the student learns to stop.
    """
    def read(path):
        rows = []
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: expected a JSON object with a 'messages' list ({e})") from e
            rows.append((number, messages))
        return rows

    teacher, student = read(teacher_path), read(student_path)
    if len(teacher) != len(student):
        raise ValueError(f"{teacher_path} has {len(teacher)} examples but {student_path} has {len(student)}")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    records = []
    for (line, t_msgs), (_, s_msgs) in zip(teacher, student):
        roles = [m.get("role") for m in t_msgs]
        if roles[-1:] != ["assistant"]:
            raise ValueError(f"{teacher_path}:{line}: the last message must be the assistant's solution")
        prompt, solution = t_msgs[:-1], t_msgs[-1]["content"]
        question = next((m["content"] for m in s_msgs if m.get("role") == "user"), None)
        if question is None:
            raise ValueError(f"{student_path}:{line}: no user message")
        records.append({
            "id": f"reference-{line - 1}", "question": question, "hinted_messages": prompt,
            "teacher_prompt_ids": encode_chat(tokenizer, prompt),
            "student_prompt_ids": encode_chat(tokenizer, s_msgs),
            "student_plain_prompt_ids": encode_plain(tokenizer, s_msgs),
            "solution_text": solution,
            "solution_ids": tokenizer.encode(solution, add_special_tokens=False) + [end_of_turn],
            "verdict": "kept",
        })
    return records
