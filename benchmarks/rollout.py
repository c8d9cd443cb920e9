"""Rollout throughput: the engine (continuous batching, paged KV cache) vs today's static Sampler vs
transformers `generate`, in one process, on a workload shaped like curation's rollouts.

    python -m benchmarks.rollout                                   # 0.5B shape, f32, CPU, < 10 min on 2 cores
    python -m benchmarks.rollout --shape 3b --dtype bfloat16 --prompts 64 --length-scale 1 --out-dir $OUT

Workload (seeded): K samples per prompt; prompt lengths uniform in [100, 300]; each row's output length
drawn from a long tail with a cap: 80% uniform in [100, 400], 15% between 400 and the cap, 5% at the cap
(--cap, default 1024); every length times --length-scale (default 0.25 on a CPU, so the default run fits
ten minutes; 1 on an accelerator). Random weights without EOS: each row stops at its drawn length (its
own cap), so every side generates the same rows of the same lengths. A static batch (the Sampler's:
prompts sorted by length, --batch-size prompts x K rows) decodes until its longest row stops and holds
KV memory for each of its rows at the longest prompt plus the cap. The engine gets a page pool of that
same KV memory and, by default, as many slots as rows of the workload's mean length (prompt plus output)
fit in it, rounded down to a power of two (--engine-slots; the paged cache's point: rows hold only the
pages they fill), refilling each as its row stops.

Reported per side: useful tokens per second (tokens before each row's stop, over the wall time after
compilation), padding share (decode row-steps spent on rows already stopped, or on empty slots), KV
memory (static: the cache of its largest batch, rows x (prompt bucket + new tokens); engine: the page
pool) and the device allocator's peak where the backend has one. transformers runs the first
--hf-batches static batches only (it is slowest; its rate is over those rows). A second, smaller
workload with every row the same length checks the engine is no slower when there is nothing to refill.
The last line is `engine/static useful tokens/s: N.NNx` for the long-tailed workload.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from benchmarks.common import device_memory, hf_config, machine_info, model_config, write_results
from ssb_jax.engine.engine import Engine
from ssb_jax.engine.paged_cache import page_bytes
from ssb_jax.model.qwen2 import init_model
from ssb_jax.sampling.driver import Sampler, bucket_for
from ssb_jax.sampling.sampler import SamplingParams


def draw_workload(rng: np.random.Generator, prompts: int, k: int, vocab: int, scale: float, cap: int):
    """Prompt token lists and each row's output length [prompts, k] (see the module docstring)."""
    lengths = rng.integers(round(100 * scale), round(300 * scale) + 1, prompts)
    tokens = [rng.integers(0, vocab, int(n)).tolist() for n in lengths]
    scaled_cap = max(round(cap * scale), 2)
    kind = rng.random((prompts, k))
    body = rng.integers(round(100 * scale), round(400 * scale) + 1, (prompts, k))
    tail = rng.integers(min(round(400 * scale) + 1, scaled_cap), scaled_cap + 1, (prompts, k))
    out = np.where(kind < 0.80, body, np.where(kind < 0.95, tail, scaled_cap))
    return tokens, np.minimum(out, scaled_cap).astype(int), scaled_cap


