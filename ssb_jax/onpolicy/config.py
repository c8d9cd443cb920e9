"""Settings of the on-policy self-distillation stages: one dataclass, three config sections.

`config.onpolicy` (OnPolicyConfig: SSB's privileged context, one correct and the most common wrong answer
of the model's own rollouts, with SSB's forward KL at T = 2 on top-k + tail from the frozen base),
`config.opsd` (OPSDConfig: the dataset's reference solution as context, forward KL with per-token clipping,
frozen-base teacher; after Zhao et al. 2026) and `config.sdpo` (SDPOConfig: a successful peer rollout of
the same group as context, generalised JSD with alpha 0.5 over the top-100 logits plus a tail bucket, an
EMA teacher; after Hübotter et al. 2026). The two subclasses change defaults only (`redefault`); every
field is OnPolicyConfig's, so the three sections have the same keys.

Frozen and hashable: a jit static argument, like TrainConfig and GRPOConfig.
"""
from __future__ import annotations

import dataclasses

from ssb_jax import validate
from ssb_jax.settings import setting
from ssb_jax.training.settings import CheckpointSettings, LoraSettings, OptimizerSettings, redefault

CONTEXTS = ("ssb", "reference", "peer")
TEACHERS = ("base", "ema")
LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig(LoraSettings, CheckpointSettings, OptimizerSettings):
    """One iteration = sample from the current student, score its tokens with the teacher under the
    privileged context, one optimiser step (ssb_jax.onpolicy.run). Defaults: the `onpolicy` stage."""
    checkpoint_every: int = redefault(CheckpointSettings, "checkpoint_every", 10,
                                      "iterations between checkpoints (a killed run resumes from the last)")
    keep_checkpoints: int = redefault(CheckpointSettings, "keep_checkpoints", 2)
    steps: int = setting(100, "iterations: sample, score under the privileged context, one optimiser step")
    prompts_per_step: int = setting(8, "questions per iteration (seeded shuffles of the question pool, one per "
                                       "pass)")
    samples_per_prompt: int = setting(1, "completions the student samples per question (peer context: >= 2, "
                                         "a sample's teacher sees a successful other one)")
    # sampling (the current student: base + LoRA, plain question)
    max_new_tokens: int = setting(1024, "token budget of each student sample")
    sample_temperature: float = setting(1.0, "sampling temperature of the student's samples (> 0)")
    top_k: int = setting(0, "top-k of the student's samples (0: off)")
    top_p: float = setting(1.0, "top-p of the student's samples (1.0: off)")
    grader: str = setting("math_verify", "grader of the samples (accuracy metric; the peer context's success)")
    # the teacher
    context: str = setting("ssb", "privileged context of the teacher: ssb (a correct and the most common wrong "
                                  "rollout from curation), reference (the dataset's worked solution) or peer (a "
                                  "successful other sample of the same question)")
    teacher: str = setting("base", "teacher weights: base (the frozen base, LoRA off) or ema (an exponential moving "
                                   "average of the student's adapters)")
    ema_decay: float = setting(0.99, "teacher=ema: ema <- decay * ema + (1 - decay) * adapters after each step")
    topk: int = setting(64, "teacher log-probs kept per token, plus one tail bucket (0: the full vocabulary)")
    # the loss
    loss: str = setting("forward_kl", "on-policy divergence per token: forward_kl (KL(teacher||student) at "
                                      "temperature T), reverse_kl (the sampled token's log-ratio teacher/student as "
                                      "a per-token advantage) or jsd (generalised Jensen-Shannon, weight jsd_alpha)")
    temperature: float = setting(2.0, "distillation temperature T of teacher and student (the loss is scaled by T²)")
    jsd_alpha: float = setting(0.5, "loss=jsd: weight of the teacher in the mixture M = alpha*teacher + "
                                    "(1-alpha)*student; JSD = alpha*KL(teacher||M) + (1-alpha)*KL(student||M)")
    clip: float = setting(0.0, "per-token clipping: a token's divergence counts at most this much, and a clipped "
                               "token passes no gradient (0: off)")
    onpolicy_weight: float = setting(1.0, "lambda: loss = lambda * on-policy + (1 - lambda) * SSB's offline loss on "
                                          "the curated pairs (0: exactly SSB's loss; < 1 reads the train section's "
                                          "loss settings and the curated pairs)")
    per_sequence_mean: bool = setting(False, "average per sequence first, then over sequences")
    microbatches: int = setting(1, "slices of an iteration's rows whose gradients the update accumulates one at a "
                                   "time (the same step in less memory; divides the rows, and the offline batch)")
    logits_chunk: int = setting(128, "answer positions per sequence projected to the vocabulary at once (0: all)")
    min_bucket: int = setting(16, "smallest padded sequence length of the update's batches")
    seed: int = setting(0, "seed of the LoRA initialisation, the question order and the samples")

    def __post_init__(self):
        for name, allowed in (("context", CONTEXTS), ("teacher", TEACHERS), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        validate.positive(self, "steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens",
                          "sample_temperature", "temperature", "min_bucket", "microbatches")
        validate.non_negative(self, "top_k", "topk", "clip", "logits_chunk")
        validate.probability(self, "top_p")
        for name in ("ema_decay", "jsd_alpha", "onpolicy_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.context == "peer" and self.samples_per_prompt < 2:
            raise ValueError(f"context 'peer' needs samples_per_prompt >= 2 (a sample's teacher sees another), "
                             f"got {self.samples_per_prompt}")
        if self.rows_per_step % self.microbatches:
            raise ValueError(f"microbatches ({self.microbatches}) must divide the rows of an iteration "
                             f"(prompts_per_step x samples_per_prompt = {self.rows_per_step})")
        if self.loss == "jsd" and self.jsd_alpha in (0, 1):
            raise ValueError("jsd_alpha must be strictly between 0 and 1 (0 and 1 make the JSD vanish)")
        from ssb_jax.evaluation.grading import GRADERS
        if self.grader not in GRADERS:
            raise ValueError(f"grader must be one of {', '.join(sorted(GRADERS))}, got {self.grader!r}")
        super().__post_init__()

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def needs_curation(self) -> bool:
        """Reads curation's records: SSB's context, or SSB's offline loss mixed in."""
        return self.context == "ssb" or self.onpolicy_weight < 1


@dataclasses.dataclass(frozen=True)
class OPSDConfig(OnPolicyConfig):
    """OPSD-style defaults (Zhao et al. 2026, as issue 24 describes them): the reference solution as context,
    forward KL over the full vocabulary at T = 1 with per-token clipping, the frozen base as teacher, one sample
    per question. The clip threshold (10 nats per token) is this project's choice. The authors' public code
    (github.com/siyan-zhao/OPSD, scripts/run_opsd.sh) trains with loss=jsd, jsd_alpha=0.5 over the full
    vocabulary at T = 1.1 (the sampling temperature too, top-p 0.95, top-k 20), a fixed (base) teacher, LoRA
    r 64 / alpha 128 at lr 2e-4, 1024 new tokens, and no clipping; set those keys to run it that way."""
    context: str = redefault(OnPolicyConfig, "context", "reference")
    topk: int = redefault(OnPolicyConfig, "topk", 0)
    temperature: float = redefault(OnPolicyConfig, "temperature", 1.0)
    clip: float = redefault(OnPolicyConfig, "clip", 10.0)


@dataclasses.dataclass(frozen=True)
class SDPOConfig(OnPolicyConfig):
    """SDPO-style defaults (Hübotter et al. 2026): a successful peer rollout of the same group as context,
    generalised JSD with alpha 0.5 on the top-100 teacher logits plus a tail bucket at T = 1, an EMA
    teacher, groups of 4 samples."""
    context: str = redefault(OnPolicyConfig, "context", "peer")
    teacher: str = redefault(OnPolicyConfig, "teacher", "ema")
    loss: str = redefault(OnPolicyConfig, "loss", "jsd")
    topk: int = redefault(OnPolicyConfig, "topk", 100)
    temperature: float = redefault(OnPolicyConfig, "temperature", 1.0)
    samples_per_prompt: int = redefault(OnPolicyConfig, "samples_per_prompt", 4)
    prompts_per_step: int = redefault(OnPolicyConfig, "prompts_per_step", 4)


# config section -> its settings class; the three stages of the same names read them
SECTION_CONFIGS = {"onpolicy": OnPolicyConfig, "opsd": OPSDConfig, "sdpo": SDPOConfig}
