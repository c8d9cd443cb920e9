"""Runs the registry's stages in order: the toy world (when configured), the base model, then each SSB
round's per-round stages, then the others. Each stage is fingerprinted, skipped when complete and
resumed when not, so rerunning the same command after a crash continues where it stopped. A run holds
its run directory's lock (pipeline/lock.py) throughout."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import jax

from ssb_jax.data.records import write_text_atomic
from ssb_jax.distributed import barrier, is_main_process
from ssb_jax.pipeline.context import CurationShortfall, RunContext, mark_done
from ssb_jax.pipeline.lock import GUARD_FILE, LOCK_FILE, lock_workdir
from ssb_jax.pipeline.registry import REGISTRY
from ssb_jax.pipeline.stage import Registry, Stage
from ssb_jax.pipeline.world import prepare_world

log = logging.getLogger("ssb_jax")

_BOOKKEEPING = {".processes", LOCK_FILE, GUARD_FILE}


def execute(stage: Stage, ctx: RunContext, r: int | None) -> None:
    """One stage: compare its fingerprint, skip it when complete, else run it and mark it done."""
    where = stage.name if r is None else f"round {r} {stage.name}"
    if not stage.applies(ctx):
        return
    fingerprint = stage.fingerprint(ctx, r)
    directory = stage.directory(ctx, r)
    if stage.name in ctx.overwrite:
        clear_outputs(ctx, directory, stage.name)
    if fingerprint is not None:
        ctx.check_fingerprint(directory, stage.name, fingerprint)
    if stage.done(ctx, r):
        log.info("%s: complete, skipped", where)
        return
    started = time.perf_counter()
    info = stage.run(ctx, r)
    if info is not None:
        mark_done(directory, **{"wall_s": time.perf_counter() - started, **info})


def clear_outputs(ctx: RunContext, directory, stage: str) -> None:
    """--config.overwrite=STAGE: delete the stage's outputs whatever their fingerprint says (a stage
    whose directory is the run directory itself, the report, is redone anyway and keeps it)."""
    if directory.resolve() == ctx.workdir.resolve():
        return
    if is_main_process() and directory.exists():
        log.warning("%s: deleting the outputs in %s (--config.overwrite=%s)", stage, directory, stage)
        shutil.rmtree(directory)
    barrier(f"overwrite:{directory}")


def run_pipeline(config, registry: Registry = REGISTRY) -> RunContext:
    """Every selected stage of `registry` on `config`; returns the run's context. Raises CurationShortfall
    (after finishing) when a round's curation kept fewer pairs than count as success."""
    started = time.perf_counter()
    new_workdir = not Path(config.workdir).exists()
    try:
        ctx = RunContext(config, registry)
        lock = lock_workdir(ctx.workdir)  # before anything is read or written there
    except BaseException:
        if new_workdir:
            _remove_if_unused(Path(config.workdir))
        raise
    try:
        return _run_stages(ctx, registry, started)
    finally:
        lock.release()


def _remove_if_unused(workdir: Path) -> None:
    """A run directory this run created and left holding only its own bookkeeping (the lock's guard,
    the processes' marks) is removed, so a refused run leaves nothing behind."""
    if is_main_process() and workdir.is_dir() and all(p.name in _BOOKKEEPING for p in workdir.iterdir()):
        shutil.rmtree(workdir, ignore_errors=True)


def _run_stages(ctx: RunContext, registry: Registry, started: float) -> RunContext:
    config = ctx.config
    prepare_world(ctx)
    if jax.process_index() == 0:  # the values in use, the world's paths included
        write_text_atomic(ctx.workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))
    ctx.load_base()
    per_round = [s for s in registry if s.per_round]
    for r in range(1, config.num_rounds + 1):
        ctx.start_round(r)
        for stage in per_round:
            if stage.name in ctx.stages:
                execute(stage, ctx, r)
            stage.publish(ctx, r)
    for stage in registry:
        if not stage.per_round:
            if stage.name in ctx.stages:
                execute(stage, ctx, None)
            stage.publish(ctx, None)
    shortfalls = [line for stage in registry for line in stage.warnings(ctx)]
    for line in shortfalls:
        log.warning("%s", line)
    log.info("all stages done in %.0f s; outputs in %s", time.perf_counter() - started, ctx.workdir)
    if shortfalls:
        raise CurationShortfall(" ".join(shortfalls))
    return ctx

