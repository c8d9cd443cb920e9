"""The toy world's properties read off a model through the real sampler and grader.

Plain (student) and hinted (teacher) accuracy, and the fraction of questions whose sampled plain
rollouts hold both a right and a wrong answer (the ones curation keeps); `measure` reports all of them.
"""
from __future__ import annotations

import numpy as np

from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet


def _problem_fields(problem) -> dict:
    """question/answer/solution/wrong_solution from a JSONL record dict or a datasets.Problem."""
    if isinstance(problem, dict):
        return problem
    return {"question": problem.question, "answer": problem.answer, **dict(problem.extra)}


def make_sampler(model, tokenizer, *, batch_size: int = 64, max_prompt_tokens: int = 512):
    from ssb_jax.sampling.driver import Sampler
    return Sampler(model, tokenizer, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                   show_progress=False)


def _graded(sampler, prompt_ids, golds, *, temperature: float, n: int, max_new_tokens: int, seed: int,
            top_k: int = 0) -> list[list[bool]]:
    from ssb_jax.evaluation.grading import grade_response
    from ssb_jax.model.tokenizer import stop_token_ids
    from ssb_jax.sampling.sampler import SamplingParams
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              stop_ids=tuple(stop_token_ids(sampler.tokenizer)),
                              pad_id=sampler.tokenizer.pad_token_id)
    outputs = sampler.generate_ids(prompt_ids, sampling, n=n, seed=seed)
    return [[grade_response(c.text, gold, grader="string_match").correct for c in completions]
            for completions, gold in zip(outputs, golds)]


def plain_prompt_ids(tokenizer, problems, prompts: PromptSet = DEFAULT_PROMPTS) -> list[list[int]]:
    from ssb_jax.model.tokenizer import encode_chat
    return [encode_chat(tokenizer, prompts.student_messages(_problem_fields(p)["question"])) for p in problems]


def hinted_prompt_ids(tokenizer, problems, prompts: PromptSet = DEFAULT_PROMPTS) -> list[list[int]]:
    """The hinted prompt with the reference solution as the correct trace and a reference wrong trace."""
    from ssb_jax.model.tokenizer import encode_chat
    ids = []
    for p in problems:
        f = _problem_fields(p)
        ids.append(encode_chat(tokenizer, prompts.hinted_messages(f["question"], f["solution"], f["wrong_solution"])))
    return ids


def plain_accuracy(sampler, problems, *, temperature: float = 0.0, n: int = 1, max_new_tokens: int = 128,
                   seed: int = 0, prompts: PromptSet = DEFAULT_PROMPTS) -> float:
    """Mean accuracy of the student (plain prompt) over problems x n samples."""
    graded = _graded(sampler, plain_prompt_ids(sampler.tokenizer, problems, prompts),
                     [_problem_fields(p)["answer"] for p in problems], temperature=temperature, n=n,
                     max_new_tokens=max_new_tokens, seed=seed)
    return float(np.mean(graded))


def hinted_accuracy(sampler, problems, *, temperature: float = 0.0, n: int = 1, max_new_tokens: int = 128,
                    seed: int = 0, prompts: PromptSet = DEFAULT_PROMPTS) -> float:
    """Mean accuracy of the teacher (hinted prompt with reference correct and wrong traces)."""
    graded = _graded(sampler, hinted_prompt_ids(sampler.tokenizer, problems, prompts),
                     [_problem_fields(p)["answer"] for p in problems], temperature=temperature, n=n,
                     max_new_tokens=max_new_tokens, seed=seed)
    return float(np.mean(graded))


def mixed_fraction(sampler, problems, *, k: int = 4, temperature: float = 0.8, top_k: int = 50,
                   max_new_tokens: int = 128, seed: int = 0, prompts: PromptSet = DEFAULT_PROMPTS) -> float:
    """Fraction of questions whose k plain rollouts hold both a right and a wrong answer (curation keeps these)."""
    graded = _graded(sampler, plain_prompt_ids(sampler.tokenizer, problems, prompts),
                     [_problem_fields(p)["answer"] for p in problems], temperature=temperature, n=k,
                     max_new_tokens=max_new_tokens, seed=seed, top_k=top_k)
    return float(np.mean([any(g) and not all(g) for g in graded]))


def measure(sampler, problems, *, k: int = 4, temperature: float = 0.8, max_new_tokens: int = 128,
            seed: int = 0) -> dict:
    """The world's headline numbers on `problems`: plain greedy and sampled accuracy, hinted greedy
    accuracy, and the fraction of questions whose k sampled rollouts are mixed."""
    common = dict(max_new_tokens=max_new_tokens, seed=seed)
    return {
        "plain_greedy": plain_accuracy(sampler, problems, **common),
        "plain_sampled": plain_accuracy(sampler, problems, temperature=temperature, **common),
        "hinted_greedy": hinted_accuracy(sampler, problems, **common),
        "mixed_fraction": mixed_fraction(sampler, problems, k=k, temperature=temperature, **common),
        "num_problems": len(problems),
    }