def static_batches(prompts, batch_size):
    """The Sampler's grouping: prompt indices sorted by length, longest first, in chunks of batch_size."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def static_side(model, prompts, sampling, batch_size, k):
    """The static Sampler with every (batch, prompt bucket) program the run uses compiled (one-token rows)."""
    sampler = Sampler(model, batch_size=batch_size, show_progress=False)
    for batch in static_batches(prompts, batch_size):
        sampler.generate_ids([prompts[i] for i in batch], sampling, n=k, caps=[1] * len(batch))
    return sampler


def run_static(sampler, prompts, lengths, sampling, batch_size, k):
    caps = [list(row) for row in lengths]
    out, seconds = timed(lambda: sampler.generate_ids(prompts, sampling, n=k, caps=caps))
    useful = sum(len(c.token_ids) for row in out for c in row)
    batches = static_batches(prompts, batch_size)
    row_steps = sum(len(b) * k * max(lengths[i].max() for i in b) for b in batches)
    widest = max(len(b) for b in batches)
    bucket = max(bucket_for(max(len(prompts[i]) for i in b), sampler.prompt_buckets) for b in batches)
    slot_bytes = page_bytes(sampler.config, 1)
    return {"useful_tokens": useful, "seconds": seconds, "useful_tokens_per_s": useful / seconds,
            "padding_share": 1 - useful / row_steps, "rows_at_a_time": widest * k,
            "kv_bytes": widest * k * (bucket + int(lengths.max())) * slot_bytes,
            "device_memory_after": device_memory()}, out


def engine_side(model, prompts, sampling, slots, k, args):
    """The engine with the run's programs compiled (prefill, and decode at each page-table width up to the
    longest prompt plus the cap)."""
    engine = Engine(model, slots=slots, page_size=args.page_size, num_pages=args.num_pages,
                    prefill_chunk=args.prefill_chunk, steps_per_call=args.steps_per_call)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    engine.generate_ids([prompts[longest]] * max(1, slots // k), sampling, n=k, caps=[[2] * k] * max(1, slots // k))
    engine.compile_ahead(prompts, sampling, n=k)  # every page-table width the run's rows reach
    return engine


def run_engine(engine, prompts, lengths, sampling, slots, k, args):
    engine.stats.clear()
    out, seconds = timed(lambda: engine.generate_ids(prompts, sampling, n=k, caps=[list(r) for r in lengths]))
    useful = sum(len(c.token_ids) for row in out for c in row)
    stats = dict(engine.stats)
    return {"useful_tokens": useful, "seconds": seconds, "useful_tokens_per_s": useful / seconds,
            "padding_share": 1 - stats["busy_slot_steps"] / max(stats["slot_steps"], 1), "slots": slots,
            "pool_pages": engine.allocator.num_pages, "page_size": args.page_size,
            "kv_bytes": engine.allocator.num_pages * page_bytes(engine.config, args.page_size),
            "engine_stats": stats, "device_memory_after": device_memory()}, out


def run_transformers(config, prompts, lengths, batch_size, k, batches, sampling):
    import torch
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = Qwen2ForCausalLM(hf_config(config)).to(device=device, dtype=dtype).eval()
    useful = row_steps = 0
    seconds = 0.0
    for batch in static_batches(prompts, batch_size)[:batches]:
        width = max(len(prompts[i]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(batch):  # left padding, as generation wants
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        steps = int(max(lengths[i].max() for i in batch))  # a static batch runs until its longest row stops
        with torch.no_grad():
            start = time.perf_counter()
            hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                        temperature=sampling.temperature, top_k=sampling.top_k, top_p=1.0, num_return_sequences=k,
                        max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0, eos_token_id=None)
            seconds += time.perf_counter() - start
        useful += int(sum(lengths[i].sum() for i in batch))
        row_steps += len(batch) * k * steps
    return {"useful_tokens": useful, "seconds": seconds, "useful_tokens_per_s": useful / seconds,
            "padding_share": 1 - useful / row_steps, "batches": batches}


def interleaved(run_engine_once, run_static_once, repeats: int):
    """Each side's fastest of `repeats` runs, timed alternately, so that another load on the machine weighs on
    both alike; returns ((engine row, outputs), (static row, outputs))."""
    best = [None, None]
    for _ in range(max(repeats, 1)):
        for side, run in enumerate((run_engine_once, run_static_once)):
            result = run()
            print(("engine", "static")[side], result[0], flush=True)
            if best[side] is None or result[0]["seconds"] < best[side][0]["seconds"]:
                best[side] = result
    return best


def identical_rows(a, b) -> int:
    """How many rows have the same tokens on both sides (a sampled token can differ where two candidates'
    logits are within float32 rounding of a tie: the sides round with other reduction widths)."""
    return sum(c.token_ids == d.token_ids for x, y in zip(a, b) for c, d in zip(x, y))


def differing_rows(ours, theirs) -> list[dict]:
    """Where the rows that differ part: the first differing token, how far apart the two sides' logprobs were
    on the tokens before it, and the logprob each side's own token had there (about equal at a near-tie)."""
    out = []
    for prompt, (x, y) in enumerate(zip(ours, theirs)):
        for sample, (c, d) in enumerate(zip(x, y)):
            if c.token_ids == d.token_ids:
                continue
            first = next(i for i, (s, t) in enumerate(zip(c.token_ids + [-1], d.token_ids + [-1])) if s != t)
            before = np.abs(np.subtract(c.logprobs[:first], d.logprobs[:first]))
            out.append({"prompt": prompt, "sample": sample, "first_difference": first,
                        "logprob_max_difference_before": float(before.max()) if first else 0.0,
                        "tokens": [c.token_ids[first:first + 1], d.token_ids[first:first + 1]],
                        "their_logprobs": [c.logprobs[first:first + 1], d.logprobs[first:first + 1]]})
    return out


