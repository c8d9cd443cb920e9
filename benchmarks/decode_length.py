"""One cached decode step on CPU: does its time follow the filled length of the KV cache, or the allocated one?

    python -m benchmarks.decode_length [--label after] [--steps 20]

A random model (4 layers, hidden 512, 8 heads / 2 KV heads of 64, vocabulary 2048) decodes one token
for 4 rows through `jit(partial(apply, graphdef), donate_argnames="cache")`, the cache fed back each
call, in both weight layouts (the stacked scan layout and the CPU decode layout). Timed: filled lengths
256, 1024, 4096 in a cache of 8192 slots, and 256 filled in a cache of 1024 (median wall time, and median
CPU time of the process, steadier on a shared machine). Also recorded: the compiled
step's temporary memory (`memory_analysis().temp_size_in_bytes`) next to the cache's own bytes, which a
step that updates the cache in place keeps far below the cache size.

Writes benchmarks/results/decode_length_<label>.json (label: "after" by default; run it with
`--label before` on an older checkout to compare).
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import machine_info, write_results
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.qwen2 import apply, init_model
from ssb_jax.sampling.decode_layout import to_decode_layout

ROWS = 4
CASES = ((8192, 256), (8192, 1024), (8192, 4096), (1024, 256))  # (allocated slots, filled slots)


def benchmark_config() -> ModelConfig:
    return ModelConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
                       num_kv_heads=2, head_dim=64, tie_word_embeddings=True)


def filled_cache(model, slots: int, filled: int) -> dict:
    """A cache of `slots` slots whose first `filled` hold random keys and values."""
    cache = model.init_cache(ROWS, slots)
    rng = np.random.default_rng(filled)
    fill = lambda x: x.at[..., :filled, :, :].set(  # noqa: E731  (slots are the third axis from the end)
        jnp.asarray(rng.normal(size=x[..., :filled, :, :].shape), x.dtype))
    cache = jax.tree.map(fill, {"k": cache["k"], "v": cache["v"]}) | {
        "valid": cache["valid"].at[:, :filled].set(True), "index": jnp.int32(filled)}
    return cache


def cache_bytes(cache: dict) -> int:
    return sum(x.nbytes for x in jax.tree.leaves({"k": cache["k"], "v": cache["v"]}))


def time_step(step, state, cache, filled: int, steps: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (all of this process's threads) of one decode step at
    `filled` (the index is reset each call, so the filled length stays put while the donated cache is
    fed back). On a machine shared with other work the CPU time is the steadier measure of the cost."""
    token, mask = jnp.ones((ROWS, 1), jnp.int32), jnp.ones((ROWS, 1), bool)
    position = jnp.full((ROWS, 1), filled, jnp.int32)
    wall, cpu = [], []
    for _ in range(steps + 2):
        cache = dict(cache, index=jnp.asarray(filled, jnp.int32))  # a fresh array: the last one was donated
        start, start_cpu = time.perf_counter(), time.process_time()
        logits, cache = step(state, token, position, mask, cache)
        jax.block_until_ready((logits, cache))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall[2:])), float(np.median(cpu[2:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    config = benchmark_config()
    base = init_model(config, 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout
    load = subprocess.run(["cat", "/proc/loadavg"], capture_output=True, text=True).stdout.split()[:3]
    results = {"label": args.label, "commit": commit, "load_average": load, "cpu_model": cpu.split(":", 1)[-1].strip(),
               "model": {k: getattr(config, k) for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                         "head_dim", "vocab_size")},
               "rows": ROWS, "machine": machine_info(), "layouts": {}}
    for layout, model in (("scan", base), ("decode", to_decode_layout(base))):
        graphdef, state = nnx.split(model)
        state = nnx.to_pure_dict(state)
        rows = []
        for slots, filled in CASES:
            # attend over the filled blocks, as a decode phase whose bound is the next block boundary does
            bound = min(slots, -(-(filled + 1) // config.cache_block) * config.cache_block)
            step = jax.jit(functools.partial(apply, graphdef, attend_slots=bound), donate_argnames="cache")
            cache = filled_cache(model, slots, filled)
            token, position, mask = jnp.ones((ROWS, 1), jnp.int32), jnp.ones((ROWS, 1), jnp.int32), jnp.ones((ROWS, 1), bool)
            memory = step.lower(state, token, position, mask, cache).compile().memory_analysis()
            wall, cpu = time_step(step, state, cache, filled, args.steps)
            rows.append({"allocated": slots, "filled": filled, "step_ms": 1e3 * wall, "step_cpu_ms": 1e3 * cpu,
                         "cache_bytes": cache_bytes(cache), "temp_bytes": int(memory.temp_size_in_bytes)})
            print(layout, rows[-1], flush=True)
        results["layouts"][layout] = rows
    write_results(f"decode_length_{args.label}", results)


if __name__ == "__main__":
    main()
