"""The jitted distillation train step: LoRA-only AdamW, sharded by the logical axes of ssb_jax.sharding.

State: {"lora": the LoRAParam adapters, "opt_state": optax state over the adapters only, "step": int32}.
The base parameters (nnx.Param) are a separate, never-differentiated argument (frozen; may be bf16)
and never get optimizer state. The step is a pure function of the (student, base) graph definitions,
the states and the batch: the student is merged inside the trace. States travel as pure dicts of
arrays (`nnx.to_pure_dict(state)`; `lora.as_lora_state` turns adapters back into an nnx.State): the
graph definitions restore variable types at the merge, and a dict flattens for jit in a fraction of
the time a tree of Variables takes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssb_jax.compile_options import vocab_program_options
from ssb_jax.distill.batch import DistillBatch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.loss import distill_objective, gather_positions
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, init_lora, student_split
from ssb_jax.model import qwen2
from ssb_jax.model.qwen2 import abstract_model, apply
from ssb_jax.sharding import batch_sharding, check_batch_divides, shard_state, state_shardings, under_mesh
from ssb_jax.training.checkpoint import abstract
from ssb_jax.training.optim import make_optimizer


# ----------------------------------------------------------------------------- steps

def total_steps_for(num_examples: int, tc: TrainConfig) -> int:
    steps = -(-(num_examples * tc.epochs) // tc.batch_size)
    return min(steps, tc.max_steps) if tc.max_steps > 0 else steps


# ----------------------------------------------------------------------------- loss

@functools.lru_cache(maxsize=16)
def abstract_base_state(model_config: ModelConfig) -> nnx.State:
    """The base state's shapes and logical axes."""
    return qwen2.base_state(abstract_model(model_config))


def base_state_for_training(model, mesh: Mesh | None = None) -> dict:
    """The frozen base as the train step takes it: a pure dict, placed by its logical axes on `mesh`."""
    state = qwen2.base_state(model)
    return nnx.to_pure_dict(state if mesh is None else shard_state(state, mesh))


@functools.lru_cache(maxsize=16)
def graph_definitions(model_config: ModelConfig, lora_config: LoraConfig) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    """(student: base + adapters, base alone), from abstract models (nothing allocated)."""
    return student_split(model_config, lora_config)[0], nnx.split(abstract_model(model_config))[0]


def student_answer_hidden(student_graphdef, lora_state, base_state, batch: DistillBatch):
    """Final-normed hidden states of base + LoRA on the student sequence at the answer positions [B, A, D]."""
    hidden, _ = apply(student_graphdef, (lora_state, base_state), batch.student_tokens, batch.student_positions,
                      batch.student_mask, return_hidden=True)
    return gather_positions(hidden, batch.student_index)


def teacher_answer_hidden(base_graphdef, base_state, batch: DistillBatch):
    """Hidden states of the base (LoRA off) on the teacher sequence at the answer positions, no gradient."""
    hidden, _ = apply(base_graphdef, base_state, batch.teacher_tokens, batch.teacher_positions, batch.teacher_mask,
                      return_hidden=True)
    return jax.lax.stop_gradient(gather_positions(hidden, batch.teacher_index))


def distill_loss(lora_state, base_state, batch: DistillBatch, *, graphdefs, tc: TrainConfig):
    """(loss, metrics) for one batch; graphdefs as graph_definitions."""
    student_graphdef, base_graphdef = graphdefs
    base_state = jax.lax.stop_gradient(base_state)
    student = student_answer_hidden(student_graphdef, lora_state, base_state, batch)
    if tc.teacher_mode == "online":
        teacher = teacher_answer_hidden(base_graphdef, base_state, batch)
    else:
        teacher = batch.cached_teacher()
    head = nnx.merge(base_graphdef, base_state).head_matrix()
    return distill_objective(student, teacher, batch.answer_tokens, batch.answer_mask, head,
                             temperature=tc.temperature, kl_weight=tc.kl_weight, ce_weight=tc.ce_weight,
                             per_sequence_mean=tc.per_sequence_mean, chunk=tc.logits_chunk)


# ----------------------------------------------------------------------------- shardings

def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state_shapes: Any, lora_shardings: Any,
                        mesh: Mesh) -> Any:
    """Leaves that mirror an adapter (Adam's mu/nu) take its sharding; the rest (counts) is replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_state_shapes, lora_shardings,
                                 transform_non_params=lambda _: replicated)


def train_state_shardings(model_config: ModelConfig, lora_config: LoraConfig, optimizer: optax.GradientTransformation,
                          mesh: Mesh) -> dict:
    """Shardings of the train state (pure dicts): adapters by their logical axes, moments as their adapters."""
    abstract_lora = student_split(model_config, lora_config)[1]
    lora = nnx.to_pure_dict(state_shardings(abstract_lora, mesh))
    opt_shapes = jax.eval_shape(optimizer.init, nnx.to_pure_dict(abstract_lora))
    return {"lora": lora, "opt_state": opt_state_shardings(optimizer, opt_shapes, lora, mesh),
            "step": NamedSharding(mesh, P())}


# ----------------------------------------------------------------------------- state and step

def init_state(model_config: ModelConfig, lora_config: LoraConfig, optimizer: optax.GradientTransformation,
               key: jax.Array, mesh: Mesh | None = None) -> dict:
    """A fresh train state {"lora", "opt_state", "step"}: adapters from `key` (B = 0, so the student starts as
    its base) and the optimizer's state for them, placed on `mesh` when one is given."""
    def make(key):
        lora = nnx.to_pure_dict(init_lora(model_config, lora_config, key))
        return {"lora": lora, "opt_state": optimizer.init(lora), "step": jnp.zeros((), jnp.int32)}
    if mesh is None:
        return jax.jit(make)(key)
    return jax.jit(make, out_shardings=train_state_shardings(model_config, lora_config, optimizer, mesh))(key)


