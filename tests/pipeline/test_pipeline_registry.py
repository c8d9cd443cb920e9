"""The stage registry drives the pipeline: a stage added through the registry alone is listed by the CLI,
run, fingerprinted, skipped when complete, stopped on stale outputs, redone under --config.overwrite (as
is every stage that reads it) and reported."""
import json
from pathlib import Path

import pytest

from ssb_jax.fingerprint import FINGERPRINT_FILE, StaleOutputsError
from ssb_jax.paths import shared_data_path
from ssb_jax.pipeline import REGISTRY, Registry, Stage, cli

TINY_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")


class EchoStage(Stage):
    """Writes one file holding `value`, its only input."""
    name = "echo"
    opt_in = True
    summary = "writes its value to echo/value.txt (a test stage)"

    def __init__(self, value: str):
        self.value = value
        self.runs = 0

    def fingerprint(self, ctx, r):
        return {"value": self.value}

    def run(self, ctx, r):
        self.runs += 1
        (self.directory(ctx, r) / "value.txt").write_text(self.value)
        return {"value": self.value}


class EchoReaderStage(EchoStage):
    """Reads echo's output: redone whenever echo is."""
    name = "echo_reader"
    depends_on = ("echo",)

    def fingerprint(self, ctx, r):
        return {"echo": ctx.stage_digest(None, "echo")}


@pytest.fixture
def registered(seed):
    """Two test stages in the global registry (before report) for the test's duration."""
    value = f"value-{seed}"
    stages = EchoStage(value), EchoReaderStage(value)
    for stage in stages:
        REGISTRY.register(stage, before="report")
    try:
        yield stages
    finally:
        for stage in reversed(stages):
            REGISTRY.unregister(stage.name)


@pytest.fixture(scope="module")
def qwen_vocab_checkpoint(tmp_path_factory):
    """A tiny random model whose embedding holds every id of the Qwen2.5 tokenizer the runs load (a run
    refuses a tokenizer with ids past the embedding's rows)."""
    from tests.hf_models import make_hf_checkpoint
    return make_hf_checkpoint(tmp_path_factory.mktemp("qwen_vocab"), tie=True, seed=0, vocab_size=151936,
                              hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                              num_hidden_layers=1)


def command(workdir, checkpoint, *extra):
    return ["ssb_jax.main", "--config", TINY_CONFIG, f"--config.workdir={workdir}",
            f"--config.model.path={checkpoint}", f"--config.model.tokenizer={shared_data_path('qwen2.5_tokenizer')}",
            "--config.model.dtype=float32", "--config.data.train=unused.jsonl", "--config.compile_cache_dir=",
            "--config.stages=echo,echo_reader,report", *extra]


@pytest.mark.e2e  # the pipeline CLI in-process, with test stages
def test_a_registered_stage_runs_is_fingerprinted_overwritten_and_reported(registered, qwen_vocab_checkpoint,
                                                                         tmp_path, capsys):
    echo, reader = registered
    cli.main(["ssb_jax.main", "--help"])
    assert "echo " in capsys.readouterr().out  # the CLI lists it

    workdir = tmp_path / "run"
    cli.main(command(workdir, qwen_vocab_checkpoint))
    assert (echo.runs, reader.runs) == (1, 1)
    assert (workdir / "echo" / "value.txt").read_text() == echo.value
    assert json.loads((workdir / "echo" / FINGERPRINT_FILE).read_text()) == {"value": echo.value}
    assert json.loads((workdir / "echo" / "DONE.json").read_text())["value"] == echo.value
    report = (workdir / "report.md").read_text()
    assert "| echo | yes | yes |" in report and "| echo_reader | yes | yes |" in report
    assert "| curate (round 1) | no | no |" in report

    cli.main(command(workdir, qwen_vocab_checkpoint))  # complete: skipped
    assert (echo.runs, reader.runs) == (1, 1)

    echo.value = echo.value + "-changed"
    with pytest.raises(SystemExit, match="echo: the outputs in .* were made from other settings"):
        cli.main(command(workdir, qwen_vocab_checkpoint))
    assert echo.runs == 1
    cli.main(command(workdir, qwen_vocab_checkpoint, "--config.overwrite=echo"))  # redoes echo and what reads it
    assert (echo.runs, reader.runs) == (2, 2)
    assert (workdir / "echo" / "value.txt").read_text() == echo.value


def test_overwrite_reaches_every_stage_that_reads_the_named_one():
    registry = Registry([EchoStage("a"), EchoReaderStage("a")])
    assert registry.downstream(["echo"]) == {"echo", "echo_reader"}
    assert registry.downstream(["echo_reader"]) == {"echo_reader"}
    with pytest.raises(ValueError, match="depends on 'echo', which is not registered before it"):
        Registry([EchoReaderStage("a")])
    with pytest.raises(ValueError, match="already registered"):
        registry.register(EchoStage("b"))
    with pytest.raises(ValueError, match="is read by echo_reader"):
        registry.unregister("echo")


@pytest.mark.e2e  # run_pipeline in-process, with test stages
def test_stale_outputs_name_the_stage(registered, qwen_vocab_checkpoint, tmp_path):
    """Through the library: run_pipeline raises StaleOutputsError (the CLI turns it into one line)."""
    from ssb_jax.config import parse_config_args
    from ssb_jax.pipeline import run_pipeline
    echo, _ = registered
    config, _ = parse_config_args(command(tmp_path, qwen_vocab_checkpoint)[1:])
    run_pipeline(config)
    echo.value = "other"
    with pytest.raises(StaleOutputsError, match=r"^echo: .*value: '.*' -> 'other'"):
        run_pipeline(config)
