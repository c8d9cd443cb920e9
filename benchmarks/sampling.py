"""Sampling throughput: ssb_jax vs transformers `generate`, in one process, plus the bandwidth roofline.

    python -m benchmarks.sampling                      # 0.5B shape, f32, CPU, batch 1 and 8
    python -m benchmarks.sampling --shape 3b --dtype bfloat16 --batches 1 64   # on a GPU

Random weights (speed does not depend on their values); EOS is suppressed on both sides
(min_new_tokens = max_new_tokens) so every row generates exactly max_new_tokens tokens.
Roofline: each decode step must read every weight once (the tied embedding is the LM head) plus the
KV cache; tokens/s <= batch * bandwidth / bytes per step. Each side is also timed with one new token
(prefill alone), which splits the run into prefill and decode: decode_tokens_per_s is what the
roofline bounds, tokens_per_s (the whole run, prefill included) is what a user waits for.

Ceilings (benchmarks.common.device_peaks): on an accelerator its datasheet row (dense bf16 peak, HBM
bandwidth; SSB_PEAK_TFLOPS / SSB_HBM_GBS override), on a CPU measured (numpy copy bandwidth, a jitted
matrix product). decode_fraction_of_roofline = bytes a decode step must read (weights + the KV cache
filled so far, at the mean context prompt + new_tokens / 2) / decode step time / bandwidth;
prefill_mfu = model FLOPs of the prompt's forward / prefill time / peak; device_memory_after = the
device allocator's statistics after the row (peak_bytes_in_use: the process's peak so far, rows run in
the order given). transformers is the peer on a CPU; on an accelerator only with --peer.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import (best_of, decode_bytes_per_step, device_memory, device_peaks, hf_config, machine_info,
                               model_config, prefill_flops, write_results)
from ssb_jax.model.qwen2 import init_model
from ssb_jax.sampling.decode_layout import to_decode_layout
from ssb_jax.sampling.driver import decode_layout_by_default
from ssb_jax.sampling.sampler import SamplingParams, generate, row_keys_for

MODES = {"greedy": dict(temperature=0.0), "sampling": dict(temperature=0.8, top_k=50)}


def best_of_interleaved(run_all, run_one, repeats: int) -> tuple[float, float]:
    """Best wall times of the whole run and of the one-token run, timed alternately so that a load on
    the machine weighs on both alike (their difference is the decode time)."""
    totals, ones = [], []
    for _ in range(max(repeats, 1)):
        totals.append(best_of(run_all, 1))
        ones.append(best_of(run_one, 1))
    return min(totals), min(ones)


def _with_decode_split(total_s, prefill_s, batch, new_tokens):
    """Timing dict with the decode part alone: (whole run - prefill and first token) / remaining steps.
    When the difference is not positive (a run so short that timer noise exceeds the decode time) the
    decode fields are None and `decode_unresolved` says why: a negative speed is never reported."""
    row = {"seconds": total_s, "tokens_per_s": batch * new_tokens / total_s, "prefill_s": prefill_s}
    step_s = (total_s - prefill_s) / max(new_tokens - 1, 1)
    if new_tokens < 2 or step_s <= 0:
        return {**row, "decode_step_ms": None, "decode_tokens_per_s": None,
                "decode_unresolved": f"whole run {total_s:.6f} s, one-token run {prefill_s:.6f} s, "
                                     f"{new_tokens} new tokens: no decode time to resolve"}
    return {**row, "decode_step_ms": 1e3 * step_s, "decode_tokens_per_s": batch / step_s}


def ours(config, model, batch, prompt_len, new_tokens, mode, repeats):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, prompt_len)), jnp.int32)
    mask = jnp.ones((batch, prompt_len), bool)
    keys = row_keys_for(0, list(range(batch)), 1)
    graphdef, state = nnx.split(model)

    def compiled(max_new):
        """A timed-run closure for max_new tokens, compiled and checked by a first call, and that call's time."""
        sampling = SamplingParams(max_new_tokens=max_new, stop_ids=(151643, 151645), min_new_tokens=max_new,
                                  **MODES[mode])
        run = jax.jit(lambda s, t, m, k: generate(graphdef, s, t, m, k, sampling=sampling))
        start = time.perf_counter()
        out = jax.block_until_ready(run(state, tokens, mask, keys))
        first = time.perf_counter() - start
        assert int(out["lengths"].min()) == max_new
        return (lambda: jax.block_until_ready(run(state, tokens, mask, keys))), first

    run_all, first = compiled(new_tokens)
    run_one, _ = compiled(1)
    total, prefill = best_of_interleaved(run_all, run_one, repeats)
    return {**_with_decode_split(total, prefill, batch, new_tokens), "compile_and_first_run_s": first}


