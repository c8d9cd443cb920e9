"""Canonical forms of answers: `normalize_answer` (for equality checks), `parse_number` (the exact
value of a plain numeric answer) and `well_formed` (whether an answer is a complete expression).

Linear time in the answer's length whatever a model writes: see the note on the patterns below.
"""
from __future__ import annotations

import itertools
import re
from fractions import Fraction

_LEADING_SPACE = re.compile(r"\s*")

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
# Longer numerals are no numbers to a grader (and int() of more than 4300 digits raises): compared as strings
MAX_NUMBER_DIGITS = 1000


def parse_number(s: object) -> Fraction | None:
    """The exact value of a plain numeric answer ("025", "-3.5", "$1,080", "\\frac{3}{4}", "3/4") as a
    Fraction, so 191999900 and 192000000 differ and 0.1 is one tenth (compare with `==`; see
    compare.same_number for where a tolerance applies).

    None for anything else (expressions, tuples, zero denominators, numerals over MAX_NUMBER_DIGITS).
    """
    text = normalize_answer(s)
    if len(text) > MAX_NUMBER_DIGITS:
        return None
    if _PLAIN_NUMBER.fullmatch(text):
        return Fraction(text)
    fraction = _LATEX_FRACTION.fullmatch(text)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        value = _divide(Fraction(numerator), Fraction(denominator))
        return None if value is None else (-value if sign == "-" else value)
    fraction = _SLASH_FRACTION.fullmatch(text)
    if fraction:
        return _divide(Fraction(fraction.group(1)), Fraction(fraction.group(2)))
    return None


def _divide(numerator: Fraction, denominator: Fraction) -> Fraction | None:
    return None if denominator == 0 else numerator / denominator


_GROUP_BRACE = re.compile(r"\\.|[{}]", re.S)  # a backslash escapes the next character: \{ is no group
_ROUND_OR_SQUARE = re.compile(r"\\.|[()\[\]]", re.S)
# `^` or `_` with no argument (`5^^`, `x_}`, `5^`, `5^{}`), an empty argument of a command (`\frac{}{}`), or
# an operator at the end (`5+`, `3\`); each alternative starts at its own operator and scans only the
# spaces after it, so a failing search takes linear time.
_INCOMPLETE = re.compile(r"[\^_]\s*(?:[\^_}]|$)|[\^_]\s*\{\s*\}|\\[A-Za-z]+\s*\{\s*\}|[-+*/=,\\]\s*$")


def well_formed(answer: object) -> bool:
    """Whether an answer is a complete expression, so a grader that parses leniently (math_verify reads
    `5^^`, `5^{}`, `5))` and `5+` as 5) never matches a malformed one: `{}` groups balanced (escaped
    braces aside); `(`/`[` and `)`/`]` balanced as one kind (an interval `[1, 2)` pairs the two), never
    closed before opened; no `^` or `_` without an argument; no empty command argument; no operator
    at the end. Linear time."""
    text = str(answer)
    if _INCOMPLETE.search(text):
        return False
    for pattern, opening in ((_GROUP_BRACE, "{"), (_ROUND_OR_SQUARE, "([")):
        depth = 0
        for match in pattern.finditer(text):
            char = match.group()
            if len(char) == 2:  # an escaped character
                continue
            depth += 1 if char in opening else -1
            if depth < 0:
                return False
        if depth:
            return False
    return True
