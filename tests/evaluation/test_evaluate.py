"""Evaluation: local JSONL fields, protocols, a recount of the table from the saved outputs, majority
vote, resumption, and a run with a real tiny model."""
import collections
import dataclasses
import json
import math
import re
import shutil
import zlib

import pytest

from ssb_jax import fingerprint
from ssb_jax.data.datasets import DataError, load_problems
from ssb_jax.evaluation import EvalConfig, format_markdown, majority_vote, outputs_path, parse_datasets, run
from ssb_jax.fingerprint import StaleOutputsError
from ssb_jax.model.tokenizer import encode_chat, load_tokenizer, stop_token_ids
from ssb_jax.paths import shared_data_path
from ssb_jax.prompts import DEFAULT_PROMPTS
from ssb_jax.sampling.driver import Completion, PromptTooLongError
from ssb_jax.sampling.sampler import SamplingParams
from tests.scripted_sampler import finish_rows


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(shared_data_path("qwen2.5_tokenizer"))


class Killed(RuntimeError):
    pass


class FakeSampler:
    """greedy[id] -> text, sampled[id] -> n texts (unscripted: `default(id, i)`, i = -1 for greedy).
    A text ending in "<cut>" finishes by length. Records every call; raises Killed on call `fail_on`."""

    def __init__(self, tokenizer, greedy=None, sampled=None, default=None, fail_on=None, max_prompt_tokens=None):
        self.tokenizer, self.greedy, self.sampled = tokenizer, dict(greedy or {}), dict(sampled or {})
        if max_prompt_tokens is not None:  # like the Sampler: it has the attribute and refuses longer prompts
            self.max_prompt_tokens = max_prompt_tokens
        self.default = default or (lambda key, i: "I do not know.")
        self.fail_on, self.calls = fail_on, []
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _completion(self, text):
        cut = text.endswith("<cut>")
        return Completion(token_ids=self.tokenizer.encode(text, add_special_tokens=False) + ([] if cut else [self.end]),
                          finish_reason="length" if cut else "stop", text=text)

    def generate_ids(self, prompts, sampling, *, n=1, seed=0, ids=None, on_finish=None):
        self.calls.append(("greedy" if sampling.greedy else "sampled", list(ids), n, sampling.max_new_tokens))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise Killed
        for key, prompt in zip(ids, prompts):
            if len(prompt) > getattr(self, "max_prompt_tokens", math.inf):
                raise PromptTooLongError(f"prompt {key!r} has {len(prompt)} tokens")
        out = []
        for key in ids:
            if sampling.greedy:
                texts = [self.greedy.get(key, self.default(key, -1))]
            else:
                texts = self.sampled.get(key) or [self.default(key, i) for i in range(n)]
            assert len(texts) == n
            out.append([self._completion(t) for t in texts])
        finish_rows(out, ids, on_finish)  # out of input order, as the rollout engine finishes rows
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


