"""The report's comparison table (base / SSB / SFT / GRPO) from fabricated stage outputs."""
import json

import pytest

from ssb_jax.curate import summarize
from ssb_jax.report import comparison_table, training_costs, write_report


def _write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _fabricate(workdir, rng, num_rounds=1):
    """Stage files with random numbers; returns what the table should say about them."""
    rounds = []
    for r in range(1, num_rounds + 1):
        rdir = workdir / f"round_{r}"
        tokens, curate_s = int(rng.integers(1000, 90000)), float(rng.uniform(1, 500))
        train_steps, train_s = int(rng.integers(1, 500)), float(rng.uniform(1, 500))
        sft_steps, sft_s = int(rng.integers(1, 500)), float(rng.uniform(1, 500))
        # the summary's count differs from DONE.json's: DONE.json (what curation spent when it finished) wins
        _write(rdir / "curate" / "curation_summary.json",
               {**summarize([]), "sampled_tokens": {"rollouts": tokens + 1, "solutions": 0, "total": tokens + 1}})
        _write(rdir / "curate" / "DONE.json", {"wall_s": curate_s, "sampled_tokens": tokens})
        _write(rdir / "train" / "DONE.json", {"steps": train_steps, "final_metrics": {}, "wall_s": train_s})
        _write(rdir / "sft" / "DONE.json", {"steps": sft_steps, "final_metrics": {}, "wall_s": sft_s})
        rounds.append((tokens, curate_s, train_steps, train_s, sft_steps, sft_s))
    grpo = {"sampled_tokens": int(rng.integers(1000, 90000)), "updates": int(rng.integers(1, 500)),
            "wall_s": float(rng.uniform(1, 500))}
    _write(workdir / "grpo" / "DONE.json", {"iterations": 3, "wall_s": grpo["wall_s"],
                                            "final_metrics": {"sampled_tokens": grpo["sampled_tokens"],
                                                              "updates": grpo["updates"], "reward_mean": 0.5}})
    rows, accuracy = [], {}
    for model in ("grpo", "sft", "base", "student"):  # file order is not the table's order
        for metric in ("pass@1", "avg@4", "maj@4"):
            acc, se, length = rng.uniform(0, 1), rng.uniform(0, 0.1), rng.uniform(5, 90)
            accuracy[model, metric] = (acc, se, length)
            rows.append({"model": model, "dataset": "world_test", "protocol": "math_verify", "metric": metric,
                         "accuracy": acc, "se": se, "mean_tokens": length})
    _write(workdir / "eval" / "results.json", {"protocols": {"math_verify": {"n_samples": 4}},
                                               "datasets": {"world_test": 200}, "rows": rows})
    return rounds, grpo, accuracy


def _table_rows(lines):
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines
            if line.startswith("| world_test")]


@pytest.mark.parametrize("num_rounds", [1, 2])
def test_costs_add_curation_to_training_and_sft_shares_ssb_s_earlier_rounds(tmp_path, rng, num_rounds):
    rounds, grpo, _ = _fabricate(tmp_path, rng, num_rounds)
    costs = training_costs(tmp_path, num_rounds)
    ssb_tokens = sum(r[0] for r in rounds)
    assert costs["student"]["sampled_tokens"] == ssb_tokens
    assert costs["student"]["optimizer_steps"] == sum(r[2] for r in rounds)
    assert costs["student"]["wall_s"] == pytest.approx(sum(r[1] + r[3] for r in rounds))
    earlier = rounds[:-1]
    last = rounds[-1]
    assert costs["sft"]["sampled_tokens"] == ssb_tokens  # the same curations
    assert costs["sft"]["optimizer_steps"] == sum(r[2] for r in earlier) + last[4]
    assert costs["sft"]["wall_s"] == pytest.approx(sum(r[1] + r[3] for r in earlier) + last[1] + last[5])
    assert costs["grpo"] == pytest.approx({"sampled_tokens": grpo["sampled_tokens"],
                                           "optimizer_steps": grpo["updates"], "wall_s": grpo["wall_s"]})
    assert costs["base"]["sampled_tokens"] == costs["base"]["optimizer_steps"] == 0


def test_table_rows_in_method_order_with_accuracies_and_costs(tmp_path, rng):
    rounds, grpo, accuracy = _fabricate(tmp_path, rng)
    rows = _table_rows(comparison_table(tmp_path))
    assert [row[2] for row in rows] == ["base", "SSB", "SFT", "GRPO"]
    tokens, curate_s, train_steps, train_s, sft_steps, sft_s = rounds[0]
    expected_costs = {"base": ("0", "0", "0"),
                      "student": (str(tokens), str(train_steps), f"{curate_s + train_s:.0f}"),
                      "sft": (str(tokens), str(sft_steps), f"{curate_s + sft_s:.0f}"),
                      "grpo": (str(grpo["sampled_tokens"]), str(grpo["updates"]), f"{grpo['wall_s']:.0f}")}
    for row, model in zip(rows, ("base", "student", "sft", "grpo")):
        for cell, metric in zip(row[3:6], ("pass@1", "avg@4", "maj@4")):
            acc, se, _ = accuracy[model, metric]
            assert cell == f"{100 * acc:.1f} ± {100 * se:.1f}"
        assert row[6] == f"{accuracy[model, 'pass@1'][2]:.1f}"  # the greedy completions' length
        assert tuple(row[7:]) == expected_costs[model]


