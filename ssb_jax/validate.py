"""Checks of settings, so an absurd value is refused before any work, with one line naming the setting.

Declared checks: `setting(..., check=between(0, 1))` (ssb_jax.settings) and `check_setting`, which the
config applies to every setting of every section (config.check_values, before a run and before
`--print_config`) and `check_declared` to a settings dataclass built in Python. Every number must be
finite whatever its check ("inf" is no temperature). The older helpers (`positive`, ...) are called from
`__post_init__`s and raise ValueError naming the field and the value; `config.section_to` adds the
section ("config.train.learning_rate must be > 0, got 0.0").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def between(low: float, high: float, *, high_open: bool = False) -> Check:
    """low <= value <= high (value < high when high_open)."""
    expected = f"in [{low}, {high}{')' if high_open else ']'}"

    def check(value):
        inside = low <= value < high if high_open else low <= value <= high
        return None if inside else expected
    return check


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f">= {low}"


def one_of(*choices: str, ignore_case: bool = False) -> Check:
    """One of `choices` (compared without case when ignore_case)."""
    allowed = {c.upper() if ignore_case else c for c in choices}

    def check(value):
        key = str(value).upper() if ignore_case else value
        return None if key in allowed else "one of " + ", ".join(choices)
    return check


def non_empty(value) -> str | None:
    return None if str(value).strip() else "a non-empty value"


def check_setting(field: dataclasses.Field, value: Any, key: str) -> None:
    """Raise ValueError("{key} must be ..., got value") unless `value` suits the field: finite if a number,
    then the field's declared check."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value!r}")
    check = field.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise ValueError(f"{key} must be {problem}, got {value!r}")


def check_declared(obj, where: str = "") -> None:
    """Every field of a settings dataclass instance against check_setting (keys `where.name`, or the bare
    name, as the `__post_init__` checks name them)."""
    for field in dataclasses.fields(obj):
        if not isinstance(field.default, tuple):
            check_setting(field, getattr(obj, field.name), f"{where}.{field.name}" if where else field.name)


def _check(obj, fields, ok, expected: str) -> None:
    for name in fields:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"{name} must be {expected}, got {value!r}")


def positive(obj, *fields: str) -> None:
    _check(obj, fields, lambda v: v > 0, "> 0")


def non_negative(obj, *fields: str) -> None:
    _check(obj, fields, lambda v: v >= 0, ">= 0")


def probability(obj, *fields: str) -> None:
    """A nucleus mass: in (0, 1]."""
    _check(obj, fields, lambda v: 0 < v <= 1, "in (0, 1]")
