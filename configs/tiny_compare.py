"""Base vs SSB vs plain SFT vs GRPO on the toy world, from the same base, at a matched budget.

    python -m ssb_jax.main --config configs/tiny_compare.py --config.workdir=runs/tiny_compare

Everything of configs/tiny.py (the world, curation, SSB training, eval) plus the two baselines:

- SSB (`train`) and plain SFT (`sft`) train on the *same* curated pairs (one curation, round_1/curate),
  with the same LoRA shape, optimiser, batch size and epochs: 128 pairs / batch 8 x 3 epochs = 48
  optimiser steps each. SFT differs only in its loss (cross-entropy on the hinted teacher's answer, no
  logit distillation).
- GRPO (`grpo`) starts from the same base with the same LoRA shape and learning rate.

The matched budget is **optimiser steps**: GRPO takes one optimiser step per iteration (minibatches 1,
updates_per_batch 1), and runs 48 iterations, as many steps as SSB and SFT. Why steps rather than
sampled tokens: the three methods then update the same adapters the same number of times at the same
learning rate, so any gap is what each step's signal is worth; matching sampled tokens instead would
tie GRPO's length to how many questions curation had to try before it found 128 usable pairs, a number
that depends on the base's accuracy rather than on the method. The report's comparison table states the
other budgets side by side (tokens sampled for training, optimiser steps, wall time), so a reader can
weigh them: SSB and SFT share curation's sampled tokens; GRPO's are its own rollouts. At this toy scale
the wall times are mostly XLA compilation (each stage compiles its own step and sampler), not work.

Learning curves (greedy accuracy and completion length on the first 32 held-out problems) are recorded
every 12 optimiser steps for all three methods and drawn in one figure (curves.png) by the report.
"""
from pathlib import Path

from ssb_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("tiny.py")))  # the world, curation, SSB and eval
    c.workdir = "runs/tiny_compare"
    c.stages = "curate,train,sft,grpo,eval,report"

    # GRPO at SSB's optimiser-step budget: 128 pairs / 8 per batch x 3 epochs = 48 steps
    ssb_steps = c.curate.target_pairs // c.train.batch_size * c.train.epochs
    c.grpo.steps = ssb_steps
    c.grpo.minibatches = 1
    c.grpo.updates_per_batch = 1
    c.grpo.checkpoint_every = 12
    # curves as configs/tiny.py sets them (every 12 optimiser steps on 32 held-out problems) apply to all
    # three methods: with one optimiser step per GRPO iteration, their points stand at the same steps
    return c
