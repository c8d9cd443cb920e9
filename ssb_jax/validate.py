"""Range checks for the settings dataclasses, so an absurd value is refused before any work.

Each raises ValueError naming the field and the value; `config.section_to` adds the section
("config.train.learning_rate must be > 0, got 0.0").
"""
from __future__ import annotations


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
