"""The run report: curation counts, training dynamics, learning curves and the evaluation table, in one
Markdown file."""
from __future__ import annotations

import json
from pathlib import Path


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_report(workdir: str | Path, num_rounds: int = 1, warnings=(), stages=()) -> Path:
    """report.md from the stages' outputs; `warnings`: lines that say the run is not what was asked;
    `stages`: one row per registered stage (stage, selected, finished, wall_s), tabled last."""
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
    lines += onpolicy_sections(workdir)
    lines += comparison_table(workdir, num_rounds)
    lines += evaluation_details(workdir)
    evaluated = (_json(workdir / "eval" / "DONE.json") or {}).get("machine")
    if evaluated:  # toy-world numbers depend on the CPU (ssb_jax.compile_options)
        from ssb_jax.compile_options import describe_machine
        lines += [f"Evaluated on {describe_machine(evaluated)}.", ""]
    lines += stage_table(stages)
    out = workdir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


# the on-policy stages (ssb_jax.onpolicy), each in <workdir>/<name>/: the report's heading of each
ONPOLICY_SECTIONS = {"onpolicy": "On-policy self-distillation (SSB's context)",
                     "opsd": "OPSD-style on-policy self-distillation", "sdpo": "SDPO-style on-policy self-distillation"}
# where a record holds the divergence to the teacher: forward KL or JSD, the reverse KL's estimate, and the
# same with lambda < 1 (the on-policy term's metrics prefixed)
DIVERGENCE_KEYS = (("divergence", "divergence to the teacher"), ("reverse_kl", "reverse KL to the teacher"),
                   ("onpolicy_divergence", "divergence to the teacher"),
                   ("onpolicy_reverse_kl", "reverse KL to the teacher"))


def onpolicy_sections(workdir: Path) -> list[str]:
    """A section per on-policy stage that finished: its iterations and the last iteration's sample accuracy,
    divergence to the teacher and completion length, the tokens it sampled in all, its dynamics plot."""
    lines = []
    for name, heading in ONPOLICY_SECTIONS.items():
        done = _json(workdir / name / "DONE.json")
        if not done:
            continue
        m = done.get("final_metrics", {})
        key, label = next(((k, label) for k, label in DIVERGENCE_KEYS if k in m), (None, "divergence to the teacher"))
        lines += [f"## {heading}: `{name}`", "",
                  f"{done.get('iterations')} iterations; last iteration: sample accuracy "
                  f"{m.get('accuracy', float('nan')):.3f}, {label} {m.get(key, float('nan')):.4g} per token, "
                  f"mean completion length {m.get('completion_len_mean', float('nan')):.1f} tokens, "
                  f"{m.get('sampled_tokens', 0)} tokens sampled in all.", ""]
        if (workdir / name / f"{name}.png").exists():
            lines += [f"![{name} dynamics]({name}/{name}.png)", ""]
    return lines


def evaluation_details(workdir: Path) -> list[str]:
    """What the comparison table does not show (each number once in the report): per metric and model the
    counts behind each accuracy, prompts too long, no-answer and truncated shares; then the protocols'
    legend from eval/results.md, which holds the whole table."""
    results = _json(workdir / "eval" / "results.json")
    if not results:
        return []
    def percent(value):
        return "–" if value is None else f"{100 * value:.1f}"

    lines = ["## Evaluation details", "",
             "Accuracies and greedy lengths are in the comparison table; every column together is in "
             "`eval/results.md`.", "",
             "| dataset | protocol | metric | model | correct / all | prompt too long | no answer % | truncated % |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['dataset']} | {r['protocol']} | {r['metric']} | {r['model']} | "
                     f"{r.get('correct', '–')}/{r.get('out_of', '–')} | {r.get('prompt_too_long', '–')} | "
                     f"{percent(r.get('no_answer_rate'))} | {percent(r.get('truncated_rate'))} |")
    markdown = workdir / "eval" / "results.md"
    legend = markdown.read_text().partition("\nProtocols:")[2] if markdown.exists() else ""
    return lines + ([""] + ["Protocols:" + legend.rstrip()] if legend else []) + [""]


def stage_table(rows) -> list[str]:
    """Which stages this run selected, which have finished outputs, and the wall time of the session that
    finished each."""
    if not rows:
        return []
    lines = ["## Stages", "", "| stage | in this run | finished | wall time |", "|---|---|---|---|"]
    for row in rows:
        wall = f"{row['wall_s']:.0f} s" if row.get("wall_s") is not None else ""
        lines.append(f"| {row['stage']} | {'yes' if row['selected'] else 'no'} | "
                     f"{'yes' if row['finished'] else 'no'} | {wall} |")
    return lines + [""]


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


# eval model name -> the method's name in the comparison, in the table's order
METHODS = {"base": "base", "student": "SSB", "sft": "SFT", "grpo": "GRPO", "onpolicy": "onpolicy", "opsd": "opsd",
           "sdpo": "sdpo"}
