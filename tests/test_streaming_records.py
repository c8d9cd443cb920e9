"""Curation and evaluation append each record as soon as the rows it needs have finished (issue 21 item 4):
a kill inside a sampler call leaves exactly the finished items' records, a resume writes the rest and ends
with the records of an uninterrupted run, and the rollout engine and the static Sampler give the same
records. Scripted samplers finish rows out of input order; a tiny random model over Qwen2.5's vocabulary
runs both real samplers, its texts steered (a box with the gold answer appended) so that questions are
mixed and teacher solutions kept or failed."""
import collections
import zlib

import pytest

from ssb_jax.curate import CurationConfig, question_order
from ssb_jax.curate import run as curate
from ssb_jax.data.datasets import Problem
from ssb_jax.data.records import RecordStore
from ssb_jax.evaluation import EvalConfig, outputs_path
from ssb_jax.evaluation import run as evaluate
from ssb_jax.evaluation.protocols import PROTOCOLS
from ssb_jax.model.tokenizer import load_tokenizer
from ssb_jax.paths import shared_data_path
from tests.scripted_sampler import Killed, KilledAfterRows, ScriptedSampler, hashed_answers

MIXED = ("kept", "teacher_failed")  # the verdicts of questions whose record waits for a teacher solution


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(shared_data_path("qwen2.5_tokenizer"))


def stored(path):
    return {r["id"]: r for r in RecordStore(path).read_all()} if path.exists() else {}


def finished_questions(log, clean, config: CurationConfig):
    """The questions whose record could be written from the rows in `log`: K rollouts finished and, for a
    mixed question (by the uninterrupted run's verdict), its teacher solution."""
    rollouts = {}
    solved = {key for key, _, sampling in log if sampling.temperature == config.solution_temperature}
    for key, _, sampling in log:
        if sampling.temperature == config.rollout_temperature:
            rollouts[key] = rollouts.get(key, 0) + 1
    return {key for key, count in rollouts.items()
            if count == config.num_rollouts and (clean[key]["verdict"] not in MIXED or key in solved)}


def check_curation_kill_and_resume(make_sampler, problems, config, kill_after, tmp_path, tokenizer, rewrite=None):
    """Curate uninterrupted; curate again killed after `kill_after` rows: exactly the finished questions'
    records, each as the uninterrupted run wrote it; resume: the uninterrupted run's file, byte for byte.
    Returns the uninterrupted run's records."""
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    curate(problems, KilledAfterRows(make_sampler(), rewrite=rewrite), tokenizer, config, clean_dir)
    clean = stored(clean_dir / "records.jsonl")
    killed = KilledAfterRows(make_sampler(), rows=kill_after, rewrite=rewrite)
    with pytest.raises(Killed):
        curate(problems, killed, tokenizer, config, killed_dir)
    partial = stored(killed_dir / "records.jsonl")
    assert set(partial) == finished_questions(killed.finished, clean, config)
    assert 0 < len(partial) < len(clean), "the kill should land with some questions done and some in flight"
    assert all(partial[key] == clean[key] for key in partial)
    resumed = KilledAfterRows(make_sampler(), rewrite=rewrite)
    curate(problems, resumed, tokenizer, config, killed_dir)
    assert not {key for key, _, _ in resumed.finished} & set(partial)  # finished questions are not redone
    assert (killed_dir / "records.jsonl").read_bytes() == (clean_dir / "records.jsonl").read_bytes()
    return clean


@pytest.mark.parametrize("kill_after", [19, 26])  # 24 rollouts, then the teacher solutions
def test_curation_records_stream_and_resume_with_a_scripted_sampler(tokenizer, tmp_path, kill_after):
    problems = [Problem(id=f"q{i}", question=f"What is {i}+{i}?", answer=str(2 * i), source="t") for i in range(8)]
    default = hashed_answers({p.id: p.answer for p in problems})
    config = CurationConfig(shuffle=False, target_pairs=0, num_rollouts=3)
    clean = check_curation_kill_and_resume(lambda: ScriptedSampler(tokenizer, default=default), problems, config,
                                           kill_after, tmp_path, tokenizer)
    assert {r["verdict"] for r in clean.values()} >= {"kept", "all_wrong"}  # both kinds of record are tested


TWO_PROCESS_CONFIG = CurationConfig(target_pairs=5, questions_per_batch=3, seed=2, num_rollouts=3)


def two_process_problems():
    return [Problem(id=f"q{i}", question=f"What is {i}+{i}?", answer=str(2 * i), source="t") for i in range(24)]


