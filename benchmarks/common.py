"""Shared helpers for the benchmarks: model shapes, the device's peak rates, model FLOPs and decode bytes
(the one home of the MFU and roofline arithmetic), timing, results.

Counting (model FLOPs, as PaLM's MFU counts them: what the model needs, not what the hardware did):
  * a matrix product of [m, k] by [k, n] is 2·m·k·n FLOPs; elementwise work, norms, softmax, RoPE,
    the embedding lookup and the optimizer are not counted;
  * attention counts QKᵀ and PV of every query against every key it is given (4·T·S·heads·head_dim
    per layer and sequence, T queries, S keys), the causal half included, as PaLM does;
  * the LM head counts only the positions whose logits are used (the answer positions in training,
    the last prompt position in prefill);
  * a frozen weight gets no gradient, so the backward pass of a frozen projection is one product (the
    gradient of its input) where a trained one would be two; LoRA factors are trained;
  * rematerialisation recomputes the forward in the backward pass; that is hardware work, not
    counted.
Decode bytes: a decode step must read every weight once (the tied embedding is the LM head) and the
keys and values cached so far; nothing else is counted (the floor a step cannot beat).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from ssb_jax.model.config import ModelConfig

RESULTS_DIR = Path(__file__).parent / "results"

SHAPES = {  # the real Qwen2.5 widths (see ../shared/data/qwen2.5_configs)
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
               num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    # smoke runs on a CPU (benchmarks/device_check.sh with SMOKE=1, tests/test_benchmarks.py)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, tie_word_embeddings=True),
}


def model_config(shape: str, dtype: str = "float32", layers: int | None = None, **overrides) -> ModelConfig:
    fields = dict(SHAPES[shape], dtype=dtype, **overrides)
    if layers:
        fields["num_layers"] = layers
    return ModelConfig(**fields)


def hf_config(config: ModelConfig):
    from transformers import Qwen2Config
    return Qwen2Config(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})


# ----------------------------------------------------------------------------- model FLOPs and decode bytes

def projection_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) widths of one decoder layer's seven projections, in ssb_jax.model.config.PROJECTIONS order."""
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def forward_flops(config: ModelConfig, batch: int, queries: int, keys: int | None = None, *,
                  logit_positions: int = 0, lora_rank: int = 0) -> dict[str, float]:
    """Model FLOPs of one forward pass of `batch` sequences of `queries` new tokens, each attending to
    `keys` positions (default: queries), with LM-head logits at `logit_positions` per sequence and
    LoRA factors of `lora_rank` on all seven projections (0: none). Parts: projections, lora,
    attention, head (see the module docstring for what is counted)."""
    keys = queries if keys is None else keys
    tokens, layers = batch * queries, config.num_layers
    shapes = projection_shapes(config)
    return {
        "projections": 2.0 * tokens * layers * sum(i * o for i, o in shapes),
        "lora": 2.0 * tokens * layers * lora_rank * sum(i + o for i, o in shapes),
        "attention": 4.0 * batch * queries * keys * layers * config.q_size,
        "head": 2.0 * batch * logit_positions * config.hidden_size * config.vocab_size,
    }


def prefill_flops(config: ModelConfig, batch: int, prompt: int) -> float:
    """A prompt's forward pass; logits at its last position only (what the sampler computes)."""
    return sum(forward_flops(config, batch, prompt, logit_positions=1).values())


def train_step_flops(config: ModelConfig, batch: int, teacher_len: int, student_len: int, answer_len: int,
                     lora_rank: int) -> dict[str, float]:
    """Model FLOPs of one online-teacher distillation step: the frozen base (LoRA off) forward over the
    teacher sequence, base + LoRA forward and backward over the student sequence, teacher and student
    logits at the answer positions. Backward: one product per frozen projection (input gradient) and per
    logit projection, two per attention product (both operands are activations), two per LoRA factor."""
    teacher = forward_flops(config, batch, teacher_len, logit_positions=answer_len)
    student = forward_flops(config, batch, student_len, logit_positions=answer_len, lora_rank=lora_rank)
    parts = {"teacher_forward": sum(teacher.values()), "student_forward": sum(student.values()),
             "student_backward": student["projections"] + 2 * student["attention"] + 2 * student["lora"]
             + student["head"]}
    parts["total"] = sum(parts.values())
    return parts


def decode_bytes_per_step(config: ModelConfig, batch: int, context: float) -> float:
    """Fewest bytes one decode step reads: every weight once, and the keys and values of `context`
    cached positions of each of `batch` rows."""
    itemsize = np.dtype(config.jnp_dtype).itemsize
    weights = config.param_count() * itemsize
    cache = 2 * config.num_layers * batch * context * config.kv_size * itemsize
    return float(weights + cache)


# ----------------------------------------------------------------------------- the device's peak rates

# (substrings all found in the lower-cased jax device_kind, its ssb_jax.plan.accelerators.ACCELERATORS entry);
# first match wins
DEVICE_KINDS = (
    (("h200",), "H200"),
    (("h100",), "H100-80G"),
    (("a100", "40gb"), "A100-40G"),
    (("a100",), "A100-80G"),
    (("tesla t4",), "T4"),
    (("nvidia l4",), "L4"),
    (("tpu v4",), "v4-8"),
    (("tpu v5 lite",), "v5e-8"),
    (("tpu v5e",), "v5e-8"),
    (("tpu v5",), "v5p-8"),
    (("tpu v6",), "v6e-8"),
)
PEAK_TFLOPS_ENV, BANDWIDTH_ENV = "SSB_PEAK_TFLOPS", "SSB_HBM_GBS"


