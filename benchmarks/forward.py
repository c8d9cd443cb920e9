"""Forward throughput: ssb_jax vs transformers on the same shape, in one process; compile time with scan.

    python -m benchmarks.forward                           # 0.5B shape, f32, CPU, batch 8 x 128
    python -m benchmarks.forward --shape 3b --dtype bfloat16 --batch 8 --seq 1024   # on a GPU
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_of, hf_config, machine_info, model_config, write_results
from flax import nnx

from ssb_jax.model.qwen2 import apply, init_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    config = model_config(args.shape, args.dtype, args.layers)
    graphdef, params = nnx.split(init_model(config, 0))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape)
    mask = np.ones(tokens.shape, bool)
    run = jax.jit(lambda p, t, pos, m: apply(graphdef, p, t, pos, m)[0])
    args_dev = [jnp.asarray(x) for x in (tokens, positions, mask)]

    start = time.perf_counter()
    compiled = run.lower(params, *args_dev).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, *args_dev))
    seconds = best_of(lambda: jax.block_until_ready(compiled(params, *args_dev)), args.repeats)
    tokens_total = args.batch * args.seq
    result = {"config": vars(args), "machine": machine_info(), "compile_s": compile_s,
              "ssb_jax": {"seconds": seconds, "tokens_per_s": tokens_total / seconds}}

    if not args.no_peer:
        import torch
        from transformers import Qwen2ForCausalLM
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = Qwen2ForCausalLM(hf_config(config)).to(device=device, dtype=torch_dtype).eval()
        ids = torch.as_tensor(tokens, dtype=torch.long, device=device)

        def peer():
            with torch.no_grad():
                model(input_ids=ids).logits.float().sum().item()
        peer()
        peer_s = best_of(peer, args.repeats)
        result["transformers"] = {"seconds": peer_s, "tokens_per_s": tokens_total / peer_s}
        result["speedup"] = peer_s / seconds
    name = args.name or f"forward_{jax.default_backend()}_{args.shape}_{args.dtype}"
    write_results(name, result)


if __name__ == "__main__":
    main()
