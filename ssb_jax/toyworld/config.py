"""The toy world's settings: problems, tokenizer, model and pre-training, one frozen dataclass.

Every field but log_every changes the world built (`build` refuses a directory built with another config).
"""
from __future__ import annotations

import dataclasses

from ssb_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class ToyWorldConfig:
    seed: int = setting(0, "seed of the whole world: problems, tokenizer, model initialisation and pre-training")
    # problems
    problem_family: str = setting(
        "one_slip", "one_slip: a group step goes wrong one way (b + e); several_slips: three ways (b + e, e * e, "
                    "b * (e + 1)) and is written right two ways (b * e, e * b), so a soft target carries more "
                    "than one solution (configs/tiny_compare.py)")
    num_train: int = setting(1000, "curation (train split) problems")
    num_test: int = setting(200, "held-out (test split) problems")
    min_steps: int = setting(1, "fewest steps in a problem")
    max_steps: int = setting(3, "most steps in a problem")
    group_step_prob: float = setting(0.25, "chance that a step is 'b groups of e' (where the slip lives)")
    slip_prob: float = setting(0.65, "chance that a plain-prompt pre-training solution writes b + e for b * e")
    max_value: int = setting(40, "every running total (right or slipped) stays in [0, max_value]")
    max_amount: int = setting(9, "largest number found or given away in one step")
    # tokenizer
    vocab_size: int = setting(768, "BPE tokenizer vocabulary size")
    # model
    hidden_size: int = setting(96, "model hidden size")
    intermediate_size: int = setting(256, "model MLP size")
    num_layers: int = setting(2, "model layers")
    num_heads: int = setting(4, "attention heads")
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)")
    head_dim: int = setting(24, "size of each attention head")
    # pretraining
    pretrain_steps: int = setting(1000, "pre-training steps")
    plain_batch: int = setting(8, "plain-prompt examples per pre-training step")
    hinted_batch: int = setting(8, "hinted-prompt examples per pre-training step")
    pretrain_pool: int = setting(4000, "distinct generated examples of each kind that batches are drawn from")
    learning_rate: float = setting(3e-3, "peak pre-training learning rate (warmup, then cosine decay)")
    warmup_steps: int = setting(50, "pre-training warmup steps")
    weight_decay: float = setting(0.01, "pre-training AdamW weight decay")
    prompt_loss_weight: float = setting(1.0, "loss weight of prompt tokens (their repeated numbers teach copying)")
    drill_batch: int = setting(8, "arithmetic drill texts per pre-training step (0: none)")
    drill_facts: int = setting(12, "arithmetic facts per drill text")
    length_buckets: int = setting(3, "length buckets pre-training batches are padded to (one compile each)")
    log_every: int = setting(
        100, "pre-training steps between loss lines when stderr is not a terminal (a terminal shows a progress bar)")

    def __post_init__(self):
        from ssb_jax.toyworld.problems import FAMILIES
        if self.problem_family not in FAMILIES:
            raise ValueError(f"problem_family must be one of {', '.join(FAMILIES)}, got {self.problem_family!r}")
