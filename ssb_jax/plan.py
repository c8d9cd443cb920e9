"""Resource planner: memory per device and a time estimate per stage, before renting the hardware.

    python -m ssb_jax.plan --config configs/qwen3b.py --accelerator H100-80G [--devices 8] [--config.key=value]
    python -m ssb_jax.plan --config configs/qwen3b.py --devices 8 --check-compiled --config.model.dtype=float32

Memory of parameters, LoRA, optimizer state and KV cache is exact: the same logical-axis table that
places the arrays decides how they split (tests compare with real sharded arrays). The working sets
(attention scores or tiles of the kernel attention_impl resolves to, MLP intermediates, vocabulary
logits, what remat keeps) are modelled term by term from the programs' shapes, per stage phase, and
checked against the compiler:
`--check-compiled` lowers the real sampling and training programs with abstract inputs, compiles them
for this machine's backend (nothing allocated) and prints `memory_analysis()` beside the plan
(tests/test_plan.py does it for the 3B shape on 1 and 8 CPU devices). Times are estimates from FLOPs
and bandwidth.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

from ssb_jax.model.attention import chunk_layout, resolve
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import student_split
from ssb_jax.model.qwen2 import CACHE_AXES
from ssb_jax.sharding import (MESH_AXES, array_bytes_per_device, check_batch_divides, data_parallel_size,
                              parse_mesh_setting, sampling_mesh_shape, state_bytes_per_device)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    devices: int          # devices one host (or slice) shows to JAX
    memory_gib: float     # per device
    bf16_tflops: float    # dense peak per device
    bandwidth_gbs: float  # memory bandwidth per device
    backend: str = "gpu"  # the JAX backend it runs (decides which kernel attention_impl="auto" resolves to)


ACCELERATORS = {
    "v4-8": Accelerator(4, 32, 275, 1228, "tpu"),
    "v5e-8": Accelerator(8, 16, 197, 819, "tpu"),
    "v5p-8": Accelerator(4, 95, 459, 2765, "tpu"),
    "v6e-8": Accelerator(8, 32, 918, 1640, "tpu"),
    "A100-40G": Accelerator(1, 40, 312, 1555),
    "A100-80G": Accelerator(1, 80, 312, 2039),
    "H100-80G": Accelerator(1, 80, 989, 3350),
    "H200": Accelerator(1, 141, 989, 4800),
    "T4": Accelerator(1, 15, 65, 320),
    "L4": Accelerator(1, 24, 121, 300),
}
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
                    lora: int, optimizer: int, chunk: int, online_teacher: bool = True,
                    backend: str = "gpu") -> dict[str, int]:
    """Bytes per device of one distillation step, term by term, and its peak ("total").

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
        "lora_gradients": lora,
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
        "layer_backward_mlp": 7 * mlp_one,
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
    terms["total"] = (weights + 2 * lora + optimizer + terms["saved_for_backward"] + terms["gathered_head"]
                      + working)
    return terms


# ----------------------------------------------------------------------------- the plan

def padded_sampler_batch(config, data_parallel: int) -> int:
    """sampler.batch_size with the filler rows the Sampler adds: a multiple of the data-parallel size."""
    return math.ceil(config.sampler.batch_size / data_parallel) * data_parallel


def sampling_shapes(config, data_parallel: int = 1) -> dict[str, SamplingShape]:
    """Curation's two generate programs at their largest: rollouts (n per question) and the hinted
    teacher's solutions, both at the longest prompt the sampler accepts (hinted prompts carry two
    traces; worst case); the batch padded to the sampling mesh's data-parallel size."""
    from ssb_jax.config import section_to
    from ssb_jax.curate import CurationConfig
    cur = section_to(CurationConfig, config.curate, "config.curate")
    batch, prompt = padded_sampler_batch(config, data_parallel), config.sampler.max_prompt_tokens
    return {"rollouts": SamplingShape(batch, prompt, cur.rollout_max_new_tokens, cur.num_rollouts),
            "solutions": SamplingShape(batch, prompt, cur.solution_max_new_tokens, 1)}


