"""Answer extraction and grading for GSM8K, MATH500 and AIME.

Answer graders, picked by name (`GRADERS`, `get_grader`), compare the last `\\boxed{}`
answer with the gold answer:

* "math_verify" (`answers_match`): numeric comparison, then normalized string
  equality, then `math_verify` for LaTeX (fractions, radicals, intervals, tuples).
* "string_match" (`string_match`): normalized string equality only; ssb_jax's strict
  grader (it is not the MOTIF papers' rule, which `motif_grade` implements).
* "exact" (`exact_match`): the SSB reference code's rule: the last `\\boxed{...}` taken
  verbatim (`extract_boxed_verbatim`: no `\\fbox`, no `\\boxed 5`, no spaces stripped, an
  empty box is an answer) and compared with the gold string as it is.

`motif_grade` grades a whole response as the MOTIF / SSB authors' evaluation code does
(greedy responses; no extraction, no normalization): correct when the response contains
`\\boxed{gold}` (rule "boxed", their MATH500 check) or the gold string anywhere (rule
"contains", their AIME check).

Timeout bound on math_verify: math_verify's own timeouts use SIGALRM, which only
works on the main thread and cannot interrupt long-running C code (e.g. sympy big
integer arithmetic). Instead every math_verify comparison runs, with math_verify's
timeouts disabled, in one long-lived worker subprocess (this file run as a script,
so the worker never imports the `ssb_jax` package or JAX). The caller waits on the
worker's pipe for at most what is left of `timeout_s`, which bounds one whole grade
(`grade_response`, `answers_match`); on expiry the worker is killed (SIGKILL),
the answer counts as wrong, and the next call starts a fresh worker. The bound thus
holds from any thread and for any input (concurrent callers share the one worker, so
their comparisons run one at a time; waiting for a turn is not charged). The worker's one-off start-up (importing
sympy) is waited for separately, up to `WORKER_START_TIMEOUT_S`, so it is not charged
to the first answer; call `start_math_verify_worker()` to pay it early.

Everything outside the worker (box extraction, number parsing, normalization,
`string_match`, `motif_grade`) takes linear time in the response's length: the regular expressions
are written so that they cannot backtrack super-linearly, and brace matching is one
pass with a stack.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

DEFAULT_TIMEOUT_S = 5.0
WORKER_START_TIMEOUT_S = 120.0
RELATIVE_TOLERANCE = 1e-6

LABEL_CORRECT = "correct"
LABEL_WRONG = "wrong"
LABEL_NO_ANSWER = "no_answer"


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SPACE_FORM_TOKEN = re.compile(r"[ \t]+([^\s$]+)")
_LEADING_SPACE = re.compile(r"\s*")
# A backslash escapes the next character (so `\{`, `\}` are never group braces).
_ESCAPE_OR_BRACE = re.compile(r"\\.|[{}]", re.S)


_BRACE = re.compile(r"[{}]")
_VERBATIM_BOX_OPEN = re.compile(r"\\boxed\{")


def _closing_braces(text: str, escapes: bool = True) -> dict[int, int]:
    """Index of the matching `}` for every closed `{` group, found in one pass; with `escapes`
    a backslash escapes the next character, else every brace counts.

    One pass for the whole text (not one scan per box) keeps extraction linear even
    for thousands of unclosed boxes.
    """
    closing: dict[int, int] = {}
    open_indices: list[int] = []
    for match in (_ESCAPE_OR_BRACE if escapes else _BRACE).finditer(text):
        char = match.group()
        if char == "{":
            open_indices.append(match.start())
        elif char == "}" and open_indices:
            closing[open_indices.pop()] = match.start()
    return closing


def extract_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}` / `\\fbox{...}` / `\\boxed 5`.

    Nested braces are matched. An unclosed box (a truncated generation) is skipped
    in favour of the previous complete one. None when there is no box. Linear time.
    """
    if not text:
        return None
    command_ends = [command.end() for command in _BOX_COMMAND.finditer(text)]
    closing: dict[int, int] | None = None
    for command_end in reversed(command_ends):
        brace_index = _LEADING_SPACE.match(text, command_end).end()
        if brace_index < len(text) and text[brace_index] == "{":
            if closing is None:
                closing = _closing_braces(text)
            close_index = closing.get(brace_index)
            if close_index is not None:
                return text[brace_index + 1:close_index].strip()
            continue
        token = _SPACE_FORM_TOKEN.match(text, command_end)
        if token:
            value = token.group(1).rstrip(".,;")
            if value:
                return value
    return None


