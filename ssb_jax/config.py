"""The run configuration: one ml_collections ConfigDict, whose stage sections mirror the stage
dataclasses (CurationConfig, TrainConfig, EvalConfig) so their defaults live in one place.

Tuple fields appear as comma-separated strings ("q,k,v") so they are easy to override on the
command line; `section_to(cls, section)` turns a section back into its dataclass and names any key
that is not a field.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import ml_collections

from ssb_jax.curate import CurationConfig
from ssb_jax.distill.config import TrainConfig
from ssb_jax.evaluate import EvalConfig

STAGES = ("curate", "teacher_cache", "train", "eval", "export", "report")


def dataclass_section(cls) -> ml_collections.ConfigDict:
    values = {}
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(str(x) for x in default)
        values[f.name] = default
    return ml_collections.ConfigDict(values)


def section_to(cls, section: ml_collections.ConfigDict | dict, where: str):
    """The dataclass for a config section; an unknown key is an error naming it (and a near miss)."""
    values = dict(section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else ""
            raise ValueError(f"config key {where}.{key} is not a setting of {cls.__name__}{hint}")
    for name, f in fields.items():
        if isinstance(f.default, tuple) and isinstance(values.get(name), str):
            items = [x.strip() for x in values[name].split(",") if x.strip()]
            values[name] = tuple(int(x) for x in items) if "int" in str(f.type) else tuple(items)
    return cls(**values)


def base_config() -> ml_collections.ConfigDict:
    """Every setting with its default; the files in configs/ start from this."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.stages = ",".join(STAGES)
    c.num_rounds = 1
    c.seed = 0
    c.log_level = "INFO"

    c.model = ml_collections.ConfigDict(dict(
        path="Qwen/Qwen2.5-3B-Instruct",  # hub id or local HF directory
        tokenizer="",                     # empty: the model's own
        dtype="bfloat16",
        attention_impl="xla",
        remat="none",  # per-layer rematerialisation: none, full, dots, dots_no_batch
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = ml_collections.ConfigDict(dict(
        initialize="auto",  # "auto" (TPU VMs, SLURM, env vars), "yes" or "no"
        coordinator_address="", num_processes=0, process_id=-1,
    ))
    c.sampler = ml_collections.ConfigDict(dict(batch_size=64, max_prompt_tokens=2048, min_prompt_bucket=64))
    c.prompts = ml_collections.ConfigDict(dict(system_prompt="", student_template="", hinted_template=""))
    c.data = ml_collections.ConfigDict(dict(
        train="gsm8k_train", question_field="", answer_field="", on_bad_line="error"))
    c.curate = dataclass_section(CurationConfig)
    c.train = dataclass_section(TrainConfig)
    c.eval = dataclass_section(EvalConfig)
    c.export = ml_collections.ConfigDict(dict(peft_adapter=True, merged_model=True, merged_dtype=""))
    c.world = ml_collections.ConfigDict(dict(enabled=False))  # configs/tiny.py fills this
    return c


def stage_list(config) -> list[str]:
    stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            close = difflib.get_close_matches(s, STAGES, n=1)
            raise ValueError(f"unknown stage {s!r} in config.stages; stages are {', '.join(STAGES)}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
    return stages


def load_config_file(path: str) -> ml_collections.ConfigDict:
    import importlib.util
    spec = importlib.util.spec_from_file_location("ssb_run_config", path)
    if spec is None or not path.endswith(".py"):
        raise ValueError(f"--config must name a configs/*.py file, got {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """Every --config.a.b=value must name an existing key; a typo is an error with a suggestion."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, "config"
        for part in dotted.split("."):
            keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean {walked}.{close[0]}?" if close else f"; {walked} has {', '.join(sorted(keys))}"
                raise ValueError(f"{arg}: {walked} has no key {part!r}{hint}")
            node, walked = node[part], f"{walked}.{part}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted keys ("train.learning_rate": 1e-4) as --config.train.learning_rate=1e-4 would."""
    check_overrides(config, [f"--config.{key}=" for key in overrides])
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config