def test_local_jsonl_fields_and_every_protocol(tokenizer, tmp_path):
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
    # the fairer grader reads 1/2 as 0.5; neither string grader does
    assert row(results, dataset="alpha", protocol="math_verify", metric="pass@1")["correct"] == 1 + 1
    assert row(results, dataset="alpha", protocol="string_match", metric="pass@1")["correct"] == 1
    assert row(results, dataset="alpha", protocol="string_match", metric="pass@1")["no_answer_rate"] == 1 / 3
    assert row(results, dataset="alpha", protocol="motif", metric="pass@1")["correct"] == 1
    assert row(results, dataset="alpha", protocol="motif", metric="pass@1")["no_answer_rate"] == 1 / 3
    assert row(results, dataset="beta", protocol="math_verify", metric="pass@1")["correct"] == 1
    assert row(results, dataset="beta", protocol="math_verify", metric="avg@2")["accuracy"] == 1.0
    # normalization reads \boxed{4.0} as 4; the MOTIF rule looks for the text \boxed{4}, which is not there
    assert row(results, dataset="beta", protocol="string_match", metric="pass@1")["correct"] == 1
    assert row(results, dataset="beta", protocol="motif", metric="pass@1")["correct"] == 0
    # motif and string_match are greedy only, so they have no sampled rows; each row names its grader
    assert {(r["protocol"], r["metric"]) for r in results["rows"]} == {
        ("math_verify", "pass@1"), ("math_verify", "avg@2"), ("math_verify", "maj@2"), ("motif", "pass@1"),
        ("string_match", "pass@1")}
    assert all(r["grader"] == ("motif:boxed" if r["protocol"] == "motif" else r["protocol"]) for r in results["rows"])
    # all protocols decode greedily with 1024 tokens: one shared greedy generation per batch
    assert [(kind, n, tokens) for kind, _, n, tokens in sampler.calls] == [
        ("greedy", 1, 1024), ("sampled", 2, 1024)] * 2
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert markdown == format_markdown(json.loads((tmp_path / "eval" / "results.json").read_text()))
    assert "**string_match** (grader `string_match`, up to 1024 new tokens): greedy decoding" in markdown
    assert "**motif** (grader `motif`, up to 1024 new tokens): the MOTIF/SSB papers' protocol" in markdown
    assert "| alpha | string_match | pass@1 | base | 1/3 | 33.3 ± 27.2 | 0 | 33.3 | 0.0 |" in markdown


def test_known_dataset_name(tokenizer, tmp_path):
    gold = {p.id: p.answer for p in load_problems("aime24")[:2]}
    results = run({"m": FakeSampler(tokenizer, default=lambda key, i: box(gold[key]))}, tokenizer,
                  EvalConfig(datasets="aime24", max_problems=2, protocols=("string_match",)), tmp_path)
    assert row(results, dataset="aime24", metric="pass@1")["correct"] == 2


def test_motif_grades_each_dataset_by_its_rule(tokenizer, tmp_path):
    """The known aime24 and the local labels motif_contains_gold lists are graded by the bare gold string,
    every other dataset by \\boxed{gold} whatever its label says; the rule is part of each outputs file's
    settings."""
    aime_gold = {p.id: p.answer for p in load_problems("aime24")[:2]}
    rows = [{"problem": "Count them.", "answer": "33"}, {"problem": "Count again.", "answer": "12"}]
    aime25, amc23 = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows)
    aime_x = write_jsonl(tmp_path / "c.jsonl", rows)
    texts = {**{f"{label}-{i}": text for label in ("AIME25", "amc23", "aime_x")
                for i, text in enumerate((r"So 233 it is: \boxed{34}", r"\boxed{12} or maybe \boxed{13}"))},
             **{key: f"The count is 1{gold}, not boxed." for key, gold in aime_gold.items()}}
    sampler = FakeSampler(tokenizer, greedy=texts)
    config = EvalConfig(datasets=f"aime24,AIME25={aime25},amc23={amc23},aime_x={aime_x}", max_problems=2,
                        protocols=("motif", "string_match"), motif_contains_gold="AIME25")
    results = run({"m": sampler}, tokenizer, config, tmp_path / "eval")
    motif = {r["dataset"]: (r["grader"], r["correct"], r["no_answer_rate"])
             for r in results["rows"] if r["protocol"] == "motif"}
    # aime_x is spelt like AIME but not listed: \boxed{gold}, as every dataset not declared AIME-style
    assert motif == {"aime24": ("motif:contains", 2, 0.0), "AIME25": ("motif:contains", 2, 0.0),
                     "amc23": ("motif:boxed", 1, 0.0), "aime_x": ("motif:boxed", 1, 0.0)}
    # the last-box grader disagrees everywhere but on a plain last box
    assert [row(results, dataset=d, protocol="string_match")["correct"] for d in ("aime24", "AIME25", "amc23")] == [0, 0, 0]
    assert row(results, dataset="aime24", protocol="string_match")["no_answer_rate"] == 1.0
    settings = json.loads(outputs_path(tmp_path / "eval", "m", "amc23", "motif").with_name("motif.settings.json")
                          .read_text())
    assert settings["grader"] == "motif:boxed"
    # another rule for a dataset is another evaluation: its stored outputs are stale, named before any generation
    with pytest.raises(StaleOutputsError, match=r"amc23/motif.jsonl .*grader: 'motif:boxed' -> 'motif:contains'"):
        run({"m": FakeSampler(tokenizer)}, tokenizer, dataclasses.replace(config, motif_contains_gold="AIME25,amc23"),
            tmp_path / "eval")
    # the known source decides, not the label: aime24 under another label is still AIME-style
    assert EvalConfig(datasets="x=aime24,math500").motif_rule("x") == "contains"
    assert EvalConfig(datasets="aime24,math500").motif_rule("math500") == "boxed"
    # from a config file or the command line the labels come as one comma-separated string; a label of no
    # dataset (a typo, or a pattern as older versions took) is refused by name
    assert EvalConfig(datasets=f"a={aime25},b={amc23}", motif_contains_gold=" a , b ").motif_contains_gold == ("a", "b")
    with pytest.raises(ValueError, match=r"motif_contains_gold names \['aime\*'\]"):
        EvalConfig(motif_contains_gold="aime*")


