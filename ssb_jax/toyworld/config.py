"""The toy world's settings: problems, tokenizer, model and pre-training, one frozen dataclass.

Every field changes the world built (`build` refuses a directory built with another config).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ToyWorldConfig:
    seed: int = 0
    # problems
    num_train: int = 1000
    num_test: int = 200
    min_steps: int = 1
    max_steps: int = 3
    group_step_prob: float = 0.25   # chance that a step is "b groups of e" (where the slip lives)
    slip_prob: float = 0.65         # plain-prompt pretraining solutions write b + e for b * e
    max_value: int = 40             # every running total (right or slipped) stays in [0, max_value]
    max_amount: int = 9             # largest number found or given away in one step
    # tokenizer
    vocab_size: int = 768
    # model
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 24
    # pretraining
    pretrain_steps: int = 1000
    plain_batch: int = 8
    hinted_batch: int = 8
    pretrain_pool: int = 4000       # distinct generated examples of each kind to draw batches from
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    prompt_loss_weight: float = 1.0  # prompts are trained on too: their repeated numbers teach copying
    drill_batch: int = 8            # arithmetic drill texts per step (0: none)
    drill_facts: int = 12
    length_buckets: int = 3         # pretraining batches are padded per length bucket (one compile each)
    log_every: int = 100            # loss lines when stderr is no terminal (a terminal shows a progress bar)