@pytest.mark.slow  # two JAX processes start and meet through the coordination service
def test_two_curation_processes_stream_into_their_shards_and_match_one(tokenizer, tmp_path):
    """Each process appends its questions' records to its own shard as they finish (out of order), the
    processes sum their kept pairs per wave, and the folded store is the one-process run's wherever both
    looked (waves are questions_per_batch x processes, so two processes may look at more questions)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from ssb_jax.curate import kept_pairs
    problems = two_process_problems()
    default = hashed_answers({p.id: p.answer for p in problems})
    curate(problems, ScriptedSampler(tokenizer, default=default), tokenizer, TWO_PROCESS_CONFIG, tmp_path / "one")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(repo / "tests/curate_processes_worker.py"), str(tmp_path / "two"),
                               str(port), str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert not list((tmp_path / "two").glob("*.process-*"))  # the shards were folded in
    one, two = RecordStore(tmp_path / "one" / "records.jsonl").read_all(), \
        RecordStore(tmp_path / "two" / "records.jsonl").read_all()
    by_id = {r["id"]: r for r in two}
    assert all(by_id[r["id"]] == r for r in one if r["id"] in by_id) and len(by_id) >= len(one)
    order = [p.id for p in question_order(problems, TWO_PROCESS_CONFIG)]
    assert [r["id"] for r in two] == [i for i in order if i in by_id]  # folded into question order
    assert kept_pairs(two, TWO_PROCESS_CONFIG.target_pairs) == kept_pairs(one, TWO_PROCESS_CONFIG.target_pairs)
    assert len(kept_pairs(one)) >= TWO_PROCESS_CONFIG.target_pairs


def finished_problems(log, config: EvalConfig):
    """{protocol: the problems whose record could be written from the rows in `log`}: its greedy row (at the
    protocol's token budget) and, for a sampled protocol, its n samples."""
    finished = {}
    for protocol in config.protocols:
        budget = PROTOCOLS[protocol].max_new_tokens or config.max_new_tokens
        greedy = {key for key, _, sampling in log if sampling.greedy and sampling.max_new_tokens == budget}
        if not PROTOCOLS[protocol].sampled:
            finished[protocol] = greedy
            continue
        samples = collections.Counter(key for key, _, sampling in log if not sampling.greedy)
        finished[protocol] = {key for key in greedy if samples[key] == config.n_samples}
    return finished


def check_evaluation_kill_and_resume(make_sampler, path, config, kill_after, tmp_path, tokenizer):
    """Evaluate uninterrupted; again killed after `kill_after` rows: exactly the finished problems' records per
    protocol, each as the uninterrupted run wrote it; resume: the uninterrupted run's files, byte for byte."""
    dataset = path.stem
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    clean_results = evaluate({"m": make_sampler()}, tokenizer, config, clean_dir)
    killed = KilledAfterRows(make_sampler(), rows=kill_after)
    with pytest.raises(Killed):
        evaluate({"m": killed}, tokenizer, config, killed_dir)
    expected = finished_problems(killed.finished, config)
    for protocol in config.protocols:
        partial = stored(outputs_path(killed_dir, "m", dataset, protocol))
        clean = stored(outputs_path(clean_dir, "m", dataset, protocol))
        assert set(partial) == expected[protocol], protocol
        assert all(partial[key] == clean[key] for key in partial)
    assert any(stored(outputs_path(killed_dir, "m", dataset, p)) for p in config.protocols), "nothing was streamed"
    resumed = KilledAfterRows(make_sampler())
    assert evaluate({"m": resumed}, tokenizer, config, killed_dir)["rows"] == clean_results["rows"]
    done_before = set.intersection(*expected.values())
    assert not {key for key, _, _ in resumed.finished} & done_before  # finished problems are not redone
    for protocol in config.protocols:
        assert (outputs_path(killed_dir, "m", dataset, protocol).read_bytes()
                == outputs_path(clean_dir, "m", dataset, protocol).read_bytes())
    return {protocol: stored(outputs_path(clean_dir, "m", dataset, protocol)) for protocol in config.protocols}


def write_problems(path, count):
    path.write_text("".join(f'{{"problem": "What is {i} + {i}?", "answer": "{2 * i}"}}\n' for i in range(count)))
    return path


@pytest.mark.parametrize("kill_after", [4, 15])  # inside the greedy call; inside the sampled one
def test_evaluation_records_stream_and_resume_with_a_scripted_sampler(tokenizer, tmp_path, kill_after):
    from tests.evaluation.test_evaluate import FakeSampler, hashed
    path = write_problems(tmp_path / "sums.jsonl", 7)
    config = EvalConfig(datasets=str(path), protocols=("math_verify", "string_match"), n_samples=3)
    check_evaluation_kill_and_resume(lambda: FakeSampler(tokenizer, default=hashed), path, config, kill_after,
                                     tmp_path, tokenizer)


# ----------------------------------------------------------------------------- both real samplers

@pytest.fixture(scope="module")
def samplers(tokenizer, seed):
    """{"engine": the rollout engine, "static": the static Sampler} of one tiny random model over Qwen2.5's
    vocabulary (prompts are chat-template ids); each made once per module, so the tests share compiled
    programs."""
    from ssb_jax.distill.synthetic import tiny_model_config
    from ssb_jax.engine.engine import Engine
    from ssb_jax.model.qwen2 import init_model
    from ssb_jax.sampling.driver import Sampler
    model = init_model(tiny_model_config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=2, num_kv_heads=1), seed, std=0.3)
    return {"engine": Engine(model, tokenizer, slots=4, page_size=16, max_prompt_tokens=512, steps_per_call=4,
                             prefill_chunk=64),
            "static": Sampler(model, tokenizer, batch_size=4, max_prompt_tokens=512, show_progress=False)}