class PromptRecorder(FakeSampler):
    """A FakeSampler that keeps each problem's prompt ids."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.prompts = {}

    def generate_ids(self, prompts, sampling, *, n=1, seed=0, ids=None, on_finish=None):
        self.prompts.update(zip(ids, prompts))
        return super().generate_ids(prompts, sampling, n=n, seed=seed, ids=ids, on_finish=on_finish)


def test_evaluation_prompts_per_dataset_leave_the_run_prompts_alone(tokenizer, tmp_path):
    """eval.system_prompt and eval.dataset_system_prompts change what the evaluated models see, per dataset,
    and nothing else: the run's PromptSet is not modified, and each outputs file records its prompts."""
    rows = [{"problem": "What is 2 + 2?", "answer": "4"}]
    a, b, c = (write_jsonl(tmp_path / f"{n}.jsonl", rows) for n in "abc")
    motif_base = ("You are a helpful assistant. In your response, you enclose your final answer in the box: "
                  "\\boxed{}.")  # MOTIF's SYSTEM_PROMPT_base, typed here from its repository
    config = EvalConfig(datasets=f"a={a},b={b},c={c}", protocols=("string_match",), system_prompt="motif_base",
                        dataset_system_prompts="b=chat_default, c=")
    run_prompts = dataclasses.replace(DEFAULT_PROMPTS, student_template="Solve: {question}")
    before = dataclasses.asdict(run_prompts)
    sampler = PromptRecorder(tokenizer, default=lambda key, i: box(4))
    results = run({"m": sampler}, tokenizer, config, tmp_path / "eval", prompts=run_prompts)
    question = "What is 2 + 2?"
    expected = {
        "a-0": [{"role": "system", "content": motif_base}, {"role": "user", "content": question}],
        "b-0": [{"role": "user", "content": question}],   # no system message: the template's default
        "c-0": [{"role": "system", "content": DEFAULT_PROMPTS.system_prompt},
                {"role": "user", "content": f"Solve: {question}"}],   # "c=": the run's own prompts
    }
    for key, messages in expected.items():
        assert sampler.prompts[key] == encode_chat(tokenizer, messages), key
    assert "You are Qwen, created by Alibaba Cloud" in tokenizer.decode(sampler.prompts["b-0"])
    assert dataclasses.asdict(run_prompts) == before
    assert results["system_prompts"] == {"a": motif_base, "b": "", "c": DEFAULT_PROMPTS.system_prompt}
    stored = json.loads(outputs_path(tmp_path / "eval", "m", "a", "string_match")
                        .with_name("string_match.settings.json").read_text())
    assert stored["prompts"]["system_prompt"] == motif_base
    # another evaluation prompt is another evaluation: the stored outputs are stale
    with pytest.raises(StaleOutputsError, match=r"a/string_match.jsonl .*system_prompt"):
        run({"m": sampler}, tokenizer, dataclasses.replace(config, system_prompt=""), tmp_path / "eval",
            prompts=run_prompts)
    # a label of no dataset or an unknown preset is named
    with pytest.raises(ValueError, match="dataset_system_prompts: 'd=motif_base'"):
        dataclasses.replace(config, dataset_system_prompts="d=motif_base")
    with pytest.raises(ValueError, match="dataset_system_prompts: 'a=motif'"):
        dataclasses.replace(config, dataset_system_prompts="a=motif")


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
    assert len(results["rows"]) == 2 * 5

    for model in samplers:
        for protocol in ("math_verify", "motif", "string_match"):
            lines = outputs_path(tmp_path / "eval", model, "numbers", protocol).read_text().splitlines()
            records = [json.loads(line) for line in lines]
            assert len(records) == 11
            greedy = [r["greedy"] for r in records]
            n = len(records)
            got = row(results, model=model, protocol=protocol, metric="pass@1")
            correct = (sum("\\boxed{2}" in g["text"] for g in greedy) if protocol == "motif" else
                       sum(g["answer"] is not None and int(g["answer"]) == 2 for g in greedy))
            assert got["correct"] == correct and got["problems"] == got["graded"] == n
            assert got["accuracy"] == pytest.approx(correct / n)
            assert got["se"] == pytest.approx(math.sqrt(correct / n * (1 - correct / n) / n))
            assert got["no_answer_rate"] == pytest.approx(sum(g["answer"] is None for g in greedy) / n)
            assert got["truncated_rate"] == pytest.approx(sum(g["text"].endswith("<cut>") for g in greedy) / n)
            tokens = [len(tokenizer.encode(g["text"])) + (not g["text"].endswith("<cut>")) for g in greedy]
            assert got["mean_tokens"] == pytest.approx(sum(tokens) / n)
            if protocol != "math_verify":
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
    with pytest.raises(StaleOutputsError, match="sampled.temperature: 0.6 -> 1.0"):  # stored outputs would not match
        run({"m": again}, tokenizer, EvalConfig(datasets=str(path), n_samples=3, temperature=1.0), tmp_path / "killed")


