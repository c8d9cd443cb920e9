"""The whole toy world: made in memory from its config (`make_world`), written to a directory (`build`).

`build` writes train.jsonl and test.jsonl (question/answer, plus solution / wrong_solution) and
model/ (the pre-trained weights and the tokenizer, a Hugging Face checkpoint), with a marker file
last; a directory that already holds a world of the same config is left as it is.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ssb_jax.prompts import DEFAULT_PROMPTS
from ssb_jax.toyworld.config import ToyWorldConfig
from ssb_jax.toyworld.measurement import make_sampler, measure
from ssb_jax.toyworld.pretraining import (arithmetic_drill, encode_examples, encode_texts, model_config, pretrain,
                                          pretraining_examples)
from ssb_jax.toyworld.problems import SLIP_KINDS, make_problems, problem_record
from ssb_jax.toyworld.tokenizer import save_tokenizer, tokenizer_corpus, train_tokenizer
from ssb_jax.training.metrics import format_duration

log = logging.getLogger(__name__)

MARKER_FILE = "world.json"
# Bumped whenever a world built by older code would differ (2: the tokenizer became a Qwen2Tokenizer,
# so stock tools load the ids it was trained with); an older world is refused, not silently reused.
WORLD_FORMAT = 2


@dataclasses.dataclass
class World:
    config: ToyWorldConfig
    train: list[dict]
    test: list[dict]
    tokenizer: Any
    model_config: Any
    model: Any                    # the pre-trained Qwen2ForCausalLM
    losses: list[float]
    seconds: dict


def _rng(config: ToyWorldConfig, purpose: str) -> random.Random:
    """One independent stream per purpose, so changing one size leaves the other draws alone."""
    return random.Random(f"toyworld:{config.seed}:{purpose}")


def make_world(config: ToyWorldConfig, *, log_fn=None, progress: bool = False) -> World:
    """Problems, tokenizer and pre-trained model, in memory. log_fn: see `pretrain`; progress: show
    pre-training's progress (a bar on a terminal, else a line every config.log_every steps)."""
    from ssb_jax.model.qwen2 import init_model
    timer = time.perf_counter()
    seconds = {}
    rng = _rng(config, "problems")
    test = make_problems(config, config.num_test, rng)
    train = make_problems(config, config.num_train, rng, exclude={p.question() for p in test})
    # Pre-training never sees a train or test question: curation and evaluation run on unseen ones.
    pool = make_problems(config, config.pretrain_pool, rng,
                         exclude={p.question() for p in train} | {p.question() for p in test})
    records_rng = _rng(config, "records")
    kinds = SLIP_KINDS[config.problem_family]
    train_records = [problem_record(p, i, "train", records_rng, kinds) for i, p in enumerate(train)]
    test_records = [problem_record(p, i, "test", records_rng, kinds) for i, p in enumerate(test)]

    tokenizer = train_tokenizer(tokenizer_corpus(pool[:2000], _rng(config, "tokenizer"), DEFAULT_PROMPTS),
                                config.vocab_size)
    examples_rng = _rng(config, "pretraining")
    plain, hinted = pretraining_examples(pool, config, examples_rng)
    plain, hinted = encode_examples(tokenizer, plain), encode_examples(tokenizer, hinted)
    drill = encode_texts(tokenizer, arithmetic_drill(examples_rng, config, config.pretrain_pool)) \
        if config.drill_batch > 0 else None
    seconds["data"] = time.perf_counter() - timer

    model_cfg = model_config(config, tokenizer)
    log.info("toy world data in %.0f s: %d train / %d test problems, a %d-token tokenizer, %d plain + %d hinted "
             "pre-training examples; pre-training a %.2fM-parameter model for %d steps", seconds["data"],
             len(train_records), len(test_records), len(tokenizer), len(plain), len(hinted),
             model_cfg.param_count() / 1e6, config.pretrain_steps)
    model = init_model(model_cfg, config.seed)
    timer = time.perf_counter()
    model, losses = pretrain(model, plain, hinted, config, drill=drill, log_fn=log_fn, progress=progress)
    seconds["pretrain"] = time.perf_counter() - timer
    return World(config, train_records, test_records, tokenizer, model_cfg, model, losses, seconds)



