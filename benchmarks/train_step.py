"""One distillation train step: ssb_jax (online teacher, chunked / unchunked vocabulary projection)
vs PyTorch + PEFT computing the same loss, on a random Qwen2.5-0.5B-shaped model (CPU, float32).

The step (both frameworks): teacher = base with LoRA off on [hinted prompt ‖ solution] (no grad),
student = base + LoRA (r = 32, alpha = 32, all 7 projections) on [plain prompt ‖ solution],
loss = T²·KL(softmax(t/T) ‖ softmax(s/T)) over the solution tokens (T = 2), backward, clip 1.0,
AdamW over the LoRA parameters only.

Method: each variant runs in its own fresh subprocess, one after the other (never concurrently):
  * step time = mean wall time of the timed steps after one warm-up (compile) step;
  * peak memory: `step_peak_rss_mb` = the process's peak resident set size (VmHWM) over all steps,
    after resetting it through /proc/self/clear_refs once the model is built (and, for ssb_jax,
    compiled ahead of time); `step_peak_delta_mb` = that peak - RSS just before the first step,
    i.e. what the step needs on top of the weights; `peak_rss_incl_compile_mb` (ssb_jax) is the
    whole-process getrusage peak including XLA compilation;
  * for ssb_jax also XLA's compiled memory analysis of the step (temp buffer bytes).

    python benchmarks/train_step.py                      # full 0.5B shape (24 layers); slow on a small CPU
    python benchmarks/train_step.py --layers 4 --steps 2 # what fits a 2-core box in a few minutes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

    from ssb_jax.distill.batch import build_batch
    from ssb_jax.distill.config import TrainConfig
    from ssb_jax.distill.step import TrainStep, _jitted_step, batch_keys, init_state
    from ssb_jax.model.config import ModelConfig
    from flax import nnx

    from ssb_jax.model.qwen2 import init_model

    config = ModelConfig(**model_fields(args), remat=args.remat)
    params = nnx.state(init_model(config, 0))
    tc = TrainConfig(lora_rank=args.rank, lora_alpha=float(args.rank), temperature=2.0, logits_chunk=args.chunk,
                     batch_size=args.batch, length_buckets=(args.seq,), max_seq_len=args.seq)
    step = TrainStep(config, tc, total_steps=100)
    state = init_state(config, tc.lora_config(), step.optimizer, jax.random.key(1))
    batch = build_batch(records(args, config.vocab_size), batch_size=args.batch, buckets=(args.seq,),
                        max_seq_len=args.seq)
    jax.block_until_ready((params, state))
    setup = rss_mb()
    placed = step.place_batch(batch)
    fn = _jitted_step(config, tc, step.lora_config, 100, None, tuple(placed), args.batch)
    t0 = time.perf_counter()
    compiled = fn.lower(state, params, placed).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    before = rss_mb()
    reset_hwm()  # the peak below counts the steps only, not the compiler
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        state, m = compiled(state, params, placed)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_peak = hwm_mb()
    return {"framework": "ssb_jax", "logits_chunk": args.chunk, "remat": args.remat, "loss": float(m["loss"]),
            "answer_tokens": int(m["answer_tokens"]), "compile_s": compile_s, "first_step_s": times[0],
            "step_times_s": times[1:], "step_s": float(np.mean(times[1:])), "setup_rss_mb": setup,
            "rss_before_steps_mb": before, "step_peak_rss_mb": step_peak, "step_peak_delta_mb": step_peak - before,
            "peak_rss_incl_compile_mb": peak_rss_mb(),
            "xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None,
            "jax_version": jax.__version__, "keys": list(batch_keys(tc))}


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
    model = Qwen2ForCausalLM(hf_config)
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
    return {"framework": "torch+peft", "attn_implementation": args.torch_attn, "loss": loss,
            "answer_tokens": sol * args.batch, "first_step_s": times[0], "step_times_s": times[1:],
            "step_s": float(np.mean(times[1:])), "setup_rss_mb": setup, "rss_before_steps_mb": setup,
            "step_peak_rss_mb": step_peak, "step_peak_delta_mb": step_peak - setup, "peak_rss_mb": peak_rss_mb(),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--vocab", type=int, default=151936)
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
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step_cpu.json"))
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        result = worker_jax(args) if args.worker == "jax" else worker_torch(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    shape_flags = ["--layers", args.layers, "--hidden", args.hidden, "--heads", args.heads, "--kv-heads", args.kv_heads,
                   "--intermediate", args.intermediate, "--vocab", args.vocab, "--seq", args.seq,
                   "--teacher-prompt", args.teacher_prompt, "--student-prompt", args.student_prompt,
                   "--batch", args.batch, "--rank", args.rank, "--steps", args.steps, "--chunk", args.chunk,
                   "--torch-attn", args.torch_attn, "--remat", args.remat]
    cleaned = [sys.executable, __file__] + [str(x) for x in shape_flags]
    variants = {"jax_chunked": ["--worker", "jax"], "jax_unchunked": ["--worker", "jax", "--chunk", "0"],
                "torch_peft": ["--worker", "torch"]}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    results = {}
    for name in args.variants.split(","):
        cmd = cleaned + variants[name]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            results[name] = {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
        else:
            results[name] = json.loads(lines[-1][len("RESULT "):])
        results[name]["wall_s"] = time.time() - t0
        print(json.dumps(results[name], indent=1), flush=True)
    tp, sp, sol = shapes(args)
    out = {
        "command": "python benchmarks/train_step.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
        "shape": {**model_fields(args), "teacher_seq": args.seq, "student_seq": sp + sol, "answer_tokens": sol * args.batch,
                  "batch": args.batch, "lora_rank": args.rank, "dtype": "float32", "temperature": 2.0},
        "method": "each variant in a fresh subprocess, sequentially; step_s = mean of the timed steps after one "
                  "warm-up step (ssb_jax compiled ahead, compile_s separate); step_peak_rss_mb = VmHWM over all "
                  "steps, reset via /proc/self/clear_refs after setup (and after XLA compilation); "
                  "step_peak_delta_mb = that peak - RSS just before the first step = memory the step needs on top "
                  "of weights and model setup; xla_temp_mb = XLA's compiled temp buffers of the step",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