@pytest.mark.e2e  # the evaluation stage with a real (random) model sampling
def test_run_with_real_tiny_model(tokenizer, tmp_path):
    from ssb_jax.model.config import ModelConfig
    from ssb_jax.model.qwen2 import init_model
    from ssb_jax.sampling.driver import Sampler

    config = ModelConfig(vocab_size=151936, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    sampler = Sampler(init_model(config, 0), tokenizer, batch_size=4,
                      max_prompt_tokens=256, show_progress=False)
    # the last prompt is longer than the Sampler takes (it would raise): recorded, not fatal
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                 for i in range(3)] + [{"problem": "long " * 300, "answer": "0"}])
    eval_config = EvalConfig(datasets=str(path), protocols=("math_verify",), n_samples=2, temperature=1.0,
                             top_p=1.0, max_new_tokens=4, seed=3)
    # the same model under two names stands in for base and student (one compile)
    results = run({"base": sampler, "student": sampler}, tokenizer, eval_config, tmp_path / "eval")
    assert results["complete"] and len(results["rows"]) == 2 * 3
    stored = {model: [json.loads(line) for line in
                      outputs_path(tmp_path / "eval", model, "tiny", "math_verify").read_text().splitlines()]
              for model in ("base", "student")}
    assert stored["base"] == stored["student"]
    assert stored["base"][3]["status"] == "prompt_too_long" and stored["base"][3]["prompt_tokens"] > 256
    assert row(results, model="base", metric="pass@1")["prompt_too_long"] == 1
    stored["base"] = stored["base"][:3]
    for record in stored["base"]:
        assert 1 <= record["greedy"]["num_tokens"] <= 4 and len(record["samples"]) == 2
        assert all(isinstance(s["text"], str) for s in record["samples"])
    # samples depend only on (seed, problem id): a direct call reproduces the stored ones
    prompts = [encode_chat(tokenizer, DEFAULT_PROMPTS.student_messages(r["question"])) for r in stored["base"]]
    again = sampler.generate_ids(prompts, SamplingParams(max_new_tokens=4, temperature=1.0,
                                                         stop_ids=tuple(stop_token_ids(tokenizer))),
                                 n=2, seed=3, ids=[r["id"] for r in stored["base"]])
    assert [[c.text for c in cs] for cs in again] == [[s["text"] for s in r["samples"]] for r in stored["base"]]