def test_missing_costs_show_a_dash_and_the_report_holds_the_table(tmp_path, rng):
    _fabricate(tmp_path, rng)
    (tmp_path / "round_1" / "sft" / "DONE.json").write_text(json.dumps({"steps": 7, "final_metrics": {}}))
    (tmp_path / "round_1" / "curate" / "DONE.json").unlink()  # a curation from before DONE.json existed
    rows = {row[2]: row for row in _table_rows(comparison_table(tmp_path))}
    summary_tokens = json.loads((tmp_path / "round_1/curate/curation_summary.json").read_text())
    assert rows["SSB"][7] == str(summary_tokens["sampled_tokens"]["total"])  # from the summary instead
    assert rows["SSB"][9] == "–" and rows["SFT"][9] == "–" and rows["SFT"][8] == "7"
    report = write_report(tmp_path).read_text()
    assert "## Comparison" in report and "| world_test | math_verify | GRPO |" in report
    assert comparison_table(tmp_path / "nothing") == []


def _tables(text: str) -> list[list[str]]:
    """Each Markdown table of a report as its data rows' cells."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append([cell.strip() for row in current[2:] for cell in row.strip("|").split("|")])
            current = []
    return tables


def test_report_states_each_number_in_one_table(tmp_path, rng):
    """An accuracy, its SE or a length shown in the comparison table is not repeated in another table; the
    evaluation section adds the counts behind them instead."""
    _, _, accuracy = _fabricate(tmp_path, rng)
    results = json.loads((tmp_path / "eval/results.json").read_text())
    for row in results["rows"]:
        row.update(correct=int(rng.integers(0, 200)), out_of=200, prompt_too_long=0,
                   no_answer_rate=float(rng.uniform()), truncated_rate=float(rng.uniform()))
    (tmp_path / "eval/results.json").write_text(json.dumps(results))
    (tmp_path / "eval/results.md").write_text("| a full table |\n|---|\n| 1 |\n\nProtocols:\n- **math_verify**: legend\n")
    report = write_report(tmp_path).read_text()
    accuracies = [{cell for cell in table if "±" in cell} for table in _tables(report)]
    assert sum(map(bool, accuracies)) == 1  # accuracies with their SE: one table only
    for model, metric in accuracy:
        acc, se, _ = accuracy[model, metric]
        assert report.count(f"{100 * acc:.1f} ± {100 * se:.1f}") == 1, (model, metric)
    headers = [line for line in report.splitlines() if line.startswith("| dataset |")]
    assert sum("mean tokens" in header for header in headers) == 1  # greedy lengths: the comparison's column
    assert "## Evaluation details" in report and "- **math_verify**: legend" in report
    assert "| a full table |" not in report  # results.md's table is not copied in
    row = results["rows"][0]
    assert f"| {row['correct']}/200 |" in report


def test_report_names_the_machine_that_evaluated(tmp_path, rng):
    from ssb_jax.compile_options import describe_machine, machine
    _fabricate(tmp_path, rng)
    info = machine()
    assert info["cores"] >= 1 and info["backend"] == "cpu" and isinstance(info["cpu"], str)
    _write(tmp_path / "eval" / "DONE.json", {"wall_s": 3.0, "machine": {**info, "cpu": "Intel Xeon", "cores": 7}})
    line = next(line for line in write_report(tmp_path).read_text().splitlines() if line.startswith("Evaluated on"))
    assert "Intel Xeon" in line and "7 cores" in line
    assert describe_machine({"cpu": "X", "family_model": "6/143", "vector_flags": ["avx512f"], "cores": 4,
                             "jax": "0.10.2", "backend": "cpu", "xla_flags": ""}) == \
        "X (family/model 6/143; avx512f; 4 cores), jax 0.10.2 on cpu"


def test_report_has_a_section_per_onpolicy_stage_that_ran(tmp_path, rng):
    """opsd and sdpo finished (sdpo trained on the reverse KL), onpolicy did not: a section each for the two,
    with the last iteration's numbers from DONE.json and the stage's dynamics plot where it was drawn."""
    from ssb_jax.onpolicy.run import plot_metrics
    _fabricate(tmp_path, rng)
    finished = {}
    for name, divergence in (("opsd", "divergence"), ("sdpo", "reverse_kl")):
        m = {"accuracy": float(rng.uniform()), divergence: float(rng.uniform()),
             "completion_len_mean": float(rng.uniform(5, 90)), "sampled_tokens": int(rng.integers(1000, 90000)),
             "loss": float(rng.uniform()), "grad_norm": 1.0, "updates": 4}
        iterations = int(rng.integers(1, 50))
        _write(tmp_path / name / "DONE.json", {"iterations": iterations, "final_metrics": m, "wall_s": 3.0})
        finished[name] = (iterations, m, divergence)
    (tmp_path / "sdpo" / "metrics.jsonl").write_text(json.dumps({"step": 1, **finished["sdpo"][1]}) + "\n")
    plot_metrics(tmp_path / "sdpo", tag="sdpo")
    report = write_report(tmp_path).read_text()
    assert "`onpolicy`" not in report and "(onpolicy/onpolicy.png)" not in report
    for name, (iterations, m, divergence) in finished.items():
        heading = next(line for line in report.splitlines() if line.startswith("## ") and f"`{name}`" in line)
        text = report.split(heading)[1].split("\n## ")[0]
        label = "reverse KL to the teacher" if divergence == "reverse_kl" else "divergence to the teacher"
        assert (f"{iterations} iterations; last iteration: sample accuracy {m['accuracy']:.3f}, "
                f"{label} {m[divergence]:.4g} per token, mean completion length {m['completion_len_mean']:.1f} "
                f"tokens, {m['sampled_tokens']} tokens sampled in all.") in text
        assert (f"![{name} dynamics]({name}/{name}.png)" in text) == (name == "sdpo")
    assert report.index("## GRPO baseline") < report.index("`opsd`") < report.index("`sdpo`") < \
        report.index("## Comparison")
