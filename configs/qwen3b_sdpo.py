"""SDPO-style on-policy self-distillation next to SSB, GRPO and OPSD: Qwen2.5-3B-Instruct, GSM8K train
questions, each sample's teacher the EMA of the student shown a successful other sample of its group.

    python -m ssb_jax.main --config configs/qwen3b_sdpo.py                       # the sdpo row
    python -m ssb_jax.main --config configs/qwen3b_sdpo.py --config.stages=eval,report   # the whole table

This file loads configs/qwen3b_opsd.py (and through it qwen3b_grpo.py and qwen3b.py), so it holds every
row's settings: run with `--config.stages=eval,report` it evaluates base, SSB, GRPO, onpolicy, opsd and sdpo
together in runs/qwen3b (README, "A Table-1-style comparison").

What SDPO stated (Hübotter et al. 2026, arXiv 2601.20802, "Reinforcement Learning via Self-Distillation";
the defaults of verl/trainer/config/actor/actor.yaml and experiments/rich_feedback/run_sdpo.sh in
github.com/lasgroup/SDPO, read for this config): the teacher is the current model re-prompted with a
successful rollout of the same question (reward >= 0.5) and, where there is one, the environment's feedback;
a sample is not shown its own success (dont_reprompt_on_self_success); distillation on the teacher's top 100
logits plus a tail bucket; alpha 0.5 (generalised JSD; 0 forward KL, 1 reverse KL); the teacher's weights an
EMA of the student's with update rate 0.05 (the default; 0.01 in the rich-feedback runs); learning rate 1e-6,
weight decay 0.01, no warmup, one gradient step per generation batch, token-mean aggregation; 8 rollouts per
question and 32 questions per batch in the rich-feedback script; an importance-sampling clip of 2.

Not stated, or not carrying over (this project's choices, marked below): SDPO trains all weights (verl FSDP)
where this trains LoRA, so its 1e-6 is not a LoRA learning rate (1e-5 here, and the SSB student's LoRA shape);
the response budget for math (1024 new tokens here, the evaluation's); the sampling temperature (1.0); the
reprompt wording (ours: ssb_jax.onpolicy.contexts); the importance-sampling correction (not implemented: our
samples come from the current adapters, so the ratio is 1 up to numerics); the number of steps for GSM8K.
"""
from pathlib import Path

from ssb_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("qwen3b_opsd.py")))  # SSB, GRPO, onpolicy and OPSD rows
    c.workdir = "runs/qwen3b"
    c.stages = "sdpo,eval,report"

    s = c.sdpo
    s.context = "peer"            # SDPO: a successful rollout of the same group
    s.teacher = "ema"             # SDPO: the teacher's weights an EMA of the student's ...
    s.ema_decay = 0.95            # ... update rate 0.05 (actor.yaml): ema <- 0.95 ema + 0.05 student
    s.loss = "jsd"                # SDPO: alpha 0.5, between forward (0) and reverse (1) KL
    s.jsd_alpha = 0.5
    s.topk = 100                  # SDPO: distillation_topk 100 plus a tail bucket
    s.samples_per_prompt = 8      # SDPO rich-feedback script: rollout.n = 8
    s.prompts_per_step = 32       # SDPO rich-feedback script: train_batch_size = 32
    s.weight_decay = 0.01         # SDPO: optim.weight_decay 0.01
    s.warmup_steps = 0            # SDPO: lr_warmup_steps 0
    s.temperature = 1.0
    s.clip = 0.0
    # this project's choices
    s.learning_rate = 1e-5        # SDPO: 1e-6 for all weights; LoRA needs more
    s.lora_rank = 32              # the SSB student's shape (SDPO trains all weights)
    s.lora_alpha = 32.0
    s.lora_targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    s.max_new_tokens = 1024
    s.sample_temperature = 1.0
    s.microbatches = 8            # 256 rows a step, 32 at a time: the update fits one 80 GB GPU (python -m ssb_jax.plan)
    s.steps = 125                 # 125 x 32 = 4,000 questions x 8 = 32,000 samples: GRPO's budget (16 x 8 x 250)
    s.schedule = "constant"
    s.onpolicy_weight = 1.0
    s.checkpoint_every = 10
    return c
