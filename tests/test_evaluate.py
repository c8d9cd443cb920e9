"""Evaluation: local JSONL fields, protocols, a recount of the table from the saved outputs, majority
vote, resumption, and a run with a real tiny model."""
import collections
import json
import math
import zlib

import pytest

from ssb_jax.data.datasets import load_problems
from ssb_jax.evaluate import EvalConfig, format_markdown, majority_vote, outputs_path, run
from ssb_jax.model.tokenizer import encode_chat, load_tokenizer, stop_token_ids
from ssb_jax.paths import shared_data_path
from ssb_jax.prompts import DEFAULT_PROMPTS
from ssb_jax.sampling.driver import Completion
from ssb_jax.sampling.sampler import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(shared_data_path("qwen2.5_tokenizer"))


class Killed(RuntimeError):
    pass


class FakeSampler:
    """greedy[id] -> text, sampled[id] -> n texts (unscripted: `default(id, i)`, i = -1 for greedy).
    A text ending in "<cut>" finishes by length. Records every call; raises Killed on call `fail_on`."""

    def __init__(self, tokenizer, greedy=None, sampled=None, default=None, fail_on=None):
        self.tokenizer, self.greedy, self.sampled = tokenizer, dict(greedy or {}), dict(sampled or {})
        self.default = default or (lambda key, i: "I do not know.")
        self.fail_on, self.calls = fail_on, []
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _completion(self, text):
        cut = text.endswith("<cut>")
        return Completion(token_ids=self.tokenizer.encode(text, add_special_tokens=False) + ([] if cut else [self.end]),
                          finish_reason="length" if cut else "stop", text=text)

    def generate_ids(self, prompts, sampling, *, n=1, seed=0, ids=None):
        self.calls.append(("greedy" if sampling.greedy else "sampled", list(ids), n, sampling.max_new_tokens))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise Killed
        out = []
        for key in ids:
            if sampling.greedy:
                texts = [self.greedy.get(key, self.default(key, -1))]
            else:
                texts = self.sampled.get(key) or [self.default(key, i) for i in range(n)]
            assert len(texts) == n
            out.append([self._completion(t) for t in texts])
        return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(results, **where):
    found = [r for r in results["rows"] if all(r[k] == v for k, v in where.items())]
    assert len(found) == 1, where
    return found[0]


def box(x):
    return f"So the answer is \\boxed{{{x}}}."


def hashed(key, i, seed=""):
    """Deterministic answers in 0..3 (gold is 1 below), sometimes none, sometimes truncated."""
    h = zlib.crc32(f"{seed}{key}:{i}".encode()) % 6
    return {4: "No idea.", 5: "Still thinking <cut>"}.get(h, box(h))


def test_local_jsonl_fields_and_both_protocols(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "alpha.jsonl", [{"problem": "Half of 1?", "answer": "0.5"},
                                               {"problem": "3+4?", "answer": "7"},
                                               {"problem": "2*2?", "answer": "4"}])
    b = write_jsonl(tmp_path / "beta.jsonl", [{"question": "1+2?", "answer": "4"},
                                              {"question": "5-1?", "answer": "4"}])
    sampler = FakeSampler(tokenizer, greedy={"alpha-0": box("\\frac{1}{2}"), "alpha-1": box(7), "alpha-2": "four",
                                             "beta-0": box(3), "beta-1": box("4.0")},
                          default=lambda key, i: box(4))
    config = EvalConfig(datasets=f"{a},{b}", n_samples=2)
    results = run({"base": sampler}, tokenizer, config, tmp_path / "eval")

    assert results["datasets"] == {"alpha": 3, "beta": 2} and results["complete"]
    # the fairer grader reads 1/2 as 0.5; the MOTIF protocol's string match does not
    assert row(results, dataset="alpha", protocol="math_verify", metric="pass@1")["correct"] == 1 + 1
    assert row(results, dataset="alpha", protocol="string_match", metric="pass@1")["correct"] == 1
    assert row(results, dataset="alpha", protocol="string_match", metric="pass@1")["no_answer_rate"] == 1 / 3
    assert row(results, dataset="beta", protocol="math_verify", metric="pass@1")["correct"] == 1
    assert row(results, dataset="beta", protocol="math_verify", metric="avg@2")["accuracy"] == 1.0
    # MOTIF is greedy only, so it has no sampled rows; each row names its grader
    assert {(r["protocol"], r["metric"]) for r in results["rows"]} == {
        ("math_verify", "pass@1"), ("math_verify", "avg@2"), ("math_verify", "maj@2"), ("string_match", "pass@1")}
    assert all(r["grader"] == r["protocol"] for r in results["rows"])
    # both protocols decode greedily with 1024 tokens: one shared greedy generation per batch
    assert [(kind, n, tokens) for kind, _, n, tokens in sampler.calls] == [
        ("greedy", 1, 1024), ("sampled", 2, 1024)] * 2
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert markdown == format_markdown(json.loads((tmp_path / "eval" / "results.json").read_text()))
    assert "**string_match** (grader `string_match`, up to 1024 new tokens): MOTIF" in markdown
    assert "| alpha | string_match | pass@1 | base | 1/3 | 33.3 ± 27.2 | 33.3 | 0.0 |" in markdown


