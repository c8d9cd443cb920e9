"""The end-to-end runs tests share: `python -m ssb_jax.main` on a reduced tiny config, either in a subprocess
(one CPU device, as a user runs it; needed wherever a test kills the run or starts several processes) or in
the test process (`pipeline_in_process`, no interpreter start or imports to pay for), and the reduced toy
world every such run starts from."""
import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A smaller world and run than configs/tiny.py, so the suite stays fast; same code path.
REDUCED = [
    "--config.world.num_train=200", "--config.world.num_test=24", "--config.world.pretrain_steps=1000",
    "--config.world.pretrain_pool=4000", "--config.world.max_value=40", "--config.world.plain_batch=8",
    "--config.world.hinted_batch=8", "--config.world.seed=1", "--config.world.hidden_size=64",
    "--config.world.intermediate_size=192", "--config.world.head_dim=16", "--config.world.learning_rate=3e-3",
    "--config.curate.target_pairs=16", "--config.curate.questions_per_batch=32",
    "--config.curate.rollout_max_new_tokens=80", "--config.curate.solution_max_new_tokens=80",
    "--config.curate.max_questions=96",
    "--config.train.epochs=2", "--config.train.batch_size=4", "--config.train.checkpoint_every=2",
    "--config.eval.n_samples=2", "--config.eval.max_new_tokens=80", "--config.eval.max_problems=8",
    "--config.sampler.batch_size=32",
]


# The training mesh of in-process runs, named rather than left to the automatic choice so that these runs
# train with tensor parallelism over the 8 CPU devices, whose data x fsdp REDUCED's train.batch_size=4 divides.
IN_PROCESS_MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]


def pipeline(workdir, *extra, **popen):
    cmd = [sys.executable, "-m", "ssb_jax.main", "--config", "configs/tiny.py", f"--config.workdir={workdir}",
           *REDUCED, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, **popen)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def pipeline_in_process(workdir, *extra):
    """`pipeline(workdir, *extra)` run by the CLI's own `main` inside the test process; returns what
    `pipeline` does (a CompletedProcess with returncode, stdout and stderr, the log on stderr).

    The test process has 8 CPU devices where a subprocess run has one, so these runs train on
    IN_PROCESS_MESH (`extra` may override it) and sample on the auto mesh over 8 devices; results agree
    with a one-device run up to the order of sharded sums, which no test compares bit for bit."""
    from ssb_jax.pipeline import cli
    args = ["ssb_jax.main", "--config", "configs/tiny.py", f"--config.workdir={workdir}", *REDUCED, *IN_PROCESS_MESH,
            *extra]
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(cli.LOG_FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    returncode = 0
    try:
        with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(args)
            except SystemExit as stop:  # what the interpreter would do with sys.exit's argument
                if isinstance(stop.code, str):
                    print(stop.code, file=err)
                    returncode = 1
                else:
                    returncode = stop.code or 0
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(args, returncode, out.getvalue(), err.getvalue())


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def kill_after_steps(proc, metrics: Path, steps: int, timeout_s: float, what: str) -> None:
    """SIGKILL `proc` once `metrics` holds `steps` training records (learning-curve points, which share the
    file, not counted); fails if the run ends first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum('"kind"' not in line for line in lines) >= steps:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"{what} finished (or failed) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()



WORLD_ARGS = [arg for arg in REDUCED if arg.startswith("--config.world.")]


def reduced_world_config():
    """The ToyWorldConfig a pipeline() run builds: configs/tiny.py's world with REDUCED's overrides."""
    from ssb_jax.config import parse_config_args, section_to
    from ssb_jax.toyworld import ToyWorldConfig
    config, _ = parse_config_args(["--config", str(REPO / "configs/tiny.py"), *WORLD_ARGS])
    return section_to(ToyWorldConfig, {k: v for k, v in config.world.items() if k != "enabled"}, "config.world")


def copy_world(world_dir: Path, workdir: Path) -> None:
    """Put a built world where a run in workdir looks for it (the same config: the run skips building)."""
    shutil.copytree(world_dir, Path(workdir) / "world")