def world_paths(out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl", "checkpoint": out_dir / "model",
            "marker": out_dir / MARKER_FILE}



def write_jsonl(records: Iterable[dict], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def save_world(world: World, out_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Write the JSONL splits and the HF checkpoint (weights + tokenizer); the marker goes last."""
    from ssb_jax.model.weights import save_params
    paths = world_paths(out_dir)
    paths["checkpoint"].mkdir(parents=True, exist_ok=True)
    write_jsonl(world.train, paths["train"])
    write_jsonl(world.test, paths["test"])
    save_params(world.model, world.model_config, paths["checkpoint"])
    save_tokenizer(world.tokenizer, paths["checkpoint"])
    losses = world.losses
    head = losses[:min(10, len(losses))]
    tail = losses[-min(10, len(losses)):]
    summary = {
        "format": WORLD_FORMAT,
        "config": dataclasses.asdict(world.config),
        "num_parameters": world.model_config.param_count(),
        "vocab_size": world.model_config.vocab_size,
        "first_loss": float(np.mean(head)) if head else None,
        "final_loss": float(np.mean(tail)) if tail else None,
        "seconds": world.seconds,
        **(extra or {}),
    }
    tmp = paths["marker"].with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(paths["marker"])
    return paths


def _identity(config: dict | None) -> dict | None:
    """A world config as `build` compares it: settings added after worlds were built (ADDED_SETTINGS) count
    only when they differ from their defaults, so a world built before they existed is still reused; settings
    that only change what is logged (LOGGING_SETTINGS) never count."""
    if config is None:
        return None
    return {k: v for k, v in config.items()
            if k not in LOGGING_SETTINGS and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}


# settings added to ToyWorldConfig after worlds were built with WORLD_FORMAT 2, and their defaults (which
# make the world such a build made)
ADDED_SETTINGS = {"problem_family": "one_slip"}
# settings that change only the build's log lines, not the world
LOGGING_SETTINGS = frozenset({"log_every"})


def build(config: ToyWorldConfig, out_dir: str | Path, *, measure_problems: int = 0) -> dict[str, Path]:
    """Build the world into out_dir (train.jsonl, test.jsonl, model/ with weights and tokenizer) and
    return their paths. Does nothing when out_dir already holds a finished world of this config; a
    finished world of another config is an error (pick another directory)."""
    paths = world_paths(out_dir)
    if paths["marker"].exists():
        marker = json.loads(paths["marker"].read_text())
        built = marker.get("config")
        if marker.get("format", 1) != WORLD_FORMAT:
            raise ValueError(f"{out_dir} holds a toy world built by an older ssb_jax (format {marker.get('format', 1)}, "
                             f"now {WORLD_FORMAT}: its tokenizer loads differently in stock tools); use a fresh "
                             "--config.workdir, or delete that directory to rebuild it")
        if _identity(built) != _identity(dataclasses.asdict(config)):
            raise ValueError(f"{out_dir} holds a toy world built with another config ({built}); "
                             f"use a fresh directory for {dataclasses.asdict(config)}")
        log.info("toy world in %s is complete; skipping", out_dir)
        return paths
    log.info("building the toy world in %s", out_dir)
    start = time.perf_counter()
    world = make_world(config, progress=True)
    log.info("toy model pre-trained in %s: loss %.4f at the first step, %.4f at the last",
             format_duration(world.seconds["pretrain"]), world.losses[0] if world.losses else float("nan"),
             world.losses[-1] if world.losses else float("nan"))
    extra = {}
    if measure_problems:
        timer = time.perf_counter()
        sampler = make_sampler(world.model, world.tokenizer)
        extra["test_metrics"] = measure(sampler, world.test[:measure_problems])
        world.seconds["measure"] = time.perf_counter() - timer
        log.info("toy world test metrics: %s", extra["test_metrics"])
    world.seconds["total"] = time.perf_counter() - start
    return save_world(world, out_dir, extra)
