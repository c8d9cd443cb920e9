"""Resource planner: memory per device and a time estimate per stage, before renting the hardware.

    python -m ssb_jax.plan --config configs/qwen3b.py --accelerator H100-80G [--devices 8] [--config.key=value]

Memory of parameters, LoRA, optimizer state and KV cache is exact: the same logical-axis table that
places the arrays decides how they split (tests compare with real sharded arrays). Activations and
times are estimates from FLOPs and bandwidth (stated as such in the output).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from types import SimpleNamespace

import numpy as np

from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import student_split
from ssb_jax.model.qwen2 import CACHE_AXES
from ssb_jax.sharding import MESH_AXES, logical_to_spec, variable_axes


@dataclasses.dataclass(frozen=True)
class Accelerator:
    devices: int          # devices one host (or slice) shows to JAX
    memory_gib: float     # per device
    bf16_tflops: float    # dense peak per device
    bandwidth_gbs: float  # memory bandwidth per device


ACCELERATORS = {
    "v4-8": Accelerator(4, 32, 275, 1228),
    "v5e-8": Accelerator(8, 16, 197, 819),
    "v5p-8": Accelerator(4, 95, 459, 2765),
    "v6e-8": Accelerator(8, 32, 918, 1640),
    "A100-40G": Accelerator(1, 40, 312, 1555),
    "A100-80G": Accelerator(1, 80, 312, 2039),
    "H100-80G": Accelerator(1, 80, 989, 3350),
    "H200": Accelerator(1, 141, 989, 4800),
    "T4": Accelerator(1, 15, 65, 320),
    "L4": Accelerator(1, 24, 121, 300),
}
# Realistic fractions of peak for the time estimates (not measured here; conservative guesses).
MFU_TRAIN, MFU_PREFILL, BANDWIDTH_FRACTION = 0.35, 0.4, 0.6


def mesh_shape(mesh: dict, devices: int) -> dict[str, int]:
    sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if devices % known:
            raise ValueError(f"{devices} devices cannot fill mesh {sizes}")
        sizes[free[0]] = devices // known
    if math.prod(sizes.values()) != devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; the accelerator has {devices}")
    return sizes


def array_bytes_per_device(logical_axes, shape, axes: dict[str, int], itemsize: int) -> int:
    """Bytes on one device of an array with these logical axes, placed by the logical-axis table."""
    split = 1
    for entry in logical_to_spec(logical_axes, shape, SimpleNamespace(shape=axes)):
        for a in ((entry,) if isinstance(entry, str) else (entry or ())):
            split *= axes[a]
    return int(np.prod(shape)) * itemsize // split


def state_bytes_per_device(state, axes: dict[str, int], itemsize: int | None = None) -> int:
    """Bytes on one device of an (abstract) model state; itemsize None: each variable's own dtype."""
    import jax
    from flax import nnx
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return sum(array_bytes_per_device(variable_axes(v), v.shape, axes, itemsize or np.dtype(v.dtype).itemsize)
               for v in variables)


