"""Activation sharding on the training mesh (8 fake CPU devices): the hidden states keep their rows split
over the data-parallel axes and their width whole (sharding.constrain, the context mesh set by
sharding.under_mesh), so the compiled train step makes no full-width activation a partial sum to
all-reduce; the loss and the adapters' gradients are those of the single-device program."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ssb_jax.distill.batch import DistillBatch, build_batch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.step import TrainStep, distill_loss, graph_definitions, init_state, train_step_program
from ssb_jax.distill.synthetic import random_records, tiny_model_config
from ssb_jax.model.qwen2 import init_model
from ssb_jax.sharding import make_mesh, shard_state

# Every test compiles train steps on 8 fake devices.
pytestmark = [pytest.mark.multidevice, pytest.mark.slow]

# Sizes that name their dimension in the HLO text: T tokens, D hidden, F MLP width, 8 rows.
T, D, F, ROWS = 48, 40, 72, 8
CONFIG = tiny_model_config(vocab_size=128, hidden_size=D, intermediate_size=F, num_heads=4, num_kv_heads=2,
                           head_dim=10, dtype="float32")
TC = TrainConfig(lora_rank=4, lora_alpha=8.0, learning_rate=1e-3, adam_eps=1e-4, logits_chunk=8, ce_weight=0.2, batch_size=ROWS)
MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1}, "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}


@pytest.fixture(scope="module")
def params(seed):
    return nnx.state(init_model(CONFIG, seed, std=0.2))


def _batch(seed: int) -> DistillBatch:
    records = random_records(np.random.default_rng(seed), ROWS, CONFIG.vocab_size, solution=(3, 16))
    return build_batch(records, batch_size=ROWS, buckets=(T,), max_seq_len=T)


def _random_adapters(state: dict, key) -> dict:
    """lora_b away from its zero init, so that every adapter has a gradient and changes the loss."""
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.05 * jax.random.normal(jax.random.fold_in(key, len(str(path))), x.shape, x.dtype)
        if "lora_b" in str(path) else x, state["lora"])
    return {**state, "lora": lora}


def _step_inputs(mesh, params, batch, seed: int, config=CONFIG):
    """(the jitted train step, its state, base and batch placed on `mesh`); the same values on any mesh."""
    step = TrainStep(config, TC, 10, mesh)
    state = _random_adapters(init_state(config, step.lora_config, step.optimizer, jax.random.key(seed)),
                             jax.random.key(seed + 1))
    if mesh is not None:
        placement = init_state(config, step.lora_config, step.optimizer, jax.random.key(seed), mesh)
        state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, placement))
    base = nnx.to_pure_dict(params if mesh is None else shard_state(params, mesh))
    placed = step.place_batch(batch)
    return train_step_program(config, TC, step.lora_config, 10, mesh), state, base, placed


def all_reduce_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """The result shapes of the compiled program's all-reduces (a combined one gives several)."""
    shapes = []
    for line in hlo_text.splitlines():
        found = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
        if found:
            shapes += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]",
                                                                                         found.group(1))]
    return shapes


@pytest.mark.parametrize("remat", ["none", "full"])
def test_train_step_on_fsdp_keeps_hidden_rows_split_and_width_whole(params, remat):
    """Every device holds its own row of the residual stream, [1, T, D], and no array of the sequence
    (T positions) is all-reduced: the projections are local products with each layer's gathered weights.
    (Left to XLA's propagation, the hidden states took the embedding table's width split, [8, T, D/8],
    and every projection into the MLP was an [8, T, F] partial sum, all-reduced.)"""
    mesh = make_mesh(MESHES["fsdp8"])
    fn, state, base, batch = _step_inputs(mesh, params, _batch(0), 0, CONFIG.replace(remat=remat))
    hlo = fn.lower(state, base, batch).compile().as_text()
    assert f"f32[1,{T},{D}]" in hlo
    assert f"f32[{ROWS},{T},{D // 8}]" not in hlo
    sequence_wide = [shape for shape in all_reduce_shapes(hlo) if T in shape]
    assert not sequence_wide, sequence_wide
    assert all_reduce_shapes(hlo), "the adapters' gradients are still summed over the devices"


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_train_step_gives_the_single_device_loss_and_update(params, mesh_name, seed):
    batch = _batch(seed)
    fn, state, base, placed = _step_inputs(None, params, batch, seed)
    new_single, metrics_single = jax.device_get(fn(state, base, placed))
    mesh = make_mesh(MESHES[mesh_name])
    fn, state, base, placed = _step_inputs(mesh, params, batch, seed)
    new_sharded, metrics_sharded = jax.device_get(fn(state, base, placed))
    assert metrics_single["loss"] > 1e-4
    for key in metrics_single:
        np.testing.assert_allclose(metrics_sharded[key], metrics_single[key], rtol=2e-5, atol=1e-7,
                                   err_msg=f"{key}, seed {seed}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}"),
                 new_sharded["lora"], new_single["lora"])


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_loss_gradients_under_the_mesh_equal_the_single_device_ones(params, mesh_name, seed):
    """The adapters' gradients themselves (Adam's first step hides their size): the distillation loss
    differentiated under the mesh, with the model's activation constraints in force, against mesh None."""
    from ssb_jax.sharding import under_mesh
    batch = _batch(seed).for_step(TC.teacher_mode)
    step = TrainStep(CONFIG, TC, 10)
    lora = _random_adapters(init_state(CONFIG, step.lora_config, step.optimizer, jax.random.key(seed)),
                            jax.random.key(seed + 1))["lora"]
    loss_and_grads = jax.jit(functools.partial(jax.value_and_grad(distill_loss, has_aux=True),
                                               graphdefs=graph_definitions(CONFIG, step.lora_config), tc=TC))
    (loss, _), grads = jax.device_get(loss_and_grads(lora, nnx.to_pure_dict(params), batch.place(None)))
    mesh = make_mesh(MESHES[mesh_name])
    lora_shardings = jax.tree.map(lambda x: x.sharding,
                                  init_state(CONFIG, step.lora_config, step.optimizer, jax.random.key(0), mesh)["lora"])
    (loss_m, _), grads_m = jax.device_get(under_mesh(loss_and_grads, mesh)(
        jax.device_put(lora, lora_shardings), nnx.to_pure_dict(shard_state(params, mesh)), batch.place(mesh)))
    np.testing.assert_allclose(loss_m, loss, rtol=2e-5, err_msg=f"seed {seed}")
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    assert largest > 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * largest,
                                                         err_msg=f"seed {seed}"), grads_m, grads)


