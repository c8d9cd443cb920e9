"""`python -m ssb_jax.main --config configs/qwen3b.py [--config.key=value ...]`: the command line, its
one-line errors and exit status, and the run's logging."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DESCRIPTION = """Runs the pipeline's stages in order: (the toy world, for the offline tiny config) then per SSB round
curate -> teacher_cache -> train (and sft when named), then grpo (when named), eval, export and report. Each
stage is skipped when its outputs are complete, so rerunning the same command after a crash continues where
it stopped; --config.stages=eval runs a subset."""
USAGE = """usage: python -m ssb_jax.main [--config=configs/FILE.py] [--config.section.key=value ...] [--print_config]

  --config        the run's settings (default configs/tiny.py: the offline toy world)
  --config.a.b=v  override one setting; --print_config lists them all
  --print_config  print every setting with its value (overrides applied) and what it does, then exit
  --verbose       a failing run shows its traceback, not just its one-line error (as log_level=DEBUG does)

Stages (config.stages; --config.overwrite=STAGE redoes it and every stage that reads it):
{stages}

Exit status: 0 done, 1 an error (one line on stderr), 3 done but curation kept fewer than curate.min_pairs.
"""


def _tpu_hardware() -> bool:
    """TPU chips show up as /dev/accel* (v2-v4) or VFIO groups /dev/vfio/N (v5e and later)."""
    return any(Path("/dev").glob("accel*")) or any(Path("/dev/vfio").glob("[0-9]*"))


class _NoLibtpuNotice(logging.Filter):
    """Drops jax's notice that libtpu.so is absent, printed by every run on a machine without a TPU;
    on a machine with TPU hardware, and for any other reason a TPU fails, the notice stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.levelno < logging.WARNING and "Unable to initialize backend 'tpu'" in message
                    and "libtpu.so" in message and not _tpu_hardware())


def configure_logging(level: str) -> None:
    """One log format for everything (ssb_jax, jax, absl and orbax all log through the root logger):
    absl's handler, with its own prefix, gives way to LOG_FORMAT unless the caller configured logging."""
    from absl import logging as absl_logging
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint step at INFO
    xla_bridge = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _NoLibtpuNotice) for f in xla_bridge.filters):
        xla_bridge.addFilter(_NoLibtpuNotice())


def usage() -> str:
    from ssb_jax.pipeline.registry import REGISTRY
    return USAGE.format(stages=REGISTRY.describe())


def run(config) -> Path:
    """The pipeline with the run's logging configured; returns the run directory."""
    configure_logging(config.log_level)  # before the pipeline's imports: a library may configure logging on import
    from ssb_jax.pipeline.run import run_pipeline
    run_pipeline(config)
    return Path(config.workdir)


def main(argv=None):
    """The command line; argv as sys.argv (the program name first)."""
    args = list(sys.argv if argv is None else argv)[1:]
    if "--help" in args or "-h" in args:  # before importing the settings (and with them jax): it answers at once
        print(DESCRIPTION + "\n\n" + usage())
        return
    from ssb_jax import config as config_lib
    try:
        config, rest = config_lib.parse_config_args(args, default_path="configs/tiny.py")
    except ValueError as e:
        sys.exit(f"error: {e}")
    print_config, verbose = "--print_config" in rest, "--verbose" in rest
    rest = [a for a in rest if a not in ("--print_config", "--verbose")]
    if rest:
        sys.exit(f"error: unexpected arguments {rest}; settings go in --config.key=value (see --help)")
    if print_config:
        print(config_lib.describe_config(config))
        return
    from ssb_jax.fingerprint import StaleOutputsError
    from ssb_jax.pipeline.context import CurationShortfall, RunStopped
    try:
        run(config)
    except CurationShortfall as shortfall:  # the run finished; its result is weak
        print(shortfall, file=sys.stderr)
        sys.exit(3)
    except (ValueError, OSError, StaleOutputsError, RunStopped) as error:  # what the user can fix: one line
        if verbose or str(config.log_level).upper() == "DEBUG":
            raise
        sys.exit(f"error: {error}{_disk_full_hint(error, config)}")


def _disk_full_hint(error: BaseException, config) -> str:
    """Where a full disk's error names no file (a library's write): say which directory filled up."""
    import errno
    if not isinstance(error, OSError) or error.errno not in (errno.ENOSPC, errno.EDQUOT) or error.filename:
        return ""
    if str(config.workdir) in str(error):  # ssb_jax's own writes (data.records.WriteError) name the file
        return ""
    return (f" (while writing under --config.workdir={config.workdir}: free space there, then rerun the same "
            "command: the run resumes)")