def extract_boxed_verbatim(text: str) -> str | None:
    """The last closed `\\boxed{...}` exactly as written, as the SSB reference code reads it: only
    `\\boxed{` with no space before the brace, every brace counted (a backslash escapes nothing),
    the content not stripped; "" for an empty box; None when no box is closed. Linear time."""
    if not text:
        return None
    opens = [match.end() - 1 for match in _VERBATIM_BOX_OPEN.finditer(text)]
    if not opens:
        return None
    closing = _closing_braces(text, escapes=False)
    for brace_index in reversed(opens):
        close_index = closing.get(brace_index)
        if close_index is not None:
            return text[brace_index + 1:close_index]
    return None


_NUMBER_IN_TEXT = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def extract_last_number(text: str) -> str | None:
    """The last number written in `text` (fallback for responses without a box)."""
    if not text:
        return None
    matches = _NUMBER_IN_TEXT.findall(text)
    return matches[-1] if matches else None


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------

# Words dropped when they trail a number ("18 dollars", "5 cm^2").
_UNIT_WORDS = frozenset("""
dollar dollars cent cents usd euro euros
cm m km mm meter meters metre metres kilometer kilometers centimeter centimeters
inch inches in ft foot feet yard yards yd mile miles mi
square sq cubic unit units
g kg gram grams kilogram kilograms pound pounds lb lbs ounce ounces oz ton tons
l ml liter liters litre litres gallon gallons quart quarts cup cups
second seconds sec secs minute minutes min mins hour hours hr hrs day days
week weeks month months year years
degree degrees mph percent
""".split())

# Every pattern below is written so that no two quantified parts next to each other
# can match the same text (`\s*(?:\.\s*)?$`, never `\s*\.?\s*$`; words need a separator,
# never `(?:[A-Za-z]+\s*)+`): a failing match then backtracks in linear time, not in
# quadratic or exponential time, whatever a model writes.
_TEXT_WRAPPER = r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|operatorname)"
_TEXT_WRAPPER_OPEN = re.compile(_TEXT_WRAPPER + r"\{")
# The power of a unit after its `^`: `2`, ` { 3 } `.
_UNIT_POWER = r"\s*(?:\{\s*)?[23]\s*(?:\}\s*)?"
# A \text{...} of plain words right after a number at the very end is a unit or noun.
_TEXT_UNIT_AT_END = re.compile(
    r"(?<=[\d}.])\s*" + _TEXT_WRAPPER + r"\{\s*[A-Za-z][A-Za-z .\-]*\}"
    + r"\s*(?:\^" + _UNIT_POWER + r")?(?:\.\s*)?$")
_UNIT_POWER_AT_END = re.compile(_UNIT_POWER + r"\.?")
_LAST_DIGIT_OR_BRACE = re.compile(r".*[\d}]", re.S)
_NOT_IN_WORDS = re.compile(r"[^A-Za-z.\s]")
_DOT_NOT_AFTER_LETTER = re.compile(r"(?<![A-Za-z])\.")
_VARIABLE_PREFIX = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)\s*(?:=|\\in(?![A-Za-z]))\s*(.+)", re.S)
_THOUSANDS_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TRAILING_ZERO_DECIMAL = re.compile(r"([-+]?\d+)\.0+")
# `[^\D0]\d*|0`, not `\d+`, which could also match the zeros that `0+` matches.
_LEADING_ZERO_INTEGER = re.compile(r"([-+]?)0+([^\D0]\d*|0)")
_PARENTHESIZED_CHOICE = re.compile(r"\(([A-E])\)")
_PLAIN_NUMBER_TEXT = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)")
# `\\` (a matrix row break) is matched first so its second backslash is never
# mistaken for the start of `\ ` or `\,`.
_LATEX_NOISE = re.compile(
    r"(\\\\)|\\(?:left|right|displaystyle|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])|\\[!,;:]|(\\ )")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°")


