"""The run report: curation counts, training dynamics, learning curves and the evaluation table, in one
Markdown file."""
from __future__ import annotations

import json
from pathlib import Path


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_report(workdir: str | Path, num_rounds: int = 1, warnings=()) -> Path:
    """report.md from the stages' outputs; `warnings`: lines that say the run is not what was asked."""
    workdir = Path(workdir)
    lines = ["# SSB run report", "", f"Run directory: `{workdir}`", ""]
    lines += [f"> **Warning:** {warning}" for warning in warnings] + ([""] if warnings else [])
    for r in range(1, num_rounds + 1):
        rdir = workdir / f"round_{r}"
        lines += [f"## Round {r}", ""]
        summary = _json(rdir / "curate" / "curation_summary.json")
        if summary:
            v = summary["verdicts"]
            lines += ["### Curation", "",
                      "| questions | all correct | all wrong | no wrong answer | mixed | teacher failed | kept "
                      "| prompt too long | rollout accuracy |",
                      "|---|---|---|---|---|---|---|---|---|",
                      f"| {summary['questions']} | {v['all_correct']} | {v['all_wrong']} "
                      f"| {v.get('no_wrong_answer', 0)} "
                      f"| {summary['mixed']} | "
                      f"{v['teacher_failed']} | {v['kept']} | {v.get('prompt_too_long', 0)} | "
                      f"{summary['rollout_accuracy']:.3f} |", ""]
            rt, st = summary["rollout_tokens"], summary["solution_tokens"]
            if rt.get("count"):
                lines.append(f"Rollout length: mean {rt['mean']:.1f}, median {rt['median']}, max {rt['max']} tokens.")
            if st.get("count"):
                lines.append(f"Teacher solution length: mean {st['mean']:.1f}, median {st['median']}, "
                             f"max {st['max']} tokens.")
            lines.append("")
        done = _json(rdir / "train" / "DONE.json")
        if done:
            m = done.get("final_metrics", {})
            lines += ["### Training", "", f"{done.get('steps')} steps; final loss {m.get('loss', float('nan')):.4g}, "
                      f"KL {m.get('kl', float('nan')):.4g}, student/teacher argmax agreement "
                      f"{m.get('agree', float('nan')):.3f}.", ""]
            first = _first_metrics(rdir / "train" / "metrics.jsonl")
            if first:
                lines += [f"First step: loss {first.get('loss', float('nan')):.4g}, KL {first.get('kl', float('nan')):.4g}.", ""]
            plot = rdir / "train" / "training.png"
            if plot.exists():
                lines += [f"![training dynamics]({plot.relative_to(workdir)})", ""]
        sft = _json(rdir / "sft" / "DONE.json")
        if sft:
            m = sft.get("final_metrics", {})
            lines += ["### SFT baseline", "", f"{sft.get('steps')} steps of cross-entropy on the same pairs (no KL); "
                      f"final CE {m.get('ce', float('nan')):.4g}, KL to the teacher {m.get('kl', float('nan')):.4g}.",
                      ""]
        lines += _learning_curves(workdir, r)
    grpo = _json(workdir / "grpo" / "DONE.json")
    if grpo:
        m = grpo.get("final_metrics", {})
        lines += ["## GRPO baseline", "", f"{grpo.get('iterations')} iterations; last iteration: mean reward "
                  f"{m.get('reward_mean', float('nan')):.3f}, sample accuracy {m.get('accuracy', float('nan')):.3f}, "
                  f"mean completion length {m.get('completion_len_mean', float('nan')):.1f} tokens, "
                  f"{m.get('sampled_tokens', 0)} tokens sampled in all.", ""]
        if (workdir / "grpo" / "grpo.png").exists():
            lines += ["![GRPO dynamics](grpo/grpo.png)", ""]
    table = workdir / "eval" / "results.md"
    if table.exists():
        lines += ["## Evaluation", "", table.read_text().strip(), ""]
    out = workdir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _first_metrics(path: Path) -> dict | None:
    """The first training record (learning-curve points share the file)."""
    if not path.exists():
        return None
    with path.open() as f:
        for line in f:
            if line.strip() and "kind" not in (record := json.loads(line)):
                return record
    return None


def round_curves(workdir: Path, r: int) -> dict[str, list[dict]]:
    """{method label: its learning-curve points} from every method's metrics.jsonl in round r's directory
    (SSB's train/, sft/) and, for round 1, in the run directory's own method folders (grpo/, which
    trains from the round-1 base): any trainer using ssb_jax.curves."""
    from ssb_jax.curves import read_curve
    paths = sorted((workdir / f"round_{r}").glob("*/metrics.jsonl"))
    if r == 1:
        paths += sorted(workdir.glob("*/metrics.jsonl"))
    by_method: dict[str, list[dict]] = {}
    for path in paths:
        for point in read_curve(path):
            by_method.setdefault(point.get("method", path.parent.name), []).append(point)
    first = ("ssb", "sft", "grpo")  # the method, then its baselines; others after them
    return dict(sorted(by_method.items(), key=lambda item: (first.index(item[0]) if item[0] in first else 3, item[0])))


def _learning_curves(workdir: Path, r: int) -> list[str]:
    """The methods' curves in one figure and each one's first and last point."""
    from ssb_jax.curves import plot_curves
    curves = round_curves(workdir, r)
    if not curves:
        return []
    figure = plot_curves(curves, workdir / f"round_{r}" / "learning_curves.png")
    lines = ["### Learning curves", "",
             "Greedy accuracy and completion length on a fixed held-out subset during training; x-axes: optimiser "
             "steps and tokens sampled for training (SSB and SFT sample everything during curation, before step 0).",
             "", "| method | points | problems | step | sampled tokens | accuracy | mean tokens | truncated |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, points in curves.items():
        for p in (points[0], points[-1]):
            accuracy = "–" if p["accuracy"] is None else f"{p['accuracy']:.3f}"
            tokens = "–" if p["mean_tokens"] is None else f"{p['mean_tokens']:.1f}"
            cut = "–" if p["truncated_rate"] is None else f"{100 * p['truncated_rate']:.0f}%"
            lines.append(f"| {label} | {len(points)} | {p['problems']} | {p['step']} | {p['sampled_tokens']} | "
                         f"{accuracy} | {tokens} | {cut} |")
    return lines + ["", f"![learning curves]({figure.relative_to(workdir)})", ""]