def read_records(out_dir, model, dataset, protocol):
    return [json.loads(line) for line in outputs_path(out_dir, model, dataset, protocol).read_text().splitlines()]


@pytest.mark.parametrize("seed", [0, 1])
def test_prompt_too_long_is_recorded_counted_and_never_raised(tokenizer, tmp_path, seed):
    import random
    rng = random.Random(seed)
    print(f"seed {seed}")
    # short questions fit in 200 tokens with the chat template; 300 words cannot
    long = {i for i in range(12) if rng.random() < 0.3} | {rng.randrange(12)}
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"problem": ("word " * 300 if i in long else f"Q{i}?"), "answer": "2"} for i in range(12)])
    sampler = FakeSampler(tokenizer, default=lambda key, i: hashed(key, i, seed), max_prompt_tokens=200)
    config = EvalConfig(datasets=str(path), n_samples=3, problems_per_batch=5)
    results = run({"m": sampler}, tokenizer, config, tmp_path / "eval")  # the fake raises on a long prompt
    assert results["complete"]
    asked = {key for _, ids, _, _ in sampler.calls for key in ids}
    assert asked == {f"mixed-{i}" for i in range(12) if i not in long}

    for protocol in ("math_verify", "string_match"):
        records = read_records(tmp_path / "eval", "m", "mixed", protocol)
        assert [r["id"] for r in records] == [f"mixed-{i}" for i in range(12)]
        for i, record in enumerate(records):
            tokens = len(encode_chat(tokenizer, DEFAULT_PROMPTS.student_messages(record["question"])))
            assert record["prompt_tokens"] == tokens
            if i in long:
                assert tokens > 200 and record["status"] == "prompt_too_long" and "greedy" not in record
            else:
                assert tokens <= 200 and record["status"] == "ok" and "greedy" in record
        # independent recount: accuracy over all 12 problems, each long one counted wrong
        generated = [r for i, r in enumerate(records) if i not in long]
        pass1 = row(results, protocol=protocol, metric="pass@1")
        correct = sum(r["greedy"]["answer"] == "2" for r in generated)
        assert (pass1["prompt_too_long"], pass1["problems"], pass1["out_of"]) == (len(long), 12, 12)
        assert pass1["correct"] == correct and pass1["accuracy"] == pytest.approx(correct / 12)
        assert pass1["se"] == pytest.approx(math.sqrt(correct / 12 * (1 - correct / 12) / 12))
        assert pass1["graded"] == 12 - len(long)
        assert pass1["no_answer_rate"] == pytest.approx(
            sum(r["greedy"]["answer"] is None for r in generated) / len(generated))
    avg = row(results, metric="avg@3")
    generated = [r for i, r in enumerate(read_records(tmp_path / "eval", "m", "mixed", "math_verify")) if i not in long]
    per_problem = [sum(s["answer"] == "2" for s in r["samples"]) / 3 for r in generated] + [0.0] * len(long)
    assert avg["accuracy"] == pytest.approx(sum(per_problem) / 12) and avg["out_of"] == 36
    assert avg["prompt_too_long"] == len(long) and avg["graded"] == 3 * len(generated)

    markdown = (tmp_path / "eval" / "results.md").read_text()
    pass1 = row(results, protocol="math_verify", metric="pass@1")
    assert (f"| mixed | math_verify | pass@1 | m | {pass1['correct']}/12 | "
            f"{100 * pass1['accuracy']:.1f} ± {100 * pass1['se']:.1f} | {len(long)} |") in markdown
    assert "counts as wrong" in markdown and "counts as wrong" in results["accuracy_denominator"]
    again = FakeSampler(tokenizer, max_prompt_tokens=200)  # resumed: the long ones count as done
    assert run({"m": again}, tokenizer, config, tmp_path / "eval")["rows"] == results["rows"]
    assert again.calls == []


