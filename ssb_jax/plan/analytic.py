"""The planner's analytic model: memory per device and a time estimate per stage, from the config alone.

Memory of parameters, LoRA, optimizer state and KV cache is exact: the same logical-axis table that
places the arrays decides how they split (tests compare with real sharded arrays). The working sets
(attention scores or tiles of the kernel attention_impl resolves to, MLP intermediates, vocabulary
logits, what remat keeps) are modelled term by term from the programs' shapes, per stage phase
(ssb_jax.plan.compiled checks them against the compiler). Times are estimates from FLOPs and bandwidth.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ssb_jax.config import section_to
from ssb_jax.curate import CurationConfig
from ssb_jax.data.datasets import known_dataset_file, load_problems
from ssb_jax.distill.batch import bucket_length
from ssb_jax.distill.config import TrainConfig
from ssb_jax.evaluation import PROTOCOLS, EvalConfig, parse_datasets
from ssb_jax.model.attention import chunk_layout, resolve
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.hub import hub_file
from ssb_jax.model.kv_cache import CACHE_AXES
from ssb_jax.model.lora import student_split
from ssb_jax.model.tokenizer import encode_chat, load_tokenizer
from ssb_jax.paths import shared_data_dir
from ssb_jax.pipeline.registry import REGISTRY
from ssb_jax.plan.accelerators import ACCELERATORS
from ssb_jax.prompts import prompts_from_config
from ssb_jax.sampling.driver import bucket_for, power_of_two_buckets
from ssb_jax.sampling.mesh import sampling_mesh_shape
from ssb_jax.sharding import (MESH_AXES, array_bytes_per_device, auto_mesh_shape, check_batch_divides,
                              data_parallel_size, parse_mesh_setting, state_bytes_per_device)

GIB = 2**30

# Realistic fractions of peak for the time estimates (not measured here; conservative guesses).
MFU_TRAIN, MFU_PREFILL, BANDWIDTH_FRACTION = 0.35, 0.4, 0.6

# How many extra copies of the whole KV cache a decode step holds: none. Each layer writes its slots
# of the one stacked cache carried through the layer scan (qwen2.LayerCache), so XLA updates it in place.
KV_CACHE_COPIES_PER_DECODE_STEP = 0
# float32 arrays of attention-score shape alive at once: for the dense XLA kernel [rows, heads,
# queries, keys], for a blocked kernel one [rows, heads, block, block] tile. Forward (prefill, the
# teacher): the scores and the masked/softmaxed copy. Backward of one layer under remat: the
# recomputed masked scores, the probabilities (kept for softmax's VJP), their gradient and the scores'
# gradient (the chunked kernel's backward forms the same four per tile).
ATTENTION_SCORE_COPIES_FORWARD = 2
ATTENTION_SCORE_COPIES_BACKWARD = 4


def mlp_backward_copies(backend: str, gathered: bool) -> int:
    """[rows, T, mlp] arrays alive in one layer's MLP backward: the recomputed gate, up, silu(gate) and
    product and the gradients of product, gate and up (7). XLA:CPU, when a layer's weights are whole on the
    device (not gathered over fsdp), also keeps transposed copies of them for its matrix products: 11 in its
    buffer assignments of the 3B training step and GRPO update on one device (measured; with the weights
    gathered over 8 devices it keeps 7)."""
    return 11 if backend == "cpu" and not gathered else 7


def mesh_shape(mesh: dict, devices: int) -> dict[str, int]:
    sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if devices % known:
            raise ValueError(f"{devices} devices cannot fill mesh {sizes}")
        sizes[free[0]] = devices // known
    if math.prod(sizes.values()) != devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; the accelerator has {devices}")
    return sizes


def cache_shape(config: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    """The shape of the K (or V) cache; its logical axes are qwen2.CACHE_AXES["k"]."""
    return (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)


def rows_per_device(rows: int, axes: dict[str, int]) -> int:
    """Rows of a batch on one device: split over the data-parallel axes (which must divide it; the
    Sampler pads its batches, and training refuses a batch they do not divide)."""
    return array_bytes_per_device(("batch",), (rows,), axes, 1)


def activation_layout(rows: int, width: int, axes: dict[str, int], pinned: bool = True) -> tuple[int, int, bool]:
    """(rows, hidden width, whether the width is split) of the hidden states [rows, T, width] on one device.

    pinned (training: the train step is traced under its mesh and the model pins the residual stream to
    qwen2.HIDDEN_AXES): rows over the data-parallel axes (data x fsdp), the width whole. Each layer's
    weights are gathered over fsdp (`gathered_layer_bytes`) and the projections are local products.
    Not pinned (sampling: the Sampler sets no context mesh, so XLA's propagation decides): the hidden
    states take the embedding table's split of the hidden axis ("embed": over fsdp) and their rows split
    over "data" only; every projection into the MLP (or the vocabulary) is then a partial sum over the
    width, all-reduced: its output has all of these rows. The sampling mesh's fsdp is 1 unless set
    explicitly, and then both layouts are the same."""
    if pinned:
        return rows_per_device(rows, axes), width, False
    data = axes["data"]
    width_here = array_bytes_per_device(("embed",), (width,), axes, 1)
    return (rows // data if rows % data == 0 else rows), width_here, width_here < width


def weights_gathered(config: ModelConfig, axes: dict[str, int]) -> bool:
    """Whether the weights' hidden width ("embed") is split on this mesh, so that training gathers them."""
    return array_bytes_per_device(("embed",), (config.hidden_size,), axes, 1) < config.hidden_size


def gathered_layer_bytes(config: ModelConfig, axes: dict[str, int]) -> int:
    """One decoder layer's projection kernels as a pinned layer uses them on a device: gathered over fsdp
    (the hidden width whole), heads and the MLP width still split over tensor; 0 when nothing is gathered."""
    if not weights_gathered(config, axes):
        return 0
    D, Q, K, F, whole = (config.hidden_size, config.q_size, config.kv_size, config.intermediate_size,
                         "activation_embed")
    kernels = [((whole, "heads"), (D, Q)), ((whole, "kv_heads"), (D, K)), ((whole, "kv_heads"), (D, K)),
               (("heads", whole), (Q, D)), ((whole, "mlp"), (D, F)), ((whole, "mlp"), (D, F)),
               (("mlp", whole), (F, D))]
    return sum(array_bytes_per_device(names, shape, axes, _itemsize(config)) for names, shape in kernels)


def gathered_head_bytes(config: ModelConfig, axes: dict[str, int]) -> int:
    """The output projection [D, V] gathered over fsdp for the loss (vocabulary still over tensor); 0 when
    nothing is gathered."""
    if not weights_gathered(config, axes):
        return 0
    return array_bytes_per_device(("activation_embed", "vocab"), (config.hidden_size, config.vocab_size), axes,
                                  _itemsize(config))


def _itemsize(config: ModelConfig) -> int:
    return np.dtype(config.jnp_dtype).itemsize


def attention_kernel(config: ModelConfig, length: int, backend: str) -> str:
    """The full-sequence attention kernel config.attention_impl resolves to for this length on `backend`."""
    return resolve(config.attention_impl, config.jnp_dtype, config.head_dim, length, backend)


def _score_bytes(config: ModelConfig, rows: int, queries: int, keys: int, tensor: int, kernel: str) -> int:
    """One float32 attention-score array of `kernel` (heads split over tensor): the dense XLA kernel's
    [rows, heads, queries, keys]; the chunked kernel's one [rows, heads, block, block] tile; 0 for the
    fused kernels (cuDNN, splash), whose tiles stay in on-chip memory."""
    heads = config.num_heads // tensor
    if kernel == "xla":
        return rows * heads * queries * keys * 4
    if kernel == "chunked":
        block = chunk_layout(keys)[1]
        return rows * heads * block * block * 4
    return 0


def _lse_bytes(config: ModelConfig, rows: int, queries: int, tensor: int, kernel: str) -> int:
    """The float32 log-sum-exp [rows, heads, queries] a blocked kernel keeps (the dense one has none)."""
    return 0 if kernel == "xla" else rows * (config.num_heads // tensor) * queries * 4


def attention_working_set(config: ModelConfig, rows: int, queries: int, keys: int, tensor: int, kernel: str,
                          backward: bool = False) -> int:
    """Bytes of one layer's attention beyond its inputs and output: the score copies (forward or
    backward, see ATTENTION_SCORE_COPIES_*) of the kernel's score array or tile, plus its log-sum-exp."""
    copies = ATTENTION_SCORE_COPIES_BACKWARD if backward else ATTENTION_SCORE_COPIES_FORWARD
    return copies * _score_bytes(config, rows, queries, keys, tensor, kernel) + _lse_bytes(config, rows, queries,
                                                                                          tensor, kernel)


# ----------------------------------------------------------------------------- workloads

@dataclasses.dataclass(frozen=True)
class SamplingShape:
    """One `generate` call: `prompts` left-padded prompts of `prompt_len` tokens, `samples` completions
    of up to `new_tokens` each (rows = prompts * samples share one prefill per prompt)."""
    prompts: int
    prompt_len: int
    new_tokens: int
    samples: int = 1

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.new_tokens


@dataclasses.dataclass(frozen=True)
class TrainingShape:
    """One distillation step's batch: padded student/teacher sequences and answer positions."""
    batch: int
    student_len: int
    teacher_len: int
    answer_len: int


# ----------------------------------------------------------------------------- memory models

def sampling_memory(config: ModelConfig, axes: dict[str, int], shape: SamplingShape, weights: int,
                    backend: str = "gpu") -> dict[str, int]:
    """Bytes per device of one `generate` program on `backend`, term by term, and its peak ("total").

    The n-sample KV cache (rows x cache_len) is allocated before the prefill and updated in place
    throughout. On top of it, two phases never alive together: the prefill (the prompts attend among
    themselves with the full-sequence kernel; one layer's attention working set or MLP intermediates,
    and that layer's keys and values repeated n times on their way into the cache) and the decode loop
    (the per-step logits; its attention reads the cache block by block). The peak is the weights, the
    cache and the larger phase.
    """
    b, tensor = _itemsize(config), axes["tensor"]
    def kv(rows: int, length: int) -> int:  # keys and values of every layer
        return 2 * array_bytes_per_device(CACHE_AXES["k"], cache_shape(config, rows, length), axes, b)
    prompt_rows = rows_per_device(shape.prompts, axes)
    # MLP of one layer in the prefill: gate, up and their product; with the hidden width split (see
    # activation_layout: the sampler pins nothing), gate and up as partial sums and all-reduced (the
    # product reuses a partial's buffer).
    mlp_rows, _, width_split = activation_layout(shape.prompts, config.hidden_size, axes, pinned=False)
    mlp_copies = 4 if width_split else 3
    rows_here = rows_per_device(shape.rows, axes)
    block = min(config.cache_block, shape.cache_len)
    terms = {
        "weights": weights,
        "kv_cache": kv(shape.rows, shape.cache_len),
        "kv_cache_decode_copy": KV_CACHE_COPIES_PER_DECODE_STEP * kv(shape.rows, shape.cache_len),
        # decode phase: float32 logits and their log-softmax; the attention's one block of keys and
        # values (LayerCache.attend) and its scores, probabilities and float32 accumulator
        "decode_logits": 2 * rows_here * config.vocab_size // tensor * 4,
        "decode_attention_block": kv(shape.rows, block) // config.num_layers
        + rows_here * (config.num_heads // tensor) * (2 * block + config.head_dim) * 4,
        # prefill phase: one layer's keys and values of the prompts, repeated for the n samples of each
        # (LayerCache.write) before they land in the cache
        "prefill_kv_write": kv(shape.rows, shape.prompt_len) // config.num_layers,
        "prefill_attention": attention_working_set(config, prompt_rows, shape.prompt_len, shape.prompt_len, tensor,
                                                   attention_kernel(config, shape.prompt_len, backend)),
        "prefill_mlp": mlp_copies * mlp_rows * shape.prompt_len * (config.intermediate_size // tensor) * b,
        # a head split over fsdp on the hidden axis is gathered whole for the vocabulary projection
        "gathered_head": config.hidden_size * config.vocab_size // tensor * b if width_split else 0,
    }
    decode = terms["kv_cache_decode_copy"] + terms["decode_logits"] + terms["decode_attention_block"]
    prefill = terms["prefill_kv_write"] + max(terms["prefill_attention"], terms["prefill_mlp"])
    terms["total"] = weights + terms["gathered_head"] + terms["kv_cache"] + max(decode, prefill)
    return terms


def _kept_per_layer(config: ModelConfig, lora_config, tokens: int, width: int, tensor: int,
                    attention_saved: int) -> int:
    """Bytes one decoder layer keeps for the backward pass under config.remat, for `tokens` rows x
    positions whose hidden width on this device is `width` (activation_layout); heads and the MLP
    width split over tensor. Compiler-checked for full, dots_no_batch and none on one device; dots is
    the same reasoning.

    full: only the layer input. dots_no_batch: every matrix product without a batch dimension, i.e.
    each projection's output (model dtype) and, for a LoRA target, its x @ A and (x @ A) @ B outputs
    (LoRA dtype). none: also the MLP's silu(gate) and product. none and dots: also what the attention
    kernel saves, `attention_saved` (attention_saved_bytes), plus the layer input for dots.
    """
    b, lb = _itemsize(config), np.dtype(lora_config.jnp_dtype).itemsize
    layer_input = tokens * width * b
    if config.remat == "full":
        return layer_input
    # the projections into heads or the MLP are split over tensor; those back into the hidden width
    # have `width` (the whole width in training, activation_layout)
    heads, mlp = config.q_size // tensor, config.intermediate_size // tensor
    out_width = {"q_proj": heads, "k_proj": config.kv_size // tensor, "v_proj": config.kv_size // tensor,
                 "o_proj": width, "gate_proj": mlp, "up_proj": mlp, "down_proj": width}
    projections = sum(tokens * w * b for w in out_width.values())
    adapters = sum(tokens * (lora_config.rank_of(t) + out_width[t]) * lb for t in lora_config.targets)
    kept = projections + adapters
    if config.remat == "dots":
        kept += attention_saved + layer_input
    elif config.remat == "none":
        kept += attention_saved + 2 * tokens * out_width["gate_proj"] * b
    return kept


def attention_saved_bytes(config: ModelConfig, rows: int, length: int, tensor: int, kernel: str) -> int:
    """What one layer's attention keeps for its backward beyond the q, k, v projections (remat none or
    dots): the dense kernel its float32 scores (dots: the batched product) and, without remat, the
    softmax's probabilities too; a blocked kernel's custom VJP only its output [rows, length, heads x
    head_dim] (model dtype) and the log-sum-exp."""
    if kernel == "xla":
        return (2 if config.remat == "none" else 1) * _score_bytes(config, rows, length, length, tensor, kernel)
    out = rows * length * config.q_size // tensor * _itemsize(config)
    return out + _lse_bytes(config, rows, length, tensor, kernel)


def training_memory(config: ModelConfig, axes: dict[str, int], shape: TrainingShape, lora_config, *, weights: int,
                    lora: int, optimizer: int, chunk: int, online_teacher: bool = True, ema_teacher: bool = False,
                    backend: str = "gpu") -> dict[str, int]:
    """Bytes per device of one distillation step, term by term, and its peak ("total").

    The same model sizes the other LoRA-only steps: GRPO's update (no teacher: `online_teacher` False;
    its chunked log-probs in place of the KL chunk) and the on-policy update (the teacher reads the
    privileged sequence; `ema_teacher`: its adapters, one more copy of the LoRA, are in the state, donated
    and updated in place).

    The hidden states are pinned (activation_layout): rows over data x fsdp, the width whole. Alive
    throughout: frozen weights, adapters, Adam moments, the adapters' gradient, what the student's
    layers keep for the backward pass and, when fsdp splits the weights, the output projection
    gathered for the loss (XLA:CPU gathers it before the layers run and keeps it to the end). On top,
    the largest of: one layer's backward (its recomputed forward, then the attention kernel's or the
    MLP's working set, with that layer's gathered weights), the teacher's forward, one chunk of
    vocabulary logits. The attention terms follow the kernel
    config.attention_impl resolves to on `backend` (attention_working_set).
    Per-layer activations are float32 wherever the model computes in float32 (scores, softmax) and in
    the model's dtype otherwise.
    """
    b, tensor = _itemsize(config), axes["tensor"]
    D, F, L = config.hidden_size, config.intermediate_size // tensor, config.num_layers
    rows, width, _ = activation_layout(shape.batch, D, axes)     # this device's rows, the whole width
    T, Tt = shape.student_len, shape.teacher_len
    mlp_one = rows * T * F * b                                   # one [rows, T, F] intermediate
    student_kernel, teacher_kernel = attention_kernel(config, T, backend), attention_kernel(config, Tt, backend)
    kept_per_layer = _kept_per_layer(config, lora_config, rows * T, width, tensor,
                                     attention_saved_bytes(config, rows, T, tensor, student_kernel))
    answer_rows = rows * shape.answer_len
    terms = {
        "weights": weights, "lora": lora, "optimizer_state": optimizer,
        "lora_gradients": lora, "ema_teacher_lora": lora if ema_teacher else 0,
        "saved_for_backward": L * kept_per_layer,
        "gathered_head": gathered_head_bytes(config, axes),
        # one layer's weights gathered over fsdp, for its forward or its backward (scan: one layer at a time)
        "gathered_layer_weights": gathered_layer_bytes(config, axes),
        # under full remat, what a layer's recomputed forward leaves alive for the rest of its backward:
        # the residual stream's incoming gradient, the mid-layer residual and both normed inputs, and
        # attention's q, k, v and output (the kernel's residuals, the o_proj adapter's input)
        "layer_backward_recomputed": rows * T * (4 * width + 2 * config.q_size // tensor
                                                 + 2 * config.kv_size // tensor) * b
        if config.remat == "full" else 0,
        # one layer's backward, attention or MLP (not alive together). MLP: the recomputed gate, up,
        # silu(gate) and product, and the gradients of product, gate and up (7)
        "layer_backward_attention": attention_working_set(config, rows, T, T, tensor, student_kernel, backward=True),
        "layer_backward_mlp": mlp_backward_copies(backend, weights_gathered(config, axes)) * mlp_one,
        "teacher_forward_attention": attention_working_set(config, rows, Tt, Tt, tensor, teacher_kernel)
        if online_teacher else 0,
        # the chunked vocabulary loss (distill.loss: its custom VJP forms each chunk's gradient in the
        # forward pass): teacher and student logits of one chunk and the KL's gradient w.r.t. the
        # student logits (f32), plus the answer positions' hidden states of both and the student's gradient
        "loss_chunk": 3 * rows * min(chunk or shape.answer_len, shape.answer_len) * config.vocab_size // tensor * 4
        + 3 * answer_rows * D * b,
    }
    layer_backward = terms["gathered_layer_weights"] + terms["layer_backward_recomputed"] + max(
        terms["layer_backward_attention"], terms["layer_backward_mlp"])
    working = max(layer_backward, terms["teacher_forward_attention"], terms["loss_chunk"])
    terms["total"] = (weights + 2 * lora + terms["ema_teacher_lora"] + optimizer + terms["saved_for_backward"]
                      + terms["gathered_head"] + working)
    return terms


# ----------------------------------------------------------------------------- the plan

def padded_sampler_batch(config, data_parallel: int) -> int:
    """sampler.batch_size with the filler rows the Sampler adds: a multiple of the data-parallel size."""
    return math.ceil(config.sampler.batch_size / data_parallel) * data_parallel


def sampling_shapes(config, data_parallel: int = 1) -> dict[str, SamplingShape]:
    """Curation's two generate programs at their largest: rollouts (n per question) and the hinted
    teacher's solutions, both at the longest prompt the sampler accepts (hinted prompts carry two
    traces; worst case); the batch padded to the sampling mesh's data-parallel size."""
    cur = section_to(CurationConfig, config.curate, "config.curate")
    batch, prompt = padded_sampler_batch(config, data_parallel), config.sampler.max_prompt_tokens
    return {"rollouts": SamplingShape(batch, prompt, cur.rollout_max_new_tokens, cur.num_rollouts),
            "solutions": SamplingShape(batch, prompt, cur.solution_max_new_tokens, 1)}


def training_shape(config) -> TrainingShape:
    """The largest batch training builds (ssb_jax.distill.batch): both sequences of a hinted prompt (at
    most sampler.max_prompt_tokens) and a solution (at most solution_max_new_tokens), or max_seq_len,
    padded to the length buckets."""
    tc = section_to(TrainConfig, config.train, "config.train")
    cur = section_to(CurationConfig, config.curate, "config.curate")
    bucket = lambda n: bucket_length(min(n, tc.length_buckets[-1]) if tc.length_buckets else n,  # noqa: E731
                                     tc.length_buckets, tc.min_bucket)
    longest = tc.max_seq_len or config.sampler.max_prompt_tokens + cur.solution_max_new_tokens
    answer = min(cur.solution_max_new_tokens, tc.max_seq_len - 1) if tc.max_seq_len else cur.solution_max_new_tokens
    return TrainingShape(tc.batch_size, bucket(longest), bucket(longest), bucket(answer))


@dataclasses.dataclass(frozen=True)
class MethodStage:
    """An on-policy training stage (GRPO, onpolicy, opsd, sdpo) as planned: per iteration one sampling call
    of `sampling` (`calls` of them when the sampler's batch holds fewer prompts), forward passes over
    `scored_rows` sequences (GRPO's old and reference log-probs), then `updates` optimiser steps on batches
    of `update`'s shape (teacher_len 0: no teacher); `offline`: SSB's batch in the same step (an on-policy
    stage with onpolicy_weight < 1), None without. With `microbatches` > 1 `update` and `offline` are one
    microbatch's shapes (its activations are what is alive at once) and a step runs that many of them."""
    name: str
    iterations: int
    sampling: SamplingShape
    calls: int
    update: TrainingShape
    updates: int
    scored_rows: int
    lora_config: object
    chunk: int
    ema_teacher: bool = False
    offline: TrainingShape | None = None
    microbatches: int = 1


def method_stages(config, sample_parallel: int, data_parallel: int) -> list[MethodStage]:
    """The GRPO and on-policy stages that config.stages selects, at their largest shapes: prompts of
    sampler.max_prompt_tokens (the longest the sampler accepts), completions of max_new_tokens, the update
    batch padded to the training mesh's data-parallel size and its sequences to the trainer's length
    buckets. An on-policy teacher's prompt: with SSB's context a hinted prompt, which curation keeps
    within max_prompt_tokens; with a reference solution or a peer sample the question plus that text,
    taken as at most max_new_tokens (a peer sample is; a reference solution is assumed to be)."""
    from ssb_jax.distill.batch import quarter_power_of_two
    from ssb_jax.grpo.config import GRPOConfig
    from ssb_jax.onpolicy.config import SECTION_CONFIGS
    selected = REGISTRY.parse(config.stages)
    prompt = config.sampler.max_prompt_tokens
    tc = section_to(TrainConfig, config.train, "config.train")

    def padded(n: int, multiple: int) -> int:
        return -(-n // multiple) * multiple

    def sampling(prompts: int, new_tokens: int, samples: int) -> tuple[SamplingShape, int]:
        per_call = min(prompts, config.sampler.batch_size)
        return (SamplingShape(padded(per_call, sample_parallel), prompt, new_tokens, samples),
                math.ceil(prompts / per_call))

    out = []
    if "grpo" in selected:
        gc = section_to(GRPOConfig, config.grpo, "config.grpo")
        shape, calls = sampling(gc.prompts_per_step, gc.max_new_tokens, gc.group_size)
        rows = padded(gc.rows_per_batch // gc.minibatches, data_parallel)
        length = quarter_power_of_two(max(prompt + gc.max_new_tokens, 16))  # grpo.run's length buckets
        out.append(MethodStage("grpo", gc.steps, shape, calls, TrainingShape(rows, length, 0, gc.max_new_tokens),
                               gc.updates_per_batch * gc.minibatches, 2 * gc.rows_per_batch,
                               gc.lora_config(tc.lora_config()),
                               gc.logits_chunk))
    for name, settings in SECTION_CONFIGS.items():
        if name not in selected:
            continue
        oc = section_to(settings, config[name], f"config.{name}")
        shape, calls = sampling(oc.prompts_per_step, oc.max_new_tokens, oc.samples_per_prompt)
        teacher_prompt = prompt if oc.context == "ssb" else prompt + oc.max_new_tokens
        bucket = lambda n: bucket_length(n, (), oc.min_bucket)  # noqa: E731 (distill.batch.build_batch's)
        count = oc.microbatches  # one microbatch's rows (onpolicy.run pads the rows to split evenly)
        update = TrainingShape(padded(oc.rows_per_step, data_parallel * count) // count,
                               bucket(prompt + oc.max_new_tokens), bucket(teacher_prompt + oc.max_new_tokens),
                               bucket(oc.max_new_tokens))
        offline = training_shape(config) if oc.onpolicy_weight < 1 else None
        if offline is not None:
            offline = dataclasses.replace(offline, batch=offline.batch // count)
        out.append(MethodStage(name, oc.steps, shape, calls, update, 1, 0, oc.lora_config(), oc.logits_chunk,
                               ema_teacher=oc.teacher == "ema", offline=offline, microbatches=count))
    return out


def eval_shapes(config, data_parallel: int = 1) -> dict[str, tuple[list[SamplingShape], int, bool]]:
    """{dataset label: (the generate programs of one batch, the problem count, whether the prompts were
    tokenized)} for the eval stage.
    Each distinct generation (protocols that decode alike share one: greedy at a token budget, and the
    n-sample pass of a sampling protocol) at the sampler's batch and the dataset's longest prompt padded
    to the sampler's prompt bucket. Datasets or a tokenizer that are not on this machine:
    max_prompt_tokens and 500 problems."""
    ec = section_to(EvalConfig, config.eval, "config.eval")
    s = config.sampler
    generations = {(PROTOCOLS[p].max_new_tokens or ec.max_new_tokens, 1) for p in ec.protocols}
    generations |= {(PROTOCOLS[p].max_new_tokens or ec.max_new_tokens, ec.n_samples)
                    for p in ec.protocols if PROTOCOLS[p].sampled and ec.n_samples}
    buckets = power_of_two_buckets(min(s.min_prompt_bucket, s.max_prompt_tokens), s.max_prompt_tokens)
    shapes = {}
    for spec in parse_datasets(ec.datasets):
        lengths = _prompt_lengths(config, spec)
        if lengths:
            count = min(len(lengths), ec.max_problems or len(lengths))
            prompt = bucket_for(min(max(lengths[:count]), s.max_prompt_tokens), buckets)
        else:
            count, prompt = ec.max_problems or 500, s.max_prompt_tokens
        batch = padded_sampler_batch(config, data_parallel)
        shapes[spec.label] = ([SamplingShape(batch, prompt, new, n) for new, n in sorted(generations)], count,
                              bool(lengths))
    return shapes


def _prompt_lengths(config, spec) -> list[int] | None:
    """Token counts of a dataset's student prompts, when the data and a tokenizer are on this machine
    (never fetched)."""
    source = known_dataset_file(spec.source) if spec.known else Path(spec.source)
    tokenizer = _local_tokenizer(config)
    if source is None or not source.exists() or tokenizer is None:
        return None
    problems = load_problems(spec.source) if spec.known else load_problems(
        spec.source, question_field=config.data.question_field or None,
        answer_field=config.data.answer_field or None, name=spec.label)
    prompts = prompts_from_config(config)
    return [len(encode_chat(tokenizer, prompts.student_messages(p.question))) for p in problems]


def _local_tokenizer(config):
    """The run's tokenizer when it is on this machine (never fetched): config.model.tokenizer or the
    model's path, and for a Qwen2.5 model the shared Qwen2.5 tokenizer; else None."""
    name = config.model.tokenizer or config.model.path
    candidates = [Path(name)]
    if Path(name).name.startswith("Qwen2.5"):  # every Qwen2.5 size shares one tokenizer
        candidates.append(shared_data_dir() / "qwen2.5_tokenizer")
    for path in candidates:
        if (path / "tokenizer_config.json").exists():
            return load_tokenizer(path)
    return None


def plan(config, accelerator: str, devices: int | None = None, keep_rate: float = 0.2,
         include_eval: bool = True, backend: str | None = None) -> dict:
    """The plan for `accelerator` (its device count unless `devices`); the attention kernels resolve for
    `backend` (default: the accelerator's; the compiler check passes the backend it compiles on)."""
    acc = ACCELERATORS[accelerator]
    devices = devices or acc.devices
    backend = backend or acc.backend
    model_config = model_config_of(config)
    tc = section_to(TrainConfig, config.train, "config.train")
    axes = auto_mesh_shape(dict(config.mesh), devices, tc.batch_size, model_config.num_kv_heads)
    cur = section_to(CurationConfig, config.curate, "config.curate")
    # the run's stages, read from the registry, with what each asks of the devices
    stage_uses = {name: REGISTRY.get(name).uses for name in REGISTRY.parse(config.stages)}
    check_batch_divides(tc.batch_size, axes, "config.train.batch_size")
    lora_config = tc.lora_config()
    capacity = acc.memory_gib * GIB
    # sampling runs on its own mesh, chosen as sampling.mesh.sampling_mesh chooses it (over the planned
    # devices, as one process sees them)
    sample_axes = mesh_shape(sampling_mesh_shape(model_config, devices, parse_mesh_setting(config.sampler.mesh),
                                                 config.sampler.memory_per_device_gib * GIB or capacity), devices)
    sample_parallel = data_parallel_size(sample_axes)

    _, lora_state, base_state = student_split(model_config, lora_config)  # abstract: nothing allocated
    weights = state_bytes_per_device(base_state, axes)
    sampling_weights = state_bytes_per_device(base_state, sample_axes)
    # the run keeps its sampling copy while it trains (it samples again afterwards); one copy when
    # both meshes place the weights alike
    held_sampling_copy = sampling_weights if sample_axes != axes else 0
    lora = state_bytes_per_device(lora_state, axes)
    optimizer = 2 * state_bytes_per_device(lora_state, axes, 4)  # Adam's two moments, f32
    shapes = sampling_shapes(config, sample_parallel)
    curation = {name: sampling_memory(model_config, sample_axes, shape, sampling_weights, backend)
                for name, shape in shapes.items()}
    sampling = max(curation.values(), key=lambda t: t["total"])
    tshape = training_shape(config)
    training = training_memory(model_config, axes, tshape, lora_config, weights=weights, lora=lora, optimizer=optimizer,
                               chunk=tc.logits_chunk, online_teacher=tc.teacher_mode == "online", backend=backend)
    # time: decode is bandwidth-bound (weights + on average half the cache per step), prefill and
    # training compute-bound
    n_params = model_config.param_count()
    bandwidth = acc.bandwidth_gbs * 1e9 * BANDWIDTH_FRACTION

    def generate_s(shape: SamplingShape, terms: dict, calls: int) -> float:
        decode_step = (sampling_weights + terms["kv_cache"] / 2) / bandwidth
        prefill = 2 * n_params * shape.prompts * shape.prompt_len / (devices * acc.bf16_tflops * 1e12 * MFU_PREFILL)
        return calls * (shape.new_tokens * decode_step + prefill)

    evaluation = {}  # label: (terms of its largest program, that program's shape, problems)
    eval_s, eval_prompts = 0.0, {}
    for label, (shapes_of_batch, count, tokenized) in (eval_shapes(config, sample_parallel).items()
                                                       if include_eval else ()):
        eval_prompts[label] = "longest tokenized prompt" if tokenized else "not on this machine: max_prompt_tokens"
        programs = [(sampling_memory(model_config, sample_axes, shape, sampling_weights, backend), shape)
                    for shape in shapes_of_batch]
        eval_s += sum(generate_s(shape, terms, math.ceil(count / shape.prompts)) for terms, shape in programs)
        evaluation[label] = (*max(programs, key=lambda program: program[0]["total"]), count)

    questions = math.ceil(cur.target_pairs / keep_rate) if cur.target_pairs else 7473
    curate_s = (generate_s(shapes["rollouts"], curation["rollouts"], math.ceil(questions / shapes["rollouts"].prompts))
                # mixed questions (about 1.5 x keep_rate of them) get a hinted solution
                + generate_s(shapes["solutions"], curation["solutions"],
                             math.ceil(1.5 * keep_rate * questions / shapes["solutions"].prompts)))
    # LoRA training per token: the student's forward and backward through frozen weights (no weight
    # gradients: 2 + 2 x params FLOPs), a forward more under remat, and the teacher's forward.
    student_flops = _student_flops(model_config, n_params, tshape.student_len)
    teacher_flops = 2 * n_params * tshape.teacher_len if tc.teacher_mode == "online" else 0
    train_s = (cur.target_pairs * tc.epochs * (student_flops + teacher_flops)
               / (devices * acc.bf16_tflops * 1e12 * MFU_TRAIN))
    # GRPO and the on-policy stages: their sampling (the sampler holds their adapters too) and their
    # update step (their own LoRA and its optimiser state), each with a time estimate
    methods, method_terms, method_s = method_stages(config, sample_parallel, data_parallel_size(axes)), {}, {}
    for m in methods:
        _, m_lora_state, _ = student_split(model_config, m.lora_config)
        m_lora, m_optimizer = state_bytes_per_device(m_lora_state, axes), 2 * state_bytes_per_device(m_lora_state,
                                                                                                   axes, 4)
        sampled = sampling_memory(model_config, sample_axes, m.sampling,
                                  sampling_weights + state_bytes_per_device(m_lora_state, sample_axes), backend)
        update = training_memory(model_config, axes, m.update, m.lora_config, weights=weights, lora=m_lora,
                                 optimizer=m_optimizer, chunk=m.chunk, online_teacher=m.update.teacher_len > 0,
                                 ema_teacher=m.ema_teacher, backend=backend)
        if m.offline is not None:
            update = with_offline_term(update, training_memory(
                model_config, axes, m.offline, m.lora_config, weights=0, lora=0, optimizer=0, chunk=tc.logits_chunk,
                backend=backend))
        method_terms[m.name] = (sampled, update)
        rows = m.update.batch * m.microbatches * m.updates
        step_flops = (rows * (_student_flops(model_config, n_params, m.update.student_len)
                              + 2 * n_params * m.update.teacher_len)
                      + m.scored_rows * 2 * n_params * m.update.student_len)
        if m.offline is not None:
            step_flops += m.offline.batch * m.microbatches * (_student_flops(model_config, n_params, m.offline.student_len)
                                             + 2 * n_params * m.offline.teacher_len)
        method_s[m.name] = m.iterations * (generate_s(m.sampling, sampled, m.calls)
                                           + step_flops / (devices * acc.bf16_tflops * 1e12 * MFU_TRAIN))
    eval_peak = max((t["total"] for t, _, _ in evaluation.values()), default=0)
    totals = {"sampling": sampling["total"], "training": training["total"], "eval": eval_peak}
    # training_total is the train step's own peak (what the compiler check compares); the verdict
    # also counts the sampling copy the run holds meanwhile
    held = {"training": held_sampling_copy}
    return {
        "accelerator": accelerator, "devices": devices, "mesh": axes, "sampling_mesh": sample_axes,
        "stages": stage_uses,
        "model_parameters": n_params,
        "memory_gib_per_device": {
            "base_weights": weights / GIB, "lora": lora / GIB, "optimizer_state": optimizer / GIB,
            "sampling_weights": sampling_weights / GIB, "sampling_kv_cache": sampling["kv_cache"] / GIB,
            "sampling_copy_while_training": held_sampling_copy / GIB,
            "training_activations": (training["total"] - weights - 2 * lora - optimizer) / GIB,
            "sampling_total": totals["sampling"] / GIB, "training_total": totals["training"] / GIB,
            "eval_total": totals["eval"] / GIB, "capacity": acc.memory_gib,
            **{f"{name} {part}_total": terms["total"] / GIB for name, pair in method_terms.items()
               for part, terms in zip(("sampling", "update"), pair)}},
        "terms_gib": {**{f"curate {name}": _gib(t) for name, t in curation.items()}, "training": _gib(training),
                      **{f"eval {label}": _gib(t) for label, (t, _, _) in evaluation.items()},
                      **{f"{name} {part}": _gib(terms) for name, pair in method_terms.items()
                         for part, terms in zip(("sampling", "update"), pair)}},
        "fits": {**{stage: total + held.get(stage, 0) < 0.9 * capacity for stage, total in totals.items()},
                 # an update holds the sampling copy as training does
                 **{f"{name} {part}": terms["total"] + (held_sampling_copy if part == "update" else 0) < 0.9 * capacity
                    for name, pair in method_terms.items() for part, terms in zip(("sampling", "update"), pair)}},
        "time_estimate_s": {"curate": curate_s, "train": train_s, "eval": eval_s, **method_s},
        "shapes": {**{f"curate {name}": shape for name, shape in shapes.items()}, "training": tshape,
                   **{f"eval {label}": shape for label, (_, shape, _) in evaluation.items()},
                   **{f"{m.name} {part}": shape for m in methods
                      for part, shape in (("sampling", m.sampling), ("update", m.update))}},
        "methods": {m.name: m for m in methods},
        "assumptions": {"keep_rate": keep_rate, "mfu_train": MFU_TRAIN, "bandwidth_fraction": BANDWIDTH_FRACTION,
                        "training_rows_per_device": rows_per_device(tshape.batch, axes),
                        "eval_problems": {label: count for label, (_, _, count) in evaluation.items()},
                        "eval_prompt_length": eval_prompts},
    }


def with_offline_term(update: dict, offline: dict) -> dict:
    """An on-policy update's terms with SSB's offline loss in the same step (lambda < 1; `offline`: SSB's
    training_memory of its batch, without weights or state): both forward passes keep their residuals
    until the one backward pass, and the working set is the larger of the two terms'."""
    shared = ("weights", "lora", "optimizer_state", "lora_gradients", "ema_teacher_lora", "saved_for_backward",
              "gathered_head")
    working = update["total"] - sum(update[k] for k in shared)
    offline_working = offline["total"] - offline["saved_for_backward"] - offline["gathered_head"]
    out = dict(update, offline_saved_for_backward=offline["saved_for_backward"],
               offline_working_set=offline_working)
    out["total"] = update["total"] + offline["saved_for_backward"] + max(0, offline_working - working)
    return out


def _student_flops(config: ModelConfig, n_params: int, length: int) -> int:
    """FLOPs of one LoRA training sequence: forward and backward through frozen weights (no weight
    gradients: 2 + 2 x params per token) and, under remat, a forward more."""
    return (4 + (2 if config.remat != "none" else 0)) * n_params * length


def _gib(terms: dict) -> dict:
    return {k: v / GIB for k, v in terms.items()}


def model_config_of(config) -> ModelConfig:
    """The ModelConfig of config.model: its path's config.json, for a hub id the shared copy of it when
    there is one, else config.json alone fetched from the hub; dtype, remat and attention_impl from
    config.model."""
    path = Path(config.model.path)
    if (path / "config.json").exists():
        mc = ModelConfig.from_json(path)
    else:  # a hub id: use the shared copy of its config when we have it, else fetch config.json only
        local = shared_data_dir() / "qwen2.5_configs" / path.name / "config.json"
        if local.exists():
            mc = ModelConfig.from_json(local)
        else:
            mc = ModelConfig.from_json(hub_file(str(config.model.path), "config.json"))
    return mc.replace(dtype=config.model.dtype, remat=config.model.remat,
                      attention_impl=config.model.attention_impl)