def test_constrain_pins_rows_on_the_context_mesh_and_is_a_no_op_without_one():
    from ssb_jax.model.qwen2 import HIDDEN_AXES
    from ssb_jax.sharding import constrain, under_mesh
    x = np.ones((8, 3, D), np.float32)
    assert constrain(x, HIDDEN_AXES) is x  # no context mesh: eager use, the sampler
    mesh = make_mesh(MESHES["data2_fsdp2_tensor2"])
    pinned = under_mesh(jax.jit(lambda x: constrain(x * 2, HIDDEN_AXES)), mesh)(x)
    assert pinned.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
    np.testing.assert_array_equal(pinned, 2 * x)
    with pytest.raises(ValueError, match="a batch of 6 rows does not divide"):
        under_mesh(jax.jit(lambda x: constrain(x, HIDDEN_AXES)), mesh)(np.ones((6, 3, D), np.float32))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_grpo_programs_under_the_mesh_equal_the_single_device_ones(params, mesh_name, rng, seed):
    """GRPO's log-prob passes (policy and reference) and its update, traced under the mesh, give the
    single-device numbers."""
    from ssb_jax.grpo.config import GRPOConfig
    from ssb_jax.grpo.loss import group_advantages
    from ssb_jax.grpo.batch import rollout_batch
    from ssb_jax.grpo.step import GRPOStep
    gc = GRPOConfig(group_size=ROWS, prompts_per_step=1, max_new_tokens=8, logits_chunk=3, grad_clip=0.0,
                    learning_rate=1e-3, adam_eps=1e-4, steps=1)
    prompt = rng.integers(0, CONFIG.vocab_size, 5).tolist()
    completions = [rng.integers(0, CONFIG.vocab_size, rng.integers(4, 9)).tolist() for _ in range(ROWS)]
    batch = rollout_batch([prompt] * ROWS, completions, max_len=gc.max_new_tokens, length_buckets=[16])
    single = GRPOStep(CONFIG, TC.lora_config(), gc)
    state = _random_adapters(single.init_state(jax.random.key(seed)), jax.random.key(seed + 1))
    advantages = group_advantages(rng.normal(size=ROWS), ROWS)
    outputs = []
    for mesh in (None, make_mesh(MESHES[mesh_name])):
        step = GRPOStep(CONFIG, TC.lora_config(), gc, mesh)
        placed = jax.tree.map(jnp.copy, state) if mesh is None else jax.device_put(  # the update donates it
            state, jax.tree.map(lambda x: x.sharding, step.init_state(jax.random.key(0))))
        base = nnx.to_pure_dict(params if mesh is None else shard_state(params, mesh))
        policy, reference = step.logprobs(placed["lora"], base, batch), step.logprobs(None, base, batch)
        new, metrics = step.update(placed, base, batch.replace(old_logprobs=policy - 0.01, advantages=advantages))
        outputs.append(jax.device_get((policy, reference, metrics, new["lora"])))
    (policy, reference, metrics, lora), (policy_m, reference_m, metrics_m, lora_m) = outputs
    np.testing.assert_allclose(policy_m, policy, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
    np.testing.assert_allclose(reference_m, reference, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
    assert float(metrics["grad_norm"]) > 1e-4
    for key in metrics:  # the loss is a sum of terms of either sign, so absolute differences count
        np.testing.assert_allclose(metrics_m[key], metrics[key], rtol=2e-5, atol=1e-6, err_msg=f"{key}, seed {seed}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}"),
                 lora_m, lora)
