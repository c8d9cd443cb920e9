"""The stage graph: one `Stage` interface and the ordered registry the CLI, `--config.overwrite`, the
planner and the report read.

A stage is a node with a name, the stages whose outputs it reads (`depends_on`), a fingerprint of what
its outputs are made from, a test of whether they are complete, and a `run`. Adding a stage is one new
module and one `Registry.register` call; nothing else names stages.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable, Iterator

DONE_FILE = "DONE.json"


class Stage:
    """One node of the pipeline. Subclasses set the class attributes and override what differs.

    per_round: runs once per SSB round, in round_<r>/<name>; otherwise once per run, in <workdir>/<name>.
    opt_in: runs only when config.stages names it (the baselines); otherwise it is a default stage.
    uses: the device work the planner sizes for it ("sampling", "training").
    """
    name: str = ""
    depends_on: tuple[str, ...] = ()
    per_round: bool = False
    opt_in: bool = False
    uses: tuple[str, ...] = ()
    summary: str = ""

    def directory(self, ctx, r: int | None) -> Path:
        return ctx.round_dir(r) / self.name if self.per_round else ctx.workdir / self.name

    def applies(self, ctx) -> bool:
        """False when the settings make the stage a no-op (the teacher cache in online mode)."""
        return True

    def fingerprint(self, ctx, r: int | None) -> dict | None:
        """What the outputs are made from; None: not fingerprinted (the stage redoes or checks its own)."""
        return None

    def done(self, ctx, r: int | None) -> bool:
        return (self.directory(ctx, r) / DONE_FILE).exists()

    def run(self, ctx, r: int | None) -> dict | None:
        """Do the work; return what DONE.json records (its wall_s is added), or None to write no marker
        (the stage stopped early, or keeps no marker)."""
        raise NotImplementedError

    def publish(self, ctx, r: int | None) -> None:
        """Make finished outputs available to later stages (a trained student for evaluation), whether
        they were made now or by an earlier run; called for every registered stage, selected or not."""

    def warnings(self, ctx) -> list[str]:
        """Lines saying the run is not what was asked (the report shows them)."""
        return []


class Registry:
    """The stages in pipeline order (per-round stages run in this order within each round, then the
    others)."""

    def __init__(self, stages: Iterable[Stage] = ()):
        self._stages: list[Stage] = []
        for stage in stages:
            self.register(stage)

    def register(self, stage: Stage, *, before: str | None = None) -> Stage:
        if not stage.name or stage.name in self.names():
            raise ValueError(f"stage name {stage.name!r} is empty or already registered")
        for dependency in stage.depends_on:
            if dependency not in self.names():
                raise ValueError(f"stage {stage.name!r} depends on {dependency!r}, which is not registered before it")
        if before is None:
            self._stages.append(stage)
        else:
            index = self.names().index(before)
            if any(d in self.names()[index:] for d in stage.depends_on):
                raise ValueError(f"stage {stage.name!r} cannot run before {before!r}: it depends on a later stage")
            self._stages.insert(index, stage)
        return stage

    def unregister(self, name: str) -> None:
        """Drop a stage no other stage depends on (tests register stages of their own)."""
        users = [s.name for s in self._stages if name in s.depends_on]
        if users:
            raise ValueError(f"stage {name!r} is read by {', '.join(users)}")
        self._stages = [s for s in self._stages if s.name != name]

    def __iter__(self) -> Iterator[Stage]:
        return iter(list(self._stages))

    def names(self) -> list[str]:
        return [s.name for s in self._stages]

    def get(self, name: str) -> Stage:
        for stage in self._stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def default_names(self) -> list[str]:
        return [s.name for s in self._stages if not s.opt_in]

    def parse(self, text: str, setting: str = "config.stages") -> list[str]:
        """Stage names from a comma-separated setting; an unknown one is an error naming a near miss."""
        names = [s.strip() for s in str(text).split(",") if s.strip()]
        known = self.names()
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise ValueError(f"unknown stage {name!r} in {setting}; stages are {', '.join(known)}"
                                 + (f" (did you mean {close[0]!r}?)" if close else ""))
        return names

    def downstream(self, names: Iterable[str]) -> set[str]:
        """The named stages and every stage that reads their outputs, directly or not."""
        closure = set(names)
        for stage in self._stages:  # registration order is a topological order
            if closure & set(stage.depends_on):
                closure.add(stage.name)
        return closure

    def describe(self) -> str:
        """One line per stage, for --help and --print_config."""
        return "\n".join(f"  {s.name:14} {s.summary}" + (" (only when named)" if s.opt_in else "")
                         + (f"; reads {', '.join(s.depends_on)}" if s.depends_on else "") for s in self._stages)
