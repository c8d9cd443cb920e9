"""The planner checked by the compiler: the real sampling and training programs lowered with abstract
inputs for the planned shapes and meshes, compiled for this machine's backend (nothing allocated), and
their `memory_analysis()` set beside the plan (`--check-compiled`; tests/plan/test_plan.py does it for the
3B shape on 1 and 8 CPU devices)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ssb_jax.config import section_to
from ssb_jax.distill.batch import DistillBatch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.step import lower_train_step
from ssb_jax.grpo.batch import RolloutBatch
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.qwen2 import abstract_model
from ssb_jax.plan.analytic import GIB, MethodStage, SamplingShape, TrainingShape, model_config_of, plan
from ssb_jax.sampling.sampler import SamplingParams, generate
from ssb_jax.sharding import BATCH_AXES, batch_sharding, make_mesh, state_shardings
from ssb_jax.training.checkpoint import abstract


def compiled_bytes(compiled) -> dict[str, int]:
    """A compiled program's memory_analysis(): arguments, outputs, temporaries (the compiler's buffer
    assignment), the outputs that reuse argument buffers (donation), the machine code; "total" is what
    one device holds at the program's peak: argument + output + temp - alias."""
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
           "alias": m.alias_size_in_bytes, "code": m.generated_code_size_in_bytes}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def check_mesh(axes: dict[str, int]):
    """A mesh of this machine's first devices with the planned axes (None for one device)."""
    devices = math.prod(axes.values())
    if devices > len(jax.devices()):
        raise ValueError(f"the plan is for {devices} devices; this machine shows {len(jax.devices())} "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return None if devices == 1 else make_mesh(axes, jax.devices()[:devices])


def compile_sampling(config: ModelConfig, shape: SamplingShape, mesh, sampling=None):
    """The sampler's generate program for this shape (the scan layout of the weights, as on an
    accelerator), lowered with abstract sharded inputs and compiled; nothing is allocated."""
    graphdef, state = nnx.split(abstract_model(config))
    rows = None if mesh is None else NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    shardings = None if mesh is None else nnx.to_pure_dict(state_shardings(state, mesh))
    params = abstract(nnx.to_pure_dict(state), shardings)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), shape.rows))
    sampling = (sampling or SamplingParams(max_new_tokens=shape.new_tokens, temperature=1.0, top_k=50)).program()
    program = jax.jit(lambda st, tokens, mask, keys, knobs: generate(graphdef, st, tokens, mask, keys,
                                                                     sampling=sampling, n=shape.samples,
                                                                     mesh=mesh, knobs=knobs))
    return program.lower(params, jax.ShapeDtypeStruct((shape.prompts, shape.prompt_len), jnp.int32, sharding=rows),
                         jax.ShapeDtypeStruct((shape.prompts, shape.prompt_len), jnp.bool_, sharding=rows),
                         jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows),
                         jax.ShapeDtypeStruct((2,), jnp.float32)).compile()


def compile_training(config: ModelConfig, tc: TrainConfig, shape: TrainingShape, mesh):
    """The distillation train step (distill.step.lower_train_step: the real jitted program) for this
    batch shape, lowered with abstract sharded state, base and batch, and compiled; nothing is allocated."""
    batch = DistillBatch.abstract(shape.batch, shape.student_len, shape.teacher_len, shape.answer_len,
                                  teacher_mode=tc.teacher_mode, topk=tc.topk,
                                  sharding=None if mesh is None else batch_sharding(mesh, (shape.batch,)))
    return lower_train_step(config, tc, batch, mesh).compile()


def compile_method_update(config, model_config: ModelConfig, method: MethodStage, mesh):
    """The update step of a GRPO or on-policy stage (grpo.step.lower_update, onpolicy.step.lower_update: the
    real jitted programs) for the planned batch shape, lowered with abstract sharded state, base and batch,
    and compiled; nothing is allocated."""
    shape = method.update
    rows = None if mesh is None else batch_sharding(mesh, (shape.batch * method.microbatches,))
    if method.name == "grpo":
        from ssb_jax.grpo.config import GRPOConfig
        from ssb_jax.grpo.step import lower_update
        gc = section_to(GRPOConfig, config.grpo, "config.grpo")
        batch = RolloutBatch.abstract(shape.batch, shape.student_len, shape.answer_len, reference=bool(gc.kl_beta),
                                      sharding=rows)
        return lower_update(model_config, method.lora_config, gc, batch, mesh).compile()
    from ssb_jax.onpolicy.config import SECTION_CONFIGS
    from ssb_jax.onpolicy.step import lower_update
    oc = section_to(SECTION_CONFIGS[method.name], config[method.name], f"config.{method.name}")
    tc = section_to(TrainConfig, config.train, "config.train")
    batch = {"onpolicy": DistillBatch.abstract(shape.batch * method.microbatches, shape.student_len, shape.teacher_len, shape.answer_len,
                                               sharding=rows)}
    if method.offline is not None:  # SSB's batch beside it (onpolicy_weight < 1)
        ssb = method.offline
        batch["offline"] = DistillBatch.abstract(tc.batch_size, ssb.student_len, ssb.teacher_len, ssb.answer_len,
                                                 sharding=None if mesh is None else batch_sharding(mesh, (tc.batch_size,)))
    return lower_update(model_config, method.lora_config, oc, batch, mesh, tc).compile()


def check_against_compiler(config, devices: int) -> dict[str, dict]:
    """{stage: {"planned": bytes, "compiled": compiled_bytes}} for the curation rollouts, the training
    step and the update step of each GRPO or on-policy stage config.stages selects, for this config on
    `devices` of this machine's devices."""
    p = plan(config, _any_accelerator(devices), devices, include_eval=False, backend=jax.default_backend())
    model_config = model_config_of(config)
    tc = section_to(TrainConfig, config.train, "config.train")
    mesh = check_mesh(p["mesh"])
    rollouts = p["shapes"]["curate rollouts"]
    cur = config.curate
    sampling = SamplingParams(max_new_tokens=rollouts.new_tokens, temperature=cur.rollout_temperature,
                              top_k=cur.rollout_top_k, top_p=cur.rollout_top_p)
    return {"backend": jax.default_backend(),
            "curate rollouts": {"planned": p["terms_gib"]["curate rollouts"]["total"] * GIB,
                                "compiled": compiled_bytes(compile_sampling(model_config, rollouts,
                                                                            check_mesh(p["sampling_mesh"]), sampling))},
            "training": {"planned": p["memory_gib_per_device"]["training_total"] * GIB,
                         "compiled": compiled_bytes(compile_training(model_config, tc, p["shapes"]["training"], mesh))},
            **{f"{name} update": {"planned": p["memory_gib_per_device"][f"{name} update_total"] * GIB,
                                  "compiled": compiled_bytes(compile_method_update(config, model_config, method, mesh))}
               for name, method in p["methods"].items()}}


def _any_accelerator(devices: int) -> str:
    """Any accelerator name: the training figures do not depend on it; its memory decides the sampling
    mesh, which the check compiles on as planned."""
    return "H100-80G" if devices == 1 else "v5e-8"
