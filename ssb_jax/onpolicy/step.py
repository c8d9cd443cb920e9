"""The jitted on-policy update: the teacher scores the student's own tokens, the adapters take one AdamW step.

A step's batch is {"onpolicy": DistillBatch, "offline": DistillBatch (only with lambda < 1)}. The on-policy
DistillBatch is the aligned pair distillation already uses (ssb_jax.distill.batch.build_batch): the student
sequence is the plain question then the sampled completion, the teacher sequence the privileged prompt then
the same completion, and `student_index` / `teacher_index` point at the positions that predict each sampled
token. The teacher (the frozen base, LoRA off, or the base with the EMA of the adapters) reads its sequence
under stop_gradient (distill.step.teacher_answer_hidden); with `topk` > 0 its answer-position logits are
reduced chunk by chunk to the cached teacher's layout (top-k log-probs at T plus the tail,
distill.teacher_cache.topk_from_logits), otherwise the losses project its hidden states over the whole
vocabulary. The offline batch is SSB's, and its loss is SSB's (distill.step.distill_loss).

State: {"lora", "opt_state", "step"} as distillation's, plus "ema" (the teacher's adapters) when
teacher = "ema", updated after each step: ema <- decay * ema + (1 - decay) * adapters.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssb_jax.compile_options import vocab_program_options
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.loss import _chunking
from ssb_jax.distill.step import (abstract_base_state, abstract_step_inputs, distill_loss, graph_definitions,
                                  init_state, student_answer_hidden, teacher_answer_hidden, train_state_shardings)
from ssb_jax.distill.teacher_cache import topk_from_logits
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig
from ssb_jax.onpolicy.config import OnPolicyConfig
from ssb_jax.onpolicy.losses import mixed_objective, onpolicy_objective
from ssb_jax.sharding import (batch_sharding, check_batch_divides, data_parallel_size, state_shardings,
                              under_mesh)
from ssb_jax.training.optim import make_optimizer


def topk_teacher(hidden, targets, head, *, k: int, temperature: float, chunk: int = 0):
    """The cached teacher's arrays (CachedTeacher, [B, A(, k)]) of teacher hidden states [B, A, D] at their
    answer positions; chunk by chunk along A, so one chunk of logits is alive."""
    def one(args):
        h, y = args
        logits = jnp.einsum("...d,dv->...v", h, head, preferred_element_type=jnp.float32)
        return topk_from_logits(logits, k, temperature, y)

    hidden = jax.lax.stop_gradient(hidden)
    if not chunk or chunk >= targets.shape[1]:
        return one((hidden, targets))
    split, merge = _chunking(targets.shape[1], chunk)
    return jax.tree_util.tree_map(merge, jax.lax.map(one, (split(hidden), split(targets))))


def onpolicy_loss(lora_state, base_state, ema_state, batch: dict, *, graphdefs, oc: OnPolicyConfig,
                  tc: TrainConfig | None, shares=None):
    """(loss, metrics): lambda * the on-policy loss + (1 - lambda) * SSB's offline loss (losses.mixed_objective).
    shares: (on-policy, offline) weights that scale each term and its mean metrics (a microbatch's share of
    the batch's tokens or sequences, microbatch_shares); None: 1."""
    student_graphdef, base_graphdef = graphdefs

    def scaled(term, share):
        if share is None:
            return term
        value, metrics = term
        return value * share, {k: v if k.endswith("answer_tokens") else v * share for k, v in metrics.items()}

    def onpolicy():
        b = batch["onpolicy"]
        base = jax.lax.stop_gradient(base_state)  # here, not above: the offline term is distill_loss untouched
        student = student_answer_hidden(student_graphdef, lora_state, base, b)
        if ema_state is None:
            teacher = teacher_answer_hidden(base_graphdef, base, b)
        else:
            teacher = teacher_answer_hidden(student_graphdef, (jax.lax.stop_gradient(ema_state), base), b)
        head = nnx.merge(base_graphdef, base).head_matrix()
        if oc.topk and oc.topk < head.shape[-1]:
            teacher = topk_teacher(teacher, b.answer_tokens, head, k=oc.topk, temperature=oc.temperature,
                                   chunk=oc.logits_chunk)
        return scaled(onpolicy_objective(student, teacher, b.answer_tokens, b.answer_mask, head, loss=oc.loss,
                                         temperature=oc.temperature, jsd_alpha=oc.jsd_alpha, clip=oc.clip,
                                         per_sequence_mean=oc.per_sequence_mean, chunk=oc.logits_chunk),
                      None if shares is None else shares[0])

    def offline():
        return scaled(distill_loss(lora_state, base_state, batch["offline"], graphdefs=graphdefs, tc=tc),
                      None if shares is None else shares[1])

    return mixed_objective(onpolicy, offline, oc.onpolicy_weight)


def offline_config(oc: OnPolicyConfig, tc: TrainConfig | None) -> TrainConfig | None:
    """SSB's settings for the offline term (its teacher online: the step scores it), None when lambda = 1."""
    if oc.onpolicy_weight == 1:
        return None
    if tc is None:
        raise ValueError("onpolicy_weight < 1 mixes in SSB's offline loss: give the train section's settings")
    return tc.replace(teacher_mode="online")


def split_microbatches(tree, count: int):
    """Every [rows, ...] leaf as [count, rows / count, ...], microbatch j holding rows j, j + count, ...: with
    rows split over the data axes in contiguous blocks, each microbatch keeps that split (no rows move)."""
    def split(x):
        x = x.reshape((x.shape[0] // count, count) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree_util.tree_map(split, tree)


def microbatch_shares(mask, count: int, per_sequence: bool):
    """[count] weights of microbatches (split_microbatches of mask [rows, A]) that make the weighted sum of their
    masked means the whole batch's: each one's share of the answer tokens, or with per_sequence of the
    sequences holding any."""
    mask = split_microbatches(mask, count).astype(jnp.float32)
    units = jnp.sum(jnp.sum(mask, -1) > 0, -1).astype(jnp.float32) if per_sequence else jnp.sum(mask, (1, 2))
    return units / jnp.maximum(jnp.sum(units), 1.0)


def onpolicy_gradients(graphdefs, oc: OnPolicyConfig, tc, lora, base_state, ema, batch):
    """(gradients, metrics) of onpolicy_loss on `batch`; with oc.microbatches > 1 accumulated over that many
    slices of its rows, one at a time (a scan: one slice's activations alive), each term weighted by the
    slice's share of its tokens (or sequences), so they are the whole batch's up to rounding."""
    grad_fn = jax.value_and_grad(functools.partial(onpolicy_loss, graphdefs=graphdefs, oc=oc, tc=tc), has_aux=True)
    count = oc.microbatches
    if count == 1:
        (_, metrics), grads = grad_fn(lora, base_state, ema, batch)
        return grads, metrics
    pieces = split_microbatches(batch, count)
    per_sequence = {"onpolicy": oc.per_sequence_mean, "offline": tc is not None and tc.per_sequence_mean}
    shares = tuple(microbatch_shares(batch[name].answer_mask, count, per_sequence[name]) if name in batch
                   else jnp.zeros(count) for name in ("onpolicy", "offline"))

    def gradients(piece, share):
        (_, metrics), grads = grad_fn(lora, base_state, ema, piece, shares=share)
        return grads, metrics

    def one(total, xs):
        return jax.tree_util.tree_map(jnp.add, total, gradients(*xs)), None

    first = jax.tree_util.tree_map(lambda x: x[0], (pieces, shares))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(gradients, *first))
    return jax.lax.scan(one, zeros, (pieces, shares))[0]


def onpolicy_update(graphdefs, optimizer, schedule, oc: OnPolicyConfig, tc, state, base_state, batch):
    """One AdamW step on the adapters (and the EMA teacher's update); a pure function."""
    grads, metrics = onpolicy_gradients(graphdefs, oc, tc, state["lora"], base_state, state.get("ema"), batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
    lora = optax.apply_updates(state["lora"], updates)
    new = {"lora": lora, "opt_state": opt_state, "step": state["step"] + 1}
    if "ema" in state:
        decay = oc.ema_decay
        new["ema"] = jax.tree_util.tree_map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype),
                                            state["ema"], lora)
    return new, dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))


