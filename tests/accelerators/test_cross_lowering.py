"""The check that stands in for a TPU we do not have: the real programs exported with `jax.export` for
the TPU platform on 8 fake CPU devices, with attention_impl="auto" resolved as on a TPU
(`attention.lowering_for("tpu")`), and the Mosaic splash kernel asserted in the exported module (a
`tpu_custom_call`). Exporting lowers every op with the TPU's rules and partitions nothing, so a Mosaic
kernel outside shard_map fails here exactly as it would when a TPU compiles it ("Mosaic kernels cannot
be automatically partitioned"). What a CPU cannot check: that Mosaic compiles the kernel for the chip's
generation, memory use and speed.

For CUDA the same programs are exported for the "cuda" platform. What this cannot check without a GPU:
JAX's cuDNN wrapper asks the installed cuDNN for its version while tracing, so on this machine it refuses
("cuDNN is not detected") and "auto" falls back to the chunked kernel, loudly; the cuDNN custom call
itself, its shard_map partitioning and its numerics are checked by tests/accelerators/test_gpu_attention.py
on a GPU (benchmarks/device_check.sh runs it).
"""
import logging

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ssb_jax.distill.batch import DistillBatch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.step import (abstract_base_state, init_state, make_optimizer, train_state_shardings,
                                  train_step_program)
from ssb_jax.distill.synthetic import tiny_model_config
from ssb_jax.model import attention
from ssb_jax.model.qwen2 import abstract_model
from ssb_jax.sampling.sampler import SamplingParams, generate
from ssb_jax.sharding import BATCH_AXES, batch_sharding, make_mesh, state_shardings
from ssb_jax.training.checkpoint import abstract

pytestmark = pytest.mark.multidevice

MOSAIC = "tpu_custom_call"
# bf16 with Qwen2.5-0.5B's head width; 2 layers: a program's size does not change what lowers
CONFIG = tiny_model_config(vocab_size=256, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                           head_dim=64, dtype="bfloat16")
ROWS, STUDENT, TEACHER, ANSWER = 8, 64, 96, 16
TRAINING_MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
                   "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
# the sampling mesh for 8 chips (a model that fits one chip: rows data parallel), and one tensor parallel
SAMPLING_MESHES = {"data8": {"data": 8, "fsdp": 1, "tensor": 1}, "data4_tensor2": {"data": 4, "fsdp": 1, "tensor": 2}}


def export_text(jitted, platform: str, mesh, *args) -> str:
    """The StableHLO text of `jitted` exported for `platform` ("tpu", "cuda"), traced with `mesh` as the
    context mesh (None: none) and "auto" resolved for that platform's backend."""
    backend = "tpu" if platform == "tpu" else "gpu"
    with attention.lowering_for(backend), (jax.set_mesh(mesh) if mesh is not None else _nothing()):
        return jax.export.export(jitted, platforms=[platform])(*args).mlir_module()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train_step_inputs(config, tc: TrainConfig, mesh, student=STUDENT, teacher=TEACHER, answer=ANSWER):
    """(the jitted distillation step, abstract state, base and batch placed as on `mesh`)."""
    lora_config = tc.lora_config()
    optimizer, _ = make_optimizer(tc, 10)
    state = jax.eval_shape(lambda: init_state(config, lora_config, optimizer, jax.random.key(0)))
    state = abstract(state, train_state_shardings(config, lora_config, optimizer, mesh))
    base = abstract(nnx.to_pure_dict(abstract_base_state(config)),
                    nnx.to_pure_dict(state_shardings(abstract_base_state(config), mesh)))
    batch = DistillBatch.abstract(tc.batch_size, student, teacher, answer, teacher_mode=tc.teacher_mode, topk=tc.topk,
                                  sharding=batch_sharding(mesh, (tc.batch_size,)))
    return train_step_program(config, tc, lora_config, 10, mesh).jitted, state, base, batch


def sampling_inputs(config, mesh, prompts: int, prompt_len: int, new_tokens: int = 4):
    """(the jitted sampling program, abstract weights, prompts, mask, row keys, knobs) on `mesh`, no
    context mesh: as the Sampler runs it."""
    graphdef, state = nnx.split(abstract_model(config))
    params = abstract(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
    rows = NamedSharding(mesh, P(BATCH_AXES))
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_k=50).program()
    program = jax.jit(lambda st, tokens, mask, keys, knobs: generate(graphdef, st, tokens, mask, keys,
                                                                     sampling=sampling, mesh=mesh, knobs=knobs))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), prompts))
    return (program, params, jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((prompts, prompt_len), jnp.bool_, sharding=rows),
            jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows), jax.ShapeDtypeStruct((2,), jnp.float32))


