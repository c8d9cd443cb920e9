"""One distillation train step: ssb_jax (online teacher, chunked / unchunked vocabulary projection)
on the default JAX backend, vs PyTorch + PEFT computing the same loss on the CPU, on a random
Qwen2.5-shaped model (--shape 0.5b / 3b / tiny, --dtype float32 / bfloat16).

The step (both frameworks): teacher = base with LoRA off on [hinted prompt ‖ solution] (no grad),
student = base + LoRA (r = 32, alpha = 32, all 7 projections) on [plain prompt ‖ solution],
loss = T²·KL(softmax(t/T) ‖ softmax(s/T)) over the solution tokens (T = 2), backward, clip 1.0,
AdamW over the LoRA parameters only. The batch is bucketed to exactly these lengths (no padding).

Method: each variant runs in its own fresh subprocess, one after the other (never concurrently):
  * step time = mean wall time of the timed steps after one warm-up (compile) step;
  * tokens_per_s = (teacher + student tokens) per step / step time; answer_tokens_per_s likewise;
  * mfu = model FLOPs of the step (benchmarks.common.train_step_flops: teacher forward, student
    forward and backward through the frozen base and the LoRA factors, the logits at the answer
    positions; rematerialisation not counted) / step time / the device's dense bf16 peak
    (benchmarks.common.device_peaks: ssb_jax.plan.accelerators.ACCELERATORS by jax device_kind, or
    SSB_PEAK_TFLOPS; on a CPU a measured matrix product);
  * device memory: `device_peak_bytes` = the allocator's peak_bytes_in_use (accelerators; weights
    included) and XLA's compiled memory analysis of the step (`xla_memory`, bytes);
  * host memory: `step_peak_rss_mb` = the process's peak resident set size (VmHWM) over all steps,
    after resetting it through /proc/self/clear_refs once the model is built (and, for ssb_jax,
    compiled ahead of time); `step_peak_delta_mb` = that peak - RSS just before the first step,
    i.e. what the step needs on top of the weights (on a CPU); `peak_rss_incl_compile_mb` (ssb_jax)
    is the whole-process getrusage peak including XLA compilation.
The PyTorch + PEFT peer runs only when the JAX backend is the CPU, unless --peer asks for it.

    python benchmarks/train_step.py                      # full 0.5B shape (24 layers); slow on a small CPU
    python benchmarks/train_step.py --layers 4 --steps 2 # what fits a 2-core box in a few minutes
    python benchmarks/train_step.py --shape 3b --dtype bfloat16 --batch 8 --remat full   # on a GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks.common` and `ssb_jax` from this checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import SHAPES, cpu_info  # noqa: E402  (light: numpy and ModelConfig only)

SHAPE_FLAGS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
               "intermediate": "intermediate_size", "vocab": "vocab_size"}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so later peaks exclude compilation/warm-up."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def shapes(args):
    teacher_prompt = args.teacher_prompt
    student_prompt = args.student_prompt
    solution = args.seq - teacher_prompt
    return teacher_prompt, student_prompt, solution


def sequence_lengths(args) -> tuple[int, int, int]:
    """(teacher, student, answer) lengths of every row."""
    tp, sp, sol = shapes(args)
    return tp + sol, sp + sol, sol


def records(args, vocab):
    import numpy as np
    rng = np.random.default_rng(0)
    tp, sp, sol = shapes(args)
    out = []
    for i in range(args.batch):
        student = rng.integers(0, vocab, sp).tolist()
        out.append({"id": i, "teacher_prompt_ids": rng.integers(0, vocab, tp - sp).tolist() + student,
                    "student_prompt_ids": student, "solution_ids": rng.integers(0, vocab, sol).tolist()})
    return out


def model_fields(args):
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                head_dim=args.hidden // args.heads, rope_theta=1e6, tie_word_embeddings=True)


# ----------------------------------------------------------------------------- workers

def worker_jax(args) -> dict:
    import jax
    import numpy as np

    from benchmarks.common import compiled_memory, device_memory, device_peaks, train_step_flops
    from ssb_jax.distill.batch import DistillBatch, build_batch
    from ssb_jax.distill.config import TrainConfig
    from ssb_jax.distill.step import TrainStep, base_state_for_training, init_state, train_step_program
    from ssb_jax.model.config import ModelConfig
    from ssb_jax.model.qwen2 import init_model

    config = ModelConfig(**model_fields(args), dtype=args.dtype, remat=args.remat)
    params = base_state_for_training(init_model(config, 0))
    teacher_len, student_len, answer_len = sequence_lengths(args)
    buckets = tuple(sorted({teacher_len, student_len, answer_len}))  # every row exactly its length: no padding
    tc = TrainConfig(lora_rank=args.rank, lora_alpha=float(args.rank), temperature=2.0, logits_chunk=args.chunk,
                     batch_size=args.batch, length_buckets=buckets, max_seq_len=teacher_len)
    step = TrainStep(config, tc, total_steps=100)
    state = init_state(config, tc.lora_config(), step.optimizer, jax.random.key(1))
    batch = build_batch(records(args, config.vocab_size), batch_size=args.batch, buckets=buckets,
                        max_seq_len=teacher_len)
    jax.block_until_ready((params, state))
    setup = rss_mb()
    placed = step.place_batch(batch)
    fn = train_step_program(config, tc, step.lora_config, 100, None)
    t0 = time.perf_counter()
    compiled = fn.lower(state, params, placed).compile()
    compile_s = time.perf_counter() - t0
    xla_memory = compiled_memory(compiled)
    before = rss_mb()
    reset_hwm()  # the peak below counts the steps only, not the compiler
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        state, m = compiled(state, params, placed)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_peak = hwm_mb()
    step_s = float(np.mean(times[1:]))
    memory = device_memory()
    flops = train_step_flops(config, args.batch, teacher_len, student_len, answer_len, args.rank)
    peaks = device_peaks(dtype=args.dtype, copy_megabytes=16)
    return {"framework": "ssb_jax", "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "dtype": args.dtype, "logits_chunk": args.chunk, "remat": args.remat, "loss": float(m["loss"]),
            "answer_tokens": int(m["answer_tokens"]),
            "computed_shapes": {k: list(v.shape) for k, v in batch.present().items() if k.endswith("_tokens")},
            "compile_s": compile_s, "first_step_s": times[0], "step_times_s": times[1:], "step_s": step_s,
            "tokens_per_s": args.batch * (teacher_len + student_len) / step_s,
            "answer_tokens_per_s": args.batch * answer_len / step_s,
            "model_flops": flops, "model_tflops_per_s": flops["total"] / step_s / 1e12,
            "mfu": peaks.mfu(flops["total"], step_s), "peaks": dataclasses.asdict(peaks),
            "device_peak_bytes": memory and memory.get("peak_bytes_in_use"), "device_memory": memory,
            "xla_memory": xla_memory,
            "xla_temp_mb": xla_memory["temp_size_in_bytes"] / 2**20 if xla_memory else None,
            "setup_rss_mb": setup, "rss_before_steps_mb": before, "step_peak_rss_mb": step_peak,
            "step_peak_delta_mb": step_peak - before, "peak_rss_incl_compile_mb": peak_rss_mb(),
            "jax_version": jax.__version__, "keys": list(DistillBatch.step_fields(tc.teacher_mode))}


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    f = model_fields(args)
    hf_config = Qwen2Config(vocab_size=f["vocab_size"], hidden_size=f["hidden_size"],
                            intermediate_size=f["intermediate_size"], num_hidden_layers=f["num_layers"],
                            num_attention_heads=f["num_heads"], num_key_value_heads=f["num_kv_heads"],
                            rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768,
                            attn_implementation=args.torch_attn)
    model = Qwen2ForCausalLM(hf_config).to({"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    recs = records(args, f["vocab_size"])
    T = 2.0
    teacher = torch.tensor([r["teacher_prompt_ids"] + r["solution_ids"] for r in recs])
    student = torch.tensor([r["student_prompt_ids"] + r["solution_ids"] for r in recs])
    tp, sp, sol = len(recs[0]["teacher_prompt_ids"]), len(recs[0]["student_prompt_ids"]), len(recs[0]["solution_ids"])
    setup = rss_mb()
    reset_hwm()

    def step():
        with torch.no_grad(), model.disable_adapter():
            t_logits = model(input_ids=teacher).logits[:, tp - 1:tp - 1 + sol]
        s_logits = model(input_ids=student).logits[:, sp - 1:sp - 1 + sol]
        V = s_logits.shape[-1]
        loss = F.kl_div(F.log_softmax(s_logits.reshape(-1, V) / T, -1), F.softmax(t_logits.reshape(-1, V) / T, -1),
                        reduction="batchmean") * T ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss)

    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    step_peak = hwm_mb()
    return {"framework": "torch+peft", "dtype": args.dtype, "attn_implementation": args.torch_attn, "loss": loss,
            "answer_tokens": sol * args.batch, "first_step_s": times[0], "step_times_s": times[1:],
            "step_s": float(np.mean(times[1:])), "setup_rss_mb": setup, "rss_before_steps_mb": setup,
            "step_peak_rss_mb": step_peak, "step_peak_delta_mb": step_peak - setup, "peak_rss_mb": peak_rss_mb(),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES),
                   help="Qwen2.5 widths (benchmarks.common.SHAPES); the flags below override single fields")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seq", type=int, default=1024, help="teacher sequence length (hinted prompt + solution)")
    p.add_argument("--teacher-prompt", type=int, default=256)
    p.add_argument("--student-prompt", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--chunk", type=int, default=128, help="answer positions per vocabulary chunk (ssb_jax)")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"],
                   help="per-layer rematerialisation policy (ssb_jax)")
    p.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--variants", default="jax_chunked,jax_unchunked,torch_peft")
    p.add_argument("--peer", action="store_true",
                   help="run torch_peft even when JAX runs on an accelerator (it runs on the CPU)")
    p.add_argument("--out", default=None,
                   help="results JSON (default benchmarks/results/train_step_<backend>_<shape>_<dtype>_b<batch>.json)")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = SHAPES[args.shape]
    for flag, field in SHAPE_FLAGS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, preset[field])
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if not 0 < args.student_prompt <= args.teacher_prompt < args.seq:
        p.error("need 0 < --student-prompt <= --teacher-prompt < --seq")
    return args


def worker_env() -> dict:
    """The workers' environment: this one (JAX_PLATFORMS included, so they run where the caller asks),
    this checkout importable, and without the test suite's fake CPU devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def run_worker(cmd, env) -> dict:
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        result = {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
    else:
        result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.time() - t0
    return result


def main(argv=None):
    args = parse(argv)
    if args.worker:
        result = worker_jax(args) if args.worker == "jax" else worker_torch(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    shape_flags = ["--layers", args.layers, "--hidden", args.hidden, "--heads", args.heads, "--kv-heads", args.kv_heads,
                   "--intermediate", args.intermediate, "--vocab", args.vocab, "--dtype", args.dtype, "--seq", args.seq,
                   "--teacher-prompt", args.teacher_prompt, "--student-prompt", args.student_prompt,
                   "--batch", args.batch, "--rank", args.rank, "--steps", args.steps, "--chunk", args.chunk,
                   "--torch-attn", args.torch_attn, "--remat", args.remat]
    cleaned = [sys.executable, __file__] + [str(x) for x in shape_flags]
    variants = {"jax_chunked": ["--worker", "jax"], "jax_unchunked": ["--worker", "jax", "--chunk", "0"],
                "torch_peft": ["--worker", "torch"]}
    env = worker_env()
    results = {}
    teacher_len, student_len, answer_len = sequence_lengths(args)
    out = {
        "command": "python benchmarks/train_step.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
        "shape": {"preset": args.shape, **model_fields(args), "teacher_seq": teacher_len, "student_seq": student_len,
                  "answer_tokens": answer_len * args.batch, "batch": args.batch, "lora_rank": args.rank,
                  "dtype": args.dtype, "remat": args.remat, "temperature": 2.0},
        "backend": None,
        "method": "each variant in a fresh subprocess, sequentially; step_s = mean of the timed steps after one "
                  "warm-up step (ssb_jax compiled ahead, compile_s separate); tokens_per_s = (teacher + student "
                  "tokens) / step_s; mfu = benchmarks.common.train_step_flops (teacher forward + student forward "
                  "and backward through the frozen base and LoRA, logits at the answer positions, remat not "
                  "counted) / step_s / peaks.bf16_tflops; device_peak_bytes = peak_bytes_in_use of the device "
                  "allocator (accelerators); xla_memory = XLA's compiled memory analysis of the step; "
                  "step_peak_rss_mb = VmHWM over all steps, reset via /proc/self/clear_refs after setup (and "
                  "after XLA compilation); step_peak_delta_mb = that peak - RSS just before the first step",
        "machine": cpu_info(),
        "results": results,
    }

    def save() -> Path:
        """The results so far (after every variant, so a run cut short keeps the variants it finished)."""
        name = f"train_step_{out['backend'] or 'unknown'}_{args.shape}_{args.dtype}_b{args.batch}.json"
        path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(out, indent=1))
        partial.replace(path)
        return path

    for name in args.variants.split(","):
        backend = out["backend"]
        if name == "torch_peft" and backend not in (None, "cpu") and not args.peer:
            results[name] = {"skipped": f"JAX ran on {backend}; the PyTorch peer is the CPU comparison (--peer runs it)"}
            print(f"== {name}: skipped ({results[name]['skipped']})", flush=True)
            continue
        cmd = cleaned + variants[name]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        results[name] = run_worker(cmd, env)
        out["backend"] = backend or results[name].get("backend")
        print(json.dumps(results[name], indent=1), flush=True)
        save()
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