def training_shape(config) -> TrainingShape:
    """The largest batch training builds (ssb_jax.distill.batch): both sequences of a hinted prompt (at
    most sampler.max_prompt_tokens) and a solution (at most solution_max_new_tokens), or max_seq_len,
    padded to the length buckets."""
    from ssb_jax.config import section_to
    from ssb_jax.curate import CurationConfig
    from ssb_jax.distill.batch import bucket_length
    from ssb_jax.distill.config import TrainConfig
    tc = section_to(TrainConfig, config.train, "config.train")
    cur = section_to(CurationConfig, config.curate, "config.curate")
    bucket = lambda n: bucket_length(min(n, tc.length_buckets[-1]) if tc.length_buckets else n,  # noqa: E731
                                     tc.length_buckets, tc.min_bucket)
    longest = tc.max_seq_len or config.sampler.max_prompt_tokens + cur.solution_max_new_tokens
    answer = min(cur.solution_max_new_tokens, tc.max_seq_len - 1) if tc.max_seq_len else cur.solution_max_new_tokens
    return TrainingShape(tc.batch_size, bucket(longest), bucket(longest), bucket(answer))


def eval_shapes(config, data_parallel: int = 1) -> dict[str, tuple[list[SamplingShape], int, bool]]:
    """{dataset label: (the generate programs of one batch, the problem count, whether the prompts were
    tokenized)} for the eval stage.
    Each distinct generation (protocols that decode alike share one: greedy at a token budget, and the
    n-sample pass of a sampling protocol) at the sampler's batch and the dataset's longest prompt padded
    to the sampler's prompt bucket. Datasets or a tokenizer that are not on this machine:
    max_prompt_tokens and 500 problems."""
    from ssb_jax.config import section_to
    from ssb_jax.evaluate import PROTOCOLS, EvalConfig, parse_datasets
    from ssb_jax.sampling.driver import bucket_for, power_of_two_buckets
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
        shapes[spec.label] = ([SamplingShape(padded_sampler_batch(config, data_parallel), prompt, new, n) for new, n in sorted(generations)], count,
                              bool(lengths))
    return shapes


def _prompt_lengths(config, spec) -> list[int] | None:
    """Token counts of a dataset's student prompts, when the data and a tokenizer are on this machine
    (never fetched)."""
    from pathlib import Path
    from ssb_jax.data.datasets import known_dataset_file, load_problems
    source = known_dataset_file(spec.source) if spec.known else Path(spec.source)
    tokenizer = _local_tokenizer(config)
    if source is None or not source.exists() or tokenizer is None:
        return None
    from ssb_jax.main import _prompts
    from ssb_jax.model.tokenizer import encode_chat
    problems = load_problems(spec.source) if spec.known else load_problems(
        spec.source, question_field=config.data.question_field or None,
        answer_field=config.data.answer_field or None, name=spec.label)
    prompts = _prompts(config)
    return [len(encode_chat(tokenizer, prompts.student_messages(p.question))) for p in problems]