def transformers_side(model, config, batch, prompt_len, new_tokens, mode, repeats):
    import torch
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, config.vocab_size, (batch, prompt_len)))

    def warmed_run(max_new):
        """A closure generating max_new tokens, run once as a warm-up."""
        kwargs = dict(max_new_tokens=max_new, min_new_tokens=max_new, eos_token_id=[151643, 151645],
                      pad_token_id=151643)
        if mode == "greedy":
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=0.8, top_k=50, top_p=1.0)

        def run():
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            assert out.shape[1] == prompt_len + max_new
        run()  # warm-up
        return run

    total, prefill = best_of_interleaved(warmed_run(new_tokens), warmed_run(1), repeats)
    return _with_decode_split(total, prefill, batch, new_tokens)


def ceilings(config, peaks, batch, prompt_len, new_tokens, timing) -> dict:
    """The decode roofline and prefill MFU of one row's timing (see the module docstring)."""
    step_bytes = decode_bytes_per_step(config, batch, prompt_len + new_tokens / 2)
    flops = prefill_flops(config, batch, prompt_len)
    row = {"decode_bytes_per_step": step_bytes, "prefill_flops": flops,
           "prefill_tflops_per_s": flops / timing["prefill_s"] / 1e12,
           "prefill_mfu": peaks.mfu(flops, timing["prefill_s"])}
    if peaks.bandwidth_gbs:
        roofline = batch / peaks.transfer_seconds(step_bytes)
        decode_s = timing["decode_step_ms"] and timing["decode_step_ms"] / 1e3
        row.update(roofline_tokens_per_s=roofline, fraction_of_roofline=timing["tokens_per_s"] / roofline,
                   decode_fraction_of_roofline=decode_s and peaks.roofline_fraction(step_bytes, decode_s))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.5b", help="0.5b, 3b or tiny (benchmarks.common.SHAPES)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--peer", dest="peer", action="store_true", default=None,
                      help="time transformers generate too (default: on a CPU only)")
    peer.add_argument("--no-peer", dest="peer", action="store_false", help="skip transformers")
    parser.add_argument("--layers-layout", choices=["auto", "scan", "unrolled"], default="auto",
                        help="scan over stacked layer weights, or an unrolled loop over unstacked ones "
                             "(auto: as the Sampler chooses in sampling.driver.unrolled_layers: unrolled on CPU and "
                             "GPU, scan on TPU)")
    parser.add_argument("--copy-mb", type=int, default=512, help="array size of the CPU copy-bandwidth measurement")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args(argv)

    config = model_config(args.shape, args.dtype, args.layers)
    params = init_model(config, 0)
    layout = args.layers_layout
    if layout == "auto":
        layout = "unrolled" if decode_layout_by_default() else "scan"
    if layout == "unrolled":
        params = to_decode_layout(params)
    backend = jax.default_backend()
    peaks = device_peaks(dtype=args.dtype, copy_megabytes=args.copy_mb)
    model = None
    if args.peer if args.peer is not None else backend == "cpu":
        import torch
        from transformers import Qwen2ForCausalLM
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = Qwen2ForCausalLM(hf_config(config)).to(device=device, dtype=torch_dtype).eval()
    rows = []
    name = args.name or f"sampling_{backend}_{args.shape}_{args.dtype}"
    results = {"config": vars(args), "backend": backend, "layers_layout": layout,
               "peaks": dataclasses.asdict(peaks), "machine": machine_info(), "rows": rows}
    for batch in args.batches:
        for mode in args.modes:
            row = {"batch": batch, "mode": mode}
            row["ssb_jax"] = ours(config, params, batch, args.prompt, args.new_tokens, mode, args.repeats)
            if model is not None:
                row["transformers"] = transformers_side(model, config, batch, args.prompt, args.new_tokens, mode,
                                                        args.repeats)
                row["speedup"] = row["ssb_jax"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
                decode_rates = row["ssb_jax"]["decode_tokens_per_s"], row["transformers"]["decode_tokens_per_s"]
                row["decode_speedup"] = decode_rates[0] / decode_rates[1] if all(decode_rates) else None
            row.update(ceilings(config, peaks, batch, args.prompt, args.new_tokens, row["ssb_jax"]))
            row["device_memory_after"] = device_memory()
            rows.append(row)
            print(row, flush=True)
            write_results(name, results, args.out_dir, echo=False)  # each row as it finishes: a timeout keeps them
    write_results(name, results, args.out_dir)


if __name__ == "__main__":
    main()