def test_known_dataset_name(tokenizer, tmp_path):
    gold = {p.id: p.answer for p in load_problems("aime24")[:2]}
    results = run({"m": FakeSampler(tokenizer, default=lambda key, i: box(gold[key]))}, tokenizer,
                  EvalConfig(datasets="aime24", max_problems=2, protocols=("string_match",)), tmp_path)
    assert row(results, dataset="aime24", metric="pass@1")["correct"] == 2


def _vote(answers):
    """Independent majority: most common integer answer, ties to the earliest; None when no answer."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def test_table_equals_recount_from_outputs(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"problem": f"Q{i}", "answer": "2"} for i in range(11)])
    samplers = {"base": FakeSampler(tokenizer, default=hashed),
                "student": FakeSampler(tokenizer, default=lambda k, i: hashed(k, i, seed="s"))}
    config = EvalConfig(datasets=str(path), n_samples=5, problems_per_batch=4)
    results = run(samplers, tokenizer, config, tmp_path / "eval")
    assert len(results["rows"]) == 2 * 4

    for model in samplers:
        for protocol in ("math_verify", "string_match"):
            lines = outputs_path(tmp_path / "eval", model, "numbers", protocol).read_text().splitlines()
            records = [json.loads(line) for line in lines]
            assert len(records) == 11
            greedy = [r["greedy"] for r in records]
            n = len(records)
            got = row(results, model=model, protocol=protocol, metric="pass@1")
            correct = sum(g["answer"] is not None and int(g["answer"]) == 2 for g in greedy)
            assert got["correct"] == correct and got["problems"] == got["graded"] == n
            assert got["accuracy"] == pytest.approx(correct / n)
            assert got["se"] == pytest.approx(math.sqrt(correct / n * (1 - correct / n) / n))
            assert got["no_answer_rate"] == pytest.approx(sum(g["answer"] is None for g in greedy) / n)
            assert got["truncated_rate"] == pytest.approx(sum(g["text"].endswith("<cut>") for g in greedy) / n)
            tokens = [len(tokenizer.encode(g["text"])) + (not g["text"].endswith("<cut>")) for g in greedy]
            assert got["mean_tokens"] == pytest.approx(sum(tokens) / n)
            if protocol == "string_match":
                continue
            answers = [[None if s["answer"] is None else int(s["answer"]) for s in r["samples"]] for r in records]
            per_problem = [sum(a == 2 for a in row_answers) / 5 for row_answers in answers]
            mean = sum(per_problem) / n
            avg = row(results, model=model, metric="avg@5")
            assert avg["correct"] == sum(a == 2 for row_answers in answers for a in row_answers)
            assert avg["graded"] == 5 * n and avg["accuracy"] == pytest.approx(mean)
            assert avg["se"] == pytest.approx(math.sqrt(sum((p - mean) ** 2 for p in per_problem) / n) / math.sqrt(n))
            assert avg["no_answer_rate"] == pytest.approx(sum(a is None for r in answers for a in r) / (5 * n))
            votes = [_vote(row_answers) for row_answers in answers]
            assert [r["majority"]["answer"] for r in records] == [None if v is None else str(v) for v in votes]
            maj = row(results, model=model, metric="maj@5")
            assert maj["correct"] == sum(v == 2 for v in votes)
            assert maj["no_answer_rate"] == pytest.approx(sum(v is None for v in votes) / n)
            assert maj["se"] == pytest.approx(math.sqrt(maj["accuracy"] * (1 - maj["accuracy"]) / n))


def test_majority_vote():
    assert majority_vote(["5", "5", "3", None]) == (0, 2)
    assert majority_vote(["3", "5"]) == (0, 1)                       # tie: the earliest answer
    assert majority_vote(["7", "3", "5", "5", "3"]) == (1, 2)        # tie between 3 and 5: 3 came first
    assert majority_vote(["2", "0.5", "\\frac{1}{2}", "1/2"]) == (1, 3)  # numeric equality
    assert majority_vote(["x", "x = 5", "5.0", "\\text{5}"]) == (1, 3)  # normalized strings
    assert majority_vote([None, None]) == (None, 0)


def test_majority_with_scripted_answers(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"question": "2+3?", "answer": "5"}])
    sampler = FakeSampler(tokenizer, greedy={"one-0": "no box"},
                          sampled={"one-0": [box(5), box(5), box(3), "no box"]})
    results = run({"m": sampler}, tokenizer, EvalConfig(datasets=str(path), n_samples=4,
                                                       protocols=("math_verify",)), tmp_path)
    assert row(results, metric="maj@4")["correct"] == 1
    avg = row(results, metric="avg@4")
    assert avg["accuracy"] == 0.5 and avg["correct"] == 2 and avg["no_answer_rate"] == 0.25
    assert row(results, metric="pass@1")["no_answer_rate"] == 1.0


def test_killed_run_resumes_without_resampling(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "seven.jsonl", [{"problem": f"Q{i}", "answer": "2"} for i in range(7)])
    config = EvalConfig(datasets=str(path), n_samples=3, problems_per_batch=3)
    clean = run({"m": FakeSampler(tokenizer, default=hashed)}, tokenizer, config, tmp_path / "clean")

    with pytest.raises(Killed):  # the third call is the second batch's greedy one
        run({"m": FakeSampler(tokenizer, default=hashed, fail_on=3)}, tokenizer, config, tmp_path / "killed")
    resumed_sampler = FakeSampler(tokenizer, default=hashed)
    resumed = run({"m": resumed_sampler}, tokenizer, config, tmp_path / "killed")
    asked = [i for _, ids, _, _ in resumed_sampler.calls for i in ids]
    assert sorted(set(asked)) == [f"seven-{i}" for i in range(3, 7)]  # the first batch was not redone
    assert resumed["rows"] == clean["rows"]
    for protocol in ("math_verify", "string_match"):
        assert (outputs_path(tmp_path / "killed", "m", "seven", protocol).read_text()
                == outputs_path(tmp_path / "clean", "m", "seven", protocol).read_text())

    again = FakeSampler(tokenizer, default=hashed)
    run({"m": again}, tokenizer, config, tmp_path / "killed")
    assert again.calls == []
    with pytest.raises(ValueError, match="other settings"):  # stored outputs would not match the config
        run({"m": again}, tokenizer, EvalConfig(datasets=str(path), n_samples=3, temperature=1.0), tmp_path / "killed")


def test_run_with_real_tiny_model(tokenizer, tmp_path):
    from ssb_jax.model.config import ModelConfig
    from ssb_jax.model.qwen2 import init_model
    from ssb_jax.sampling.driver import Sampler

    config = ModelConfig(vocab_size=151936, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    sampler = Sampler(init_model(config, 0), tokenizer, batch_size=4,
                      max_prompt_tokens=256, show_progress=False)
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                 for i in range(3)])
    eval_config = EvalConfig(datasets=str(path), protocols=("math_verify",), n_samples=2, temperature=1.0,
                             top_p=1.0, max_new_tokens=4, seed=3)
    # the same model under two names stands in for base and student (one compile)
    results = run({"base": sampler, "student": sampler}, tokenizer, eval_config, tmp_path / "eval")
    assert results["complete"] and len(results["rows"]) == 2 * 3
    stored = {model: [json.loads(line) for line in
                      outputs_path(tmp_path / "eval", model, "tiny", "math_verify").read_text().splitlines()]
              for model in ("base", "student")}
    assert stored["base"] == stored["student"]
    for record in stored["base"]:
        assert 1 <= record["greedy"]["num_tokens"] <= 4 and len(record["samples"]) == 2
        assert all(isinstance(s["text"], str) for s in record["samples"])
    # samples depend only on (seed, problem id): a direct call reproduces the stored ones
    prompts = [encode_chat(tokenizer, DEFAULT_PROMPTS.student_messages(r["question"])) for r in stored["base"]]
    again = sampler.generate_ids(prompts, SamplingParams(max_new_tokens=4, temperature=1.0,
                                                         stop_ids=tuple(stop_token_ids(tokenizer))),
                                 n=2, seed=3, ids=[r["id"] for r in stored["base"]])
    assert [[c.text for c in cs] for cs in again] == [[s["text"] for s in r["samples"]] for r in stored["base"]]