def _local_tokenizer(config):
    from pathlib import Path
    from ssb_jax.model.tokenizer import load_tokenizer
    from ssb_jax.paths import shared_data_dir
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
    from ssb_jax.config import section_to
    from ssb_jax.curate import CurationConfig
    from ssb_jax.distill.config import TrainConfig
    acc = ACCELERATORS[accelerator]
    devices = devices or acc.devices
    backend = backend or acc.backend
    axes = mesh_shape(dict(config.mesh), devices)
    model_config = _model_config(config)
    tc = section_to(TrainConfig, config.train, "config.train")
    cur = section_to(CurationConfig, config.curate, "config.curate")
    check_batch_divides(tc.batch_size, axes, "config.train.batch_size")
    lora_config = tc.lora_config()
    capacity = acc.memory_gib * GIB
    # sampling runs on its own mesh, chosen as sharding.sampling_mesh chooses it (over the planned
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
    student_flops = (4 + (2 if model_config.remat != "none" else 0)) * n_params * tshape.student_len
    teacher_flops = 2 * n_params * tshape.teacher_len if tc.teacher_mode == "online" else 0
    train_s = (cur.target_pairs * tc.epochs * (student_flops + teacher_flops)
               / (devices * acc.bf16_tflops * 1e12 * MFU_TRAIN))
    eval_peak = max((t["total"] for t, _, _ in evaluation.values()), default=0)
    totals = {"sampling": sampling["total"], "training": training["total"], "eval": eval_peak}
    # training_total is the train step's own peak (what the compiler check compares); the verdict
    # also counts the sampling copy the run holds meanwhile
    held = {"training": held_sampling_copy}
    return {
        "accelerator": accelerator, "devices": devices, "mesh": axes, "sampling_mesh": sample_axes,
        "model_parameters": n_params,
        "memory_gib_per_device": {
            "base_weights": weights / GIB, "lora": lora / GIB, "optimizer_state": optimizer / GIB,
            "sampling_weights": sampling_weights / GIB, "sampling_kv_cache": sampling["kv_cache"] / GIB,
            "sampling_copy_while_training": held_sampling_copy / GIB,
            "training_activations": (training["total"] - weights - 2 * lora - optimizer) / GIB,
            "sampling_total": totals["sampling"] / GIB, "training_total": totals["training"] / GIB,
            "eval_total": totals["eval"] / GIB, "capacity": acc.memory_gib},
        "terms_gib": {**{f"curate {name}": _gib(t) for name, t in curation.items()}, "training": _gib(training),
                      **{f"eval {label}": _gib(t) for label, (t, _, _) in evaluation.items()}},
        "fits": {stage: total + held.get(stage, 0) < 0.9 * capacity for stage, total in totals.items()},
        "time_estimate_s": {"curate": curate_s, "train": train_s, "eval": eval_s},
        "shapes": {**{f"curate {name}": shape for name, shape in shapes.items()}, "training": tshape,
                   **{f"eval {label}": shape for label, (_, shape, _) in evaluation.items()}},
        "assumptions": {"keep_rate": keep_rate, "mfu_train": MFU_TRAIN, "bandwidth_fraction": BANDWIDTH_FRACTION,
                        "training_rows_per_device": rows_per_device(tshape.batch, axes),
                        "eval_problems": {label: count for label, (_, _, count) in evaluation.items()},
                        "eval_prompt_length": eval_prompts},
    }


def _gib(terms: dict) -> dict:
    return {k: v / GIB for k, v in terms.items()}


def _model_config(config) -> ModelConfig:
    from pathlib import Path
    path = Path(config.model.path)
    if (path / "config.json").exists():
        mc = ModelConfig.from_json(path)
    else:  # a hub id: use the shared copy of its config when we have it, else fetch config.json only
        from ssb_jax.paths import shared_data_dir
        local = shared_data_dir() / "qwen2.5_configs" / path.name / "config.json"
        if local.exists():
            mc = ModelConfig.from_json(local)
        else:
            from huggingface_hub import hf_hub_download
            mc = ModelConfig.from_json(hf_hub_download(str(config.model.path), "config.json"))
    return mc.replace(dtype=config.model.dtype, remat=config.model.remat,
                      attention_impl=config.model.attention_impl)


# ----------------------------------------------------------------------------- checked by the compiler

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
    import jax
    from ssb_jax.sharding import make_mesh
    devices = math.prod(axes.values())
    if devices > len(jax.devices()):
        raise ValueError(f"the plan is for {devices} devices; this machine shows {len(jax.devices())} "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return None if devices == 1 else make_mesh(axes, jax.devices()[:devices])


def _abstract(tree, shardings=None):
    import jax
    if shardings is None:
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), tree)
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), tree, shardings)


