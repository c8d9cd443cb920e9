"""Learning curves: greedy accuracy and completion length on a fixed held-out subset while a method trains.

Every `CurveConfig.eval_every` optimiser steps, and at step 0 and at the last step, the current adapters
answer the same `eval_size` held-out problems greedily (the student's plain prompt, as the eval stage
asks it). Each point records accuracy (with its binomial SE), the mean completion length in tokens,
the share of completions cut at the token budget, and two x-axes: the optimiser step and the tokens
sampled *for training* so far (SSB and SFT: everything curation sampled, rollouts plus hinted teacher
solutions, all spent before step 0, so their points share one x; GRPO: its own running
count of rollout tokens). Tokens sampled for the curve itself are not counted. `plot_curves` draws an
up-front cost as an offset: a dashed segment from 0 to the cost, the points at its end, said in the legend
and the figure's caption.

The held-out subset: the first `eval_size` problems, in file order, of `CurveConfig.dataset` (default:
the first dataset of eval.datasets; on the toy world its held-out test split). The eval stage grades the
same problems with the same greedy decoding, so the last point's accuracy is that of the final greedy
pass@1 on those problems; the curve only monitors training and selects nothing, so nothing leaks.

One sampler is built at the first point, from the student (base + adapters; the pipeline's
`RunContext.sampler`: the rollout engine or the static Sampler); every later point swaps the new adapter
values in (`set_adapters`), so nothing is compiled again. A point's problems go to it in one call, and the
point is one record, written once its last row has finished: there is nothing per problem to stream, and a
point cut by a kill is redone after the resume (its step has no checkpoint yet).

Interface:

    curve = LearningCurve(config, problems, tokenizer, base_model, lora_config, workdir / "metrics.jsonl",
                          label="grpo", make_sampler=pipeline.sampler, prompts=..., grader="math_verify",
                          place=None)
    TrainingLoop(..., hooks=Hooks(curve_point=curve.loop_hook(lambda: sampled_tokens)))

The training loop (ssb_jax.training.loop), after truncating metrics.jsonl to the checkpoint it resumes
from, then calls `curve.maybe_record(step, total_steps, lora, sampled_tokens, writer=tb)` at the step it
starts from and after every step, before that step's checkpoint.

`lora`: the adapters as a pure dict (a train state's "lora") or an nnx.State; `place` (optional) puts
them where the sampler's mesh wants them (several processes: gathered, then placed on the local mesh).
Points go to the caller's metrics.jsonl as records with "kind": "curve" (training records have no kind),
only from the main process; TensorBoard gets curve/* scalars at the optimiser step. A point whose step
is already in the file is not redone, and a run that truncates its metrics to its last checkpoint
(ssb_jax.training.loop) drops later points, so a killed run neither loses nor repeats points as long as each
point is written before the checkpoint of its step. `plot_curves` draws several methods' points (by
label) in one figure; report.py uses it to put SSB, SFT and GRPO side by side.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ssb_jax import validate
from ssb_jax.settings import setting
from ssb_jax.training.metrics import append_record, read_records, save_plot, subplots, write_scalars

log = logging.getLogger(__name__)

KIND = "curve"
PLOTTED = (("accuracy", "greedy accuracy"), ("mean_tokens", "mean completion length (tokens)"),
           ("truncated_rate", "share cut at the token budget"))


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    eval_every: int = setting(0, "optimiser steps between learning-curve points (greedy accuracy and length on a "
                                 "held-out subset; also at step 0 and the end); 0: off")
    eval_size: int = setting(64, "held-out problems per learning-curve point (the first ones of curves.dataset)")
    max_new_tokens: int = setting(0, "token budget of each learning-curve answer (0: eval.max_new_tokens)")
    dataset: str = setting("", "learning-curve problems: one eval dataset spec (empty: the first of eval.datasets)")

    def __post_init__(self):
        validate.check_declared(self)  # finite numbers and each field's declared check
        validate.non_negative(self, "eval_every", "max_new_tokens")
        validate.positive(self, "eval_size")

    @property
    def enabled(self) -> bool:
        return self.eval_every > 0


def is_curve(record: Mapping) -> bool:
    return record.get("kind") == KIND


def read_curve(metrics_path) -> list[dict]:
    """The curve points in a metrics.jsonl, in step order."""
    return sorted((r for r in read_records(metrics_path) if is_curve(r)), key=lambda r: r["step"])


class LearningCurve:
    """Greedy evaluation of the adapters on a fixed subset, every few steps; see the module docstring."""

    def __init__(self, config: CurveConfig, problems: Sequence, tokenizer, base_model, lora_config, metrics_path,
                 *, label: str, make_sampler: Callable | None = None, prompts=None, grader: str = "math_verify",
                 max_new_tokens: int = 1024, place: Callable | None = None):
        """problems: the held-out problems (the first config.eval_size whose prompts fit are used);
        make_sampler(base_model, lora_state, lora_config) -> a Sampler of the student (as
        ssb_jax.main.Pipeline.sampler; default: a plain Sampler), called once; max_new_tokens: used when
        config.max_new_tokens is 0."""
        from ssb_jax.model.tokenizer import encode_chat, stop_token_ids
        from ssb_jax.prompts import DEFAULT_PROMPTS
        from ssb_jax.sampling.sampler import SamplingParams
        self.config, self.tokenizer, self.label, self.grader = config, tokenizer, label, grader
        self.base_model, self.lora_config, self.place = base_model, lora_config, place
        self.metrics_path = Path(metrics_path)
        self.make_sampler = make_sampler or self._plain_sampler
        self.sampler = None
        self.sampling = SamplingParams(max_new_tokens=config.max_new_tokens or max_new_tokens, temperature=0.0,
                                       stop_ids=tuple(stop_token_ids(tokenizer)))
        prompts = prompts or DEFAULT_PROMPTS
        self._problems = list(problems)[:config.eval_size]
        self._prompt_ids = [encode_chat(tokenizer, prompts.student_messages(p.question)) for p in self._problems]
        self._recorded: set[int] | None = None  # read at the first point, after the caller's truncation

    def _plain_sampler(self, base_model, lora, lora_config):
        from ssb_jax.model.lora import with_adapters
        from ssb_jax.sampling.driver import Sampler
        return Sampler(with_adapters(base_model, lora, lora_config), self.tokenizer,
                       batch_size=max(1, min(64, len(self._problems))), show_progress=False)

    def due(self, step: int, total_steps: int) -> bool:
        every = self.config.eval_every
        return every > 0 and (step == 0 or step == total_steps or step % every == 0)

    def loop_hook(self, sampled_tokens: Callable[[], int]) -> Callable:
        """The training loop's curve_point hook (ssb_jax.training.loop.Hooks): a point of the train state's
        adapters (state["lora"]); sampled_tokens() is the x-axis at that step."""
        return lambda step, total_steps, state, writer: self.maybe_record(step, total_steps, state["lora"],
                                                                           sampled_tokens(), writer)

    def maybe_record(self, step: int, total_steps: int, lora, sampled_tokens: int, writer=None) -> dict | None:
        """The point at `step` when one is due and not yet recorded (written and returned), else None."""
        if not self.due(step, total_steps):
            return None
        if self._recorded is None:
            self._recorded = {r["step"] for r in read_curve(self.metrics_path)}
        if step in self._recorded:
            return None
        point = self.evaluate(lora)
        point = {"kind": KIND, "method": self.label, "step": int(step), "sampled_tokens": int(sampled_tokens), **point}
        import jax
        if jax.process_index() == 0:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            append_record(self.metrics_path, point)
            if writer is not None:
                write_scalars(writer, point, "curve", step, keys=("accuracy", "mean_tokens", "truncated_rate",
                                                                  "sampled_tokens"))
        self._recorded.add(step)
        log.info("curve %s step %d: accuracy %.3f on %d problems, mean %.1f tokens, %.0f%% cut (%.1f s)",
                 self.label, step, point["accuracy"] or 0.0, point["problems"], point["mean_tokens"] or 0.0,
                 100 * (point["truncated_rate"] or 0.0), point["eval_time_s"])
        return point

    def evaluate(self, lora) -> dict:
        """Greedy accuracy (and SE), mean tokens, truncated and no-answer rates of base + `lora`."""
        from flax import nnx
        from ssb_jax.evaluation.metrics import metric_rows
        from ssb_jax.evaluation.grading import grade_response
        from ssb_jax.model.lora import as_lora_state
        started = time.perf_counter()
        if not isinstance(lora, nnx.State):
            lora = as_lora_state(lora, self.base_model.config, self.lora_config)
        if self.place is not None:
            lora = self.place(lora)
        if self.sampler is None:
            self.sampler = self.make_sampler(self.base_model, lora, self.lora_config)
            self._drop_over_long_prompts()
        else:
            self.sampler.set_adapters(lora)
        ids = [p.id for p in self._problems]
        completions = self.sampler.generate_ids(self._prompt_ids, self.sampling, n=1, ids=ids) if ids else []
        records = []
        for problem, (completion,) in zip(self._problems, completions):
            graded = grade_response(completion.text, problem.answer, grader=self.grader)
            records.append({"greedy": {"label": graded.label, "num_tokens": len(completion.token_ids),
                                       "finish_reason": completion.finish_reason}})
        row = metric_rows(records, 0)[0]
        return {**{k: row[k] for k in ("accuracy", "se", "correct", "problems", "mean_tokens", "truncated_rate",
                                        "no_answer_rate")},
                "eval_time_s": time.perf_counter() - started}

    def _drop_over_long_prompts(self) -> None:
        limit = getattr(self.sampler, "max_prompt_tokens", None)
        if limit is None:
            return
        fits = [i for i, ids in enumerate(self._prompt_ids) if len(ids) <= limit]
        if len(fits) < len(self._prompt_ids):
            log.warning("curve %s: %d of %d problems have prompts over max_prompt_tokens=%d and are left out",
                        self.label, len(self._prompt_ids) - len(fits), len(self._prompt_ids), limit)
        self._problems = [self._problems[i] for i in fits]
        self._prompt_ids = [self._prompt_ids[i] for i in fits]


# The smallest span a panel's y-axis shows (key -> absolute span, share of the mean): a curve that moves by
# 0.06 tokens is flat, and an axis zoomed onto it would draw noise as a trend.
MIN_SPAN = {"accuracy": (0.1, 0.0), "truncated_rate": (0.1, 0.0), "mean_tokens": (8.0, 0.2)}
CAPTION = ("Right column: tokens generated to train. SSB and SFT sample everything in curation, before step 0: "
           "the dashed segment is that cost, an offset from 0, and their curve stands at its end; GRPO samples "
           "as it trains.")


def upfront_cost(points: Sequence[Mapping]) -> int | None:
    """The tokens a method sampled before its first step, when it samples nothing while training (SSB and
    SFT: all of curation); None for a method whose count grows with its steps (GRPO)."""
    counts = {p["sampled_tokens"] for p in points}
    return counts.pop() if len(counts) == 1 and len(points) > 1 else None


def widen(low: float, high: float, key: str) -> tuple[float, float]:
    """The data range (low, high) widened about its middle to MIN_SPAN[key]; accuracies and shares stay
    within [0, 1], lengths at or above 0."""
    absolute, relative = MIN_SPAN.get(key, (0.0, 0.0))
    span = max(absolute, relative * abs(low + high) / 2)
    if high - low >= span:
        return low, high
    middle = (low + high) / 2
    low, high = middle - span / 2, middle + span / 2
    if key in ("accuracy", "truncated_rate"):  # shift rather than cross a bound
        low, high = (0.0, span) if low < 0 else (1.0 - span, 1.0) if high > 1 else (low, high)
    return max(low, 0.0), high


def plot_curves(curves: Mapping[str, Sequence[Mapping]], out) -> Path | None:
    """One figure of several methods' points ({label: curve records}): accuracy, mean length and the
    truncated share (rows) against optimiser steps and against sampled tokens (columns). A method that
    samples everything before step 0 is drawn in the tokens column at its cost, reached by a dashed
    segment from 0 (the caption says so); every y-axis spans at least MIN_SPAN."""
    curves = {label: sorted(points, key=lambda p: p["step"]) for label, points in curves.items() if points}
    if not curves:
        return None
    fig, axes = subplots(len(PLOTTED), 2, figsize=(12, 3.2 * len(PLOTTED) + 0.6), squeeze=False)
    for label, points in curves.items():
        offset = upfront_cost(points)
        for row, (key, title) in enumerate(PLOTTED):
            shown = [p for p in points if p.get(key) is not None]
            ys = [p[key] for p in shown]
            line, = axes[row][0].plot([p["step"] for p in shown], ys, marker="o", markersize=3, label=label)
            tokens_axis = axes[row][1]
            if offset is None or not shown:
                tokens_axis.plot([p["sampled_tokens"] for p in shown], ys, marker="o", markersize=3, label=label,
                                 color=line.get_color())
            else:
                tokens_axis.plot([0, offset], [ys[0], ys[0]], linestyle="--", color=line.get_color(), alpha=0.6)
                tokens_axis.plot([offset] * len(ys), ys, marker="o", markersize=3, color=line.get_color(),
                                 label=f"{label}: {offset:,} tokens sampled before step 0")
            axes[row][0].set_title(title)
            tokens_axis.set_title(title)
    for row, (key, _) in enumerate(PLOTTED):
        values = [y for ax in axes[row] for line in ax.get_lines() for y in line.get_ydata()]
        if values:
            low, high = widen(min(values), max(values), key)
            pad = 0.05 * (high - low) or 0.5
            for ax in axes[row]:
                ax.set_ylim(low - pad, high + pad)
        axes[row][0].set_xlabel("optimiser step")
        axes[row][1].set_xlabel("tokens sampled for training")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.text(0.5, 0.005, CAPTION, ha="center", va="bottom", fontsize=8, wrap=True)
    return save_plot(fig, out, rect=(0, 0.03, 1, 1))
