"""Settings of the GRPO stage (the `grpo` config section)."""
from __future__ import annotations

import dataclasses

from ssb_jax import validate
from ssb_jax.model.lora import LoraConfig
from ssb_jax.settings import setting
from ssb_jax.training.settings import CheckpointSettings, OptimizerSettings, redefault

# How the per-token objective is averaged (see grpo.loss.token_weights).
NORMALIZATIONS = ("token_mean", "sequence_mean", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(CheckpointSettings, OptimizerSettings):
    """Frozen and hashable (a jit static argument). GRPO trains adapters of the SSB student's shape (the
    train section's lora_* settings), so the two are comparable, unless lora_rank / lora_alpha say
    otherwise (MOTIF's GRPO used rank 64: configs/qwen3b_grpo.py). The
    optimiser and checkpoint settings are the shared ones (ssb_jax.training.settings), with GRPO's
    defaults; one step of the training loop is one iteration."""
    # optimiser and checkpoints: GRPO's defaults for the shared settings
    learning_rate: float = redefault(OptimizerSettings, "learning_rate", 1e-5,
                                     "peak learning rate of AdamW on the adapters")
    schedule: str = redefault(OptimizerSettings, "schedule", "constant")
    checkpoint_every: int = redefault(CheckpointSettings, "checkpoint_every", 10,
                                      "iterations between checkpoints (a killed run resumes from the last)")
    keep_checkpoints: int = redefault(CheckpointSettings, "keep_checkpoints", 2)
    steps: int = setting(100, "GRPO iterations: sample groups for prompts_per_step questions, then update on them")
    prompts_per_step: int = setting(16, "questions per iteration (from data.train, seeded shuffles, one per pass)")
    group_size: int = setting(8, "samples per question (G >= 2); advantages compare a question's samples")
    # sampling (the current policy: base + LoRA)
    max_new_tokens: int = setting(1024, "token budget of each sample (also Dr. GRPO's constant normaliser)")
    temperature: float = setting(1.0, "sampling temperature of the policy's samples (> 0)")
    top_k: int = setting(0, "top-k of the samples (0: off)")
    top_p: float = setting(1.0, "top-p of the samples (1.0: off)")
    # reward (ssb_jax.grpo.reward): grader: 1 for a correct \boxed answer, 0 otherwise, plus format_reward for
    # having a \boxed answer at all; motif: MOTIF's reward
    reward: str = setting("grader", "grader (1 for a correct answer by grpo.grader, plus format_reward for any "
                                    "\\boxed answer) or motif (MOTIF's: 2.0 when \\boxed{gold} appears anywhere, "
                                    "plus its XML format rewards, up to 1.5)")
    format_reward: float = setting(0.0, "reward added for having a \\boxed answer at all (a correct answer earns 1)")
    grader: str = setting("math_verify", "answer grader of the reward: math_verify (lenient) or string_match "
                                         "(strict)")
    # objective
    clip_epsilon: float = setting(0.2, "PPO clip: ratios outside [1-eps, 1+eps] stop pushing")
    kl_beta: float = setting(0.0, "weight of the k3 KL estimate to the base (LoRA off) in the loss (0: none)")
    loss_normalization: str = setting("token_mean", "token_mean (all tokens of the batch, as DAPO), sequence_mean "
                                                    "(per sample, then over samples: original GRPO) or dr_grpo "
                                                    "(sum / (samples * max_new_tokens))")
    scale_by_std: bool = setting(True, "divide advantages by the group's reward std (False: Dr. GRPO, mean-centred "
                                       "only)")
    advantage_eps: float = setting(1e-4, "added to the group std before dividing")
    updates_per_batch: int = setting(1, "passes over each iteration's samples")
    minibatches: int = setting(1, "optimiser steps per pass (must divide prompts_per_step * group_size)")
    logits_chunk: int = setting(128, "completion positions per sequence projected to the vocabulary at once "
                                     "(0: all)")
    # the adapters' shape: the student's (the train section's) unless set here
    lora_rank: int = setting(0, "LoRA rank of GRPO's adapters (0: the train section's, the SSB student's shape)")
    lora_alpha: float = setting(0.0, "LoRA alpha of GRPO's adapters (0: the train section's)")
    seed: int = setting(0, "seed of the LoRA initialisation, the question order, the samples and the minibatch "
                           "order")

    def __post_init__(self):
        validate.positive(self, "steps", "prompts_per_step", "max_new_tokens", "updates_per_batch", "minibatches",
                          "advantage_eps")
        validate.non_negative(self, "temperature", "top_k", "format_reward", "clip_epsilon", "kl_beta",
                              "logits_chunk")
        validate.probability(self, "top_p")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of a question), "
                             f"got {self.group_size!r}")
        if self.loss_normalization not in NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {', '.join(NORMALIZATIONS)}, "
                             f"got {self.loss_normalization!r}")
        if self.temperature == 0:
            raise ValueError("temperature must be > 0: greedy samples of a question are all alike")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError(f"minibatches ({self.minibatches}) must divide prompts_per_step * group_size "
                             f"({self.prompts_per_step * self.group_size})")
        from ssb_jax.grpo.reward import REWARDS
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        validate.non_negative(self, "lora_rank", "lora_alpha")
        from ssb_jax.evaluation.grading import GRADERS
        if self.grader not in GRADERS:
            raise ValueError(f"grader must be one of {', '.join(sorted(GRADERS))}, got {self.grader!r}")
        super().__post_init__()

    def lora_config(self, student: LoraConfig) -> LoraConfig:
        """The adapters GRPO trains: the student's shape (`student`, the train section's) with lora_rank and
        lora_alpha when set."""
        return dataclasses.replace(student, rank=self.lora_rank or student.rank, alpha=self.lora_alpha or student.alpha)

    @property
    def rows_per_batch(self) -> int:
        return self.prompts_per_step * self.group_size
