"""Base vs SSB vs plain SFT vs GRPO vs the on-policy variants on the toy world, from the same base, at a
matched budget of optimiser steps.

    python -m ssb_jax.main --config configs/tiny_compare.py --config.workdir=runs/tiny_compare

Everything of configs/tiny.py (curation, SSB training, eval) on a harder toy world, plus five rows:

- SSB (`train`, offline) and plain SFT (`sft`) train on the *same* curated pairs (one curation,
  round_1/curate), with the same LoRA shape, optimiser, batch size and epochs: 128 pairs / batch 8 x 3 epochs
  = 48 optimiser steps each. SFT differs only in its loss (cross-entropy on the hinted teacher's answer, no
  logit distillation).
- GRPO (`grpo`) starts from the same base with the same LoRA shape and learning rate: 48 iterations of one
  optimiser step on 16 questions x 4 samples.
- The on-policy rows sample from the current student and distil the frozen (or EMA) base shown a privileged
  context into it, one optimiser step per iteration on 8 sampled sequences (SSB's batch), 48 iterations:
  `onpolicy` (SSB's context: the correct and most common wrong rollout of the same curation, SSB's forward
  KL at T = 2 on top-k + tail), `opsd` (the world's reference solution, forward KL at T = 1, per-token clip,
  frozen base) and `sdpo` (a successful other sample of the same question, 2 questions x 4 samples, JSD
  alpha 0.5 on top-100 + tail, EMA teacher), with the defaults of their config sections otherwise.

The matched budget is **optimiser steps**: every method updates the same adapters 48 times at the same
learning rate, so any gap is what each step's signal is worth. The report's comparison table states the
other budgets side by side (tokens sampled for training, optimiser steps, wall time): SSB and SFT share
curation's sampled tokens; GRPO's and the on-policy rows' are their own samples. At this toy scale the wall
times are mostly XLA compilation (each stage compiles its own step and sampler), not work.

The world: `world.problem_family=several_slips` (ssb_jax/toyworld/problems.py). In the default world a
"b groups of e" step goes wrong one way (b + e) and is written right one way (b * e): the hinted teacher's
next-token distribution is nearly one-hot, so its soft logits carry the one solution's tokens and SSB tied
SFT (83.0 both). Here the step goes wrong three ways (b + e, e * e, b * (e + 1)) and is written right two ways
(b * e or e * b), so the base's plain answers spread over several wrong modes and the teacher's distribution
at the step holds both right orders; half the problems (group_step_prob 0.5) have such a step. The world's
privileged prompts in pre-training are all three kinds the on-policy stages show (SSB's hint, a reference
solution, a successful peer), so the toy base can read each.

Pre-training is 4,000 steps (`world.pretrain_steps`, 1,000 in configs/tiny.py): after 1,000 the hinted
teacher of this world failed most mixed questions, so there was nothing reliable to distil; after 4,000 it
solves nearly all of them (README, Results, has the figures).

The learning rate is 5e-5 for every method, a quarter of the paper's 2e-4: at 2e-4 every method reaches the
toy's ceiling well before the 48th step, so the table cannot tell them apart; at 5e-5 they stop short of it
and do (README, Results). The on-policy sections copy train.learning_rate when this
file is read, so a different rate is given to each section on the command line (README has the command).

Learning curves (greedy accuracy and completion length on the first 32 held-out problems) are recorded
every 12 optimiser steps for every method and drawn in one figure (curves.png) by the report.
"""
from pathlib import Path

from ssb_jax.config import load_config_file

ON_POLICY_ROWS = ("onpolicy", "opsd", "sdpo")


def get_config():
    c = load_config_file(str(Path(__file__).with_name("tiny.py")))  # curation, SSB, eval, curves
    c.workdir = "runs/tiny_compare"
    c.stages = "curate,train,sft,grpo,onpolicy,opsd,sdpo,eval,report"
    c.world.problem_family = "several_slips"   # the harder world (docstring)
    c.world.group_step_prob = 0.5
    c.world.pretrain_steps = 4000              # a reliable hinted teacher (docstring)
    c.train.learning_rate = 5e-5               # below the ceiling at 48 steps (docstring)

    # GRPO at SSB's optimiser-step budget: 128 pairs / 8 per batch x 3 epochs = 48 steps
    ssb_steps = c.curate.target_pairs // c.train.batch_size * c.train.epochs
    c.grpo.steps = ssb_steps
    c.grpo.minibatches = 1
    c.grpo.updates_per_batch = 1
    c.grpo.checkpoint_every = 12
    c.grpo.learning_rate = c.train.learning_rate

    # the on-policy rows: one optimiser step per iteration, SSB's batch of 8 sequences, SSB's LoRA and lr
    for name in ON_POLICY_ROWS:
        o = c[name]
        o.steps = ssb_steps
        o.max_new_tokens = c.grpo.max_new_tokens        # 96, as curation's rollouts and GRPO's samples
        o.sample_temperature = c.grpo.temperature       # 0.8
        o.learning_rate = c.train.learning_rate          # 5e-5
        o.schedule = c.train.schedule
        o.lora_rank = c.train.lora_rank                  # 16
        o.lora_alpha = c.train.lora_alpha                # 32
        o.logits_chunk = 0
        o.checkpoint_every = 12
        o.grader = c.curate.grader
    c.onpolicy.prompts_per_step = c.train.batch_size     # 8 questions x 1 sample
    c.opsd.prompts_per_step = c.train.batch_size
    c.sdpo.prompts_per_step = c.train.batch_size // c.sdpo.samples_per_prompt   # 2 questions x 4 samples
    # curves as configs/tiny.py sets them (every 12 optimiser steps on 32 held-out problems) apply to every
    # method: with one optimiser step per iteration, their points stand at the same steps
    return c
