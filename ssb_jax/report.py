"""The run report: curation counts, training dynamics and the evaluation table, in one Markdown file."""
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
    if not path.exists():
        return None
    with path.open() as f:
        line = f.readline()
    return json.loads(line) if line.strip() else None