class OnPolicyStep:
    """`update(state, base_state, batch) -> (state, metrics)`, jitted once per configuration (and batch
    shapes), the state donated; `init_state(key)`."""

    def __init__(self, model_config: ModelConfig, lora_config: LoraConfig, oc: OnPolicyConfig,
                 tc: TrainConfig | None = None, mesh: Mesh | None = None):
        self.model_config, self.lora_config, self.oc, self.mesh = model_config, lora_config, oc, mesh
        self.tc = offline_config(oc, tc)
        if mesh is not None and self.tc is not None:
            check_batch_divides(self.tc.batch_size, mesh, "train.batch_size")
        if self.tc is not None and self.tc.batch_size % oc.microbatches:
            raise ValueError(f"microbatches ({oc.microbatches}) must divide train.batch_size ({self.tc.batch_size}), "
                             "the rows of the offline batch mixed in")
        self.optimizer, self.schedule = make_optimizer(oc, oc.steps)

    def init_state(self, key: jax.Array) -> dict:
        state = init_state(self.model_config, self.lora_config, self.optimizer, key, self.mesh)
        if self.oc.teacher == "ema":  # the teacher starts as the student
            state["ema"] = jax.tree_util.tree_map(lambda x: x.copy(), state["lora"])
        return state

    def place(self, batch: dict) -> dict:
        placed = {"onpolicy": batch["onpolicy"].for_step("online").place(self.mesh)}
        if self.tc is not None:
            placed["offline"] = batch["offline"].for_step("online").place(self.mesh)
        return placed

    def update(self, state, base_state, batch: dict):
        data_parallel = 1 if self.mesh is None else data_parallel_size(self.mesh)
        for name, b in batch.items():
            if b.rows % (self.oc.microbatches * data_parallel):
                raise ValueError(f"the {name} batch's {b.rows} rows do not split into {self.oc.microbatches} "
                                 f"microbatches of a multiple of the {data_parallel} data-parallel devices")
        fn = _jitted_update(self.model_config, self.lora_config, self.oc, self.tc, self.mesh, batch["onpolicy"].rows)
        return fn(state, base_state, self.place(batch))


