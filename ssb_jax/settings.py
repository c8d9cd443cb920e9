"""Settings carry their help text and their valid values: `setting(default, "what it does", check=...)`
declares a dataclass field whose one-line description `--print_config` shows (config.describe_config
reads it from the field metadata) and whose values `validate.check_setting` accepts: every number must
be finite, and `check` (validate.between, validate.one_of, ...) says what else."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


def setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:  # noqa: A002
    """A dataclass field with a default, its one-line description (the metadata key the CLI table reads)
    and optionally `check`: value -> None when valid, else what it must be ("in [0, 1)")."""
    metadata = {"help": help}
    if check is not None:
        metadata["check"] = check
    return dataclasses.field(default=default, metadata=metadata)


def help_texts(cls) -> dict[str, str]:
    """{field name: description} of a settings dataclass (fields without one are left out)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}
