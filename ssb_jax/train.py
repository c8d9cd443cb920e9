"""SSB distillation training loop: the hint-free student (base + LoRA) learns the hinted teacher's
(base, LoRA off) token distributions on the curated solutions.

    from ssb_jax.train import TrainConfig, run
    result = run(TrainConfig(), model_config, params, records, "runs/ssb", mesh=None, resume=True)

`records` are dicts with "id", "teacher_prompt_ids", "student_prompt_ids", "solution_ids".
workdir gets: checkpoints/ (orbax: LoRA, optimizer state, step, grain iterator state),
metrics.jsonl, tb/ (TensorBoard), training.png, train_config.json, lora_config.json; with a learning
curve (ssb_jax.curves) also its points in metrics.jsonl ("kind": "curve") and curves.png.
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
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.data import make_dataset
from ssb_jax.distill.step import (TrainStep, base_state_for_training, init_state, make_optimizer, total_steps_for,
                                  train_state_shardings)
from ssb_jax.distill.teacher_cache import TeacherCache, build_teacher_cache
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, as_lora_state

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "run", "load_lora", "plot_metrics", "read_metrics", "build_teacher_cache"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


def _checkpoint_manager(workdir: Path, tc: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_names=("state", "data"), options=options)


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def read_metrics(workdir) -> list[dict]:
    """The per-step training records (learning-curve points, which share the file, left out)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "kind" not in r]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records of steps <= last_step (the ones a resumed run will not redo)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def resume_metrics(workdir: Path, start: int) -> Path:
    """metrics.jsonl holding the records of steps <= start only (none when starting afresh); its path."""
    path = workdir / METRICS_FILE
    if start:
        _truncate_metrics(path, start)
    elif path.exists():
        path.unlink()
    return path


def write_record(record: dict, metrics_path: Path, writer, tag: str) -> None:
    """Append one step's record to metrics.jsonl and, given a TensorBoard writer, its scalars under `tag`/."""
    with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(f"{tag}/{k}", v, record["step"])