def memory_matched_slots(static_kv_slots: int, prompts, lengths) -> int:
    """The rows of the workload's mean length (prompt plus output) that the static sampler's KV memory
    holds, rounded down to a power of two."""
    mean_row = np.mean([len(p) for p in prompts]) + float(np.mean(lengths))
    return 1 << int(math.log2(max(static_kv_slots / mean_row, 1)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.5b", help="0.5b, 3b or tiny (benchmarks.common.SHAPES)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (default 16 on a CPU, 256 elsewhere)")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per static batch, of batch-size x k rows (default 2 on a CPU, 16)")
    parser.add_argument("--length-scale", type=float, default=None, help="every length times this (default 0.25 on "
                        "a CPU, 1 elsewhere)")
    parser.add_argument("--cap", type=int, default=1024, help="the output cap before scaling")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=None, help="the engine's pool (default: no more KV memory "
                        "than the static sampler's largest batch)")
    parser.add_argument("--engine-slots", type=int, default=None, help="the engine's decode slots (default: the "
                        "rows of the workload's mean length its pool holds, a power of two)")
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--steps-per-call", type=int, default=32)
    parser.add_argument("--hf-batches", type=int, default=1, help="static batches transformers runs (0: none)")
    parser.add_argument("--equal-prompts", type=int, default=None, help="prompts of the equal-length workload "
                        "(default: batch-size, one static batch; 0 skips it)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side, alternately; the fastest "
                        "counts (2+ on a loaded machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    prompts_n = args.prompts or (16 if cpu else 256)
    batch_size = args.batch_size or (2 if cpu else 16)
    scale = args.length_scale or (0.25 if cpu else 1.0)
    config = model_config(args.shape, args.dtype, args.layers)
    model = init_model(config, 0)
    sampling = SamplingParams(max_new_tokens=max(round(args.cap * scale), 2), temperature=1.0, top_k=50)
    rng = np.random.default_rng(args.seed)
    prompts, lengths, cap = draw_workload(rng, prompts_n, args.k, config.vocab_size, scale, args.cap)
    static_rows = batch_size * args.k
    if args.num_pages is None:  # the static sampler's KV memory of its largest batch, in pages
        longest_bucket = 2 ** math.ceil(math.log2(max(len(p) for p in prompts)))
        args.num_pages = static_rows * (longest_bucket + cap) // args.page_size
    slots = args.engine_slots or memory_matched_slots(args.num_pages * args.page_size, prompts, lengths)

    results = {"config": vars(args), "backend": jax.default_backend(), "machine": machine_info(),
               "workload": {"prompts": prompts_n, "k": args.k, "length_scale": scale, "cap": cap,
                            "prompt_lengths": [len(p) for p in prompts], "output_lengths": lengths.tolist(),
                            "mean_output": float(lengths.mean()), "at_cap": float((lengths == cap).mean())}}
    engine = engine_side(model, prompts, sampling, slots, args.k, args)
    sampler = static_side(model, prompts, sampling, batch_size, args.k)
    (engine_row, engine_out), (static_row, static_out) = interleaved(
        lambda: run_engine(engine, prompts, lengths, sampling, slots, args.k, args),
        lambda: run_static(sampler, prompts, lengths, sampling, batch_size, args.k), args.repeats)
    results["long_tailed"] = {"engine": engine_row, "static": static_row,
                              "identical_rows": identical_rows(engine_out, static_out),
                              "differing_rows": differing_rows(engine_out, static_out),
                              "rows": int(lengths.size),
                              "ratio": engine_row["useful_tokens_per_s"] / static_row["useful_tokens_per_s"]}
    if args.hf_batches:
        results["long_tailed"]["transformers"] = run_transformers(config, prompts, lengths, batch_size, args.k,
                                                                  args.hf_batches, sampling)
        print("transformers", results["long_tailed"]["transformers"], flush=True)
    equal_n = batch_size if args.equal_prompts is None else args.equal_prompts
    if equal_n:
        equal_prompts = prompts[:equal_n]
        equal_lengths = np.full((equal_n, args.k), int(np.median(lengths)))
        (engine_eq, _), (static_eq, _) = interleaved(
            lambda: run_engine(engine, equal_prompts, equal_lengths, sampling, slots, args.k, args),
            lambda: run_static(sampler, equal_prompts, equal_lengths, sampling, batch_size, args.k), args.repeats)
        results["equal_lengths"] = {"engine": engine_eq, "static": static_eq,
                                    "ratio": engine_eq["useful_tokens_per_s"] / static_eq["useful_tokens_per_s"]}
        print("equal lengths: engine/static useful tokens/s", f"{results['equal_lengths']['ratio']:.2f}x", flush=True)
    name = args.name or f"rollout_{jax.default_backend()}_{args.shape}_{args.dtype}"
    write_results(name, results, args.out_dir)
    print(f"engine/static useful tokens/s: {results['long_tailed']['ratio']:.2f}x")


if __name__ == "__main__":
    main()