def _drop_latex_noise(match: re.Match) -> str:
    if match.group(1):
        return match.group(1)
    return " " if match.group(2) else ""


def _fix_fracs_and_sqrts(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac{a}7` -> `\\frac{a}{7}`, `\\sqrt2` -> `\\sqrt{2}`."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    return s


def _trailing_words(rest: str) -> list[str] | None:
    """The words of `rest` when it is `word [word ...] [^2 | ^{3}] [.]`, else None.

    A word is ASCII letters with at most one dot right after them; only a final dot
    may stand alone.
    """
    if not rest or not (rest[0].isascii() and rest[0].isalpha()):
        return None
    caret = rest.find("^")
    if caret >= 0:
        if not _UNIT_POWER_AT_END.fullmatch(rest, caret + 1):
            return None
        words, dots_checked_to = rest[:caret], caret
    else:
        words = rest
        dots_checked_to = len(rest) - 1 if rest.endswith(".") else len(rest)
    if _NOT_IN_WORDS.search(words) or _DOT_NOT_AFTER_LETTER.search(words, 0, dots_checked_to):
        return None
    tokens = words.split()
    if tokens[-1] == ".":
        tokens.pop()
    return tokens


def _split_trailing_words(s: str) -> tuple[str, bool, list[str]] | None:
    """`s` as (head, whether a space follows it, trailing words without their dots), or
    None when `s` does not end in words.

    The head is the shortest single-line prefix ending in a digit or `}` after which only
    words (and a unit power) follow. Words hold no digit or `}`, so the head ends at the
    last one of them, or at the last one before the last `^`: two candidates, each
    checked in linear time.
    """
    head_ends = set()
    last = _LAST_DIGIT_OR_BRACE.match(s)
    if last:
        head_ends.add(last.end())
    last_caret = s.rfind("^")
    last_before_caret = _LAST_DIGIT_OR_BRACE.match(s, 0, last_caret) if last_caret > 0 else None
    if last_before_caret:
        head_ends.add(last_before_caret.end())
    for head_end in sorted(head_ends):
        head = s[:head_end]
        gap = _LEADING_SPACE.match(s, head_end).end() - head_end
        words = _trailing_words(s[head_end + gap:])
        if words is not None and "\n" not in head:
            return head, gap > 0, [word.rstrip(".") for word in words]
    return None


def _strip_trailing_words(s: str) -> str:
    """"18 dollars" -> "18", "5cm^2" -> "5", "5 apples" -> "5"; keeps "2x", "6+9i", "2 x"."""
    split = _split_trailing_words(s)
    if split is None:
        return s
    head, spaced, words = split
    known_units = all(
        w.lower() in _UNIT_WORDS and (spaced or len(w) > 1) for w in words)
    plain_noun_after_number = (
        spaced and _PLAIN_NUMBER_TEXT.fullmatch(head.strip()) is not None
        and all(len(w) > 1 for w in words))
    return head if known_units or plain_noun_after_number else s


def _unwrap_text_commands(s: str) -> str:
    """`\\text{\\textbf{east}}` -> `east`: drops every wrapper whose content, once its
    own wrappers are dropped, holds no brace; one pass with a stack of open braces
    (repeated regex passes would take time proportional to length x nesting depth)."""
    wrapper_starts = {match.end() - 1: match.start() for match in _TEXT_WRAPPER_OPEN.finditer(s)}
    if not wrapper_starts:
        return s
    keep = bytearray(b"\x01") * len(s)
    # Parallel stacks of plain ints/bools (cheap for the garbage collector) per open brace.
    open_indices: list[int] = []
    keeps_brace: list[bool] = []
    for match in re.finditer(r"[{}]", s):
        index = match.start()
        if s[index] == "{":
            open_indices.append(index)
            keeps_brace.append(False)
        elif open_indices:
            open_index, content_keeps_brace = open_indices.pop(), keeps_brace.pop()
            wrapper_start = wrapper_starts.get(open_index)
            if wrapper_start is not None and not content_keeps_brace:
                keep[wrapper_start:open_index + 1] = bytes(open_index + 1 - wrapper_start)
                keep[index] = 0
            elif keeps_brace:
                keeps_brace[-1] = True
    return "".join(itertools.compress(s, keep))


def normalize_answer(s: object) -> str:
    """Canonical string form of an answer, for equality checks.

    Drops `$`, `\\left`/`\\right`, LaTeX spacing, degrees, percent signs, thousands
    commas, unit words and `\\text{}` wrappers, `x =` / `x \\in` prefixes, trailing
    `.0`, leading zeros of integers (AIME "025" -> "25"), and all whitespace;
    `\\dfrac`/`\\tfrac` become `\\frac`, `(C)` becomes `C`.
    """
    if s is None:
        return ""
    s = str(s).strip()
    s = s.replace("\u2212", "-").replace("{,}", ",")
    s = _LATEX_NOISE.sub(_drop_latex_noise, s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _TEXT_UNIT_AT_END.sub("", s)
    s = _unwrap_text_commands(s)
    s = s.strip()
    prefix = _VARIABLE_PREFIX.fullmatch(s)
    if prefix:
        s = prefix.group(1).strip()
    s = _strip_trailing_words(s)
    s = _fix_fracs_and_sqrts(s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if _THOUSANDS_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    zero_decimal = _TRAILING_ZERO_DECIMAL.fullmatch(s)
    if zero_decimal:
        s = zero_decimal.group(1)
    leading_zero = _LEADING_ZERO_INTEGER.fullmatch(s)
    if leading_zero:
        s = leading_zero.group(1) + leading_zero.group(2)
    if s.startswith("+"):
        s = s[1:]
    choice = _PARENTHESIZED_CHOICE.fullmatch(s)
    if choice:
        s = choice.group(1)
    return s


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(_NUMBER)
_LATEX_FRACTION = re.compile(r"([-+]?)\\frac\{(" + _NUMBER + r")\}\{(" + _NUMBER + r")\}")
_SLASH_FRACTION = re.compile(r"(" + _NUMBER + r")/(" + _NUMBER + r")")


def parse_number(s: object) -> float | None:
    """The value of a plain numeric answer ("025", "-3.5", "$1,080", "\\frac{3}{4}", "3/4").

    None for anything else (expressions, tuples, zero denominators).
    """
    text = normalize_answer(s)
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    fraction = _LATEX_FRACTION.fullmatch(text)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        value = _divide(float(numerator), float(denominator))
        return None if value is None else (-value if sign == "-" else value)
    fraction = _SLASH_FRACTION.fullmatch(text)
    if fraction:
        return _divide(float(fraction.group(1)), float(fraction.group(2)))
    return None


def _divide(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def _numbers_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-12)


# ---------------------------------------------------------------------------
# math_verify in a bounded worker subprocess
# ---------------------------------------------------------------------------

def _worker_command() -> list[str]:
    # Run this file as a script: the worker needs math_verify only, not ssb_jax/JAX.
    # -P keeps the script's folder (ssb_jax/) off sys.path so its modules shadow nothing.
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, os.path.abspath(__file__), "--math-verify-worker"]


class MathVerifyTimeout(RuntimeError):
    """A math_verify comparison exceeded its time bound (its worker was killed)."""


class _MathVerifyWorker:
    """One long-lived subprocess answering `{"prediction", "gold"}` JSON lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._owner_pid: int | None = None

    def _alive(self) -> bool:
        return (self._process is not None and self._owner_pid == os.getpid()
                and self._process.poll() is None)

    def _read_line(self, deadline: float) -> bytes | None:
        assert self._process is not None and self._process.stdout is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([self._process.stdout], [], [], remaining)
        if not ready:
            return None
        return self._process.stdout.readline()

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._alive():
            return
        self._kill()
        self._process = subprocess.Popen(
            _worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True)
        self._owner_pid = os.getpid()
        line = self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S)
        if not line or line.strip() != b"ready":
            self._kill()
            raise RuntimeError("math_verify worker failed to start")

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._owner_pid == os.getpid():
            try:
                process.kill()
                process.wait(timeout=10)
            except Exception:
                pass
            for stream in (process.stdin, process.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except Exception:
                    pass

    def equal(self, prediction: str, gold: str, timeout_s: float) -> bool:
        with self._lock:
            self._ensure_started()
            assert self._process is not None and self._process.stdin is not None
            request = json.dumps({"prediction": prediction, "gold": gold}) + "\n"
            deadline = time.monotonic() + timeout_s
            try:
                self._process.stdin.write(request.encode("utf-8"))
                self._process.stdin.flush()
                line = self._read_line(deadline)
            except (BrokenPipeError, OSError) as error:
                self._kill()
                raise RuntimeError("math_verify worker died") from error
            if line is None:
                self._kill()
                raise MathVerifyTimeout(f"math_verify took longer than {timeout_s}s")
            if not line:
                self._kill()
                raise RuntimeError("math_verify worker died")
            return bool(json.loads(line)["equal"])

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER = _MathVerifyWorker()


def start_math_verify_worker() -> None:
    """Start the math_verify worker now, so its start-up is not paid mid-evaluation."""
    _WORKER.start()


def stop_math_verify_worker() -> None:
    _WORKER.close()


def _math_verify_equal(prediction: str, gold: str, timeout_s: float) -> bool:
    return _WORKER.equal(prediction, gold, timeout_s)


def _verify_in_worker(parse: Callable, verify: Callable, prediction: str, gold: str) -> bool:
    """Runs inside the worker; math_verify's signal timeouts are off (None)."""
    candidates = [(prediction, gold)]
    normalized = (normalize_answer(prediction), normalize_answer(gold))
    if normalized != candidates[0] and all(normalized):
        candidates.append(normalized)
    for pred_text, gold_text in candidates:
        gold_parsed = parse(f"${gold_text}$", parsing_timeout=None)
        pred_parsed = parse(f"${pred_text}$", parsing_timeout=None)
        if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
            return True
    return False


def _serve_math_verify() -> None:
    import logging
    logging.disable(logging.WARNING)  # math_verify warns that its timeout is off
    # Keep the protocol on a private fd; stray prints from libraries go to stderr.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    from math_verify import parse, verify
    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            equal = _verify_in_worker(parse, verify, request["prediction"], request["gold"])
        except Exception:
            equal = False
        protocol.write(json.dumps({"equal": bool(equal)}) + "\n")
        protocol.flush()


# ---------------------------------------------------------------------------
# Graders
# ---------------------------------------------------------------------------

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
    """Lenient grader: numbers within relative 1e-6, normalized strings, then math_verify.

    When both sides are plain numbers the numeric result is final (math_verify is not
    consulted). The whole call is bounded by `timeout_s` (math_verify gets what is left;
    see module docstring); a timeout or any exception counts as False.
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
            return _numbers_close(pred_value, gold_value)
        if normalize_answer(pred) == normalize_answer(ref):
            return True
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:  # out of time before math_verify: wrong, and the worker lives on
            return False
        return _math_verify_equal(pred, ref, remaining_s)
    except Exception:
        return False


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


def gsm8k_gold(answer_field: str) -> str:
    """The GSM8K gold answer: text after the last `####`, commas removed."""
    if "####" not in answer_field:
        raise ValueError("GSM8K answer field has no '####' marker")
    return answer_field.rsplit("####", 1)[1].replace(",", "").strip()


if __name__ == "__main__" and "--math-verify-worker" in sys.argv:
    _serve_math_verify()
