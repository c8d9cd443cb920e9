"""The whole pipeline on a reduced tiny config: every artifact, skip on rerun, resume after a kill."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_runs import REDUCED, check, copy_world, kill_after_steps, pipeline, pipeline_in_process

REPO = Path(__file__).resolve().parents[2]

# Every test runs the CLI: in a subprocess where it kills the run or starts several processes, else in-process;
# those that need the finished run are slow.
pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, toy_world):
    workdir = tmp_path_factory.mktemp("run")
    copy_world(toy_world, workdir)  # the run's world config: its build is skipped
    log = check(pipeline(workdir))
    return workdir, log


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_every_artifact_is_produced(finished_run):
    workdir, _ = finished_run
    for relative in ["config.json", "world/train.jsonl", "world/model/config.json", "round_1/curate/records.jsonl",
                     "round_1/curate/curation_summary.json", "round_1/train/DONE.json", "round_1/train/metrics.jsonl",
                     "round_1/train/training.png", "eval/results.json", "eval/results.md",
                     "export/peft_adapter/adapter_config.json", "export/peft_adapter/adapter_model.safetensors",
                     "export/merged/config.json", "export/merged/model.safetensors", "report.md"]:
        assert (workdir / relative).exists(), relative
    summary = json.loads((workdir / "round_1/curate/curation_summary.json").read_text())
    assert summary["verdicts"]["kept"] >= 1
    results = json.loads((workdir / "eval/results.json").read_text())
    models = {row["model"] for row in results["rows"]}
    assert models == {"base", "student"}
    report = (workdir / "report.md").read_text()
    assert "Curation" in report and "Training" in report and "Evaluation" in report


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_second_run_skips_finished_stages(finished_run):
    workdir, _ = finished_run
    before = (workdir / "round_1/curate/records.jsonl").read_bytes()
    log = check(pipeline_in_process(workdir))
    for stage in ("toy world", "curate: complete, skipped", "train: complete, skipped", "export: complete, skipped"):
        assert stage in log, stage
    assert "distill" not in log.split("train: complete")[1][:200]
    assert (workdir / "round_1/curate/records.jsonl").read_bytes() == before


def test_typo_in_override_is_named(tmp_path):
    result = pipeline_in_process(tmp_path, "--config.train.learnig_rate=1e-3")
    assert result.returncode != 0
    assert "config.train has no key 'learnig_rate'; did you mean config.train.learning_rate?" in result.stderr


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_killed_during_training_resumes(finished_run, tmp_path):
    import shutil
    workdir = tmp_path / "run"
    # reuse the finished world and curation, redo training from scratch
    shutil.copytree(finished_run[0] / "world", workdir / "world")
    shutil.copytree(finished_run[0] / "round_1" / "curate", workdir / "round_1" / "curate")
    metrics = workdir / "round_1" / "train" / "metrics.jsonl"
    proc = pipeline(workdir, "--config.stages=train", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_steps(proc, metrics, 3, 600, "training")
    log = check(pipeline(workdir, "--config.stages=train"))
    assert "resumed from step" in log
    from ssb_jax.curves import read_curve
    from ssb_jax.training.metrics import read_metrics
    steps = [record["step"] for record in read_metrics(metrics.parent)]
    assert steps == list(range(1, len(steps) + 1))  # no step twice, none missing
    done = json.loads((workdir / "round_1/train/DONE.json").read_text())
    assert done["steps"] == len(steps)
    reference = [record["loss"] for record in read_metrics(finished_run[0] / "round_1/train")]
    resumed = [record["loss"] for record in read_metrics(metrics.parent)]
    assert resumed == pytest.approx(reference, rel=1e-5)
    # learning-curve points: none lost, none repeated
    curve, reference_curve = read_curve(metrics), read_curve(finished_run[0] / "round_1/train/metrics.jsonl")
    assert [p["step"] for p in curve] == [p["step"] for p in reference_curve] and len(curve) >= 2


def _as_overrides(flags):
    """--config.a.b=v flags -> {"a.b": typed value} for the notebook's OVERRIDES."""
    import ast
    out = {}
    for flag in flags:
        key, value = flag[len("--config."):].split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_sft_stage_beside_ssb_with_learning_curves(finished_run, tmp_path):
    """The sft stage on the finished run's world and pairs: its own adapters and fingerprint, the CE alone
    as its loss, learning-curve points at the configured cadence from the same base, evaluated as 'sft'."""
    import shutil
    from ssb_jax import curate
    from ssb_jax.curves import read_curve
    from ssb_jax.data.records import RecordStore
    from ssb_jax.model.config import ModelConfig
    from ssb_jax.distill.train import load_lora
    from ssb_jax.training.metrics import read_metrics
    import jax
    import jax.numpy as jnp

    source, workdir = finished_run[0], tmp_path / "run"
    for part in ("world", "round_1/curate", "round_1/train", "eval"):  # only sft and its evaluation are new
        shutil.copytree(source / part, workdir / part)
    log = check(pipeline_in_process(workdir, "--config.stages=sft,eval,report"))
    rdir = workdir / "round_1"
    assert (rdir / "sft" / "DONE.json").exists() and "learning curve sft" in log
    ssb_fp, sft_fp = (json.loads((rdir / d / "FINGERPRINT.json").read_text()) for d in ("train", "sft"))
    assert ssb_fp != sft_fp
    model_config = ModelConfig.from_json(workdir / "world" / "model" / "config.json")
    ssb_lora, _ = load_lora(rdir / "train", model_config)
    sft_lora, _ = load_lora(rdir / "sft", model_config)
    gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ssb_lora, sft_lora))
    assert max(gaps) > 1e-4
    for record in read_metrics(rdir / "sft"):  # SFT trains on the CE alone
        assert record["loss"] == pytest.approx(record["ce"], rel=1e-6)
    for record in read_metrics(rdir / "train"):
        assert record["loss"] == pytest.approx(4.0 * record["kl"], rel=1e-5)  # T = 2, no CE
    tokens = curate.sampled_tokens(RecordStore(rdir / "curate" / curate.RECORDS_FILE).read_all())["total"]
    total = len(read_metrics(rdir / "sft"))
    every = json.loads((workdir / "config.json").read_text())["curves"]["eval_every"]
    curves = {d: read_curve(rdir / d / "metrics.jsonl") for d in ("train", "sft")}
    for d, points in curves.items():
        assert [p["step"] for p in points] == sorted({*range(0, total, every), total}), d
        assert {p["sampled_tokens"] for p in points} == {tokens} and tokens > 0
    assert curves["train"][0]["method"] == "ssb" and curves["sft"][0]["method"] == "sft"
    # step 0: both are the base (fresh adapters have B = 0), on the same problems
    assert {k: curves["train"][0][k] for k in ("accuracy", "mean_tokens", "problems")} == \
        {k: curves["sft"][0][k] for k in ("accuracy", "mean_tokens", "problems")}
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert {row["model"] for row in results["rows"]} == {"base", "student", "sft"}
    report = (workdir / "report.md").read_text()
    assert "SFT baseline" in report and "Learning curves" in report
    assert (rdir / "learning_curves.png").exists() and not (rdir / "sft" / "curves.png").exists()  # one figure


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_notebook_runs_top_to_bottom(finished_run, tmp_path):
    """CI executes notebooks/ssb_colab.ipynb on the (reduced) tiny config, so it cannot rot."""
    import shutil

    import nbformat
    from nbclient import NotebookClient
    workdir = tmp_path / "nb_run"
    shutil.copytree(finished_run[0] / "world", workdir / "world")  # same world config: its build is skipped
    nb = nbformat.read(REPO / "notebooks" / "ssb_colab.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += (f"\nCONFIG = 'configs/tiny.py'\nWORKDIR = {str(workdir)!r}\n"
                      f"OVERRIDES = {_as_overrides(REDUCED)!r}")  # the other settings as a user finds them
    env_backup = dict(os.environ)
    os.environ.update({"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    outputs = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                      for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "kept" in outputs and "peft_adapter" in outputs and "CpuDevice" in outputs  # jax.devices() printed
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert (workdir / "report.md").exists()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_two_processes_match_one(finished_run, tmp_path):
    """Two JAX processes on localhost (gloo collectives, one CPU device each) run curation, training
    and evaluation; the merged records, the trained LoRA and the base model's evaluation outputs
    equal the single-process run's."""
    import shutil

    import numpy as np

    from ssb_jax.curate import kept_pairs
    from ssb_jax.data.records import RecordStore
    reference = finished_run[0]
    workdir = tmp_path / "two"
    shutil.copytree(reference / "world", workdir / "world")  # same world config: its build is skipped
    logs = _two_processes(workdir)
    assert "process 1 of 2" in logs[1]

    curated = {r["id"]: r for r in RecordStore(workdir / "round_1/curate/records.jsonl").read_all()}
    single = RecordStore(reference / "round_1/curate/records.jsonl").read_all()
    assert not list((workdir / "round_1/curate").glob("*.process-*"))  # shards folded in
    assert len(set(curated)) == len(curated)
    for record in single:  # every question both runs looked at came out the same
        if record["id"] in curated:
            assert curated[record["id"]] == record, record["id"]
    merged = list(curated.values())
    assert kept_pairs(merged, 16) == kept_pairs(single, 16)

    from ssb_jax.distill import train
    from ssb_jax.model.config import ModelConfig
    model_config = ModelConfig.from_hf_dict(json.loads((reference / "world/model/config.json").read_text()))
    ours, _ = train.load_lora(workdir / "round_1/train", model_config)
    theirs, _ = train.load_lora(reference / "round_1/train", model_config)
    for a, b in zip(jax_leaves(ours), jax_leaves(theirs)):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-7  # measured: ~1e-6 (gloo sums)
    assert (workdir / "round_1/train/metrics.jsonl").read_text().count("\n") == \
        (reference / "round_1/train/metrics.jsonl").read_text().count("\n")

    for protocol_file in (reference / "eval/outputs/base").rglob("*.jsonl"):
        relative = protocol_file.relative_to(reference)
        assert RecordStore(workdir / relative).read_all() == RecordStore(protocol_file).read_all(), relative
    assert not list((workdir / "eval/outputs").rglob("*.process-*"))
    for relative in ("eval/results.json", "export/peft_adapter/adapter_model.safetensors", "report.md"):
        assert (workdir / relative).exists(), relative

    # the cached-teacher stage: each process writes its part, the index joins them
    _two_processes(workdir, "--config.stages=teacher_cache", "--config.train.teacher_mode=cached")
    import ssb_jax
    from ssb_jax.distill.teacher_cache import TeacherCache, build_teacher_cache
    tc = json.loads((workdir / "config.json").read_text())["train"]
    _, params = ssb_jax.load_model(str(workdir / "world/model"))
    pairs = kept_pairs(merged, 16)
    build_teacher_cache(params, model_config, pairs, tmp_path / "single_cache", k=tc["topk"],
                        temperature=tc["temperature"], batch_size=tc["batch_size"], chunk=tc["logits_chunk"])
    two, one = TeacherCache(workdir / "round_1/teacher_cache"), TeacherCache(tmp_path / "single_cache")
    assert len(two) == len(one) == len(pairs)
    assert len(list((workdir / "round_1/teacher_cache").glob("shard_p1of2_*"))) >= 1
    for record in pairs:
        ours, theirs = two(record["id"]), one(record["id"])
        for key in ("logprobs", "tail_logprob", "target_logprob"):  # top-k log-probs are sorted: ties agree too
            np.testing.assert_allclose(getattr(ours, key), getattr(theirs, key), rtol=1e-5, atol=1e-5, err_msg=key)
        # the same top-k ids per token; two ids of equal log-prob may come in either order
        np.testing.assert_array_equal(np.sort(ours.ids, axis=-1), np.sort(theirs.ids, axis=-1))


def _two_processes(workdir, *extra, expect_success=True):
    """Run the pipeline as two JAX processes on localhost; returns their logs. workdir may be a
    pair (one directory per process)."""
    port = _free_port()
    workdirs = workdir if isinstance(workdir, tuple) else (workdir, workdir)
    procs = [pipeline(workdirs[i], f"--config.distributed.coordinator_address=localhost:{port}",
                      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", *extra,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    if expect_success:
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-6000:]
    return logs


def test_two_processes_refuse_a_run_directory_they_do_not_share(tmp_path):
    for mine, other in ((0, 1), (1, 0)):  # marks an earlier run left behind must not count
        (tmp_path / f"host{mine}" / ".processes").mkdir(parents=True)
        (tmp_path / f"host{mine}" / ".processes" / str(other)).write_text("an old run's token")
    logs = _two_processes((tmp_path / "host0", tmp_path / "host1"), expect_success=False)
    for i, log in enumerate(logs):
        assert "is not shared by all processes" in log, log[-3000:]
        assert f"does not see the marks of processes [{1 - i}]" in log


def jax_leaves(tree):
    import jax
    import numpy as np
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_second_round_starts_from_the_first_rounds_student(finished_run, tmp_path):
    """num_rounds=2: round 2 curates and trains on top of round 1's merged student, with fresh
    rollouts; the exported model is base + round 1's LoRA + round 2's LoRA."""
    import shutil

    import numpy as np

    import ssb_jax
    from ssb_jax.distill import train
    from ssb_jax.data.records import RecordStore
    reference = finished_run[0]
    workdir = tmp_path / "rounds"
    shutil.copytree(reference / "world", workdir / "world")
    shutil.copytree(reference / "round_1", workdir / "round_1")  # round 1 is complete: only round 2 runs
    log = check(pipeline_in_process(workdir, "--config.num_rounds=2", "--config.stages=curate,train,export"))
    assert "round 1 curate: complete, skipped" in log and "round 1 train: complete, skipped" in log
    for relative in ("round_2/curate/records.jsonl", "round_2/train/DONE.json", "export/merged/model.safetensors"):
        assert (workdir / relative).exists(), relative
    first = {r["id"]: r for r in RecordStore(workdir / "round_1/curate/records.jsonl").read_all()}
    second = RecordStore(workdir / "round_2/curate/records.jsonl").read_all()
    shared = [r for r in second if r["id"] in first]
    assert shared and any(r["rollouts"] != first[r["id"]]["rollouts"] for r in shared)  # fresh rollouts

    config, base = ssb_jax.load_model(str(workdir / "world/model"))
    _, merged = ssb_jax.load_model(str(workdir / "export/merged"))
    from flax import nnx

    from ssb_jax.model.lora import adapter_factors

    def kernels(model):
        return {p[-2]: np.asarray(m[...], np.float64) for p, m in nnx.iter_graph(model)
                if isinstance(m, nnx.Param) and p[-1] == "kernel" and p[0] == "layers"}

    expected = kernels(base)
    assert len(expected) == 7
    for r in (1, 2):
        lora, lora_config = train.load_lora(workdir / f"round_{r}/train", config)
        for t, (a, b) in adapter_factors(lora).items():
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            expected[t] = expected[t] + lora_config.scale_of(t) * np.einsum("lir,lro->lio", a, b)
    merged_kernels = kernels(merged)
    for t, kernel in expected.items():
        np.testing.assert_allclose(merged_kernels[t], kernel, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # one process arrives 40 s late on purpose
def test_processes_meet_after_uneven_work():
    """Barriers and sums go through the coordination service, so one process may arrive long after
    the other (gloo collectives give up after 30 s)."""
    port, late = _free_port(), 40
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests/distributed_worker.py"), str(port), str(i), str(late)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, log[-3000:]
        assert f"process {i}: waited" in log and "sums 30 1" in log, log[-3000:]
    waited = float(logs[0].split("waited ")[1].split("s,")[0])
    assert waited >= late - 5  # process 0 really waited at the barrier


def _error_line(result):
    """The run failed with one line on stderr and no traceback; returns that line."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    return result.stderr.strip().splitlines()[-1]


def _copy_run(reference, workdir, *parts):
    import shutil
    for part in parts:
        shutil.copytree(reference / part, workdir / part)
    for name in ("config.json",):
        shutil.copy(reference / name, workdir / name)


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_changed_training_setting_stops_then_overwrite_redoes_it(finished_run, tmp_path):
    reference = finished_run[0]
    workdir = tmp_path / "changed"
    _copy_run(reference, workdir, "world", "round_1")
    line = _error_line(pipeline_in_process(workdir, "--config.stages=train", "--config.train.learning_rate=1e-3"))
    assert line.startswith("error: train: the outputs in ") and "settings.learning_rate: 0.0002 -> 0.001" in line
    assert "--config.overwrite=train" in line
    done_before = (workdir / "round_1/train/DONE.json").read_text()
    assert done_before == (reference / "round_1/train/DONE.json").read_text()  # nothing redone or deleted

    log = check(pipeline_in_process(workdir, "--config.stages=train", "--config.train.learning_rate=1e-3",
                                    "--config.train.epochs=1", "--config.overwrite=train"))
    assert "deleting the outputs" in log and "round 1 curate" not in log
    steps = json.loads((workdir / "round_1/train/DONE.json").read_text())["steps"]
    assert steps < json.loads(done_before)["steps"]  # retrained with one epoch instead of two
    # without --config.overwrite the same settings reuse what it just made (with it, it is redone again)
    log = check(pipeline(workdir, "--config.stages=train", "--config.train.learning_rate=1e-3",
                          "--config.train.epochs=1"))
    assert "train: complete, skipped" in log and "deleting" not in log


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_changed_training_file_stops_curation(finished_run, tmp_path):
    workdir = tmp_path / "edited"
    _copy_run(finished_run[0], workdir, "world", "round_1")
    train_file = workdir / "world" / "train.jsonl"
    lines = train_file.read_text().splitlines(keepends=True)
    train_file.write_text("".join(lines[1:]))  # same file name, other questions
    line = _error_line(pipeline_in_process(workdir, "--config.stages=curate"))
    assert line.startswith("error: curate: the outputs in ") and "data.train:" in line
    assert "--config.overwrite=curate" in line


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_given_paths_are_used_and_recorded(finished_run, tmp_path):
    """With configs/tiny.py, paths the user gives take effect: the world is neither built nor used."""
    world = finished_run[0] / "world"
    workdir = tmp_path / "given"
    given = {"model.path": str(world / "model"), "data.train": str(world / "train.jsonl"),
             "eval.datasets": f"held_out={world / 'test.jsonl'}"}
    log = check(pipeline_in_process(workdir, "--config.stages=report",
                                    *(f"--config.{k}={v}" for k, v in given.items())))
    assert "toy world: not built" in log
    assert not (workdir / "world").exists()
    recorded = json.loads((workdir / "config.json").read_text())
    for key, value in given.items():
        section, name = key.split(".")
        assert recorded[section][name] == value


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_world_fills_only_what_is_missing_and_config_json_records_it(finished_run):
    recorded = json.loads((finished_run[0] / "config.json").read_text())
    world = finished_run[0] / "world"
    assert recorded["model"]["path"] == str(world / "model")
    assert recorded["data"]["train"] == str(world / "train.jsonl")
    assert recorded["eval"]["datasets"] == f"world_test={world / 'test.jsonl'}"


@pytest.mark.slow  # needs finished_run, the whole pipeline
def test_curation_short_of_its_minimum_says_so_and_exits_3(finished_run, tmp_path):
    workdir = tmp_path / "short"
    _copy_run(finished_run[0], workdir, "world", "round_1")
    result = pipeline_in_process(workdir, "--config.stages=curate,report", "--config.curate.min_pairs=1000")
    assert result.returncode == 3, result.stderr[-3000:]
    kept = json.loads((workdir / "round_1/curate/curation_summary.json").read_text())["verdicts"]["kept"]
    line = result.stderr.strip().splitlines()[-1]
    assert f"round 1 curation: kept {kept} pairs of the 16 targeted, fewer than the 1000" in line
    assert "curate.min_pairs" in (workdir / "report.md").read_text()


@pytest.mark.parametrize("args, expected", [
    (["--config.stages=curate,trian"], "error: unknown stage 'trian' in config.stages"),
    (["--config.train.learning_rate=0"], "error: config.train: learning_rate must be > 0, got 0"),
    (["--config.eval.top_p=1.5"], "error: config.eval: top_p must be in (0, 1], got 1.5"),
    (["--config.curate.rollout_temperature=-1"], "error: config.curate: rollout_temperature must be >= 0"),
])
def test_bad_settings_stop_before_any_work_in_one_line(tmp_path, args, expected):
    workdir = tmp_path / "bad"
    line = _error_line(pipeline_in_process(workdir, *args))
    assert line.startswith(expected), line
    assert not (workdir / "world").exists()


def test_missing_config_file_and_read_only_workdir_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "ssb_jax.main", "--config", "configs/nope.py"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert _error_line(result).startswith("error: --config=configs/nope.py: no such file")
    (tmp_path / "file").write_text("")  # a path under a file is unwritable for root too
    line = _error_line(pipeline_in_process(tmp_path / "file" / "run"))
    assert "config.workdir=" in line and "is not a writable directory" in line