def steer(gold, config: CurationConfig):
    """Rewrites finished rows by (id, sample) only: rollout 0 of two questions in three gets the right box (a
    mixed group: the random rest has no answer); the teacher solution of every other question gets it too
    and counts as stopped (kept), the others stay as sampled (teacher_failed)."""
    def rewrite(key, sample, sampling, completion):
        h = zlib.crc32(key.encode())
        rollout = sampling.temperature == config.rollout_temperature
        if (rollout and sample == 0 and h % 3) or (not rollout and h % 2):
            completion.text = f"{completion.text} \\boxed{{{gold[key]}}}"
            completion.finish_reason = "stop"
    return rewrite


@pytest.mark.e2e  # curation with a real (random) model sampling
@pytest.mark.slow  # ~35 s: the engine's and the Sampler's programs compiled
@pytest.mark.parametrize("kind,kill_after", [("engine", 7), ("engine", 15), ("static", 9)])
def test_curation_streams_the_same_records_with_either_sampler(tokenizer, samplers, tmp_path, kind, kill_after):
    problems = [Problem(id=f"q{i}", question=f"What is {i}+{i}?", answer=str(2 * i), source="t") for i in range(6)]
    config = CurationConfig(shuffle=False, target_pairs=0, num_rollouts=2, rollout_max_new_tokens=6,
                            solution_max_new_tokens=6, seed=3)
    rewrite = steer({p.id: p.answer for p in problems}, config)
    clean = check_curation_kill_and_resume(lambda: samplers[kind], problems, config, kill_after, tmp_path, tokenizer,
                                           rewrite)
    assert {r["verdict"] for r in clean.values()} == {"kept", "teacher_failed", "all_wrong"}
    other = "static" if kind == "engine" else "engine"
    curate(problems, KilledAfterRows(samplers[other], rewrite=rewrite), tokenizer, config, tmp_path / other)
    assert (tmp_path / other / "records.jsonl").read_bytes() == (tmp_path / "clean" / "records.jsonl").read_bytes()


@pytest.mark.e2e  # evaluation with a real (random) model sampling
@pytest.mark.slow  # ~35 s: the engine's and the Sampler's programs compiled
@pytest.mark.parametrize("kind,kill_after", [("engine", 8), ("engine", 12), ("static", 9)])  # 5 greedy rows, then 10
def test_evaluation_streams_the_same_records_with_either_sampler(tokenizer, samplers, tmp_path, kind, kill_after):
    path = write_problems(tmp_path / "sums.jsonl", 5)
    # math_verify alone: the greedy-only protocols decode 1024 tokens (the scripted test above covers them)
    config = EvalConfig(datasets=str(path), protocols=("math_verify",), n_samples=2, temperature=1.0, top_p=1.0,
                        max_new_tokens=5, seed=3)
    clean = check_evaluation_kill_and_resume(lambda: samplers[kind], path, config, kill_after, tmp_path, tokenizer)
    other = "static" if kind == "engine" else "engine"
    evaluate({"m": samplers[other]}, tokenizer, config, tmp_path / other)
    assert {protocol: stored(outputs_path(tmp_path / other, "m", "sums", protocol))
            for protocol in config.protocols} == clean
