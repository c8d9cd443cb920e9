"""The offline toy world (configs/tiny.py): before any stage, it supplies whichever of model.path,
data.train and the eval datasets the config leaves empty."""
from __future__ import annotations

import logging
from pathlib import Path

from ssb_jax import config as config_lib
from ssb_jax import toyworld
from ssb_jax.distributed import barrier, is_main_process
from ssb_jax.evaluation import EvalConfig, dataset_specs

log = logging.getLogger("ssb_jax")

WORLD_TEST = "world_test"  # in eval.datasets: the toy world's held-out split


def world_dir(ctx) -> Path:
    return ctx.workdir / "world"


def world_file(ctx, split: str) -> str:
    """A toy world file of this run ("train", "test", "checkpoint")."""
    return str(toyworld.world_paths(world_dir(ctx))[split])


def prepare_world(ctx) -> None:
    """Build (or reuse) the toy world when config.world.enabled, and point the empty settings at it."""
    config = ctx.config
    if not config.world.enabled:
        return
    world_config = config_lib.section_to(toyworld.ToyWorldConfig,
                                         {k: v for k, v in config.world.items() if k != "enabled"}, "config.world")
    eval_specs = dataset_specs(config.eval.datasets) if "eval" in ctx.stages else []
    wanted = [key for key, empty in (("model.path", not config.model.path), ("data.train", not config.data.train),
                                     ("eval.datasets", WORLD_TEST in eval_specs)) if empty]
    if not wanted:
        log.info("toy world: not built (model.path, data.train and eval.datasets are all given)")
        return
    if is_main_process():
        toyworld.build(world_config, world_dir(ctx))
    barrier("world")
    paths = toyworld.world_paths(world_dir(ctx))
    with config.unlocked():
        if "model.path" in wanted:
            config.model.path = str(paths["checkpoint"])
        if "data.train" in wanted:
            config.data.train = str(paths["train"])
        if "eval.datasets" in wanted:
            config.eval.datasets = ",".join(f"{WORLD_TEST}={paths['test']}" if spec == WORLD_TEST else spec
                                            for spec in eval_specs)
    log.info("toy world: supplies %s", ", ".join(wanted))
    ctx.eval_config = config_lib.section_to(EvalConfig, config.eval, "config.eval")