def plot_metrics(workdir, out: str | Path | None = None) -> Path | None:
    """PNG of loss (and T²-free KL), gradient norm and mean answer length per step."""
    history = read_metrics(workdir)
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
    fig.tight_layout()
    out = Path(out) if out else Path(workdir) / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(tc: TrainConfig, model_config: ModelConfig, model, examples: Sequence[Mapping], workdir, *,
        mesh: Mesh | None = None, resume: bool = True, teacher_cache_dir=None, progress: bool = True,
        stop_after: int | None = None, tensorboard: bool = True, plot: bool = True, curve=None,
        sampled_tokens: int = 0) -> dict:
    """Train LoRA by distillation; returns {"state", "lora", "history", "total_steps", "workdir"}.

    model: the frozen base, a Qwen2ForCausalLM (its parameters placed on `mesh` by their logical axes
    here if a mesh is given).
    resume: continue from the latest checkpoint in workdir (LoRA, optimizer, step, data position).
    teacher_cache_dir: cached teacher mode (tc.teacher_mode == "cached"); built first if it has no index.
    stop_after: stop after this many steps of this call without a final checkpoint (simulates a kill).
    curve: a curves.LearningCurve writing to this run's metrics.jsonl, evaluated at its steps (each point
    before that step's checkpoint); sampled_tokens: its x-axis, the tokens sampled to make `examples`.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lora_config = tc.lora_config()
    total = total_steps_for(len(examples), tc)
    optimizer, schedule = make_optimizer(tc, total)

    teacher_cache = None
    if tc.teacher_mode == "cached":
        if teacher_cache_dir is None:
            teacher_cache_dir = workdir / "teacher_cache"
        if not (Path(teacher_cache_dir) / "index.json").exists():
            if jax.process_count() > 1:
                raise FileNotFoundError(f"{teacher_cache_dir}: no teacher cache; under several processes build it "
                                        "first (the pipeline's teacher_cache stage, build_teacher_cache_sharded)")
            build_teacher_cache(model, model_config, examples, teacher_cache_dir, k=tc.topk, temperature=tc.temperature,
                                batch_size=tc.batch_size, chunk=tc.logits_chunk, buckets=tc.length_buckets,
                                min_bucket=tc.min_bucket, max_seq_len=tc.max_seq_len)
        teacher_cache = TeacherCache(teacher_cache_dir, temperature=tc.temperature)

    base_state = base_state_for_training(model, mesh)  # split once; the step merges it in its trace

    dataset = make_dataset(examples, tc, teacher_cache=teacher_cache)
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
    state = init_state(model_config, lora_config, optimizer, jax.random.key(tc.seed), mesh)

    manager = _checkpoint_manager(workdir, tc)
    start = 0
    if resume and manager.latest_step() is not None:
        start = int(manager.latest_step())
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state)), data=ocp.args.JsonRestore()))
        state = restored.state
        iterator.set_state(restored.data)
        log.info("resumed from step %d", start)
    metrics_path = resume_metrics(workdir, start)
    if jax.process_index() == 0:
        (workdir / "train_config.json").write_text(tc.to_json())
        (workdir / "lora_config.json").write_text(json.dumps(lora_config.to_dict(), indent=2))

    step_fn = TrainStep(model_config, tc, total, mesh, lora_config)
    writer = None
    if tensorboard and jax.process_index() == 0:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(workdir / "tb"), purge_step=start + 1 if start else None)
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, disable=not progress or jax.process_index() != 0, desc="distill")

    def save(step):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(iterator.get_state())), force=True)

    history = []
    interrupted = False
    try:
        if curve is not None:
            curve.maybe_record(start, total, state["lora"], sampled_tokens, writer)  # step 0 (or a missing point)
        for step in range(start, total):
            batch = next(iterator)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, base_state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - t0
            rows = max(int(np.sum(batch["row_valid"])), 1)
            seq_tokens = int(np.sum(batch["student_mask"])) + int(np.sum(batch.get("teacher_mask", 0)))
            record = {"step": step + 1, **metrics, "answer_len_mean": metrics["answer_tokens"] / rows,
                      "step_time_s": elapsed, "tokens_per_s": seq_tokens / elapsed,
                      "answer_tokens_per_s": metrics["answer_tokens"] / elapsed}
            history.append(record)
            if jax.process_index() == 0:
                write_record(record, metrics_path, writer if (step + 1) % tc.log_every == 0 else None, "train")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", kl=f"{metrics['kl']:.3g}", gnorm=f"{metrics['grad_norm']:.3g}")
            if stop_after is not None and step + 1 - start >= stop_after and step + 1 < total:
                interrupted = True
                break
            if curve is not None:  # before the checkpoint, so a resumed run neither loses nor repeats a point
                curve.maybe_record(step + 1, total, state["lora"], sampled_tokens, writer)
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == total:
                save(step + 1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        manager.close()
    if plot and jax.process_index() == 0:
        plot_metrics(workdir)
        if curve is not None:
            from ssb_jax.curves import PLOT_FILE as CURVE_PLOT, plot_curves, read_curve
            plot_curves({curve.label: read_curve(workdir / METRICS_FILE)}, workdir / CURVE_PLOT)
    return {"state": state, "lora": as_lora_state(state["lora"], model_config, lora_config), "history": history,
            "total_steps": total,
            "workdir": workdir, "interrupted": interrupted, "start_step": start}


def load_lora(workdir, model_config: ModelConfig, tc: TrainConfig | None = None, step: int | None = None,
              mesh: Mesh | None = None) -> tuple[nnx.State, LoraConfig]:
    """(LoRA state, LoraConfig) from a run's checkpoint (the latest unless `step`)."""
    workdir = Path(workdir)
    if tc is None:
        tc = TrainConfig.from_dict(json.loads((workdir / "train_config.json").read_text()))
    manager = _checkpoint_manager(workdir, tc)
    step = manager.latest_step() if step is None else step
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
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    manager.close()
    return as_lora_state(restored.state["lora"], model_config, lora_config), lora_config
