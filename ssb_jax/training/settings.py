"""Settings every trainer shares: the optimiser, checkpointing and the LoRA shape, one frozen dataclass
each, inherited by the config sections that use them (distill.config.TrainConfig takes all three,
grpo.config.GRPOConfig the optimiser and checkpointing), so their keys stay flat on the command line
(--config.train.learning_rate, --config.grpo.learning_rate).

Every field carries its one-line description (ssb_jax.settings.setting). A section that wants another
default for a shared setting redeclares only that field with `redefault(...)`, which keeps the shared
description unless given another. Each class checks its own fields in `__post_init__` and then calls
the next class's, so a shared field is checked in one place.
"""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from ssb_jax import validate
from ssb_jax.model.config import PROJECTIONS
from ssb_jax.settings import setting

if TYPE_CHECKING:  # imported where used: these settings are read without jax (the command line's --help)
    from ssb_jax.model.lora import LoraConfig

SCHEDULES = ("linear", "cosine", "constant")


def redefault(cls: type, name: str, default: Any, help: str | None = None) -> Any:  # noqa: A002
    """`cls`'s field `name` with another default, keeping its description unless `help` is given."""
    inherited = next(f for f in dataclasses.fields(cls) if f.name == name)
    return setting(default, help or inherited.metadata["help"], check=inherited.metadata.get("check"))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of the settings dataclasses: the end of the `__post_init__` chain, and (de)serialisation."""

    def __post_init__(self):
        validate.check_declared(self)  # every field's declared check (ssb_jax.settings.setting)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        """The settings from `to_dict`'s output (JSON lists back to tuples); an unknown key is an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(fields[k].default, tuple) and isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings(Settings):
    """AdamW on a warmup-then-decay learning-rate schedule (training.optim.make_optimizer)."""
    learning_rate: float = setting(2e-4, "peak learning rate of AdamW")
    schedule: str = setting("linear", "learning-rate decay after warmup: linear (to 0), cosine (to 0) or constant",
                            check=validate.one_of(*SCHEDULES))
    warmup_steps: int = setting(0, "linear warmup steps")
    warmup_ratio: float = setting(0.0, "warmup as a fraction of all steps, used when warmup_steps is 0",
                                  check=validate.between(0, 1))
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_b1: float = setting(0.9, "AdamW beta1", check=validate.between(0, 1, high_open=True))
    adam_b2: float = setting(0.999, "AdamW beta2", check=validate.between(0, 1, high_open=True))
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "global-norm gradient clip (<= 0: off)")

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'linear', 'cosine' or 'constant', got {self.schedule!r}")
        validate.positive(self, "learning_rate")
        validate.non_negative(self, "warmup_steps", "warmup_ratio", "weight_decay", "adam_eps")
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(Settings):
    """How often the training loop checkpoints and writes TensorBoard scalars (its steps: optimiser steps,
    or GRPO's iterations)."""
    checkpoint_every: int = setting(100, "steps between checkpoints (a killed run resumes from the last)")
    keep_checkpoints: int = setting(3, "checkpoints kept on disk")
    log_every: int = setting(1, "steps between TensorBoard scalar writes")

    def __post_init__(self):
        validate.positive(self, "checkpoint_every", "keep_checkpoints", "log_every")
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class LoraSettings(Settings):
    """The adapters' shape. `lora_rank` is an int or one per target ({target: rank}, kept as sorted pairs
    so the settings stay hashable)."""
    lora_rank: Any = setting(32, "LoRA rank")
    lora_alpha: float = setting(32.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_targets: tuple[str, ...] = setting(PROJECTIONS, "comma-separated projections that get LoRA adapters")
    use_rslora: bool = setting(False, "rank-stabilised LoRA: scale by alpha / sqrt(rank)")
    lora_dtype: str = setting("float32", "dtype of the LoRA weights and their optimizer state")

    def __post_init__(self):
        validate.positive(self, "lora_alpha")
        for rank in (dict(self.lora_rank).values() if isinstance(self.lora_rank, (dict, tuple)) else [self.lora_rank]):
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"lora_rank must be a positive integer (or one per target), got {self.lora_rank!r}")
        if isinstance(self.lora_rank, dict):
            object.__setattr__(self, "lora_rank", tuple(sorted(self.lora_rank.items())))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        super().__post_init__()

    def lora_config(self) -> LoraConfig:
        """The adapters these settings describe (targets, rank, alpha, rsLoRA, dtype)."""
        from ssb_jax.model.lora import LoraConfig
        return LoraConfig(targets=self.lora_targets, rank=self.lora_rank, alpha=self.lora_alpha,
                          use_rslora=self.use_rslora, dtype=self.lora_dtype)

    def to_dict(self) -> dict:
        d = super().to_dict()
        if isinstance(self.lora_rank, tuple):
            d["lora_rank"] = dict(self.lora_rank)
        d["lora_targets"] = list(self.lora_targets)
        return d


# settings that change how a training run is kept or reported, not what it computes: left out of fingerprints
OPERATIONAL_SETTINGS = (*(f.name for f in dataclasses.fields(CheckpointSettings)), "logits_chunk")
