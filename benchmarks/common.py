"""Shared helpers for the benchmarks: model shapes, the machine's copy bandwidth, timing, results."""
from __future__ import annotations

import json
import os
import platform
import subprocess
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
}


def model_config(shape: str, dtype: str = "float32", layers: int | None = None, **overrides) -> ModelConfig:
    fields = dict(SHAPES[shape], dtype=dtype, **overrides)
    if layers:
        fields["num_layers"] = layers
    return ModelConfig(**fields)


def hf_config(config: ModelConfig):
    from transformers import Qwen2Config
    return Qwen2Config(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})


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


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
    try:
        model = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True)
        info["cpu_model"] = model.stdout.split(":", 1)[-1].strip()
    except OSError:
        pass
    try:
        import jax
        info["jax_devices"] = [str(d) for d in jax.devices()]
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


def write_results(name: str, results: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return path