def compile_sampling(config: ModelConfig, shape: SamplingShape, mesh, sampling=None):
    """The sampler's generate program for this shape (the scan layout of the weights, as on an
    accelerator), lowered with abstract sharded inputs and compiled; nothing is allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from ssb_jax.model.qwen2 import abstract_model
    from ssb_jax.sampling.sampler import SamplingParams, generate
    from ssb_jax.sharding import BATCH_AXES, state_shardings
    graphdef, state = nnx.split(abstract_model(config))
    rows = None if mesh is None else NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    params = _abstract(nnx.to_pure_dict(state), None if mesh is None else nnx.to_pure_dict(state_shardings(state, mesh)))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), shape.rows))
    sampling = (sampling or SamplingParams(max_new_tokens=shape.new_tokens, temperature=1.0, top_k=50)).program()
    program = jax.jit(lambda st, tokens, mask, keys, knobs: generate(graphdef, st, tokens, mask, keys,
                                                                     sampling=sampling, n=shape.samples,
                                                                     mesh=mesh, knobs=knobs))
    return program.lower(params, jax.ShapeDtypeStruct((shape.prompts, shape.prompt_len), jnp.int32, sharding=rows),
                         jax.ShapeDtypeStruct((shape.prompts, shape.prompt_len), jnp.bool_, sharding=rows),
                         jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows),
                         jax.ShapeDtypeStruct((2,), jnp.float32)).compile()


def compile_training(config: ModelConfig, tc, shape: TrainingShape, mesh):
    """The distillation train step (ssb_jax.distill.step, the real jitted program) for this batch shape,
    lowered with abstract sharded state, base and batch, and compiled; nothing is allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from ssb_jax.distill.step import (_jitted_step, abstract_base_state, batch_keys, batch_shardings, init_state,
                                      make_optimizer, train_state_shardings)
    from ssb_jax.sharding import state_shardings
    tc = dataclasses.replace(tc, batch_size=shape.batch)
    lora_config = tc.lora_config()
    total_steps = 1000
    optimizer, _ = make_optimizer(tc, total_steps)
    keys = batch_keys(tc)
    state = jax.eval_shape(lambda: init_state(config, lora_config, optimizer, jax.random.key(0)))
    base = abstract_base_state(config)
    B, T, Tt, A, k = shape.batch, shape.student_len, shape.teacher_len, shape.answer_len, tc.topk
    batch_shapes = {"student_tokens": ((B, T), jnp.int32), "student_positions": ((B, T), jnp.int32),
                    "student_mask": ((B, T), jnp.bool_), "teacher_tokens": ((B, Tt), jnp.int32),
                    "teacher_positions": ((B, Tt), jnp.int32), "teacher_mask": ((B, Tt), jnp.bool_),
                    "student_index": ((B, A), jnp.int32), "teacher_index": ((B, A), jnp.int32),
                    "answer_tokens": ((B, A), jnp.int32), "answer_mask": ((B, A), jnp.bool_),
                    "teacher_topk_logprobs": ((B, A, k), jnp.float32), "teacher_topk_ids": ((B, A, k), jnp.int32),
                    "teacher_tail_logprob": ((B, A), jnp.float32), "teacher_target_logprob": ((B, A), jnp.float32)}
    batch = {key: jax.ShapeDtypeStruct(*batch_shapes[key]) for key in keys}
    if mesh is None:
        state, base = _abstract(state), _abstract(nnx.to_pure_dict(base))
    else:
        state = _abstract(state, train_state_shardings(config, lora_config, optimizer, mesh))
        base = _abstract(nnx.to_pure_dict(base), nnx.to_pure_dict(state_shardings(base, mesh)))
        batch = _abstract(batch, batch_shardings(keys, B, mesh))
    step = _jitted_step(config, tc, lora_config, total_steps, mesh, keys, B)
    return step.lower(state, base, batch).compile()


def check_against_compiler(config, devices: int) -> dict[str, dict]:
    """{stage: {"planned": bytes, "compiled": compiled_bytes}} for the curation rollouts and the training
    step of this config on `devices` of this machine's devices."""
    import jax
    from ssb_jax.config import section_to
    from ssb_jax.distill.config import TrainConfig
    from ssb_jax.sampling.sampler import SamplingParams
    p = plan(config, _any_accelerator(devices), devices, include_eval=False, backend=jax.default_backend())
    model_config = _model_config(config)
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
                         "compiled": compiled_bytes(compile_training(model_config, tc, p["shapes"]["training"], mesh))}}


