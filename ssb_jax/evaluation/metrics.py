"""The numbers of an evaluation, from its stored records: pass@1, avg@n and maj@n with counts,
accuracy and standard error, no-answer and truncation rates, mean tokens (`metric_rows`), and the
results table as markdown with a legend of every protocol's grader and decoding (`format_markdown`).

Accuracy is over all problems of a dataset: a problem whose prompt was too long for the sampler
(records.STATUS_PROMPT_TOO_LONG) has no response and counts as wrong.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from ssb_jax.evaluation.grading import LABEL_CORRECT, LABEL_NO_ANSWER
from ssb_jax.evaluation.records import STATUS_OK, STATUS_PROMPT_TOO_LONG

ACCURACY_DENOMINATOR = ("all problems of the dataset (avg@n: n responses per problem); a problem whose prompt is "
                        "longer than the sampler's max_prompt_tokens gets no response and counts as wrong")


def _ratio(count: float, total: int) -> float | None:
    return count / total if total else None


def _response_stats(responses: Sequence[dict]) -> dict:
    return {"truncated_rate": _ratio(sum(r["finish_reason"] == "length" for r in responses), len(responses)),
            "mean_tokens": _ratio(sum(r["num_tokens"] for r in responses), len(responses))}


def _binomial_row(metric: str, labels: Sequence[str], responses: Sequence[dict], too_long: int) -> dict:
    """One 0/1 outcome per problem (labels: the generated ones; `too_long` more count as wrong);
    SE sqrt(p(1-p)/N) over all N problems."""
    n, correct = len(labels) + too_long, sum(label == LABEL_CORRECT for label in labels)
    p = _ratio(correct, n)
    return {"metric": metric, "problems": n, "prompt_too_long": too_long, "correct": correct, "out_of": n,
            "graded": len(labels), "accuracy": p, "se": None if p is None else math.sqrt(p * (1 - p) / n),
            "no_answer_rate": _ratio(sum(label == LABEL_NO_ANSWER for label in labels), len(labels)),
            **_response_stats(responses)}


def metric_rows(records: Sequence[dict], n_samples: int) -> list[dict]:
    """pass@1, and avg@n / maj@n when n_samples > 0; counts, accuracy, SE, rates, length.

    Accuracy and SE are over all records, a prompt_too_long one counting as wrong; the rates and mean
    tokens are over the responses generated."""
    generated = [r for r in records if r.get("status", STATUS_OK) != STATUS_PROMPT_TOO_LONG]
    too_long = len(records) - len(generated)
    rows = [_binomial_row("pass@1", [r["greedy"]["label"] for r in generated], [r["greedy"] for r in generated],
                          too_long)]
    if n_samples > 0:
        samples = [s for r in generated for s in r["samples"]]
        means = [statistics.fmean(s["label"] == LABEL_CORRECT for s in r["samples"]) for r in generated]
        means += [0.0] * too_long
        # SE of the mean over problems of per-problem accuracy (population SD, so avg@1 matches pass@1's SE)
        rows.append({"metric": f"avg@{n_samples}", "problems": len(records), "prompt_too_long": too_long,
                     "correct": sum(s["label"] == LABEL_CORRECT for s in samples), "out_of": n_samples * len(records),
                     "graded": len(samples), "accuracy": statistics.fmean(means) if means else None,
                     "se": statistics.pstdev(means) / math.sqrt(len(means)) if means else None,
                     "no_answer_rate": _ratio(sum(s["label"] == LABEL_NO_ANSWER for s in samples), len(samples)),
                     **_response_stats(samples)})
        rows.append(_binomial_row(f"maj@{n_samples}", [r["majority"]["label"] for r in generated], samples,
                                  too_long))
    return rows


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def format_markdown(results: dict) -> str:
    """The results table plus a legend naming each protocol's grader and decoding."""
    lines = ["| dataset | protocol | metric | model | correct / all | accuracy % ± SE | prompt too long "
             "| no answer % | truncated % | mean tokens |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        tokens = "–" if r["mean_tokens"] is None else f"{r['mean_tokens']:.1f}"
        lines.append(f"| {r['dataset']} | {r['protocol']} | {r['metric']} | {r['model']} | "
                     f"{r['correct']}/{r['out_of']} | {_percent(r['accuracy'])} ± {_percent(r['se'])} | "
                     f"{r['prompt_too_long']} | {_percent(r['no_answer_rate'])} | {_percent(r['truncated_rate'])} "
                     f"| {tokens} |")
    s = results["sampling"]
    lines += ["", "Protocols:"]
    for name, p in results["protocols"].items():
        lines.append(f"- **{name}** (grader `{p['grader']}`, up to {p['max_new_tokens']} new tokens): "
                     f"{p['description']}.")
    lines += ["", "pass@1: greedy decoding, one response per problem. "
              f"avg@n: mean accuracy of n responses sampled at temperature {s['temperature']}, top-k {s['top_k']}, "
              f"top-p {s['top_p']} (seed {s['seed']}); `correct` counts responses and the SE is across problems of "
              "the per-problem mean. maj@n: majority vote over the n extracted answers (numeric equality, else "
              "normalized strings; ties to the earliest answer). SE for pass@1 and maj@n: sqrt(p(1-p)/N). "
              "No answer: no \\boxed{} answer (for maj@n: none of the n responses had one; for motif: and not "
              "correct). "
              "Truncated: stopped at the token budget. Mean tokens: generated tokens, stop token included.",
              "", "Accuracy, SE and `correct / all` are over all problems of the dataset (avg@n: n responses per "
              "problem); a problem whose prompt is longer than the sampler's max_prompt_tokens gets no response "
              "and counts as wrong (`prompt too long`: how many). No answer, truncated and mean tokens are over "
              "the responses generated."]
    if not results.get("complete", True):
        lines += ["", "**Incomplete**: some problems have no outputs yet; rerun to finish."]
    return "\n".join(lines) + "\n"
