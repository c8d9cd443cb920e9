"""Settings carry their help text: `setting(default, "what it does")` declares a dataclass field whose
one-line description `--print_config` shows (config.describe_config reads it from the field metadata)."""
from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the metadata key the CLI table reads
    """A dataclass field with a default and its one-line description."""
    return dataclasses.field(default=default, metadata={"help": help})


def help_texts(cls) -> dict[str, str]:
    """{field name: description} of a settings dataclass (fields without one are left out)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}
