"""Qwen2.5-0.5B-Instruct, sized for a free Colab accelerator (a T4 GPU or a TPU v2-8).

    python -m ssb_jax.main --config configs/qwen05b.py
"""
from ssb_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/qwen05b"
    c.model.path = "Qwen/Qwen2.5-0.5B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # a 16 GB accelerator: recompute activations in the backward pass
    c.sampler.batch_size = 32
    c.sampler.max_prompt_tokens = 2048

    c.curate.rollout_max_new_tokens = 768
    c.curate.solution_max_new_tokens = 768
    c.curate.target_pairs = 256
    c.curate.questions_per_batch = 32

    c.train.batch_size = 4
    c.train.epochs = 3
    c.train.checkpoint_every = 50
    c.eval.datasets = "math500,aime24,gsm8k_test"
    c.eval.max_new_tokens = 1024
    c.export.merged_dtype = "bfloat16"
    return c
