"""Training configuration for the distillation stage, with the paper's defaults."""
from __future__ import annotations

import dataclasses

from ssb_jax import validate
from ssb_jax.settings import setting
from ssb_jax.training.settings import CheckpointSettings, LoraSettings, OptimizerSettings


@dataclasses.dataclass(frozen=True)
class TrainConfig(LoraSettings, CheckpointSettings, OptimizerSettings):
    """Frozen and hashable, so it can be a jit static argument. Paper defaults: lr 2e-4 with linear
    decay and no warmup, AdamW without weight decay, clip 1.0, batch 4, 3 epochs, T = 2,
    LoRA r = alpha = 32 on all seven projections, no CE term. `as_sft()`: the plain SFT baseline.
    The optimiser, checkpoint and LoRA settings are the shared ones (ssb_jax.training.settings); the
    bases are listed last-first so the fields come in that order, then the method's own."""
    batch_size: int = setting(4, "global batch: sequences per step")
    epochs: int = setting(3, "passes over the curated pairs")
    max_steps: int = setting(0, "> 0: stop after this many steps")
    seed: int = setting(0, "seed of the LoRA initialisation and the data order")
    # loss
    temperature: float = setting(2.0, "softmax temperature of teacher and student in the KL term")
    kl_weight: float = setting(1.0, "weight of the T²·KL term (the sft stage trains with 0 and ce_weight 1)")
    ce_weight: float = setting(0.0, "weight of the cross-entropy term on the teacher's solution (0: KL only)")
    per_sequence_mean: bool = setting(False, "average KL/CE per sequence first, then over sequences")
    logits_chunk: int = setting(128, "answer positions per sequence projected to the vocabulary at once (0: all)")
    teacher_mode: str = setting("online", "teacher logits: online (computed each step) or cached (top-k stored "
                                          "before training)")
    topk: int = setting(64, "cached teacher mode: log-probabilities kept per answer token")
    # batching: sequences are right padded to the smallest bucket >= their length
    length_buckets: tuple[int, ...] = setting((), "comma-separated padded sequence lengths (empty: 4-7 times a "
                                                  "power of two >= min_bucket, under 25% padding)")
    min_bucket: int = setting(16, "smallest padded sequence length")
    max_seq_len: int = setting(0, "> 0: solutions are truncated so both sequences fit in this many tokens")
    # the student's input and targets (the SSB reference code: "plain", False; see docs/reference_differences.md)
    student_format: str = setting("chat", "student input: chat (the chat-rendered question) or plain (system "
                                          "prompt and question joined as plain text with the solution right after, "
                                          "as the reference code trains)")
    stop_token_target: bool = setting(True, "the solution's final stop token is a training target (False: left "
                                            "out, as in the reference code)")

    def __post_init__(self):
        if self.teacher_mode not in ("online", "cached"):
            raise ValueError(f"teacher_mode must be 'online' or 'cached', got {self.teacher_mode!r}")
        if self.student_format not in ("chat", "plain"):
            raise ValueError(f"student_format must be 'chat' or 'plain', got {self.student_format!r}")
        validate.positive(self, "temperature", "batch_size", "epochs", "topk", "min_bucket")
        validate.non_negative(self, "kl_weight", "ce_weight", "max_steps", "logits_chunk", "max_seq_len")
        if not self.kl_weight and not self.ce_weight:
            raise ValueError("kl_weight and ce_weight are both 0: the loss would be 0")
        object.__setattr__(self, "length_buckets", tuple(sorted(int(b) for b in self.length_buckets)))
        super().__post_init__()

    def as_sft(self) -> "TrainConfig":
        """The plain SFT baseline on the same curated pairs: cross-entropy on the teacher's solution tokens
        under the student's plain prompt and no KL term, so comparing it with SSB isolates what the
        teacher's soft logits add. Everything else (LoRA, optimiser, data order) is SSB's."""
        return self.replace(kl_weight=0.0, ce_weight=1.0)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["length_buckets"] = list(self.length_buckets)
        return d
