"""What a training run reports: metrics.jsonl (one JSON record per step; learning-curve points share the
file with "kind": "curve"), TensorBoard scalars, plots, and progress on the console.

A resumed run truncates metrics.jsonl to the records of the steps up to its checkpoint
(`resume_metrics`), so a killed run neither loses nor repeats a record.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


def read_records(path) -> list[dict]:
    """Every record of a metrics.jsonl, in file order (none when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(workdir) -> list[dict]:
    """The per-step training records of a run (learning-curve points, which share the file, left out)."""
    return [r for r in read_records(Path(workdir) / METRICS_FILE) if "kind" not in r]


def resume_metrics(workdir, start: int) -> Path:
    """metrics.jsonl holding the records of steps <= start only (none when starting afresh); its path."""
    path = Path(workdir) / METRICS_FILE
    if start and path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
    elif path.exists():
        path.unlink()
    return path


def append_record(path, record: Mapping) -> None:
    """One JSON line at the end of a metrics.jsonl."""
    from ssb_jax.data.records import naming_write_errors
    with naming_write_errors(path), Path(path).open("a") as f:  # a full disk names the file
        f.write(json.dumps(record) + "\n")


def write_scalars(writer, record: Mapping, tag: str, step: int, keys=None) -> None:
    """A record's numbers (those of `keys`, else all but "step"; None values skipped) as TensorBoard
    scalars `tag`/key at `step`."""
    for key in keys if keys is not None else [k for k in record if k != "step"]:
        if record[key] is not None:
            writer.add_scalar(f"{tag}/{key}", record[key], step)


def tensorboard_writer(workdir, start: int):
    """A TensorBoard writer into workdir/tb; resuming from step `start` drops the events after it."""
    from tensorboardX import SummaryWriter
    return SummaryWriter(str(Path(workdir) / TENSORBOARD_DIR), purge_step=start + 1 if start else None)


def write_eval_tensorboard(eval_dir, rows: list[Mapping]) -> Path:
    """Evaluation results as TensorBoard scalars in eval_dir/tb/<model> (one TensorBoard run per model, so
    `tensorboard --logdir <workdir>` shows them beside the training curves): accuracy (%) and mean tokens
    per dataset/protocol/metric. Rewritten whole each time, as results.json is."""
    import shutil

    from tensorboardX import SummaryWriter
    root = Path(eval_dir) / TENSORBOARD_DIR
    shutil.rmtree(root, ignore_errors=True)
    for model in sorted({row["model"] for row in rows}):
        with SummaryWriter(str(root / model)) as writer:
            for row in (r for r in rows if r["model"] == model):
                metric = row["metric"].replace("@", "_at_")  # TensorBoard tags take no "@" (pass@1 -> pass_at_1)
                tag = f"eval/{row['dataset']}/{row['protocol']}/{metric}"
                write_scalars(writer, {"accuracy_pct": 100 * row["accuracy"], "mean_tokens": row.get("mean_tokens")},
                              tag, 0)
    return root


def subplots(rows: int, columns: int, **kwargs):
    """(figure, axes) of a new matplotlib figure, drawn off screen (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(rows, columns, **kwargs)


def save_plot(fig, out, rect=None) -> Path:
    """Lay out (within `rect`, figure fractions, when room is kept for a caption), write (PNG at 100 dpi)
    and close a figure; the file's path."""
    import matplotlib.pyplot as plt
    fig.tight_layout(rect=rect)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_iterations(workdir, panels, against_tokens, out) -> Path | None:
    """PNG of an on-policy trainer's records (GRPO's, the on-policy stages'): one panel per iteration for each
    (key, title) of `panels` whose key the records hold (a key may be a tuple of alternatives: the first
    held is drawn; one held by none is left out), and one panel of `against_tokens` (key, title) against
    the tokens sampled so far ("sampled_tokens"). None when there is no record."""
    history = read_metrics(workdir)  # training records only (learning-curve points left out)
    if not history:
        return None

    def held(keys):
        return next((k for k in ((keys,) if isinstance(keys, str) else keys) if k in history[0]), None)

    drawn = [(held(keys), title) for keys, title in panels if held(keys) is not None]
    columns = (len(drawn) + 2) // 2
    fig, axes = subplots(2, columns, figsize=(4 * columns, 7))
    axes = axes.ravel()
    steps = [h["step"] for h in history]
    for ax, (key, title) in zip(axes, drawn):
        ax.plot(steps, [h[key] for h in history])
        ax.set_title(title)
        ax.set_xlabel("iteration")
    key, title = against_tokens
    ax = axes[len(drawn)]
    ax.plot([h["sampled_tokens"] for h in history], [h[key] for h in history])
    ax.set_title(f"{title} vs sampled tokens")
    ax.set_xlabel("sampled tokens")
    for ax in axes[len(drawn) + 1:]:
        ax.axis("off")
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_plot(fig, out)


def format_duration(seconds: float) -> str:
    """45 s, 3 min 20 s, 1 h 05 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


class Progress:
    """How far a loop is, on the main process only: a tqdm bar (with its ETA) when stderr is a terminal,
    else, since a bar's redraws would flood a log file, a log line every `every` items (and after the
    session's first, which includes compiling) with the elapsed time and an ETA.

    update(done, postfix) as items finish: `done` of `total` are finished (it may jump by more than one),
    `postfix` ({name: text}) is shown beside the bar or in the line. `initial`: items done before this
    session (a resumed run). `label` names the loop in log lines (default: `desc`, the bar's description);
    `unit` names an item. `interval_s` > 0: off a terminal, a line only when that many seconds passed since
    the last one (or the start), so many short calls (a sampler's) stay silent and a long one still reports.
    """

    def __init__(self, total: int, every: int, *, desc: str, label: str | None = None, initial: int = 0,
                 terminal: bool | None = None, main_process: bool | None = None, enabled: bool = True,
                 unit: str = "step", interval_s: float = 0.0):
        if main_process is None:
            import jax
            main_process = jax.process_index() == 0
        self.total, self.every, self.initial = total, max(1, every), initial
        self.label, self.unit, self.interval_s = label or desc, unit, interval_s
        self.enabled = enabled and main_process
        self.start = time.perf_counter()
        self.first_step_done = None  # time after the session's first update: later ones estimate the ETA
        self.first_done = initial    # items done at that time
        self.last_logged, self.last_line = initial, self.start
        self.bar = None
        if self.enabled and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)

    def eta_seconds(self, done: int, now: float) -> float:
        """The remaining items at the pace of those after the session's first update (which includes compiling)."""
        return (now - self.first_step_done) / max(done - self.first_done, 1) * (self.total - done)

    def update(self, done: int, postfix: Mapping[str, str] | None = None) -> None:
        if not self.enabled:
            return
        postfix = postfix or {}
        now = time.perf_counter()
        first = self.first_step_done is None
        if first:
            self.first_step_done, self.first_done = now, done
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        shown = ", ".join(f"{name} {text}" for name, text in postfix.items())
        if self.interval_s > 0:
            if now - self.last_line < self.interval_s:
                return
        elif first:
            log.info("%s %s %d/%d: %s (compiling included, it took %s)", self.label, self.unit, done, self.total,
                     shown, format_duration(now - self.start))
            self.last_logged, self.last_line = done, now
            return
        elif done // self.every == self.last_logged // self.every and done != self.total:
            return
        log.info("%s %s %d/%d (%d%%): %s, %s elapsed, ETA %s", self.label, self.unit, done, self.total,
                 100 * done // self.total, shown, format_duration(now - self.start),
                 format_duration(self.eta_seconds(done, now)))
        self.last_logged, self.last_line = done, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