def test_dataset_specs_labels_and_clashes(tokenizer, tmp_path):
    specs = parse_datasets("amc23=/x/amc23/test.jsonl, aime=/y/test.jsonl,math500,/z/my-set.v2.parquet,m=aime24")
    assert [(s.label, s.source, s.known) for s in specs] == [
        ("amc23", "/x/amc23/test.jsonl", False), ("aime", "/y/test.jsonl", False), ("math500", "math500", True),
        ("my-set.v2", "/z/my-set.v2.parquet", False), ("m", "aime24", True)]
    with pytest.raises(ValueError, match=r"'/x/test.jsonl' and 'test=/y/other.jsonl' are both labelled 'test'"):
        parse_datasets("/x/test.jsonl,test=/y/other.jsonl")
    with pytest.raises(ValueError, match=r"'math500' and 'math500=/p.jsonl' are both labelled 'math500'"):
        EvalConfig(datasets="math500,math500=/p.jsonl")
    with pytest.raises(ValueError, match=r"the label 'my set' of '/x/my set.jsonl' must be letters"):
        parse_datasets("/x/my set.jsonl")
    with pytest.raises(ValueError, match=r"label '../up' .* must be letters"):
        parse_datasets("../up=/x/a.jsonl")
    with pytest.raises(ValueError, match=r"'a=' names no dataset"):
        EvalConfig(datasets="a=")

    # two files with the same stem, told apart by their labels; ids carry the label
    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    first = write_jsonl(tmp_path / "x" / "test.jsonl", [{"problem": "1+1?", "answer": "2"}])
    second = write_jsonl(tmp_path / "y" / "test.jsonl", [{"problem": "2+2?", "answer": "4"}, {"problem": "3+3?", "answer": "6"}])
    sampler = FakeSampler(tokenizer, default=lambda key, i: box({"a-0": 2, "b-0": 4}.get(key, 0)))
    results = run({"m": sampler}, tokenizer, EvalConfig(datasets=f"a={first},b={second}", protocols="string_match"),
                  tmp_path / "eval")
    assert results["datasets"] == {"a": 1, "b": 2}
    assert [r["id"] for r in read_records(tmp_path / "eval", "m", "b", "string_match")] == ["b-0", "b-1"]
    assert row(results, dataset="b")["correct"] == 1


