"""Reading an answer out of text: the last `\\boxed{}` (leniently, or verbatim as the SSB reference
code reads it), the last number written, and the gold answer of a GSM8K record.

Linear time in the text's length: brace matching is one pass with a stack, and no regular
expression here can backtrack super-linearly.
"""
from __future__ import annotations

import re

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



def gsm8k_gold(answer_field: str) -> str:
    """The GSM8K gold answer: text after the last `####`, commas removed."""
    if "####" not in answer_field:
        raise ValueError("GSM8K answer field has no '####' marker")
    return answer_field.rsplit("####", 1)[1].replace(",", "").strip()