def _any_accelerator(devices: int) -> str:
    """Any accelerator name: the training figures do not depend on it; its memory decides the sampling
    mesh, which the check compiles on as planned."""
    return "H100-80G" if devices == 1 else "v5e-8"


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_check(results: dict) -> str:
    backend = results["backend"]
    lines = [f"planned vs compiled per device; compiled = memory_analysis() of the real programs lowered with "
             f"abstract inputs, i.e. XLA:{backend.upper()}'s buffer assignment (argument + output + temp - alias)"
             + ("; XLA:CPU upcasts bfloat16 matmul operands to float32 copies that a GPU/TPU compiler does not "
                "make: check with --config.model.dtype=float32 there" if backend == "cpu" else "")]
    for stage, r in results.items():
        if stage == "backend":
            continue
        c = r["compiled"]
        lines.append(f"  {stage:16s} planned {_size(r['planned']):>11s}  compiled {_size(c['total']):>11s} "
                     f"({(r['planned'] - c['total']) / c['total']:+.1%}; argument {_size(c['argument'])}, "
                     f"output {_size(c['output'])}, temp {_size(c['temp'])}, alias {_size(c['alias'])})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output

def format_plan(p: dict) -> str:
    m = p["memory_gib_per_device"]
    lines = [f"{p['accelerator']}: {p['devices']} devices, mesh {p['mesh']}, sampling mesh {p['sampling_mesh']}, "
             f"{p['model_parameters'] / 1e9:.2f}B parameters",
             "memory per device (GiB):"]
    for key in ("base_weights", "lora", "optimizer_state", "training_activations", "sampling_weights",
                "sampling_kv_cache", "sampling_copy_while_training"):
        lines.append(f"  {key:32s}{m[key]:10.3f}")
    for stage in ("sampling", "training", "eval"):
        if stage == "eval" and not m["eval_total"]:
            continue
        remedy = ("shard more (mesh.fsdp/tensor), lower the batch, or remat" if stage == "training" else
                  "more tensor/fsdp in config.sampler.mesh, or a lower sampler.batch_size")
        verdict = "fits" if p["fits"][stage] else f"DOES NOT FIT: {remedy}"
        held = f" + {m['sampling_copy_while_training']:.3f} sampling copy" if stage == "training" and \
            m["sampling_copy_while_training"] else ""
        lines.append(f"  {stage + ' total':32s}{m[stage + '_total']:10.3f}{held} of {m['capacity']} -> {verdict}")
    lines.append("terms per stage (GiB; the total is the peak of the program's phases, not the sum):")
    for stage, terms in p["terms_gib"].items():
        shape = p["shapes"][stage]
        described = ", ".join(f"{f.name}={getattr(shape, f.name)}" for f in dataclasses.fields(shape))
        lines.append(f"  {stage} ({described}): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in terms.items() if k != "total" and v))
    lines.append("activations and working sets are modelled per program phase and checked against XLA:CPU's buffer "
                 "assignment of the real programs (tests/test_plan.py, --check-compiled); a GPU/TPU compiler "
                 "schedules differently")
    t = p["time_estimate_s"]
    lines.append(f"time estimate: curate {t['curate'] / 60:.1f} min, train {t['train'] / 60:.1f} min, "
                 f"eval {t['eval'] / 60:.1f} min (assumptions: {p['assumptions']})")
    return "\n".join(lines)


def main(argv=None):
    """argv without the program name; --config.section.key=value overrides as in ssb_jax.main."""
    import sys
    from ssb_jax.config import parse_config_args
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="--config.section.key=value overrides a setting, as for ssb_jax.main")
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--accelerator", default="H100-80G", choices=sorted(ACCELERATORS))
    parser.add_argument("--devices", type=int, default=None, help="override the device count (e.g. a bigger slice)")
    parser.add_argument("--keep-rate", type=float, default=0.2, help="fraction of questions curation keeps")
    parser.add_argument("--check-compiled", action="store_true",
                        help="also compile the sampling and training programs on this machine (abstract inputs, "
                             "nothing allocated) and print their memory_analysis() beside the plan")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(["--help"])
    try:
        config, rest = parse_config_args(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest + ["--config", "(parsed above)"])
    try:
        result = plan(config, args.accelerator, args.devices, args.keep_rate)
    except ValueError as e:  # a setting that cannot work (a train batch the mesh does not divide): one line
        parser.error(str(e))
    print(format_plan(result))
    if args.check_compiled:
        print(format_check(check_against_compiler(config, result["devices"])))


if __name__ == "__main__":
    main()