def test_outputs_never_reused_for_another_input(tokenizer, tmp_path):
    for folder in "acd":
        (tmp_path / folder).mkdir()
    rows = [{"problem": f"Q{i}", "answer": "2"} for i in range(3)]
    path = write_jsonl(tmp_path / "a" / "numbers.jsonl", rows)
    other = write_jsonl(tmp_path / "b.jsonl", [{"problem": "Q0", "answer": "2"}])
    config = EvalConfig(datasets=f"{path},{other}", n_samples=2)
    out = tmp_path / "eval"
    run({"m": FakeSampler(tokenizer, default=hashed)}, tokenizer, config, out, model_identities={"m": "ckpt#1"})

    def rerun(config=config, max_prompt_tokens=None, **options):
        sampler = FakeSampler(tokenizer, default=hashed, max_prompt_tokens=max_prompt_tokens)
        try:
            return run({"m": sampler}, tokenizer, config, out, **options)
        except StaleOutputsError:
            assert sampler.calls == []  # every store is checked before any generation
            raise

    # the same content under another path (and the same stem) is the same input: reused
    moved = write_jsonl(tmp_path / "c" / "numbers.jsonl", rows)
    rerun(EvalConfig(datasets=f"{moved},{other}", n_samples=2), model_identities={"m": "ckpt#1"})
    rerun()  # no identity given: that part is not checked

    def stale(pattern, **kwargs):
        with pytest.raises(StaleOutputsError) as error:
            rerun(**kwargs)
        message = str(error.value)
        assert "\n" not in message and re.search(pattern, message), message
        assert "--config.overwrite=eval" in message and "--config.workdir" in message
        return message

    stale(r"outputs \S*/m/numbers/math_verify.jsonl .*model: 'ckpt#1' -> 'ckpt#2'", model_identities={"m": "ckpt#2"})
    stale(r"max_prompt_tokens: None -> 4096", max_prompt_tokens=4096)
    stale(r"dataset.question_field: None -> 'problem'", question_field="problem")
    # a different file with the same stem: its questions must not count as done
    second = write_jsonl(tmp_path / "d" / "b.jsonl", [{"problem": "Other", "answer": "2"}])
    message = stale(r"outputs \S*/m/b/\S*\.jsonl were made from other settings or inputs \(dataset.content: 'file#",
                    config=EvalConfig(datasets=f"{path},{second}", n_samples=2))
    assert fingerprint.file_digest(second) in message and fingerprint.file_digest(other) in message
    # outputs whose settings file is gone cannot be trusted
    outputs_path(out, "m", "numbers", "string_match").with_name("string_match.settings.json").unlink()
    stale(r"outputs \S*/m/numbers/string_match.jsonl .*string_match.settings.json is missing")
    # what --config.overwrite=eval does (main deletes the directory): a fresh start
    shutil.rmtree(out)
    assert rerun(config=EvalConfig(datasets=f"{path},{second}", n_samples=2))["complete"]


def test_data_settings_bad_lines_and_field_names(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "custom.jsonl", [{"q": "1+1?", "gold": "2"}, {"q": "2+2?", "gold": "4"}])
    with path.open("a") as handle:
        handle.write("{broken\n")
    gold = {p.id: p.answer for p in load_problems("aime24")[:1]}
    sampler = FakeSampler(tokenizer, default=lambda key, i: box(gold.get(key, 2)))
    config = EvalConfig(datasets=f"aime24,{path}", protocols="string_match", max_problems=2)
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        run({"m": sampler}, tokenizer, config, tmp_path / "eval", question_field="q", answer_field="gold")
    with pytest.raises(DataError, match=rf"{path}:1: missing field 'problem'"):
        run({"m": sampler}, tokenizer, config, tmp_path / "eval", on_bad_line="skip", question_field="problem")
    # the field names apply to local files; the known dataset keeps its own
    results = run({"m": sampler}, tokenizer, dataclasses.replace(config, max_problems=1), tmp_path / "eval",
                  on_bad_line="skip", question_field="q", answer_field="gold")
    assert results["datasets"] == {"aime24": 1, "custom": 1}
    assert results["dataset_inputs"]["custom"]["skipped_records"] == 1
    assert results["dataset_inputs"]["custom"]["question_field"] == "q"
    assert results["dataset_inputs"]["aime24"]["question_field"] is None
    assert row(results, dataset="aime24")["correct"] == 1 and row(results, dataset="custom")["correct"] == 1
    assert read_records(tmp_path / "eval", "m", "custom", "string_match")[0]["question"] == "1+1?"
