"""One problem's evaluation record, as stored in an outputs file: the graded greedy response, the
graded samples and their majority vote, or the status of a problem that got no response.

A record: {"id", "question", "gold", "status", "prompt_tokens"} plus, when status is "ok",
"greedy" (a response: text, answer, label, num_tokens, finish_reason) and, for a sampled protocol,
"samples" (n responses) and "majority" (answer, votes, label).
"""
from __future__ import annotations

from typing import Sequence

from ssb_jax.data.datasets import Problem
from ssb_jax.evaluation.grading import (LABEL_NO_ANSWER, grade_response, motif_grade, normalize_answer, parse_number,
                                        same_number)
from ssb_jax.evaluation.protocols import MOTIF

STATUS_OK = "ok"
STATUS_PROMPT_TOO_LONG = "prompt_too_long"


def same_answer(a: str, b: str) -> bool:
    """Equal values when both are numbers (grading.same_number: exact, a tolerance only against a value
    no decimal equals), else equal normalized strings."""
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return same_number(x, y)
    return normalize_answer(a) == normalize_answer(b)


def majority_vote(answers: Sequence[str | None]) -> tuple[int | None, int]:
    """(index of a response carrying the winning answer, its number of votes); (None, 0) if none answered.

    Missing answers do not vote. A tie goes to the answer that appeared first, so the vote depends
    only on the (seeded) samples.
    """
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        group = next((g for g in groups if same_answer(answers[g[0]], answer)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    if not groups:
        return None, 0
    winner = max(groups, key=len)  # max keeps the first of equals: the earliest answer wins ties
    return winner[0], len(winner)


def response_record(completion, gold: str, grader: str) -> dict:
    """One completion graded; grader: a name from EvalConfig.grader_name."""
    if grader.startswith(f"{MOTIF}:"):
        graded = motif_grade(completion.text, gold, rule=grader.split(":", 1)[1])
    else:
        graded = grade_response(completion.text, gold, grader=grader)
    return {"text": completion.text, "answer": graded.answer, "label": graded.label,
            "num_tokens": len(completion.token_ids), "finish_reason": completion.finish_reason}


def problem_record(problem: Problem, prompt_tokens: int, greedy, samples, grader: str) -> dict:
    """The record of a problem with responses: `greedy` one completion, `samples` a list of them or None."""
    record = {"id": problem.id, "question": problem.question, "gold": problem.answer, "status": STATUS_OK,
              "prompt_tokens": prompt_tokens, "greedy": response_record(greedy, problem.answer, grader)}
    if samples is not None:
        record["samples"] = [response_record(c, problem.answer, grader) for c in samples]
        winner, votes = majority_vote([s["answer"] for s in record["samples"]])
        record["majority"] = {
            "answer": None if winner is None else record["samples"][winner]["answer"], "votes": votes,
            "label": LABEL_NO_ANSWER if winner is None else record["samples"][winner]["label"]}
    return record


def too_long_record(problem: Problem, prompt_tokens: int) -> dict:
    """The record of a problem whose prompt the sampler cannot take: no responses, counted wrong."""
    return {"id": problem.id, "question": problem.question, "gold": problem.answer,
            "status": STATUS_PROMPT_TOO_LONG, "prompt_tokens": prompt_tokens}