class TrainStep:
    """`step(state, base_state, batch) -> (new_state, metrics)`; jitted, the state donated.

    With a mesh: in/out shardings from the logical axes (base and adapters by their variables' axes,
    optimizer moments as their adapters, batch over (data, fsdp)); metrics come back replicated. The
    step is traced with the mesh as the context mesh (sharding.under_mesh), so the hidden states keep
    their rows split and their width whole (sharding.constrain in the model).
    The jitted function is shared by every TrainStep with the same configuration (so a resumed
    run in the same process does not recompile).
    """

    def __init__(self, model_config: ModelConfig, tc: TrainConfig, total_steps: int, mesh: Mesh | None = None,
                 lora_config: LoraConfig | None = None):
        self.model_config, self.tc, self.mesh = model_config, tc, mesh
        if mesh is not None:  # a batch the mesh does not divide cannot be split over its devices
            check_batch_divides(tc.batch_size, mesh, "train.batch_size")
        self.total_steps = int(total_steps)
        self.lora_config = lora_config or tc.lora_config()
        self.optimizer, self.schedule = make_optimizer(tc, self.total_steps)

    def place_batch(self, batch: DistillBatch) -> DistillBatch:
        """Global host batch (numpy) -> the fields the step reads as device arrays, sharded over the mesh
        when there is one. Under several processes each copies only the rows of its own devices."""
        return batch.for_step(self.tc.teacher_mode).place(self.mesh)

    def __call__(self, state, base_state, batch: DistillBatch):
        fn = train_step_program(self.model_config, self.tc, self.lora_config, self.total_steps, self.mesh)
        return fn(state, base_state, self.place_batch(batch))


def train_step(graphdefs, optimizer, schedule, tc: TrainConfig, state, base_state, batch):
    """One AdamW step on the adapters; a pure function of graph definitions, states and batch."""
    grad_fn = jax.value_and_grad(distill_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state["lora"], base_state, batch, graphdefs=graphdefs, tc=tc)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
    lora = optax.apply_updates(state["lora"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"lora": lora, "opt_state": opt_state, "step": state["step"] + 1}, metrics


@functools.lru_cache(maxsize=32)
def train_step_program(model_config: ModelConfig, tc: TrainConfig, lora_config: LoraConfig, total_steps: int,
                       mesh: Mesh | None):
    """The jitted `train_step` (state donated) for batches of tc.batch_size rows, shared by every caller
    with this configuration; with a mesh, placed by the logical axes and traced under the mesh."""
    optimizer, schedule = make_optimizer(tc, total_steps)
    graphdefs = graph_definitions(model_config, lora_config)
    step = functools.partial(train_step, graphdefs, optimizer, schedule, tc)

    if mesh is None:
        return jax.jit(step, donate_argnums=0, compiler_options=vocab_program_options())
    state_sh = train_state_shardings(model_config, lora_config, optimizer, mesh)
    replicated = NamedSharding(mesh, P())
    base_sh = nnx.to_pure_dict(state_shardings(abstract_base_state(model_config), mesh))
    rows = batch_sharding(mesh, (tc.batch_size,))  # every batch field: its rows over the data axes
    # traced under the mesh, so that the model's activation constraints hold (rows split, width whole)
    return under_mesh(jax.jit(step, in_shardings=(state_sh, base_sh, rows), out_shardings=(state_sh, replicated),
                              donate_argnums=0, compiler_options=vocab_program_options()), mesh)


def lower_train_step(model_config: ModelConfig, tc: TrainConfig, batch: DistillBatch, mesh: Mesh | None = None,
                     total_steps: int = 1000, lora_config: LoraConfig | None = None) -> jax.stages.Lowered:
    """train_step_program for `batch` (DistillBatch.abstract: its rows set the batch size), lowered with
    abstract state and base placed as on `mesh`; nothing is allocated."""
    tc = dataclasses.replace(tc, batch_size=batch.rows)
    lora_config = lora_config or tc.lora_config()
    optimizer, _ = make_optimizer(tc, total_steps)
    state, base = abstract_step_inputs(model_config, lora_config, optimizer, mesh)
    program = train_step_program(model_config, tc, lora_config, total_steps, mesh)
    return program.lower(state, base, batch)


def abstract_step_inputs(model_config: ModelConfig, lora_config: LoraConfig, optimizer: optax.GradientTransformation,
                         mesh: Mesh | None = None) -> tuple[dict, dict]:
    """(train state, frozen base) as ShapeDtypeStructs placed as on `mesh`: what a LoRA-only step program
    (distillation's, GRPO's, the on-policy one's) is lowered with; nothing is allocated."""
    state = jax.eval_shape(lambda: init_state(model_config, lora_config, optimizer, jax.random.key(0)))
    base = nnx.to_pure_dict(abstract_base_state(model_config))
    if mesh is None:
        return abstract(state), abstract(base)
    return (abstract(state, train_state_shardings(model_config, lora_config, optimizer, mesh)),
            abstract(base, nnx.to_pure_dict(state_shardings(abstract_base_state(model_config), mesh))))
