"""The command line: --print_config, override checking, one log format, pre-training progress."""
import dataclasses
import io
import json
import logging
import random
import re
from pathlib import Path

import ml_collections
import pytest

from ssb_jax import config as config_lib
from ssb_jax import main as main_module
from ssb_jax.pipeline import cli
from ssb_jax.pipeline.context import CurationShortfall
from ssb_jax import toyworld
from ssb_jax.training import metrics

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_CONFIG = str(CONFIGS / "tiny.py")


def leaves(node, prefix=""):
    """{dotted key: value} of a plain nested dict (the test's own walk, not config_lib.flat_settings)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def printed_settings(text: str) -> dict[str, tuple[str, str]]:
    """`key = value  # description` lines -> {key: (value, description)}."""
    rows = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([\w.]+) = (.*?) +# (.*)", line)
        assert match, f"not a setting line: {line!r}"
        rows[match[1]] = (match[2], match[3])
    return rows


def test_print_config_shows_every_setting_with_its_overridden_value(tmp_path, capsys, seed):
    rng = random.Random(seed)
    batch, slip, lr = rng.randint(2, 512), round(rng.uniform(0.5, 0.9), 3), rng.choice([1e-4, 3e-5, 7e-4])
    workdir = tmp_path / "run"
    main_module.main(["ssb_jax.main", f"--config={TINY_CONFIG}", f"--config.workdir={workdir}",
                      f"--config.train.batch_size={batch}", f"--config.world.slip_prob={slip}",
                      "--config.train.learning_rate", str(lr), "--config.curate.grader=string_match",
                      "--config.train.use_rslora=true", "--print_config"])
    rows = printed_settings(capsys.readouterr().out)
    expected = leaves(config_lib.load_config_file(TINY_CONFIG).to_dict())
    expected.update({"workdir": str(workdir), "train.batch_size": batch, "world.slip_prob": slip,
                     "train.learning_rate": lr, "curate.grader": "string_match", "train.use_rslora": True})
    assert set(rows) == set(expected)
    for key, value in expected.items():
        assert rows[key][0] == repr(value), key
        assert rows[key][1] and rows[key][1] != "(no description)", key
    assert not workdir.exists()  # nothing ran


def test_every_setting_has_a_description_and_every_description_a_setting():
    base = leaves(config_lib.base_config().to_dict())
    tiny = leaves(config_lib.load_config_file(TINY_CONFIG).to_dict())
    world = {f"world.{f.name}" for f in dataclasses.fields(toyworld.ToyWorldConfig)}
    settings = set(base) | set(tiny)
    assert world <= settings
    described = config_lib.setting_help()
    missing = sorted(settings - set(described))
    assert not missing, f"settings without a description (setting(default, help) in its dataclass): {missing}"
    stale = sorted(set(described) - settings)
    assert not stale, f"descriptions of settings that no longer exist: {stale}"
    assert all(text.strip() and "\n" not in text for text in described.values())


@pytest.mark.parametrize("argument, message", [
    ("--config.train.lerning_rate=1e-3",
     "config.train has no key 'lerning_rate'; did you mean config.train.learning_rate?"),
    ("--config.wrld.slip_prob=0.5", "config has no key 'wrld'; did you mean config.world?"),
    ("--config.train.batch_size=many", "--config.train.batch_size=many: invalid literal for int()"),
    ("stray", "unexpected arguments ['stray']"),
])
def test_command_line_mistakes_are_one_line_naming_the_setting(tmp_path, argument, message):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main_module.main(["ssb_jax.main", "--config", TINY_CONFIG, f"--config.workdir={workdir}", argument])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not workdir.exists()


@pytest.fixture
def clean_logging():
    """The root logger and jax's xla_bridge logger as they were, after the test (which starts by
    clearing the root's handlers, pytest's capture included, as in a fresh process)."""
    root, bridge = logging.getLogger(), logging.getLogger("jax._src.xla_bridge")
    saved = (root.handlers[:], root.level, bridge.filters[:], logging.getLogger("absl").level)
    yield root
    root.handlers[:], bridge.filters[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    logging.getLogger("absl").setLevel(saved[3])


def test_one_log_format_and_no_libtpu_notice(clean_logging, monkeypatch):
    from absl import logging as absl_logging
    clean_logging.handlers.clear()
    clean_logging.addHandler(absl_logging.get_absl_handler())  # as absl.app.run leaves it
    monkeypatch.setattr(cli, "_tpu_hardware", lambda: False)
    cli.configure_logging("info")
    assert len(clean_logging.handlers) == 1 and clean_logging.handlers[0] is not absl_logging.get_absl_handler()
    stream = io.StringIO()
    clean_logging.handlers[0].setStream(stream)
    notice = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: cannot open "
              "shared object file: No such file or directory")
    logging.getLogger("jax._src.xla_bridge").info(notice)
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu': ABORTED: TPU in use")
    logging.getLogger("ssb_jax.toyworld.world").info("building")
    absl_logging.warning("from absl")
    logging.getLogger("orbax.checkpoint").warning("from orbax")
    lines = stream.getvalue().splitlines()
    prefix = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) "
    assert [re.sub(prefix, "", line) for line in lines] == [
        "jax._src.xla_bridge: Unable to initialize backend 'tpu': ABORTED: TPU in use",
        "ssb_jax.toyworld.world: building", "absl: from absl", "orbax.checkpoint: from orbax"]
    assert all(re.match(prefix, line) for line in lines)
    # with TPU hardware present, a missing libtpu.so is worth saying
    monkeypatch.setattr(cli, "_tpu_hardware", lambda: True)
    logging.getLogger("jax._src.xla_bridge").info(notice)
    assert stream.getvalue().splitlines()[-1].endswith(notice)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_pretrain_progress_logs_every_few_steps_with_an_eta(monkeypatch, caplog, seed):
    rng = random.Random(seed)
    total, every = rng.randint(30, 200), rng.randint(3, 20)
    compile_s, step_s = rng.uniform(5, 90), rng.uniform(0.1, 2.0)
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    caplog.set_level(logging.INFO, logger="ssb_jax.training.metrics")
    progress = metrics.Progress(total, every, desc="pre-training the toy model", label="pretrain", terminal=False,
                                main_process=True)  # as toyworld.pretrain shows its progress
    for step in range(total):
        clock.now += compile_s if step == 0 else step_s
        progress.update(step + 1, {"loss": f"{1.0 / (step + 1):.4f}"})
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    reported = [1] + [d for d in range(2, total + 1) if d % every == 0 or d == total]
    assert len(lines) == len(reported)
    assert lines[0] == f"pretrain step 1/{total}: loss 1.0000 (compiling included, it took " \
                       f"{metrics.format_duration(compile_s)})"
    for line, done in zip(lines[1:], reported[1:]):
        assert line.startswith(f"pretrain step {done}/{total} ({100 * done // total}%): loss {1 / done:.4f}, ")
        elapsed = compile_s + (done - 1) * step_s
        eta = (total - done) * step_s  # the pace after the compiling first step
        assert line.endswith(f"{metrics.format_duration(elapsed)} elapsed, ETA {metrics.format_duration(eta)}")


def test_pretrain_progress_bar_on_a_terminal_and_silence_elsewhere(caplog, capsys):
    caplog.set_level(logging.INFO, logger="ssb_jax.training.metrics")
    progress = metrics.Progress(7, 2, desc="pre-training the toy model", label="pretrain", terminal=True,
                                main_process=True)
    for step in range(7):
        progress.update(step + 1, {"loss": "0.5000"})
    progress.close()
    err = capsys.readouterr().err
    assert "pre-training the toy model" in err and "7/7" in err and "loss=0.5000" in err
    assert not caplog.records  # the bar replaces the log lines
    quiet = metrics.Progress(7, 2, desc="pre-training the toy model", terminal=False, main_process=False)
    for step in range(7):
        quiet.update(step + 1, {"loss": "0.5000"})
    quiet.close()
    assert not caplog.records and not capsys.readouterr().err


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59.4, "59 s"), (61, "1 min 01 s"), (3599, "59 min 59 s"),
                                           (3660, "1 h 01 min"), (-3, "0 s")])
def test_format_duration(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_world_paths_are_what_build_returns(tmp_path):
    """Pipeline.world reads the paths with world_paths once build has finished."""
    config = toyworld.ToyWorldConfig(num_train=3)
    paths = toyworld.world_paths(tmp_path)
    paths["marker"].write_text(json.dumps({"format": toyworld.WORLD_FORMAT,  # a finished world
                                           "config": dataclasses.asdict(config)}))
    assert toyworld.build(config, tmp_path) == paths
    assert set(paths) == {"train", "test", "checkpoint", "marker"}


def test_exit_status_and_one_line_errors_of_a_failing_run(monkeypatch, capsys):
    from ssb_jax.fingerprint import StaleOutputsError
    argv = ["ssb_jax.main", "--config", TINY_CONFIG]

    def failing(error):
        def run(config):
            raise error
        return run

    monkeypatch.setattr(cli, "run", failing(ValueError("config.train: lr must be > 0, got 0")))
    with pytest.raises(SystemExit) as exit_info:
        main_module.main(argv)
    assert exit_info.value.code == "error: config.train: lr must be > 0, got 0"
    with pytest.raises(ValueError):  # --verbose: the traceback
        main_module.main(argv + ["--verbose"])
    monkeypatch.setattr(cli, "run", failing(StaleOutputsError("train: the outputs in x were made from ...")))
    with pytest.raises(SystemExit) as exit_info:
        main_module.main(argv)
    assert exit_info.value.code == "error: train: the outputs in x were made from ..."
    monkeypatch.setattr(cli, "run", failing(CurationShortfall("round 1 curation: kept 3")))
    with pytest.raises(SystemExit) as exit_info:
        main_module.main(argv)
    assert exit_info.value.code == 3 and capsys.readouterr().err.strip() == "round 1 curation: kept 3"
    monkeypatch.setattr(cli, "run", failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError):  # anything else keeps its traceback
        main_module.main(argv)


def test_help_answers_without_importing_jax():
    """`python -m ssb_jax.main --help` lists the registry's stages and imports neither jax nor numpy
    (python -X importtime names every module a process imports)."""
    import subprocess
    import sys

    from ssb_jax.pipeline.registry import REGISTRY
    repo = CONFIGS.parent
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ssb_jax.main", "--help"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "ssb_jax.pipeline.registry" in imported  # the stages come from the registry itself
    heavy = sorted(m for m in imported if m.split(".")[0] in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"))
    assert not heavy, heavy
    assert all(stage.name in done.stdout for stage in REGISTRY)
