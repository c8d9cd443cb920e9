"""Settings of the GRPO stage (the `grpo` config section)."""
from __future__ import annotations

import dataclasses
import json

from ssb_jax import validate

# How the per-token objective is averaged (see grpo.loss.token_weights).
NORMALIZATIONS = ("token_mean", "sequence_mean", "dr_grpo")
SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Frozen and hashable (a jit static argument). The LoRA shape is not here: GRPO trains adapters of
    the SSB student's shape (the train section's lora_* settings), so the two are comparable."""
    steps: int = 100                 # iterations: sample a batch of groups, then update on it
    prompts_per_step: int = 16       # questions per iteration
    group_size: int = 8              # samples per question (G)
    # sampling (the current policy: base + LoRA)
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # reward: 1 for a correct \boxed answer, 0 otherwise, plus format_reward for having a \boxed answer at all
    format_reward: float = 0.0
    grader: str = "math_verify"
    # objective
    clip_epsilon: float = 0.2
    kl_beta: float = 0.0             # weight of the k3 KL estimate to the base (LoRA off); 0: no reference pass
    loss_normalization: str = "token_mean"
    scale_by_std: bool = True        # False: Dr. GRPO's advantages (mean-centred only)
    advantage_eps: float = 1e-4
    updates_per_batch: int = 1       # passes over each batch of rollouts
    minibatches: int = 1             # optimiser steps per pass
    logits_chunk: int = 128          # completion positions per sequence projected to the vocabulary at once; 0: all
    # optimiser (read by distill.step.make_optimizer, as the train section's)
    learning_rate: float = 1e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    log_every: int = 1

    def __post_init__(self):
        validate.positive(self, "steps", "prompts_per_step", "max_new_tokens", "learning_rate", "updates_per_batch",
                          "minibatches", "checkpoint_every", "keep_checkpoints", "log_every", "advantage_eps")
        validate.non_negative(self, "temperature", "top_k", "format_reward", "clip_epsilon", "kl_beta",
                              "logits_chunk", "warmup_steps", "warmup_ratio", "weight_decay", "adam_eps")
        validate.probability(self, "top_p")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of a question), "
                             f"got {self.group_size!r}")
        if self.loss_normalization not in NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {', '.join(NORMALIZATIONS)}, "
                             f"got {self.loss_normalization!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.temperature == 0:
            raise ValueError("temperature must be > 0: greedy samples of a question are all alike")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError(f"minibatches ({self.minibatches}) must divide prompts_per_step * group_size "
                             f"({self.prompts_per_step * self.group_size})")
        from ssb_jax.evaluation.grading import GRADERS
        if self.grader not in GRADERS:
            raise ValueError(f"grader must be one of {', '.join(sorted(GRADERS))}, got {self.grader!r}")

    @property
    def rows_per_batch(self) -> int:
        return self.prompts_per_step * self.group_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
