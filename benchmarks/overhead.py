"""Host overhead per call of the jitted hot-path functions, on a model so small that compute is negligible.

    python -m benchmarks.overhead

What is timed (median of many calls, each waited for):
- decode_step: one cached decode token through `jit(partial(apply, graphdef))(state, ...)`, the model
  split once and its state passed as a pure dict, as the Sampler, the teacher cache and the train step do
  (what a notebook user stepping a decode loop by hand pays per token; the Sampler's own loop runs on
  the device and pays it once per batch);
- decode_step_static_graphdef: the graph definition as a static argument and the nnx.State as it is;
- decode_step_split_per_call: `nnx.split` on every call as well (the pattern to avoid);
- train_step: the compiled distillation step on placed inputs (state donated), and
- train_step_call: `TrainStep.__call__` with a host batch (adds placing the batch).
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import machine_info, write_results
from ssb_jax.distill.batch import build_batch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.step import TrainStep, init_state, train_step_program
from ssb_jax.distill.synthetic import random_records, tiny_model_config
from ssb_jax.model.qwen2 import apply, init_model


def median_us(fn, calls: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    config = tiny_model_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2)
    model = init_model(config, 0)
    graphdef, state = nnx.split(model)
    token, position, mask = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)
    cache = model.init_cache(1, 16)
    step = jax.jit(functools.partial(apply, graphdef))
    pure = nnx.to_pure_dict(state)
    results = {"decode_step_us": median_us(
        lambda: jax.block_until_ready(step(pure, token, position, mask, cache)), args.calls)}
    static_step = jax.jit(apply, static_argnums=0)
    results["decode_step_static_graphdef_us"] = median_us(
        lambda: jax.block_until_ready(static_step(graphdef, state, token, position, mask, cache)), args.calls)

    def split_every_call():
        g, s = nnx.split(model)
        jax.block_until_ready(static_step(g, s, token, position, mask, cache))
    results["decode_step_split_per_call_us"] = median_us(split_every_call, args.calls // 4)

    tc = TrainConfig(lora_rank=4, logits_chunk=8, batch_size=2, length_buckets=(32,), max_seq_len=32)
    train = TrainStep(config, tc, total_steps=10)
    base = nnx.to_pure_dict(state)
    train_state = init_state(config, train.lora_config, train.optimizer, jax.random.key(1))
    host_batch = build_batch(random_records(np.random.default_rng(0), 2, config.vocab_size), batch_size=2,
                             buckets=(32,), max_seq_len=32)
    placed = train.place_batch(host_batch)
    fn = train_step_program(config, tc, train.lora_config, 10, None)
    holder = {"state": train_state}

    def compiled_step():
        holder["state"], metrics = fn(holder["state"], base, placed)
        jax.block_until_ready(metrics)

    def full_call():
        holder["state"], metrics = train(holder["state"], base, host_batch)
        jax.block_until_ready(metrics)

    results["train_step_us"] = median_us(compiled_step, args.calls // 4)
    results["train_step_call_us"] = median_us(full_call, args.calls // 4)
    for k, v in results.items():
        print(f"{k}: {v:.0f}")
    write_results(args.name or f"overhead_{jax.default_backend()}",
                  {"config": vars(args), "machine": machine_info(), "jax_version": jax.__version__, **results})


if __name__ == "__main__":
    main()