# stages that sample their own training data from the round-1 base, each in <workdir>/<name>/, recording
# "sampled_tokens" and "updates" in DONE.json's final_metrics
SAMPLING_METHODS = ("grpo", "onpolicy", "opsd", "sdpo")


def training_costs(workdir: Path, num_rounds: int = 1) -> dict[str, dict]:
    """{eval model: {"sampled_tokens", "optimizer_steps", "wall_s"}}: what training each method cost, from
    the stages' DONE.json files (None where a stage did not record it). SSB: every round's curation
    (rollouts and teacher solutions) and distillation; SFT: the rounds before the last as SSB (its base),
    then the last round's curation (the same pairs) and its own training; GRPO and the on-policy stages:
    their own samples and updates. Wall times are those of the sessions that finished each stage,
    learning-curve points included."""
    def cost(curate_dir: Path, train_dir: Path) -> dict:
        curated, trained = _json(curate_dir / "DONE.json") or {}, _json(train_dir / "DONE.json") or {}
        summary = _json(curate_dir / "curation_summary.json") or {}
        tokens = curated.get("sampled_tokens", summary.get("sampled_tokens", {}).get("total"))
        wall = (curated["wall_s"] + trained["wall_s"]) if "wall_s" in curated and "wall_s" in trained else None
        return {"sampled_tokens": tokens, "optimizer_steps": trained.get("steps"), "wall_s": wall}

    def total(parts: list[dict]) -> dict:
        return {k: sum(p[k] for p in parts) if all(p[k] is not None for p in parts) else None
                for k in ("sampled_tokens", "optimizer_steps", "wall_s")}

    rounds = [workdir / f"round_{r}" for r in range(1, num_rounds + 1)]
    ssb = [cost(rdir / "curate", rdir / "train") for rdir in rounds]
    costs = {"base": {"sampled_tokens": 0, "optimizer_steps": 0, "wall_s": 0.0},
             "student": total(ssb),
             "sft": total(ssb[:-1] + [cost(rounds[-1] / "curate", rounds[-1] / "sft")])}
    for name in SAMPLING_METHODS:
        done = _json(workdir / name / "DONE.json")
        if done:
            m = done.get("final_metrics", {})
            costs[name] = {"sampled_tokens": m.get("sampled_tokens"), "optimizer_steps": m.get("updates"),
                           "wall_s": done.get("wall_s")}
    return costs


def comparison_table(workdir: Path, num_rounds: int = 1) -> list[str]:
    """One row per evaluated method (base, SSB, SFT, GRPO) and dataset/protocol: its accuracies with
    standard errors, greedy completion length, and the training budget it spent."""
    results = _json(workdir / "eval" / "results.json")
    if not results:
        return []
    costs = training_costs(workdir, num_rounds)
    by_key = {(row["model"], row["dataset"], row["protocol"], row["metric"].split("@")[0]): row
              for row in results["rows"]}
    n = max((p.get("n_samples") or 0 for p in results["protocols"].values()), default=0)
    lines = ["## Comparison", "",
             "Each method from the same base; SSB and SFT train on the same curated pairs. Sampled tokens: "
             "tokens generated to train (SSB and SFT: curation's rollouts and teacher solutions, shared by the "
             "two); wall time: curation plus training (SSB, SFT) or the GRPO stage, learning-curve points "
             "included. Mean tokens: the greedy completions' mean length.", "",
             f"| dataset | protocol | method | greedy pass@1 % ± SE | avg@{n} % ± SE | maj@{n} % ± SE | mean tokens "
             "| sampled tokens | optimiser steps | wall time (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def accuracy(row) -> str:
        return "–" if row is None else f"{100 * row['accuracy']:.1f} ± {100 * row['se']:.1f}"

    def number(value, spec: str = "d") -> str:
        return "–" if value is None else format(value, spec)

    keys = sorted({(row["dataset"], row["protocol"]) for row in results["rows"]},
                  key=lambda k: (list(results["datasets"]).index(k[0]), list(results["protocols"]).index(k[1])))
    for dataset, protocol in keys:
        for model in sorted({row["model"] for row in results["rows"]},
                            key=lambda m: (list(METHODS).index(m) if m in METHODS else len(METHODS), m)):
            greedy = by_key.get((model, dataset, protocol, "pass"))
            if greedy is None:
                continue
            cost = costs.get(model, {})
            lines.append(f"| {dataset} | {protocol} | {METHODS.get(model, model)} | {accuracy(greedy)} "
                         f"| {accuracy(by_key.get((model, dataset, protocol, 'avg')))} "
                         f"| {accuracy(by_key.get((model, dataset, protocol, 'maj')))} "
                         f"| {number(greedy.get('mean_tokens'), '.1f')} | {number(cost.get('sampled_tokens'))} "
                         f"| {number(cost.get('optimizer_steps'))} | {number(cost.get('wall_s'), '.0f')} |")
    return lines + [""]