@pytest.mark.parametrize("mesh_name", list(TRAINING_MESHES))
def test_distillation_step_exports_for_tpu_with_splash(mesh_name):
    mesh = make_mesh(TRAINING_MESHES[mesh_name])
    tc = TrainConfig(lora_rank=4, batch_size=ROWS, logits_chunk=8)
    step, *inputs = train_step_inputs(CONFIG, tc, mesh)
    text = export_text(step, "tpu", mesh, *inputs)
    assert MOSAIC in text
    # the kernel runs per device: shard_map's manual region, not a program XLA would have to partition
    assert "sdy.manual_computation" in text


@pytest.mark.parametrize("mesh_name", ["fsdp8", pytest.param("data2_fsdp2_tensor2", marks=pytest.mark.slow)])
def test_grpo_update_exports_for_tpu_with_splash(mesh_name):
    from ssb_jax.grpo.batch import RolloutBatch
    from ssb_jax.grpo.config import GRPOConfig
    from ssb_jax.grpo.step import _jitted, total_updates
    mesh = make_mesh(TRAINING_MESHES[mesh_name])
    gc = GRPOConfig(logits_chunk=8)
    lora_config = gc.lora_config(TrainConfig(lora_rank=4).lora_config())
    optimizer, _ = make_optimizer(gc, total_updates(gc))
    state = jax.eval_shape(lambda: init_state(CONFIG, lora_config, optimizer, jax.random.key(0)))
    state = abstract(state, train_state_shardings(CONFIG, lora_config, optimizer, mesh))
    base = abstract(nnx.to_pure_dict(abstract_base_state(CONFIG)),
                    nnx.to_pure_dict(state_shardings(abstract_base_state(CONFIG), mesh)))
    batch = RolloutBatch.abstract(ROWS, STUDENT, ANSWER, update=True, reference=bool(gc.kl_beta),
                                  sharding=batch_sharding(mesh, (ROWS,)))
    update = _jitted(CONFIG, lora_config, gc, mesh, "update", ROWS).jitted
    assert MOSAIC in export_text(update, "tpu", mesh, state, base, batch)


