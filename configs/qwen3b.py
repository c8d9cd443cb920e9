"""The paper's setting: Qwen2.5-3B-Instruct, 256 pairs from GSM8K train, evaluated on MATH500 and AIME 2024.

    python -m ssb_jax.main --config configs/qwen3b.py
Needs an accelerator (one 80 GB GPU or a TPU v4-8/v5e-8 and up). The training mesh is chosen to fit
train.batch_size (config.mesh auto: on 8 devices 4 rows over fsdp and the 2 KV heads over tensor); on a pod
slice set e.g. --config.mesh.data=4 (one per host) with a batch to match (--config.train.batch_size=16 on
16 chips). Sampling picks its own mesh (config.sampler.mesh, auto).
"""
from ssb_jax.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/qwen3b"
    c.model.path = "Qwen/Qwen2.5-3B-Instruct"
    c.model.dtype = "bfloat16"
    # Without remat, batch 4 at the longest sequence bucket (4096) keeps ~400 GiB for the backward pass
    # (float32 attention scores and probabilities of every layer); with full remat 2.25 GiB
    # (python -m ssb_jax.plan shows the terms).
    c.model.remat = "full"
    c.sampler.batch_size = 64
    c.sampler.max_prompt_tokens = 2048

    c.curate.num_rollouts = 4
    c.curate.rollout_temperature = 0.8
    c.curate.rollout_top_k = 50
    c.curate.solution_temperature = 0.4
    c.curate.solution_top_k = 50
    c.curate.rollout_max_new_tokens = 1024
    c.curate.solution_max_new_tokens = 1024
    c.curate.target_pairs = 256
    c.curate.questions_per_batch = 64

    c.train.learning_rate = 2e-4
    c.train.schedule = "linear"
    c.train.batch_size = 4
    c.train.epochs = 3
    c.train.temperature = 2.0
    c.train.ce_weight = 0.0
    c.train.lora_rank = 32
    c.train.lora_alpha = 32.0
    c.train.lora_targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    c.train.checkpoint_every = 50

    c.eval.datasets = "math500,aime24"
    c.export.merged_dtype = "bfloat16"
    return c
