"""A curation cut inside a wave (its records' prefix stored, as a kill or a full disk leaves it) resumes to
the same records and the same reported counts as an uninterrupted run (ssb_jax/curate.py)."""
import json

import pytest

from ssb_jax.curate import CurationConfig, run
from ssb_jax.data.datasets import Problem
from ssb_jax.model.tokenizer import load_tokenizer
from ssb_jax.paths import shared_data_path
from tests.scripted_sampler import ScriptedSampler


def box(x):
    return f"The answer is \\boxed{{{x}}}."


PROBLEMS = [Problem(id=f"q{i}", question=f"What is {i}+{i}?", answer=str(2 * i), source="t") for i in range(10)]
# waves of 5: the first keeps nothing, the second keeps q5 and q6 (reaching the target of 2) then q7..q9 are
# all correct; an uninterrupted run stops after the second wave: 10 questions, 2 kept
ROLLOUTS = {p.id: [box(p.answer)] * 4 for p in PROBLEMS}  # all correct: not kept
ROLLOUTS.update({p.id: [box(p.answer), box(-1)] * 2 for p in PROBLEMS[5:7]})  # mixed
SOLUTIONS = {p.id: box(p.answer) for p in PROBLEMS[5:7]}  # the teacher gets them right: kept
ROLLOUTS.update({p.id: [box(-1)] * 4 for p in PROBLEMS[:5]})  # the first wave: all wrong


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(shared_data_path("qwen2.5_tokenizer"))


def test_a_wave_cut_short_is_finished_before_the_target_counts(tokenizer, tmp_path):
    config = CurationConfig(shuffle=False, target_pairs=2, questions_per_batch=5)
    clean = run(PROBLEMS, ScriptedSampler(tokenizer, ROLLOUTS, SOLUTIONS), tokenizer, config, tmp_path / "clean")
    assert (clean["questions"], clean["verdicts"]["kept"]) == (10, 2)

    cut = tmp_path / "cut"
    cut.mkdir()
    lines = (tmp_path / "clean" / "records.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["id"] for line in lines[:7]][-2:] == ["q5", "q6"]
    (cut / "records.jsonl").write_text("".join(lines[:7]))  # the second wave's first two records: the target
    resumed_sampler = ScriptedSampler(tokenizer, ROLLOUTS, SOLUTIONS)
    resumed = run(PROBLEMS, resumed_sampler, tokenizer, config, cut)
    assert resumed_sampler.calls == [("rollout", ["q7", "q8", "q9"], 4)]  # the rest of the cut wave only
    assert (cut / "records.jsonl").read_text() == "".join(lines)
    assert resumed == clean
    assert json.loads((cut / "curation_summary.json").read_text()) == clean