@pytest.mark.parametrize("mesh_name", ["data8", pytest.param("data4_tensor2", marks=pytest.mark.slow)])
def test_teacher_scoring_exports_for_tpu_with_splash(mesh_name):
    """The teacher cache's program on the sampling mesh, with no context mesh (the mesh its base is on)."""
    from ssb_jax.distill.teacher_cache import _teacher_topk_jit
    mesh = make_mesh(SAMPLING_MESHES[mesh_name])
    graphdef, state = nnx.split(abstract_model(CONFIG))
    params = abstract(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
    rows = batch_sharding(mesh, (ROWS,))
    seq = [jax.ShapeDtypeStruct((ROWS, TEACHER), dtype, sharding=rows) for dtype in (jnp.int32, jnp.int32, jnp.bool_)]
    answers = [jax.ShapeDtypeStruct((ROWS, ANSWER), jnp.int32, sharding=rows)] * 2
    program = _teacher_topk_jit(graphdef, mesh)
    with attention.lowering_for("tpu"):
        text = jax.export.export(program, platforms=["tpu"])(params, *seq, *answers, k=8, temperature=2.0,
                                                             chunk=8).mlir_module()
    assert MOSAIC in text


@pytest.mark.parametrize("mesh_name", ["data8", pytest.param("data4_tensor2", marks=pytest.mark.slow)])
def test_prefill_and_sampling_program_export_for_tpu_with_splash(mesh_name):
    """The whole sampling program (prefill by splash, then the decode loop) and the prefill alone."""
    mesh = make_mesh(SAMPLING_MESHES[mesh_name])
    program, params, tokens, mask, keys, knobs = sampling_inputs(CONFIG, mesh, prompts=ROWS, prompt_len=64)
    assert MOSAIC in export_text(program, "tpu", None, params, tokens, mask, keys, knobs)
    graphdef = nnx.split(abstract_model(CONFIG))[0]

    def prefill(state, tokens, mask):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(tokens.shape[0], tokens.shape[1] + 4)
        with attention.kernel_mesh(mesh):
            hidden, cache = model(tokens, jnp.cumsum(mask, -1) - 1, mask, cache, return_hidden=True,
                                  cache_is_empty=True)
        return hidden, cache

    assert MOSAIC in export_text(jax.jit(prefill), "tpu", None, params, tokens, mask)


def test_programs_export_for_cuda_and_cudnn_refusal_falls_back_once(caplog):
    """The distillation step and the sampling program export for CUDA. Without a GPU JAX's cuDNN wrapper
    refuses while tracing, so "auto" falls back to the chunked kernel with one warning naming the reason
    (what the cuDNN call compiles to is checked on a GPU only: tests/accelerators/test_gpu_attention.py)."""
    assert attention.resolve("auto", jnp.bfloat16, 64, STUDENT, backend="gpu", compute_capability=9.0) == "cudnn"
    mesh = make_mesh(TRAINING_MESHES["data2_fsdp2_tensor2"])
    tc = TrainConfig(lora_rank=4, batch_size=ROWS, logits_chunk=8)
    attention._reported_refusals.clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        step, *inputs = train_step_inputs(CONFIG, tc, mesh)
        text = export_text(step, "cuda", mesh, *inputs)
        sampling_mesh = make_mesh(SAMPLING_MESHES["data8"])
        program, *args = sampling_inputs(CONFIG, sampling_mesh, prompts=ROWS, prompt_len=64)
        export_text(program, "cuda", None, *args)
    assert MOSAIC not in text and "stablehlo" in text
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    if not refusals:
        pytest.fail("no cuDNN refusal on a machine without a GPU: is there a cuDNN here? run test_gpu_attention")
    assert len(refusals) == 1 and "cudnn" in refusals[0] and "chunked" in refusals[0], refusals


# ----------------------------------------------------------------------------- every shipped config

def _shipped_configs() -> list[str]:
    from pathlib import Path
    return sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.py"))


def reduced_model_config(config, layers: int = 2):
    """The config's model with `layers` layers (the toy world's from its settings, its vocabulary a
    stand-in: the world trains its tokenizer later); widths, heads and dtype as configured."""
    from ssb_jax.model.config import ModelConfig
    from ssb_jax.plan.analytic import model_config_of
    if config.world.enabled:
        w = config.world
        model = ModelConfig(vocab_size=512, hidden_size=w.hidden_size, intermediate_size=w.intermediate_size,
                            num_layers=w.num_layers, num_heads=w.num_heads, num_kv_heads=w.num_kv_heads,
                            head_dim=w.head_dim, dtype=config.model.dtype, attention_impl=config.model.attention_impl)
    else:
        model = model_config_of(config)
    return model.replace(num_layers=min(layers, model.num_layers))


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name == "qwen05b.py" else pytest.mark.slow)
                                  for name in _shipped_configs()])
def test_every_config_lowers_for_a_tpu_v5e_8(name):
    """Each shipped config's distillation step (its train settings, on the mesh config.mesh chooses for 8
    chips) and sampling program (on the sampling mesh for a v5e-8's 16 GiB chips), with 2 of its layers and
    short sequences, export for TPU with the splash kernel in both."""
    from pathlib import Path

    from ssb_jax.config import load_config_file, section_to
    from ssb_jax.sampling.mesh import sampling_mesh_shape
    from ssb_jax.sharding import auto_mesh_shape
    config = load_config_file(str(Path(__file__).resolve().parents[2] / "configs" / name))
    model = reduced_model_config(config)
    tc = section_to(TrainConfig, config.train, "config.train")
    mesh = make_mesh(auto_mesh_shape(dict(config.mesh), 8, tc.batch_size, model.num_kv_heads))
    step, *inputs = train_step_inputs(model, tc, mesh)
    assert MOSAIC in export_text(step, "tpu", mesh, *inputs), dict(mesh.shape)
    sampling_mesh = make_mesh(sampling_mesh_shape(model, 8, memory_per_device=16 * 2**30))
    rows = sampling_mesh.shape["data"] * sampling_mesh.shape["fsdp"]
    program, *args = sampling_inputs(model, sampling_mesh, prompts=rows, prompt_len=64)
    assert MOSAIC in export_text(program, "tpu", None, *args), dict(sampling_mesh.shape)