def cache_shape(config: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    """The shape of the K (or V) cache; its logical axes are qwen2.CACHE_AXES["k"]."""
    return (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)


def training_activation_bytes(config: ModelConfig, batch_per_device: int, seq: int, remat: str,
                              tensor: int, chunk: int) -> int:
    """Estimate: what the backward pass keeps per layer, plus the transient working set of one layer.

    Per token and layer without remat: about 10 hidden-sized and 3 MLP-sized tensors, plus the f32
    attention probabilities (heads x seq); remat "full" keeps only the layer input; "dots" and
    "dots_no_batch" keep the projections' outputs (about 4 hidden-sized and 3 MLP-sized tensors;
    "dots" also attention's two batched products).
    """
    b = 2 if config.dtype == "bfloat16" else 4
    tokens = batch_per_device * seq
    attention_probs = batch_per_device * (config.num_heads // tensor) * seq * seq * 4
    one_layer = tokens * (10 * config.hidden_size + 3 * config.intermediate_size // tensor) * b + attention_probs
    projections = tokens * (4 * config.hidden_size + 3 * config.intermediate_size // tensor) * b
    kept = {"none": one_layer, "full": tokens * config.hidden_size * b, "dots_no_batch": projections,
            "dots": projections + attention_probs}[remat]
    logits = 3 * batch_per_device * chunk * config.vocab_size * 4  # teacher, student and its gradient
    return config.num_layers * kept + one_layer + logits


def plan(config, accelerator: str, devices: int | None = None, keep_rate: float = 0.2) -> dict:
    from ssb_jax.config import section_to
    from ssb_jax.curate import CurationConfig
    from ssb_jax.distill.config import TrainConfig
    acc = ACCELERATORS[accelerator]
    devices = devices or acc.devices
    axes = mesh_shape(dict(config.mesh), devices)
    model_config = _model_config(config)
    tc = section_to(TrainConfig, config.train, "config.train")
    cur = section_to(CurationConfig, config.curate, "config.curate")
    lora_config = tc.lora_config()
    pbytes = np.dtype(model_config.jnp_dtype).itemsize
    data_parallel = axes["data"] * axes["fsdp"]

    _, lora_state, base_state = student_split(model_config, lora_config)  # abstract: nothing allocated
    weights = state_bytes_per_device(base_state, axes)
    lora = state_bytes_per_device(lora_state, axes)
    optimizer = 2 * state_bytes_per_device(lora_state, axes, 4)  # Adam's two moments, f32
    sample_batch = max(config.sampler.batch_size, data_parallel)
    sample_len = config.sampler.max_prompt_tokens + max(cur.rollout_max_new_tokens, cur.solution_max_new_tokens)
    rows = sample_batch * cur.num_rollouts
    kv = 2 * array_bytes_per_device(CACHE_AXES["k"], cache_shape(model_config, rows, sample_len), axes, pbytes)
    train_seq = tc.max_seq_len or 2 * max(cur.solution_max_new_tokens, 512) + 512
    batch_per_device = max(1, tc.batch_size // data_parallel)
    activations = training_activation_bytes(model_config, batch_per_device, train_seq, model_config.remat,
                                            axes["tensor"], tc.logits_chunk or train_seq)
    sampling_total = weights + kv
    training_total = weights + lora + optimizer + activations
    capacity = acc.memory_gib * 2**30

    # time: decode is bandwidth-bound (weights + cache per step), training compute-bound
    n_params = model_config.param_count()
    questions = math.ceil(cur.target_pairs / keep_rate) if cur.target_pairs else 7473
    # each decode step reads the weights and (on average) half the cache; mixed questions ~ keep_rate * 1.5
    decode_step_s = (weights + kv / 2) / (acc.bandwidth_gbs * 1e9 * BANDWIDTH_FRACTION)
    rollout_steps = math.ceil(questions / sample_batch) * cur.rollout_max_new_tokens
    solution_steps = math.ceil(1.5 * keep_rate * questions / sample_batch) * cur.solution_max_new_tokens
    curate_s = (rollout_steps + solution_steps) * decode_step_s
    train_tokens = cur.target_pairs * tc.epochs * train_seq
    train_s = 6 * n_params * train_tokens / (devices * acc.bf16_tflops * 1e12 * MFU_TRAIN)
    gib = 2**30
    return {
        "accelerator": accelerator, "devices": devices, "mesh": axes, "model_parameters": n_params,
        "memory_gib_per_device": {
            "base_weights": weights / gib, "lora": lora / gib, "optimizer_state": optimizer / gib,
            "sampling_kv_cache": kv / gib, "training_activations_estimate": activations / gib,
            "sampling_total": sampling_total / gib, "training_total": training_total / gib,
            "capacity": acc.memory_gib},
        "fits": {"sampling": sampling_total < 0.9 * capacity, "training": training_total < 0.9 * capacity},
        "time_estimate_s": {"curate": curate_s, "train": train_s},
        "assumptions": {"keep_rate": keep_rate, "sampling_rows": rows, "sampling_length": sample_len,
                        "train_seq": train_seq, "mfu_train": MFU_TRAIN, "bandwidth_fraction": BANDWIDTH_FRACTION},
    }


def _model_config(config) -> ModelConfig:
    from pathlib import Path
    path = Path(config.model.path)
    if (path / "config.json").exists():
        mc = ModelConfig.from_json(path)
    else:  # a hub id: use the shared copy of its config when we have it, else fetch config.json only
        from ssb_jax.paths import shared_data_dir
        local = shared_data_dir() / "qwen2.5_configs" / path.name / "config.json"
        if local.exists():
            mc = ModelConfig.from_json(local)
        else:
            from huggingface_hub import hf_hub_download
            mc = ModelConfig.from_json(hf_hub_download(str(config.model.path), "config.json"))
    return mc.replace(dtype=config.model.dtype, remat=config.model.remat)


def format_plan(p: dict) -> str:
    m = p["memory_gib_per_device"]
    lines = [f"{p['accelerator']}: {p['devices']} devices, mesh {p['mesh']}, {p['model_parameters'] / 1e9:.2f}B parameters",
             "memory per device (GiB):"]
    for key in ("base_weights", "lora", "optimizer_state", "sampling_kv_cache", "training_activations_estimate"):
        lines.append(f"  {key:32s}{m[key]:10.3f}")
    for stage in ("sampling", "training"):
        verdict = "fits" if p["fits"][stage] else "DOES NOT FIT: shard more (mesh.fsdp/tensor), lower the batch, or remat"
        lines.append(f"  {stage + ' total':32s}{m[stage + '_total']:10.3f} of {m['capacity']} -> {verdict}")
    t = p["time_estimate_s"]
    lines.append(f"time estimate: curate {t['curate'] / 60:.1f} min, train {t['train'] / 60:.1f} min "
                 f"(assumptions: {p['assumptions']})")
    return "\n".join(lines)


def main(argv=None):
    """argv without the program name; --config.section.key=value overrides as in ssb_jax.main."""
    import sys
    from ssb_jax.config import parse_config_args
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="--config.section.key=value overrides a setting, as for ssb_jax.main")
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--accelerator", default="H100-80G", choices=sorted(ACCELERATORS))
    parser.add_argument("--devices", type=int, default=None, help="override the device count (e.g. a bigger slice)")
    parser.add_argument("--keep-rate", type=float, default=0.2, help="fraction of questions curation keeps")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(["--help"])
    try:
        config, rest = parse_config_args(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest + ["--config", "(parsed above)"])
    print(format_plan(plan(config, args.accelerator, args.devices, args.keep_rate)))


if __name__ == "__main__":
    main()
