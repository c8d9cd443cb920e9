"""Graders: whether an answer (or a whole response) is correct against a gold answer.

Answer graders, picked by name (`GRADERS`, `get_grader`), compare the last `\\boxed{}` answer with
the gold answer:

* "math_verify" (`answers_match`): numeric comparison (`same_number`: exact values, a tolerance only
  where one side is inexact), then normalized string equality, then `math_verify` for LaTeX
  (fractions, radicals, intervals, tuples) on a well-formed prediction, in a worker process
  (math_verify_worker) killed when the time is up.
* "string_match" (`string_match`): normalized string equality only; ssb_jax's strict grader (it is
  not the MOTIF papers' rule, which `motif_grade` implements).
* "exact" (`exact_match`): the SSB reference code's rule: the last `\\boxed{...}` taken verbatim
  (`extract_boxed_verbatim`: no `\\fbox`, no `\\boxed 5`, no spaces stripped, an empty box is an
  answer) and compared with the gold string as it is.

`grade_response` grades a whole response with one of them; one `timeout_s` bounds the whole grade
(extraction, normalization and math_verify together), and a timeout counts as wrong. `motif_grade`
grades a whole response as the MOTIF / SSB authors' evaluation code does (no extraction, no
normalization): correct when the response contains `\\boxed{gold}` (rule "boxed", their MATH500
check) or the gold string anywhere (rule "contains", their AIME check).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from ssb_jax.evaluation.grading.extract import extract_boxed, extract_boxed_verbatim, extract_last_number
from ssb_jax.evaluation.grading.math_verify_worker import math_verify_any
from ssb_jax.evaluation.grading.normalize import normalize_answer, parse_number, well_formed

DEFAULT_TIMEOUT_S = 5.0
RELATIVE_TOLERANCE = Fraction(1, 10**6)  # only between a decimal and a value no decimal equals (same_number)

LABEL_CORRECT = "correct"
LABEL_WRONG = "wrong"
LABEL_NO_ANSWER = "no_answer"


def _finite_decimal(value: Fraction) -> bool:
    """Whether some decimal numeral equals `value` (its reduced denominator has no prime but 2 and 5)."""
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def same_number(a: Fraction, b: Fraction) -> bool:
    """The numeric rule of every grader that compares values (math_verify's first step, majority votes).

    Values compare exactly: integers, decimals and fractions as written (191999900 is not 192000000,
    12.5 is not 12.50001, 0.5 is 1/2). A tolerance applies only where one side is inexact: a decimal
    against a value that no decimal numeral equals (1/3, 2/7) can only be a rounding of it, and matches
    within relative RELATIVE_TOLERANCE (0.333333 for 1/3; 0.33 is wrong).
    """
    if a == b:
        return True
    if _finite_decimal(a) == _finite_decimal(b):  # both exact as written, or two different fractions
        return False
    return abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b))


def string_match(prediction: object, gold: object) -> bool:
    """Strict grader: normalized string equality only."""
    try:
        if prediction is None or gold is None:
            return False
        pred, ref = normalize_answer(prediction), normalize_answer(gold)
        return bool(pred) and pred == ref
    except Exception:
        return False


def exact_match(prediction: object, gold: object) -> bool:
    """The reference code's grader: the answer string equals the gold string, character for character."""
    return prediction is not None and gold is not None and str(prediction) == str(gold)


def answers_match(prediction: object, gold: object, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Lenient grader: numbers by value (`same_number`: exact, a tolerance only against a value no
    decimal equals), normalized strings, then math_verify for a well-formed prediction.

    When both sides are plain numbers the numeric result is final (math_verify is not consulted). A
    malformed prediction (`5^^`, `5))`: `normalize.well_formed`) never reaches math_verify, which would
    read it leniently. The whole call is bounded by `timeout_s` (math_verify gets what is left; see
    module docstring); a timeout or any exception counts as False.
    """
    return _answers_match_by(prediction, gold, time.monotonic() + timeout_s)


def _answers_match_by(prediction: object, gold: object, deadline: float) -> bool:
    """`answers_match` finishing by `deadline` (a `time.monotonic()` value)."""
    try:
        if prediction is None or gold is None:
            return False
        pred, ref = str(prediction).strip(), str(gold).strip()
        if not pred or not ref:
            return False
        pred_value, gold_value = parse_number(pred), parse_number(ref)
        if pred_value is not None and gold_value is not None:
            return same_number(pred_value, gold_value)
        if normalize_answer(pred) == normalize_answer(ref):
            return True
        if not well_formed(pred):
            return False
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:  # out of time before math_verify: wrong, and the worker lives on
            return False
        return _math_verify_equal(pred, ref, remaining_s)
    except Exception:
        return False


def _math_verify_equal(prediction: str, gold: str, timeout_s: float) -> bool:
    """math_verify on the answers as written, then on their normal forms when those differ and
    neither is empty; within `timeout_s`, normalizing included."""
    deadline = time.monotonic() + timeout_s
    pairs = [(prediction, gold)]
    normalized = (normalize_answer(prediction), normalize_answer(gold))
    if normalized != pairs[0] and all(normalized):
        pairs.append(normalized)
    remaining_s = deadline - time.monotonic()
    return remaining_s > 0 and math_verify_any(pairs, remaining_s)


GRADERS: dict[str, Callable[[object, object], bool]] = {
    "math_verify": answers_match,
    "string_match": string_match,
    "exact": exact_match,
}
EXACT = "exact"  # the grader that reads boxes verbatim (extract_boxed_verbatim)


def get_grader(name: str) -> Callable[[object, object], bool]:
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; expected one of {sorted(GRADERS)}") from None


@dataclass(frozen=True)
class GradeResult:
    answer: str | None  # extracted answer, None when the response gives none
    correct: bool
    label: str  # "correct" | "wrong" | "no_answer"


def grade_response(response_text: str, gold: object, *, grader: str = "math_verify",
                   allow_unboxed: bool = False,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> GradeResult:
    """Grade a full model response against a gold answer.

    The answer is the last `\\boxed{}` (grader "exact": `extract_boxed_verbatim`, where an empty
    box is an answer); with `allow_unboxed` a response without a box falls back to its last
    number. Extraction and normalization take linear time; the whole grade (math_verify
    included) is bounded by `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    verbatim = grader == EXACT
    answer = (extract_boxed_verbatim if verbatim else extract_boxed)(response_text or "")
    if answer is None and allow_unboxed:
        answer = extract_last_number(response_text or "")
    if answer is None or not (verbatim or answer.strip()):
        return GradeResult(answer=None, correct=False, label=LABEL_NO_ANSWER)
    if grader == "math_verify":
        correct = _answers_match_by(answer, gold, deadline)
    else:
        correct = get_grader(grader)(answer, gold)
    return GradeResult(answer=answer, correct=correct,
                       label=LABEL_CORRECT if correct else LABEL_WRONG)


MOTIF_RULES = ("boxed", "contains")


def motif_grade(response_text: str, gold: object, rule: str) -> GradeResult:
    """The MOTIF / SSB papers' evaluation rule: correct when the response contains `\\boxed{gold}`
    (rule "boxed") or the gold string itself (rule "contains"), exactly as written: no answer is
    extracted for the verdict and nothing is normalized, so `\\boxed{ 12 }` misses gold "12",
    gold "33" is found inside "233", and a correct box followed by a different final box still
    counts. An empty gold answer is never matched (the empty string is inside every text).

    `answer` is the last box, for the record only; the label is "no_answer" when the response is
    not correct and has no box. Linear time: one substring search per response (CPython's search
    switches to the two-way algorithm when a pattern repeats)."""
    if rule not in MOTIF_RULES:
        raise ValueError(f"unknown MOTIF rule {rule!r}; expected one of {MOTIF_RULES}")
    text, gold_text = response_text or "", "" if gold is None else str(gold)
    needle = f"\\boxed{{{gold_text}}}" if rule == "boxed" else gold_text
    correct = bool(gold_text) and needle in text
    answer = extract_boxed(text) or None
    label = LABEL_CORRECT if correct else LABEL_WRONG if answer is not None else LABEL_NO_ANSWER
    return GradeResult(answer=answer, correct=correct, label=label)