def accelerator_for(device_kind: str) -> str | None:
    kind = device_kind.lower()
    for needles, name in DEVICE_KINDS:
        if all(n in kind for n in needles):
            return name
    return None


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """The ceilings MFU and the decode roofline are taken against (None: unknown, no ratio reported)."""
    device_kind: str
    bf16_tflops: float | None    # dense matrix-product peak
    bandwidth_gbs: float | None  # memory bandwidth
    source: str

    def mfu(self, flops: float, seconds: float) -> float | None:
        return flops / seconds / (self.bf16_tflops * 1e12) if self.bf16_tflops and seconds > 0 else None

    def transfer_seconds(self, bytes_moved: float) -> float | None:
        """The least time moving these bytes through memory takes."""
        return bytes_moved / (self.bandwidth_gbs * 1e9) if self.bandwidth_gbs else None

    def roofline_fraction(self, bytes_moved: float, seconds: float) -> float | None:
        return self.transfer_seconds(bytes_moved) / seconds if self.bandwidth_gbs and seconds > 0 else None


def device_peaks(*, dtype: str = "float32", copy_megabytes: int = 512) -> DevicePeaks:
    """Peaks of jax.devices()[0]: the datasheet row of ssb_jax.plan.accelerators.ACCELERATORS for its
    device_kind (dense bf16 peak, HBM bandwidth); on a CPU, measured (a jitted `dtype` matrix product;
    numpy's copy bandwidth, bytes read plus written). SSB_PEAK_TFLOPS / SSB_HBM_GBS (TFLOP/s, GB/s) override either."""
    import jax
    from ssb_jax.plan.accelerators import ACCELERATORS
    device = jax.devices()[0]
    tflops, bandwidth = (float(os.environ[k]) if os.environ.get(k) else None for k in (PEAK_TFLOPS_ENV, BANDWIDTH_ENV))
    overrides = [k for k in (PEAK_TFLOPS_ENV, BANDWIDTH_ENV) if os.environ.get(k)]
    source = "unknown device kind (set SSB_PEAK_TFLOPS and SSB_HBM_GBS)"
    name = accelerator_for(device.device_kind)
    if name:
        tflops = tflops or ACCELERATORS[name].bf16_tflops
        bandwidth = bandwidth or ACCELERATORS[name].bandwidth_gbs
        source = f"ssb_jax.plan.accelerators.ACCELERATORS[{name!r}] (datasheet: dense bf16, HBM)"
    elif device.platform == "cpu":  # measure only what the environment does not give
        tflops = tflops or matmul_tflops(dtype)
        bandwidth = bandwidth or copy_bandwidth_gbs(copy_megabytes)
        source = f"measured on this CPU: jitted {dtype} 1024x1024 matrix product; numpy copy, read + write"
    if overrides:
        source += "; overridden by " + ", ".join(overrides)
    return DevicePeaks(device.device_kind, tflops, bandwidth, source)


def matmul_tflops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """Best rate of a jitted n x n x n matrix product on the default device, random operands."""
    import jax
    import jax.numpy as jnp
    k1, k2 = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.dtype(dtype)) for k in (k1, k2))
    product = jax.jit(jnp.matmul)
    jax.block_until_ready(product(a, b))
    return 2.0 * n**3 / best_of(lambda: jax.block_until_ready(product(a, b)), repeats) / 1e12


def device_memory() -> dict | None:
    """Allocator statistics of jax.devices()[0] (None on backends without them, e.g. the CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def compiled_memory(compiled) -> dict | None:
    """XLA's memory analysis of a compiled program, in bytes (None where the backend gives none)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if analysis is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


# ----------------------------------------------------------------------------- timing and machine

def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """STREAM-style copy bandwidth: bytes read plus bytes written per second, best of `repeats`."""
    src = np.ones(megabytes * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def best_of(fn, repeats: int = 3) -> float:
    """Best wall time of fn() over repeats (fn must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


CPU_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_info() -> dict:
    """The CPU behind a figure: model name, family/model numbers (a cloud's "AMD EPYC" says neither the
    generation nor the vector units, and CPU matrix kernels differ by both), and its wide-vector flags."""
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["cpu_model"] = fields.get("model name")
    info["cpu_family"], info["cpu_model_number"] = fields.get("cpu family"), fields.get("model")
    flags = set(fields.get("flags", "").split())
    info["cpu_vector_flags"] = [f for f in CPU_VECTOR_FLAGS if f in flags]
    return info


def machine_info() -> dict:
    info = cpu_info()
    try:
        import jax
        info["jax_devices"] = [str(d) for d in jax.devices()]
        info["device_kind"] = jax.devices()[0].device_kind
        info["jax_backend"] = jax.default_backend()
        info["jax"] = jax.__version__
    except Exception:
        pass
    try:
        import torch
        import transformers
        info["torch"], info["transformers"] = torch.__version__, transformers.__version__
        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    return info


def write_results(name: str, results: dict, directory: str | Path | None = None, echo: bool = True) -> Path:
    """Write results to directory/name.json atomically (a benchmark rewrites it after every row, so a run
    cut short keeps the rows it finished); echo: print them too."""
    directory = Path(directory or RESULTS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=2))
    partial.replace(path)
    if echo:
        print(json.dumps(results, indent=2))
    return path
