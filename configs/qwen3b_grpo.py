"""The GRPO baseline next to SSB: Qwen2.5-3B-Instruct, GSM8K train questions, LoRA r = alpha = 64 on all
seven projections (MOTIF's; the SSB student of configs/qwen3b.py has 32), evaluated like the SSB student.

    python -m ssb_jax.main --config configs/qwen3b_grpo.py              # GRPO, then eval / export / report
    python -m ssb_jax.main --config configs/qwen3b_grpo.py --config.stages=curate,train,grpo,eval,report

In the same workdir as an SSB run the eval stage scores base, SSB student and GRPO student together
(the grpo stage reads only the round-1 base and data.train, never the SSB outputs).

What the SSB paper's GRPO row used: it is taken from the authors' earlier MOTIF paper (Mitra & Ulukus
2025, arXiv 2507.02851), whose repository (github.com/purbeshmitra/MOTIF, vanilla_grpo.py) trains with
unsloth + TRL's GRPOTrainer. That script sets: Qwen2.5-3B-Instruct loaded in 4 bit, LoRA r = alpha = 64
on the seven projections, learning rate 5e-6, cosine schedule, warmup ratio 0.1, AdamW 8-bit with betas
(0.9, 0.99) and weight decay 0.1, max grad norm 0.1, 8 generations per prompt, 1024 prompt and 1024
completion tokens, 2000 steps, per-device batch 1, beta (KL) 0; its rewards are 2.0 for the string
"\\boxed{gold}" in the response plus XML-format rewards (0.5 strict, 0.5 soft, up to 0.5 for tag counts)
under a <reasoning>/<answer> system prompt. Not stated: the TRL and unsloth versions (requirements.txt
pins none), so the loss normalisation, sampling temperature and the number of questions per step that
this implies; the number of GPUs; whether exactly this script produced the paper's row.

This config takes MOTIF's LoRA shape (r = alpha = 64, grpo.lora_rank / lora_alpha; the SSB student keeps
its 32), optimiser settings, group size, lengths and beta, and keeps the rest of SSB's comparison fixed
(the tutor prompt, the math-verify grader, bf16 weights rather than 4 bit). prompts_per_step, steps,
temperature and the normalisation are this project's choices, marked so. MOTIF's own reward is
`--config.grpo.reward=motif` (2.0 for \\boxed{gold} anywhere plus its XML format rewards, ssb_jax.grpo.reward);
its format rewards only pay under MOTIF's XML system prompt, which would also change curation's prompts in
this workdir, so use it in a workdir of its own with --config.prompts.system_prompt set to
ssb_jax.prompts.MOTIF_XML_SYSTEM_PROMPT.
"""
from pathlib import Path

from ssb_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("qwen3b.py")))  # the SSB run's settings
    c.workdir = "runs/qwen3b"   # next to the SSB run, so one eval table holds base, student and grpo
    c.stages = "grpo,eval,export,report"

    g = c.grpo
    g.lora_rank = 64              # MOTIF: lora_rank = 64 (r), on the same seven projections
    g.lora_alpha = 64.0           # MOTIF: lora_alpha = lora_rank
    g.group_size = 8              # MOTIF: num_generations = 8
    g.max_new_tokens = 1024       # MOTIF: max_completion_length = 1024
    g.kl_beta = 0.0               # MOTIF: beta = 0.0
    g.learning_rate = 5e-6        # MOTIF: learning_rate = 5e-6
    g.schedule = "cosine"         # MOTIF: lr_scheduler_type = "cosine"
    g.warmup_ratio = 0.1          # MOTIF: warmup_ratio = 0.1
    g.weight_decay = 0.1          # MOTIF: weight_decay = 0.1
    g.adam_b1 = 0.9               # MOTIF: adam_beta1 = 0.9
    g.adam_b2 = 0.99              # MOTIF: adam_beta2 = 0.99
    g.grad_clip = 0.1             # MOTIF: max_grad_norm = 0.1
    g.updates_per_batch = 1       # one update per batch of rollouts (TRL's default; MOTIF sets none)
    g.clip_epsilon = 0.2          # TRL's default epsilon; MOTIF sets none
    # this project's choices (not stated by MOTIF in a form that carries over):
    g.prompts_per_step = 16
    g.steps = 250                 # 16 x 250 = 4,000 questions (about half of GSM8K train), 32,000 samples
    g.temperature = 1.0
    g.top_k = 0
    g.top_p = 1.0
    g.loss_normalization = "sequence_mean"   # the original GRPO's; which one MOTIF's TRL used is not stated
    g.scale_by_std = True
    g.format_reward = 0.0
    g.grader = "math_verify"
    g.minibatches = 4             # 32 sequences per optimiser step (activation memory; not measured here)
    g.logits_chunk = 128
    g.checkpoint_every = 10
    return c
