"""The offline default: a toy world the project builds itself, so every stage runs on a laptop CPU in
minutes with no network.

    python -m ssb_jax.main --config configs/tiny.py

The world (ssb_jax/toyworld/): synthetic multi-step arithmetic word problems, a tokenizer trained on
them, and a small Qwen2 pre-trained so that its plain answers are often wrong (a systematic slip) while
its hinted answers are right. SSB then distils the hinted teacher into the plain student.
"""
from ssb_jax.config import base_config, dataclass_section
from ssb_jax.toyworld import ToyWorldConfig


def get_config():
    c = base_config()
    c.workdir = "runs/tiny"
    c.world = dataclass_section(ToyWorldConfig)
    c.world.enabled = True
    c.model.path = ""           # filled by the world stage
    c.model.dtype = "float32"
    c.data.train = ""           # filled by the world stage
    c.mesh.data = -1            # pure data parallel: a model this small is fastest unsharded
    c.mesh.fsdp = 1

    c.sampler.batch_size = 64
    c.sampler.max_prompt_tokens = 1024  # hinted prompts hold two traces
    c.sampler.min_prompt_bucket = 64

    c.curate.num_rollouts = 4
    c.curate.rollout_max_new_tokens = 96
    c.curate.solution_max_new_tokens = 96
    c.curate.target_pairs = 128
    c.curate.questions_per_batch = 64
    c.curate.grader = "math_verify"

    c.train.batch_size = 8
    c.train.epochs = 3
    c.train.learning_rate = 2e-4   # the paper's lr; a sweep on this world gave the largest held-out gain here
    c.train.lora_rank = 16
    c.train.lora_alpha = 32.0
    c.train.checkpoint_every = 20
    c.train.logits_chunk = 0

    # the GRPO baseline (only with --config.stages naming grpo), on the same questions and LoRA shape
    c.grpo.steps = 30
    c.grpo.prompts_per_step = 16
    c.grpo.group_size = 4
    c.grpo.max_new_tokens = 96
    c.grpo.temperature = 0.8
    c.grpo.learning_rate = 2e-4
    c.grpo.logits_chunk = 0
    c.grpo.checkpoint_every = 5

    c.eval.datasets = "world_test"   # the world's held-out split
    c.eval.protocols = "math_verify"
    c.eval.n_samples = 4
    c.eval.temperature = 0.8
    c.eval.top_p = 1.0
    c.eval.max_new_tokens = 96

    # learning curves: greedy accuracy and length on the first 32 held-out problems every 12 of the 48 steps
    c.curves.eval_every = 12
    c.curves.eval_size = 32
    return c
