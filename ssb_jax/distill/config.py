"""Training configuration for the distillation stage, with the paper's defaults."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from ssb_jax import validate
from ssb_jax.model.lora import LoraConfig
from ssb_jax.model.config import PROJECTIONS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Frozen and hashable, so it can be a jit static argument. Paper defaults: lr 2e-4 with linear
    decay and no warmup, AdamW without weight decay, clip 1.0, batch 4, 3 epochs, T = 2,
    LoRA r = alpha = 32 on all seven projections, no CE term. `as_sft()`: the plain SFT baseline."""
    # optimisation
    learning_rate: float = 2e-4
    schedule: str = "linear"          # "linear" (to 0), "cosine" (to 0) or "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0         # used when warmup_steps == 0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0            # global-norm clip; <= 0 disables
    batch_size: int = 4               # global batch (sequences per step)
    epochs: int = 3
    max_steps: int = 0                # > 0 caps the number of steps
    seed: int = 0
    # loss
    temperature: float = 2.0
    kl_weight: float = 1.0            # weight of the T²·KL term (0 with ce_weight > 0: plain SFT)
    ce_weight: float = 0.0
    per_sequence_mean: bool = False   # average KL/CE per sequence first, then over sequences
    logits_chunk: int = 128           # answer positions per sequence projected to the vocab at once; 0 = all
    teacher_mode: str = "online"      # "online" or "cached"
    topk: int = 64                    # cached mode: teacher log-probs kept per answer token
    # LoRA
    lora_rank: Any = 32
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = PROJECTIONS
    use_rslora: bool = False
    lora_dtype: str = "float32"
    # batching: sequences are right padded to the smallest bucket >= their length
    length_buckets: tuple[int, ...] = ()   # empty: powers of two >= min_bucket
    min_bucket: int = 16
    max_seq_len: int = 0              # > 0: solutions are truncated so both sequences fit
    # the student's input and targets (the SSB reference code: "plain", False; see docs/reference_differences.md)
    student_format: str = "chat"      # "chat": the chat-rendered question; "plain": system + question as plain text
    stop_token_target: bool = True    # the solution's final stop token is a target (the student learns to stop)
    # bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1

    def __post_init__(self):
        if self.teacher_mode not in ("online", "cached"):
            raise ValueError(f"teacher_mode must be 'online' or 'cached', got {self.teacher_mode!r}")
        if self.student_format not in ("chat", "plain"):
            raise ValueError(f"student_format must be 'chat' or 'plain', got {self.student_format!r}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be 'linear', 'cosine' or 'constant', got {self.schedule!r}")
        validate.positive(self, "learning_rate", "temperature", "batch_size", "epochs", "lora_alpha", "topk",
                          "min_bucket", "checkpoint_every", "keep_checkpoints", "log_every")
        validate.non_negative(self, "warmup_steps", "warmup_ratio", "weight_decay", "kl_weight", "ce_weight",
                              "max_steps", "logits_chunk", "max_seq_len", "adam_eps")
        if not self.kl_weight and not self.ce_weight:
            raise ValueError("kl_weight and ce_weight are both 0: the loss would be 0")
        for rank in (dict(self.lora_rank).values() if isinstance(self.lora_rank, (dict, tuple)) else [self.lora_rank]):
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"lora_rank must be a positive integer (or one per target), got {self.lora_rank!r}")
        if isinstance(self.lora_rank, dict):
            object.__setattr__(self, "lora_rank", tuple(sorted(self.lora_rank.items())))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "length_buckets", tuple(sorted(int(b) for b in self.length_buckets)))

    def lora_config(self) -> LoraConfig:
        return LoraConfig(targets=self.lora_targets, rank=self.lora_rank, alpha=self.lora_alpha,
                          use_rslora=self.use_rslora, dtype=self.lora_dtype)

    def as_sft(self) -> "TrainConfig":
        """The plain SFT baseline on the same curated pairs: cross-entropy on the teacher's solution tokens
        under the student's plain prompt and no KL term, so comparing it with SSB isolates what the
        teacher's soft logits add. Everything else (LoRA, optimiser, data order) is SSB's."""
        return self.replace(kl_weight=0.0, ce_weight=1.0)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.lora_rank, tuple):
            d["lora_rank"] = dict(self.lora_rank)
        d["lora_targets"] = list(self.lora_targets)
        d["length_buckets"] = list(self.length_buckets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        d = dict(d)
        for key in ("lora_targets", "length_buckets"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
