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

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssb_jax.compile_options import vocab_program_options
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.loss import distill_objective, gather_positions
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, init_lora, student_split
from ssb_jax.model import qwen2
from ssb_jax.model.qwen2 import abstract_model, apply
from ssb_jax.sharding import batch_sharding, check_batch_divides, shard_state, state_shardings, under_mesh

CACHED_KEYS = ("teacher_topk_logprobs", "teacher_topk_ids", "teacher_tail_logprob", "teacher_target_logprob")


# ----------------------------------------------------------------------------- optimizer

def make_schedule(tc: TrainConfig, total_steps: int) -> optax.Schedule:
    total_steps = max(int(total_steps), 1)
    warmup = tc.warmup_steps or int(round(tc.warmup_ratio * total_steps))
    warmup = min(warmup, total_steps - 1) if total_steps > 1 else 0
    decay_steps = max(total_steps - warmup, 1)
    lr = tc.learning_rate
    if tc.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif tc.schedule == "linear":
        main = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        main = optax.cosine_decay_schedule(lr, decay_steps)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(tc: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(tc, total_steps)
    parts = []
    if tc.grad_clip and tc.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(tc.grad_clip))
    parts.append(optax.adamw(schedule, b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps, weight_decay=tc.weight_decay))
    return optax.chain(*parts), schedule


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


def student_answer_hidden(student_graphdef, lora_state, base_state, batch):
    """Final-normed hidden states of base + LoRA on the student sequence at the answer positions [B, A, D]."""
    hidden, _ = apply(student_graphdef, (lora_state, base_state), batch["student_tokens"],
                      batch["student_positions"], batch["student_mask"], return_hidden=True)
    return gather_positions(hidden, batch["student_index"])


def teacher_answer_hidden(base_graphdef, base_state, batch):
    """Hidden states of the base (LoRA off) on the teacher sequence at the answer positions, no gradient."""
    hidden, _ = apply(base_graphdef, base_state, batch["teacher_tokens"], batch["teacher_positions"],
                      batch["teacher_mask"], return_hidden=True)
    return jax.lax.stop_gradient(gather_positions(hidden, batch["teacher_index"]))


def distill_loss(lora_state, base_state, batch: Mapping[str, jax.Array], *, graphdefs, tc: TrainConfig):
    """(loss, metrics) for one batch (see ssb_jax.distill.batch for the keys); graphdefs as graph_definitions."""
    student_graphdef, base_graphdef = graphdefs
    base_state = jax.lax.stop_gradient(base_state)
    student = student_answer_hidden(student_graphdef, lora_state, base_state, batch)
    if tc.teacher_mode == "online":
        teacher = teacher_answer_hidden(base_graphdef, base_state, batch)
    else:
        teacher = {"logprobs": batch["teacher_topk_logprobs"], "ids": batch["teacher_topk_ids"],
                   "tail_logprob": batch["teacher_tail_logprob"], "target_logprob": batch["teacher_target_logprob"]}
    head = nnx.merge(base_graphdef, base_state).head_matrix()
    return distill_objective(student, teacher, batch["answer_tokens"], batch["answer_mask"], head,
                             temperature=tc.temperature, kl_weight=tc.kl_weight, ce_weight=tc.ce_weight,
                             per_sequence_mean=tc.per_sequence_mean, chunk=tc.logits_chunk)


def batch_keys(tc: TrainConfig) -> tuple[str, ...]:
    keys = ["student_tokens", "student_positions", "student_mask", "student_index", "answer_tokens", "answer_mask"]
    if tc.teacher_mode == "online":
        keys += ["teacher_tokens", "teacher_positions", "teacher_mask", "teacher_index"]
    else:
        keys += list(CACHED_KEYS)
    return tuple(keys)


# ----------------------------------------------------------------------------- shardings

def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state_shapes: Any, lora_shardings: Any,
                        mesh: Mesh) -> Any:
    """Leaves that mirror an adapter (Adam's mu/nu) take its sharding; the rest (counts) is replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_state_shapes, lora_shardings,
                                 transform_non_params=lambda _: replicated)


def batch_shardings(keys, batch_size: int, mesh: Mesh) -> dict:
    """Every batch array splits its leading (batch) axis over the data-parallel axes."""
    return {k: batch_sharding(mesh, (batch_size,)) for k in keys}


def place_batch(batch: Mapping, mesh: Mesh | None) -> dict:
    """Global host batch (numpy) -> device arrays, split over the mesh's data axes when there is one.
    Under several processes each copies only the rows of its own devices."""
    if mesh is None:
        return jax.device_put(dict(batch))
    B = next(iter(batch.values())).shape[0]
    shardings = batch_shardings(tuple(batch), B, mesh)
    if jax.process_count() > 1:
        return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda index, v=v: v[index])
                for k, v in batch.items()}
    return jax.device_put(dict(batch), shardings)


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

    def place_batch(self, batch: Mapping) -> dict:
        """Global host batch (numpy) -> device arrays, sharded over the mesh when there is one.
        Under several processes each copies only the rows of its own devices."""
        return place_batch({k: batch[k] for k in batch_keys(self.tc)}, self.mesh)

    def __call__(self, state, base_state, batch):
        batch = self.place_batch(batch)
        B = next(iter(batch.values())).shape[0]
        fn = _jitted_step(self.model_config, self.tc, self.lora_config, self.total_steps, self.mesh, tuple(batch), B)
        return fn(state, base_state, batch)


def train_step(graphdefs, optimizer, schedule, tc: TrainConfig, state, base_state, batch):
    """One AdamW step on the adapters; a pure function of graph definitions, states and batch."""
    grad_fn = jax.value_and_grad(distill_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state["lora"], base_state, batch, graphdefs=graphdefs, tc=tc)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
    lora = optax.apply_updates(state["lora"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"lora": lora, "opt_state": opt_state, "step": state["step"] + 1}, metrics


@functools.lru_cache(maxsize=32)
def _jitted_step(model_config: ModelConfig, tc: TrainConfig, lora_config: LoraConfig, total_steps: int,
                 mesh: Mesh | None, keys: tuple[str, ...], batch_size: int):
    optimizer, schedule = make_optimizer(tc, total_steps)
    graphdefs = graph_definitions(model_config, lora_config)
    step = functools.partial(train_step, graphdefs, optimizer, schedule, tc)

    if mesh is None:
        return jax.jit(step, donate_argnums=0, compiler_options=vocab_program_options())
    state_sh = train_state_shardings(model_config, lora_config, optimizer, mesh)
    replicated = NamedSharding(mesh, P())
    base_sh = nnx.to_pure_dict(state_shardings(abstract_base_state(model_config), mesh))
    # traced under the mesh, so that the model's activation constraints hold (rows split, width whole)
    return under_mesh(jax.jit(step, in_shardings=(state_sh, base_sh, batch_shardings(keys, batch_size, mesh)),
                              out_shardings=(state_sh, replicated), donate_argnums=0,
                              compiler_options=vocab_program_options()), mesh)
