"""The distillation training stage (SSB, and SFT with TrainConfig.as_sft()): the hint-free student
(base + LoRA) learns the hinted teacher's (base, LoRA off) token distributions on the curated
solutions, run by the shared training loop (ssb_jax.training.loop).

    from ssb_jax.distill.train import run
    result = run(TrainConfig(), model_config, model, records, "runs/ssb", mesh=None, resume=True)

`records` are dicts with "id", "teacher_prompt_ids", "student_prompt_ids", "solution_ids".
workdir gets: checkpoints/ (orbax: LoRA, optimizer state, step, grain iterator state),
metrics.jsonl, tb/ (TensorBoard), training.png, train_config.json, lora_config.json; with a learning
curve (ssb_jax.curves) also its points in metrics.jsonl ("kind": "curve"), drawn by the report beside the
other methods' in round_<r>/learning_curves.png (no per-run copy of that figure).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import grain
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.data import make_dataset
from ssb_jax.distill.step import TrainStep, base_state_for_training, init_state, total_steps_for, train_state_shardings
from ssb_jax.distill.teacher_cache import TeacherCache, build_teacher_cache
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, as_lora_state
from ssb_jax.training.checkpoint import Checkpoints, abstract
from ssb_jax.training.loop import Hooks, TrainingLoop, host_numbers, iterator_batches
from ssb_jax.training.metrics import METRICS_FILE, read_metrics, save_plot, subplots
from ssb_jax.training.optim import make_optimizer

log = logging.getLogger(__name__)

PLOT_FILE = "training.png"
CONFIG_FILE = "train_config.json"
DATA_ITEM = "data"  # the checkpoint's JSON item: the grain iterator's state


def plot_metrics(workdir, out: str | Path | None = None) -> Path | None:
    """PNG of loss (and T²-free KL), gradient norm and mean answer length per step."""
    history = read_metrics(workdir)
    if not history:
        return None
    steps = [h["step"] for h in history]
    fig, axes = subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [h["loss"] for h in history], label="loss (T²·KL + λ·CE)")
    axes[0].plot(steps, [h["kl"] for h in history], label="KL at T", alpha=0.7)
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("loss")
    axes[1].plot(steps, [h["grad_norm"] for h in history])
    axes[1].set_title("gradient norm (before clipping)")
    axes[2].plot(steps, [h["answer_len_mean"] for h in history])
    axes[2].set_title("mean answer length (tokens)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save_plot(fig, out or Path(workdir) / PLOT_FILE)


def _teacher_cache(tc: TrainConfig, model, model_config: ModelConfig, examples, directory) -> TeacherCache:
    """The cached teacher of `examples` in `directory`, built first if it has no index."""
    if not (Path(directory) / "index.json").exists():
        if jax.process_count() > 1:
            raise FileNotFoundError(f"{directory}: no teacher cache; under several processes build it "
                                    "first (the pipeline's teacher_cache stage, build_teacher_cache_sharded)")
        build_teacher_cache(model, model_config, examples, directory, k=tc.topk, temperature=tc.temperature,
                            batch_size=tc.batch_size, chunk=tc.logits_chunk, buckets=tc.length_buckets,
                            min_bucket=tc.min_bucket, max_seq_len=tc.max_seq_len)
    return TeacherCache(directory, temperature=tc.temperature)


def distill_step(train_step: TrainStep, base_state):
    """The loop's step: one optimiser step on a DistillBatch; its record adds the mean answer length
    and the step's throughput to the step's metrics."""
    def step(state, batch):
        started = time.perf_counter()
        state, metrics = train_step(state, base_state, batch)
        metrics = host_numbers(metrics)
        elapsed = time.perf_counter() - started
        rows = max(int(np.sum(batch.row_valid)), 1)
        teacher_tokens = 0 if batch.teacher_mask is None else int(np.sum(batch.teacher_mask))
        seq_tokens = int(np.sum(batch.student_mask)) + teacher_tokens
        return state, {**metrics, "answer_len_mean": metrics["answer_tokens"] / rows, "step_time_s": elapsed,
                       "tokens_per_s": seq_tokens / elapsed, "answer_tokens_per_s": metrics["answer_tokens"] / elapsed}
    return step


def run(tc: TrainConfig, model_config: ModelConfig, model, examples: Sequence[Mapping], workdir, *,
        mesh: Mesh | None = None, resume: bool = True, teacher_cache_dir=None, progress: bool = True,
        stop_after: int | None = None, tensorboard: bool = True, plot: bool = True, curve=None,
        sampled_tokens: int = 0) -> dict:
    """Train LoRA by distillation; returns {"state", "lora", "history", "total_steps", "workdir",
    "interrupted", "start_step"}.

    model: the frozen base, a Qwen2ForCausalLM (its parameters placed on `mesh` by their logical axes
    here if a mesh is given).
    resume: continue from the latest checkpoint in workdir (LoRA, optimizer, step, data position).
    teacher_cache_dir: cached teacher mode (tc.teacher_mode == "cached"); built first if it has no index.
    stop_after: stop after this many steps of this call without a final checkpoint (simulates a kill).
    curve: a curves.LearningCurve writing to this run's metrics.jsonl, evaluated at its steps (each point
    before that step's checkpoint); sampled_tokens: its x-axis, the tokens sampled to make `examples`.
    """
    workdir = Path(workdir)
    lora_config = tc.lora_config()
    total = total_steps_for(len(examples), tc)
    optimizer, _ = make_optimizer(tc, total)

    teacher_cache = None
    if tc.teacher_mode == "cached":
        teacher_cache = _teacher_cache(tc, model, model_config, examples,
                                       workdir / "teacher_cache" if teacher_cache_dir is None else teacher_cache_dir)
    base_state = base_state_for_training(model, mesh)  # split once; the step merges it in its trace
    dataset = make_dataset(examples, tc, teacher_cache=teacher_cache)
    batches = iterator_batches(iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))))
    state = init_state(model_config, lora_config, optimizer, jax.random.key(tc.seed), mesh)

    hooks = Hooks()
    if curve is not None:
        hooks.curve_point = lambda step, total_steps, state, writer: curve.maybe_record(
            step, total_steps, state["lora"], sampled_tokens, writer)
    loop = TrainingLoop(
        workdir, total, distill_step(TrainStep(model_config, tc, total, mesh, lora_config), base_state),
        checkpoints=tc, desc="distill", tag="train", hooks=hooks, progress=progress, tensorboard=tensorboard,
        postfix=lambda r: {"loss": f"{r['loss']:.4g}", "kl": f"{r['kl']:.3g}", "gnorm": f"{r['grad_norm']:.3g}"},
        config_files={CONFIG_FILE: tc.to_json(), "lora_config.json": json.dumps(lora_config.to_dict(), indent=2)},
        plot=plot_metrics if plot else None, position_item=DATA_ITEM)
    result = loop.run(state, batches, resume=resume, stop_after=stop_after)
    return {"state": result.state, "lora": as_lora_state(result.state["lora"], model_config, lora_config),
            "history": result.history, "total_steps": total, "workdir": workdir, "interrupted": result.interrupted,
            "start_step": result.start_step}


def load_lora(workdir, model_config: ModelConfig, tc: TrainConfig | None = None, step: int | None = None,
              mesh: Mesh | None = None) -> tuple[nnx.State, LoraConfig]:
    """(LoRA state, LoraConfig) from a run's checkpoint (the latest unless `step`)."""
    workdir = Path(workdir)
    if tc is None:
        tc = TrainConfig.from_dict(json.loads((workdir / CONFIG_FILE).read_text()))
    with Checkpoints(workdir, tc.keep_checkpoints, json_items=(DATA_ITEM,)) as checkpoints:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
        optimizer, _ = make_optimizer(tc, 1)
        lora_config = tc.lora_config()
        shapes = jax.eval_shape(lambda: init_state(model_config, lora_config, optimizer, jax.random.key(0)))
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: device, shapes)
        else:
            shardings = train_state_shardings(model_config, lora_config, optimizer, mesh)
        state, _ = checkpoints.restore(step, abstract(shapes, shardings), json_items=False)
    return as_lora_state(state["lora"], model_config, lora_config), lora_config
