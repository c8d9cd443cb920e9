"""GRPO on the device: completion log-probs of base + LoRA and the jitted update of the adapters.

A batch (ssb_jax.grpo.batch.RolloutBatch) holds each sample as one right-padded sequence, prompt then
completion; the log-prob of completion token j is read at position prompt_len - 1 + j. Only the hidden
states at those positions are gathered and projected to the vocabulary, chunk by chunk
(distill.loss.target_logprobs), so no [B, T, V] logits exist. The sampling-time log-probs that the
ratio divides by are recomputed here, by the same program shape as the update's forward pass
(`GRPOStep.logprobs`), not taken from the sampler: its decode runs in another layout and, for bf16
models, another precision, and a ratio of two numerics would not be 1 for an unchanged policy. The
policy is the model at the sampling temperature (logits / T, as the samples were drawn; top-k / top-p
truncation is not modelled), and so is the reference the KL term compares it with.

Like distill.step, the update is a pure function of the graph definitions, the adapter/optimizer state
(donated), the frozen base state and the batch, optimises the adapters only and is sharded by the
logical axes (batch rows over the data axes).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssb_jax.compile_options import vocab_program_options
from ssb_jax.distill.loss import gather_positions, target_logprobs
from ssb_jax.distill.step import (abstract_base_state, abstract_step_inputs, graph_definitions, init_state,
                                  train_state_shardings)
from ssb_jax.distributed import to_host
from ssb_jax.grpo.batch import RolloutBatch
from ssb_jax.grpo.config import GRPOConfig
from ssb_jax.grpo.loss import grpo_objective
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig
from ssb_jax.sharding import batch_sharding, state_shardings, under_mesh
from ssb_jax.training.optim import make_optimizer


def completion_logprobs(graphdef, states, batch: RolloutBatch, chunk: int, temperature: float = 1.0):
    """Log-probs [B, A] of the completion tokens under the model (graphdef merged with `states`) at the
    sampling temperature: logits / T, formed as (hidden / T) @ head (the projection is linear)."""
    model = nnx.merge(graphdef, *states)
    hidden, _ = model(batch.tokens, batch.positions, batch.mask, return_hidden=True)
    hidden = gather_positions(hidden, batch.completion_index)
    if temperature != 1.0:
        hidden = hidden.astype(jnp.promote_types(hidden.dtype, jnp.float32)) / temperature
    return target_logprobs(hidden, batch.completion_ids, model.head_matrix(), chunk)


def grpo_loss(lora_state, base_state, batch: RolloutBatch, *, graphdef, gc: GRPOConfig):
    base_state = jax.lax.stop_gradient(base_state)
    logprobs = completion_logprobs(graphdef, (lora_state, base_state), batch, gc.logits_chunk, gc.temperature)
    loss, metrics = grpo_objective(logprobs, batch.old_logprobs, batch.advantages, batch.completion_mask,
                                   clip_epsilon=gc.clip_epsilon, normalization=gc.loss_normalization,
                                   max_len=gc.max_new_tokens, kl_beta=gc.kl_beta, ref_logprobs=batch.ref_logprobs)
    return loss, dict(metrics, completion_tokens=jnp.sum(batch.completion_mask.astype(jnp.int32)))


def grpo_update(graphdef, optimizer, schedule, gc: GRPOConfig, state, base_state, batch):
    """One optimiser step on the adapters; a pure function of graph definition, states and batch."""
    (_, metrics), grads = jax.value_and_grad(grpo_loss, has_aux=True)(state["lora"], base_state, batch,
                                                                       graphdef=graphdef, gc=gc)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
    lora = optax.apply_updates(state["lora"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"lora": lora, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def total_updates(gc: GRPOConfig) -> int:
    return gc.steps * gc.updates_per_batch * gc.minibatches


class GRPOStep:
    """The update (`update(state, base_state, batch) -> (state, metrics)`, the state donated) and the
    log-prob pass (`logprobs(lora or None, base_state, batch)`: None gives the reference, LoRA off),
    jitted once per (configuration, batch shape) and shared by every GRPOStep of that configuration."""

    def __init__(self, model_config: ModelConfig, lora_config: LoraConfig, gc: GRPOConfig, mesh: Mesh | None = None):
        self.model_config, self.lora_config, self.gc, self.mesh = model_config, lora_config, gc, mesh
        self.optimizer, self.schedule = make_optimizer(gc, total_updates(gc))

    def init_state(self, key: jax.Array) -> dict:
        return init_state(self.model_config, self.lora_config, self.optimizer, key, self.mesh)

    def update(self, state, base_state, batch: RolloutBatch):
        batch = batch.for_program(update=True, reference=bool(self.gc.kl_beta)).place(self.mesh)
        fn = _jitted(self.model_config, self.lora_config, self.gc, self.mesh, "update", batch.rows)
        return fn(state, base_state, batch)

    def logprobs(self, lora, base_state, batch: RolloutBatch) -> np.ndarray:
        batch = batch.for_program(update=False).place(self.mesh)
        which = "reference" if lora is None else "policy"
        fn = _jitted(self.model_config, self.lora_config, self.gc, self.mesh, which, batch.rows)
        out = fn(base_state, batch) if lora is None else fn(lora, base_state, batch)
        return np.asarray(to_host(out), np.float32)


def lower_update(model_config: ModelConfig, lora_config: LoraConfig, gc: GRPOConfig, batch: RolloutBatch,
                 mesh: Mesh | None = None) -> jax.stages.Lowered:
    """GRPOStep's update program for `batch` (RolloutBatch.abstract with update=True: its rows set the
    minibatch), lowered with abstract state and base placed as on `mesh`; nothing is allocated (the planner)."""
    optimizer, _ = make_optimizer(gc, total_updates(gc))
    state, base = abstract_step_inputs(model_config, lora_config, optimizer, mesh)
    return _jitted(model_config, lora_config, gc, mesh, "update", batch.rows).lower(state, base, batch)


@functools.lru_cache(maxsize=32)
def _jitted(model_config: ModelConfig, lora_config: LoraConfig, gc: GRPOConfig, mesh: Mesh | None, which: str,
            batch_size: int):
    student_graphdef, base_graphdef = graph_definitions(model_config, lora_config)
    optimizer, schedule = make_optimizer(gc, total_updates(gc))
    chunk, temperature = gc.logits_chunk, gc.temperature
    if which == "update":
        fn = functools.partial(grpo_update, student_graphdef, optimizer, schedule, gc)
    elif which == "policy":
        def fn(lora, base, batch):
            return completion_logprobs(student_graphdef, (lora, base), batch, chunk, temperature)
    else:
        def fn(base, batch):
            return completion_logprobs(base_graphdef, (base,), batch, chunk, temperature)
    options = vocab_program_options()
    if mesh is None:
        return jax.jit(fn, donate_argnums=0 if which == "update" else (), compiler_options=options)
    state_sh = train_state_shardings(model_config, lora_config, optimizer, mesh)
    base_sh = nnx.to_pure_dict(state_shardings(abstract_base_state(model_config), mesh))
    rows_sh = batch_sharding(mesh, (batch_size,))  # every batch field and the log-probs: rows over the data axes
    # each program is traced under the mesh, so that the model's activation constraints hold
    if which == "update":
        return under_mesh(jax.jit(fn, in_shardings=(state_sh, base_sh, rows_sh),
                                  out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0,
                                  compiler_options=options), mesh)
    if which == "policy":
        return under_mesh(jax.jit(fn, in_shardings=(state_sh["lora"], base_sh, rows_sh), out_shardings=rows_sh,
                                  compiler_options=options), mesh)
    return under_mesh(jax.jit(fn, in_shardings=(base_sh, rows_sh), out_shardings=rows_sh,
                              compiler_options=options), mesh)
