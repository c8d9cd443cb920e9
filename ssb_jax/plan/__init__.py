"""Resource planner: memory per device and a time estimate per stage, before renting the hardware.

    python -m ssb_jax.plan --config configs/qwen3b.py --accelerator H100-80G [--devices 8] [--config.key=value]
    python -m ssb_jax.plan --config configs/qwen3b.py --devices 8 --check-compiled --config.model.dtype=float32

accelerators.py (the table of accelerators: devices, memory, peak and bandwidth), analytic.py (the
memory and time model: workload shapes from the config, `sampling_memory`, `training_memory`, GRPO's and the
on-policy stages' `method_stages`, `plan`), compiled.py (the real programs lowered and compiled with abstract
inputs: `check_against_compiler`),
cli.py (`main`, the text of a plan and of a check).
"""
from ssb_jax.plan.accelerators import ACCELERATORS, Accelerator
from ssb_jax.plan.analytic import (GIB, MethodStage, SamplingShape, TrainingShape, attention_kernel,
                                   attention_saved_bytes, attention_working_set, cache_shape, eval_shapes,
                                   mesh_shape, method_stages, model_config_of, plan, sampling_memory, sampling_shapes,
                                   training_memory, training_shape)
from ssb_jax.plan.cli import format_check, format_plan, main
from ssb_jax.plan.compiled import (check_against_compiler, compile_method_update, compile_sampling, compile_training,
                                   compiled_bytes)

__all__ = ["ACCELERATORS", "Accelerator", "GIB", "MethodStage", "SamplingShape", "TrainingShape", "attention_kernel",
           "attention_saved_bytes", "attention_working_set", "cache_shape", "check_against_compiler",
           "compile_method_update", "compile_sampling", "compile_training", "compiled_bytes", "eval_shapes",
           "format_check", "format_plan", "main", "mesh_shape", "method_stages", "model_config_of", "plan",
           "sampling_memory", "sampling_shapes", "training_memory", "training_shape"]