def lower_update(model_config: ModelConfig, lora_config: LoraConfig, oc: OnPolicyConfig, batch: dict,
                 mesh: Mesh | None = None, tc: TrainConfig | None = None) -> jax.stages.Lowered:
    """OnPolicyStep's update program for `batch` ({"onpolicy": DistillBatch.abstract (online teacher),
    "offline": ... when lambda < 1}), lowered with abstract state (the EMA teacher's adapters included) and
    base placed as on `mesh`; nothing is allocated (the planner)."""
    tc = offline_config(oc, tc)
    optimizer, _ = make_optimizer(oc, oc.steps)
    state, base = abstract_step_inputs(model_config, lora_config, optimizer, mesh)
    if oc.teacher == "ema":
        state["ema"] = state["lora"]
    return _jitted_update(model_config, lora_config, oc, tc, mesh, batch["onpolicy"].rows).lower(state, base, batch)


@functools.lru_cache(maxsize=16)
def _jitted_update(model_config: ModelConfig, lora_config: LoraConfig, oc: OnPolicyConfig, tc, mesh: Mesh | None,
                   rows: int):
    optimizer, schedule = make_optimizer(oc, oc.steps)
    graphdefs = graph_definitions(model_config, lora_config)
    fn = functools.partial(onpolicy_update, graphdefs, optimizer, schedule, oc, tc)
    options = vocab_program_options()
    if mesh is None:
        return jax.jit(fn, donate_argnums=0, compiler_options=options)
    state_sh = train_state_shardings(model_config, lora_config, optimizer, mesh)
    if oc.teacher == "ema":
        state_sh["ema"] = state_sh["lora"]
    base_sh = nnx.to_pure_dict(state_shardings(abstract_base_state(model_config), mesh))
    rows_sh = batch_sharding(mesh, (rows,))  # every batch field: its rows over the data axes
    return under_mesh(jax.jit(fn, in_shardings=(state_sh, base_sh, rows_sh), out_shardings=(state_sh, NamedSharding(
        mesh, P())), donate_argnums=0, compiler_options=options), mesh)
