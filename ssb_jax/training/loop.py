"""The one training loop: every trainer (SSB distillation and SFT, GRPO, the toy world's pre-training) is a
step function and a batch source run by `TrainingLoop`.

    loop = TrainingLoop(workdir, total_steps, step, checkpoints=tc, desc="distill", tag="train",
                        hooks=Hooks(curve_point=curve.loop_hook(...)), plot=plot_metrics)
    result = loop.run(initial_state, batches, resume=True)  # a LoopResult

- `step(state, batch) -> (state, record)`: one training step; `record` is a dict of plain Python numbers
  (metrics.jsonl's line for the step, without "step"). `host_numbers` turns jitted metrics into those.
- `batches.next_batch(state)`: the next batch. It gets the current state, so an on-policy source can
  sample from the policy being trained; `iterator_batches` wraps a plain iterator. A source with
  `get_state()` / `set_state(json)` (its position: a grain iterator's state, GRPO's iteration count) is
  checkpointed with the state and put back on resume.

Per step, in order: the step; its record to history, metrics.jsonl and (every log_every steps)
TensorBoard; progress; `hooks.on_step(record)`; the simulated kill (`stop_after`); then
`hooks.curve_point(step, total, state, writer)` (a learning-curve point: before the checkpoint, so a
resumed run neither loses nor repeats one); and every checkpoint_every steps and at the last,
`hooks.before_checkpoint(step, state)`, the checkpoint, `hooks.on_checkpoint(step)`. The curve hook is
also called once before the first step, with the step the run starts from.

A workdir of None runs in memory: no checkpoints, metrics file, TensorBoard, config files or plot.
Resuming restores the latest checkpoint in workdir/checkpoints (state and source position) and
truncates metrics.jsonl to its step; `stop_after` steps into a session the loop stops without a final
checkpoint, as a kill would.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax

from ssb_jax.training.checkpoint import Checkpoints, abstract
from ssb_jax.training.metrics import Progress, append_record, resume_metrics, tensorboard_writer, write_scalars
from ssb_jax.training.settings import CheckpointSettings

log = logging.getLogger(__name__)

StepFn = Callable[[Any, Any], tuple[Any, dict]]


class BatchSource(Protocol):
    def next_batch(self, state) -> Any: ...


class _IteratorBatches:
    def __init__(self, iterator: Iterator):
        self.iterator = iterator
        if hasattr(iterator, "get_state"):  # resumable: a grain DatasetIterator
            self.get_state, self.set_state = iterator.get_state, iterator.set_state

    def next_batch(self, state):
        return next(self.iterator)


def iterator_batches(iterator: Iterator) -> BatchSource:
    """A batch source over an iterator of batches, resumable when the iterator has get_state/set_state."""
    return _IteratorBatches(iterator)


def host_numbers(metrics: Mapping) -> dict[str, float]:
    """Device scalars (a jitted step's metrics) as Python floats."""
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


@dataclasses.dataclass
class Hooks:
    """Calls into a run at fixed points of each step (see the module docstring for their order)."""
    on_step: Callable[[dict], None] | None = None                         # (record)
    curve_point: Callable[[int, int, Any, Any], None] | None = None      # (step, total steps, state, writer)
    before_checkpoint: Callable[[int, Any], None] | None = None          # (step, state)
    on_checkpoint: Callable[[int], None] | None = None                   # (step)


@dataclasses.dataclass
class LoopResult:
    state: Any
    history: list[dict]      # this session's records
    start_step: int          # the step it resumed from (0: a fresh run)
    total_steps: int
    interrupted: bool        # stopped by stop_after before the last step


@dataclasses.dataclass
class TrainingLoop:
    """One run of `step` for `total_steps` steps in `workdir`; see the module docstring."""
    workdir: Path | None
    total_steps: int
    step: StepFn
    checkpoints: CheckpointSettings = CheckpointSettings()
    desc: str = "train"                 # the progress bar's description
    tag: str = "train"                  # the run's short name: TensorBoard scalars tag/<metric>, log lines
    hooks: Hooks = dataclasses.field(default_factory=Hooks)
    postfix: Callable[[dict], dict] | None = None  # record -> {name: text} shown with the progress
    progress: bool = True
    progress_every: int = 0             # steps between progress lines off a terminal (0: about 20 a run)
    tensorboard: bool = True
    config_files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # {file name: text} in workdir
    plot: Callable[[Path], Any] | None = None  # plot(workdir) after the loop
    position_item: str = "data"         # the checkpoint's JSON item holding the batch source's state

    def run(self, state, batches: BatchSource, *, resume: bool = True, stop_after: int | None = None) -> LoopResult:
        workdir = None if self.workdir is None else Path(self.workdir)
        main_process = jax.process_index() == 0
        total = self.total_steps
        hooks = self.hooks
        resumable = hasattr(batches, "get_state")
        checkpoints = None
        start = 0
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            checkpoints = Checkpoints(workdir, self.checkpoints.keep_checkpoints,
                                      json_items=(self.position_item,) if resumable else ())
            if resume and checkpoints.latest_step() is not None:
                start = checkpoints.latest_step()
                state, items = checkpoints.restore(start, abstract(state))
                if resumable:
                    batches.set_state(items[self.position_item])
                log.info("%s: resumed from step %d", self.tag, start)
        writer = None
        metrics_path = None
        if workdir is not None:
            metrics_path = resume_metrics(workdir, start)
            if main_process:
                for name, text in self.config_files.items():
                    (workdir / name).write_text(text)
                if self.tensorboard:
                    writer = tensorboard_writer(workdir, start)
        progress = Progress(total, self.progress_every or max(1, total // 20), desc=self.desc, label=self.tag,
                            initial=start, enabled=self.progress)

        history, interrupted = [], False
        try:
            if hooks.curve_point is not None:  # step 0 (or a point the resumed run misses)
                hooks.curve_point(start, total, state, writer)
            for step in range(start, total):
                state, record = self.step(state, batches.next_batch(state))
                done = step + 1
                record = {"step": done, **record}
                history.append(record)
                if metrics_path is not None and main_process:
                    append_record(metrics_path, record)
                    if writer is not None and done % self.checkpoints.log_every == 0:
                        write_scalars(writer, record, self.tag, done)
                progress.update(done, self.postfix(record) if self.postfix else None)
                if hooks.on_step is not None:
                    hooks.on_step(record)
                if stop_after is not None and done - start >= stop_after and done < total:
                    interrupted = True
                    break
                if hooks.curve_point is not None:  # before the checkpoint: a resumed run neither loses nor repeats it
                    hooks.curve_point(done, total, state, writer)
                if checkpoints is not None and (done % self.checkpoints.checkpoint_every == 0 or done == total):
                    if hooks.before_checkpoint is not None:
                        hooks.before_checkpoint(done, state)
                    positions = {self.position_item: batches.get_state()} if resumable else {}
                    checkpoints.save(done, state, **positions)
                    if hooks.on_checkpoint is not None:
                        hooks.on_checkpoint(done)
        finally:
            progress.close()
            if writer is not None:
                writer.close()
            if checkpoints is not None:
                checkpoints.close()
        if self.plot is not None and workdir is not None and main_process:
            self.plot(workdir)
        return LoopResult(state=state, history=history, start_step=start, total_steps=total, interrupted=interrupted)
