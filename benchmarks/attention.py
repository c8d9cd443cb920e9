"""One layer of full-sequence attention, forward + backward (or forward alone): time and compiled
temporary memory per kernel.

    python -m benchmarks.attention                                   # B=4, T=256..2048, 14/2 heads of 64, f32, CPU
    python -m benchmarks.attention --impls xla,chunked,cudnn --dtype bfloat16 --seqs 2048,8192   # on a GPU

The loss is sum(out * w) over real query rows of a left-padded batch (a quarter of each row padding at
most), so the backward is the one training runs. Temp memory is XLA's `memory_analysis()` of the
compiled gradient program (bytes beyond its arguments and outputs).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_of, machine_info, write_results
from ssb_jax.model.attention import causal_attention


def measure(impl, batch, seq, heads, kv_heads, head_dim, dtype, repeats, forward_only=False):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, seq, kv_heads, head_dim)), dtype) for _ in range(2))
    pads = rng.integers(0, seq // 4 + 1, batch)
    key_valid = jnp.asarray(np.arange(seq)[None, :] >= pads[:, None])
    weights = jnp.asarray(rng.normal(size=q.shape), dtype) * key_valid[:, :, None, None]

    def loss(q, k, v, key_valid, weights):  # every array an argument: XLA would constant-fold closed-over ones
        return jnp.sum(causal_attention(q, k, v, key_valid, impl).astype(jnp.float32) * weights)

    program = jax.jit(loss if forward_only else jax.value_and_grad(loss, argnums=(0, 1, 2)))
    arrays = (q, k, v, key_valid, weights)
    compiled = program.lower(*arrays).compile()
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(*arrays))
    seconds = best_of(lambda: jax.block_until_ready(compiled(*arrays)), repeats)
    return {"impl": impl, "batch": batch, "seq": seq, "dtype": jnp.dtype(dtype).name,
            "pass": "forward" if forward_only else "forward+backward", "seconds": round(seconds, 4),
            "temp_mib": round(memory.temp_size_in_bytes / 2**20, 1) if memory is not None else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="xla,chunked")
    parser.add_argument("--seqs", default="256,512,1024,2048")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward_only", action="store_true", help="time the forward alone (teacher scoring)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    rows = []
    for seq in (int(s) for s in args.seqs.split(",")):
        for impl in args.impls.split(","):
            rows.append(measure(impl, args.batch, seq, args.heads, args.kv_heads, args.head_dim,
                                jnp.dtype(args.dtype), args.repeats, args.forward_only))
            print(rows[-1], flush=True)
    name = args.name or f"attention_{jax.default_backend()}_{args.dtype}{'_forward' if args.forward_only else ''}"
    write_results(name, {"machine": machine_info(), "heads": args.heads, "kv_heads": args.kv_heads,
                         "head_dim": args.head_dim, "results": rows})


if __name__ == "__main__":
    main()
