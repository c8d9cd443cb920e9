"""Full-sequence attention kernels: the one home of how a causal, padded batch attends.

Every kernel computes the same thing (grouped-query, causal, padding-aware):

    causal_attention(q, k, v, key_valid, impl)     q [B,T,N,H]; k, v [B,T,G,H]; key_valid [B,T] bool
    out[b, t] = softmax_s(q[b,t] . k[b,s] / sqrt(H)  over s <= t with key_valid[b, s]) @ v[b, s]

Query head i uses key/value head i // (N // G) (HF's repeat_kv order). Rows may be padded on either
side (prompts are left padded, training sequences right padded); every row has its own positions, so
the mask is per row: causal AND the key is real. The outputs at padding queries are finite but
unspecified (each kernel fills them its own way); nothing downstream reads them, and their keys are
never visible to a real query, so they cannot leak into real tokens or their gradients.

Implementations (`ModelConfig.attention_impl`):
  xla      the reference: float32 scores [B,G,n,T,T] materialised by einsum (`dense_attention`).
  chunked  pure JAX, blocked over queries and keys with an online softmax and a flash-style custom
           VJP (the backward recomputes each block's probabilities from the saved log-sum-exp), so
           neither pass holds more than one [B,G,n,block,block] tile of scores; key blocks after a
           query block (the causal future) are skipped. Runs on every backend.
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")` on GPU: cuDNN flash attention,
           is_causal plus the key-padding mask (a [B,1,T,T] boolean that JAX turns into a bias;
           cuDNN's own seq-length padding assumes right padding, which our prompts are not).
           bf16/fp16 only, head_dim a multiple of 8 and <= 128 (256 on Hopper), even T when training.
  splash   the Pallas TPU splash-attention kernel that ships with JAX: a causal mask and segment
           ids (1 real, 0 padding; a query sees only keys of its own segment), T padded to a
           multiple of 128, grouped-query heads as one MQA kernel per key/value head.
  auto     (default) cudnn on GPU where it can run (compute capability 8.0 and up), splash on TPU,
           else the portable choice: chunked for sequences of at least CHUNKED_MIN_LENGTH tokens, xla below.

The fused kernels (cudnn, splash) cannot be partitioned by XLA (Mosaic refuses outright; JAX's cuDNN
partitioner needs q, k and v split alike), so on a mesh they run under `shard_map`: rows over the
batch axes, heads over "tensor" where the key/value heads divide (else k and v are repeated to one per
query head so that all three split alike, or heads stay whole). The mesh is the context mesh (the
training programs, `sharding.under_mesh`), else the one `kernel_mesh` names (the sampler's). Where a
fused kernel refuses at trace time (no cuDNN, an unsupported GPU or shape, a Pallas block it cannot
tile), "auto" falls back to the chunked kernel and logs the reason once; a kernel named explicitly
raises. A refusal when XLA compiles the program cannot be caught here. `lowering_for("tpu")` resolves
"auto" as on that backend, so CPU tests can export the TPU program (tests/accelerators/).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ssb_jax.sharding import BATCH_AXES

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
MASKED = -1e30  # finite, so a query with no visible key (a pad) softmaxes to uniform, not NaN
# Query/key block of the chunked kernel (a sequence is cut into equal blocks of at most this many).
CHUNK_SIZE = 512
# Where no fused kernel runs, "auto" takes the chunked kernel from this length on, the XLA einsum
# below it: chunked took less time and less temporary memory than the einsum at every length
# benchmarked on CPU (forward alone from 128 tokens, forward + backward from 256; python -m
# benchmarks.attention, docs/benchmarks.md). Shorter sequences were not benchmarked and stay on the einsum.
CHUNKED_MIN_LENGTH = 128


def check_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl must be one of {', '.join(IMPLEMENTATIONS)}; got {impl!r}")
    return impl


def at_least_f32(dtype):
    """Norms, scores, softmax and logits run in float32, or float64 under x64 with float64 weights (the
    gradient tests)."""
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------- reference

def dense_attention(q, k, v, visible):
    """Grouped-query attention under any boolean mask. q [B,T,N,H]; k, v [B,S,G,H]; visible [B,T,S]
    -> [B,T,N,H]. Materialises the float32 scores [B,G,n,T,S]: the reference, and the KV-cache path."""
    B, T, N, H = q.shape
    G = k.shape[2]
    q = q.reshape(B, T, G, N // G, H)
    scores = jnp.einsum("btgnh,bsgh->bgnts", q, k, preferred_element_type=at_least_f32(q.dtype))
    scores = scores * (1.0 / np.sqrt(H))
    scores = jnp.where(visible[:, None, None, :, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgnts,bsgh->btgnh", probs, v)
    return out.reshape(B, T, N, H)


def causal_visible(key_valid):
    """[B,T] key mask -> [B,T,T] visible: key s is real and s <= t."""
    T = key_valid.shape[1]
    return key_valid[:, None, :] & jnp.tril(jnp.ones((T, T), bool))[None]


def xla_attention(q, k, v, key_valid):
    return dense_attention(q, k, v, causal_visible(key_valid))


# ----------------------------------------------------------------------------- chunked (pure JAX)

def chunk_layout(length: int, chunk: int | None = None) -> tuple[int, int]:
    """(number of blocks, block size): equal blocks of at most `chunk` (default CHUNK_SIZE), padding at
    most blocks - 1 slots."""
    blocks = max(1, -(-length // (chunk or CHUNK_SIZE)))
    return blocks, -(-length // blocks)


def chunked_attention(q, k, v, key_valid, chunk: int | None = None):
    """Causal padded attention that never forms more than a [B,G,n,block,block] tile of scores."""
    B, T, N, H = q.shape
    G = k.shape[2]
    blocks, size = chunk_layout(T, chunk)
    pad = blocks * size - T
    if pad:  # padded keys are invalid; padded queries are sliced off
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
        key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
    grouped_q = q.reshape(B, blocks * size, G, N // G, H).transpose(0, 2, 3, 1, 4)  # [B,G,n,T,H]
    out = _flash(size, grouped_q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), key_valid)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, blocks * size, N, H)[:, :T]


def _block(x, index, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _block_scores(q_block, k_block, valid_block, i, j, size):
    """Scaled, masked scores of query block i against key block j: [B,G,n,size,size] in float32."""
    scores = jnp.einsum("bgnqh,bgkh->bgnqk", q_block, k_block, preferred_element_type=at_least_f32(q_block.dtype))
    scores = scores * (1.0 / np.sqrt(q_block.shape[-1]))
    query_slot = i * size + jnp.arange(size)
    key_slot = j * size + jnp.arange(size)
    visible = (key_slot[None, :] <= query_slot[:, None])[None, None, None] & valid_block[:, None, None, None, :]
    return jnp.where(visible, scores, MASKED)


def causal_block_pairs(blocks: int, queries_outer: bool) -> tuple[np.ndarray, np.ndarray]:
    """The (query block, key block) pairs of the causal triangle (key block <= query block) in the order a
    loop visits them: queries_outer, every query block with its key blocks 0..i; else every key block with
    its query blocks j..blocks-1. A static list, so the loop's trip count does not depend on a traced
    index (on a GPU each data-dependent loop bound is a copy to the host and a wait)."""
    pairs = [(i, j) for i in range(blocks) for j in range(i + 1)] if queries_outer else \
        [(i, j) for j in range(blocks) for i in range(j, blocks)]
    query_blocks, key_blocks = (np.asarray(column, np.int32) for column in zip(*pairs))
    return query_blocks, key_blocks


def _over_block_pairs(blocks: int, queries_outer: bool, init, step, finish, outputs):
    """One static loop over causal_block_pairs: the carry starts from `init` at each outer block's first
    pair, `step(i, j, carry)` accumulates a pair, and `finish(carry)` is written into the outer block's slot
    of `outputs` (arrays with a leading blocks axis): the last write, after its last pair, is the result."""
    query_blocks, key_blocks = causal_block_pairs(blocks, queries_outer)
    outer = query_blocks if queries_outer else key_blocks
    first = np.concatenate([[True], outer[1:] != outer[:-1]])
    query_blocks, key_blocks, outer, first = (jnp.asarray(x) for x in (query_blocks, key_blocks, outer, first))

    def body(p, carry):
        acc, written = carry
        acc = jax.tree.map(lambda a, fresh: jnp.where(first[p], fresh, a), acc, init)
        acc = step(query_blocks[p], key_blocks[p], acc)
        written = jax.tree.map(lambda buffer, x: buffer.at[outer[p]].set(x), written, finish(acc))
        return acc, written

    return jax.lax.fori_loop(0, len(first), body, (init, outputs))[1]


def _flash_forward(size, q, k, v, valid):
    """q [B,G,n,T,H], k, v [B,G,T,H] -> (out [B,G,n,T,H] in q's dtype, log-sum-exp [B,G,n,T] float32)."""
    B, G, n, T, H = q.shape
    wide = at_least_f32(q.dtype)
    blocks = T // size

    def key_block(i, j, carry):
        running_max, total, acc = carry
        scores = _block_scores(_block(q, i, size, 3), _block(k, j, size, 2), _block(valid, j, size, 1), i, j, size)
        new_max = jnp.maximum(running_max, scores.max(-1))
        probs = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        values = jnp.einsum("bgnqk,bgkh->bgnqh", probs.astype(v.dtype), _block(v, j, size, 2),
                            preferred_element_type=wide)
        acc = acc * rescale[..., None] + values
        return new_max, total * rescale + probs.sum(-1), acc

    def finish(carry):
        running_max, total, acc = carry
        return (acc / total[..., None]).astype(q.dtype), running_max + jnp.log(total)

    init = (jnp.full((B, G, n, size), MASKED, wide), jnp.zeros((B, G, n, size), wide),
            jnp.zeros((B, G, n, size, H), wide))
    outputs = (jnp.zeros((blocks, B, G, n, size, H), q.dtype), jnp.zeros((blocks, B, G, n, size), wide))
    # causal: query block i meets key blocks 0..i, in that order
    out, lse = _over_block_pairs(blocks, True, init, key_block, finish, outputs)   # [blocks, B,G,n,size,(H)]
    return (jnp.moveaxis(out, 0, 3).reshape(B, G, n, T, H), jnp.moveaxis(lse, 0, 3).reshape(B, G, n, T))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(size, q, k, v, valid):
    return _flash_forward(size, q, k, v, valid)[0]


def _flash_fwd(size, q, k, v, valid):
    out, lse = _flash_forward(size, q, k, v, valid)
    return out, (q, k, v, valid, out, lse)


def _flash_bwd(size, residuals, d_out):
    """FlashAttention-2's backward: per tile, probs = exp(scores - lse) and
    d_scores = probs * (d_probs - rowsum(d_out * out)); one pass over query blocks for dq, one over key
    blocks for dk and dv (each pass accumulates in its loop carry, no scatter-adds)."""
    q, k, v, valid, out, lse = residuals
    B, G, n, T, H = q.shape
    blocks = T // size
    wide = at_least_f32(q.dtype)
    scale = 1.0 / np.sqrt(H)
    d_out = d_out.astype(q.dtype)
    out_dot = jnp.sum(d_out.astype(wide) * out.astype(wide), axis=-1)  # [B,G,n,T]

    def tile(i, j):
        """(probs, d_scores) of query block i against key block j, float32 [B,G,n,size,size]."""
        k_j, v_j = _block(k, j, size, 2), _block(v, j, size, 2)
        scores = _block_scores(_block(q, i, size, 3), k_j, _block(valid, j, size, 1), i, j, size)
        probs = jnp.exp(scores - _block(lse, i, size, 3)[..., None])
        d_probs = jnp.einsum("bgnqh,bgkh->bgnqk", _block(d_out, i, size, 3), v_j, preferred_element_type=wide)
        return probs, probs * (d_probs - _block(out_dot, i, size, 3)[..., None])

    def dq_step(i, j, acc):
        _, d_scores = tile(i, j)
        return acc + jnp.einsum("bgnqk,bgkh->bgnqh", d_scores.astype(q.dtype), _block(k, j, size, 2),
                                preferred_element_type=wide)

    def dkv_step(i, j, acc):
        d_k, d_v = acc
        probs, d_scores = tile(i, j)
        d_v = d_v + jnp.einsum("bgnqk,bgnqh->bgkh", probs.astype(v.dtype), _block(d_out, i, size, 3),
                               preferred_element_type=wide)
        d_k = d_k + jnp.einsum("bgnqk,bgnqh->bgkh", d_scores.astype(q.dtype), _block(q, i, size, 3),
                               preferred_element_type=wide)
        return d_k, d_v

    # causal: dq of query block i sums over key blocks 0..i; dk, dv of key block j over query blocks j..end
    d_q = _over_block_pairs(blocks, True, jnp.zeros((B, G, n, size, H), wide), dq_step,
                            lambda acc: (acc * scale).astype(q.dtype), jnp.zeros((blocks, B, G, n, size, H), q.dtype))
    zeros = jnp.zeros((B, G, size, H), wide)
    buffers = (jnp.zeros((blocks, B, G, size, H), k.dtype), jnp.zeros((blocks, B, G, size, H), v.dtype))
    d_k, d_v = _over_block_pairs(blocks, False, (zeros, zeros), dkv_step,
                                 lambda acc: ((acc[0] * scale).astype(k.dtype), acc[1].astype(v.dtype)), buffers)
    d_q = jnp.moveaxis(d_q, 0, 3).reshape(q.shape)
    d_k, d_v = (jnp.moveaxis(d, 0, 2).reshape(k.shape) for d in (d_k, d_v))
    return d_q, d_k, d_v, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cuDNN (GPU)

def cudnn_arguments(q, k, v, key_valid):
    """Keyword arguments for jax.nn.dot_product_attention: causal, plus the key-padding mask broadcast
    to [B,1,T,S] (cuDNN takes a bias of the full [T,S] extent; one head row shared by all heads)."""
    B, T = key_valid.shape[0], q.shape[1]
    mask = jnp.broadcast_to(key_valid[:, None, None, :], (B, 1, T, key_valid.shape[1]))
    return {"mask": mask, "is_causal": True}


def cudnn_attention(q, k, v, key_valid, implementation: str = "cudnn"):
    """`implementation="xla"` runs the same call through JAX's XLA version (what the CPU tests check)."""
    return jax.nn.dot_product_attention(q, k, v, **cudnn_arguments(q, k, v, key_valid), implementation=implementation)


def cudnn_supports(dtype, head_dim: int, length: int) -> bool:
    """Whether cuDNN flash attention can run this (checked by JAX's cuDNN wrapper, which raises instead)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    return head_dim % 8 == 0 and head_dim <= 128 and length % 2 == 0


# ----------------------------------------------------------------------------- splash (TPU)

SPLASH_LANES = 128  # splash blocks are multiples of the TPU lane width


def splash_segment_ids(key_valid, length: int):
    """Segment ids [B, length] int32: 1 for real tokens, 0 for padding (also the slots added to reach
    `length`). Under a causal mask a real query then sees exactly the real keys at or before it, and
    every query sees at least itself (splash needs no all-masked row)."""
    segments = key_valid.astype(jnp.int32)
    return jnp.pad(segments, ((0, 0), (0, length - key_valid.shape[1])))


def splash_block(length: int) -> int:
    return next(b for b in (512, 256, SPLASH_LANES) if length % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, heads_per_kv: int, interpret: bool, mesh):
    """mesh: the abstract mesh traced under (shard_map's manual one), whose axes the kernel's constants carry."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    block = splash_block(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads_per_kv)
    with jax.ensure_compile_time_eval():  # its block tables are constants, not tracers of the first caller's trace
        return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, key_valid, interpret: bool = False):
    """One MQA splash kernel per (row, key/value head); `interpret=True` runs it on CPU (tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    B, T, N, H = q.shape
    G = k.shape[2]
    length = -(-T // SPLASH_LANES) * SPLASH_LANES
    widths = ((0, 0), (0, length - T), (0, 0), (0, 0))
    scaled = (q.astype(at_least_f32(q.dtype)) * (1.0 / np.sqrt(H))).astype(q.dtype)  # splash does not scale
    grouped_q = jnp.pad(scaled, widths).reshape(B, length, G, N // G, H).transpose(0, 2, 3, 1, 4)  # [B,G,n,T,H]
    k, v = (jnp.pad(x, widths).transpose(0, 2, 1, 3) for x in (k, v))                            # [B,G,T,H]
    segments = splash_segment_ids(key_valid, length)
    kernel = _splash_kernel(length, N // G, interpret, jax.sharding.get_abstract_mesh())

    def one(q_g, k_g, v_g, segment):
        return kernel(q_g, k_g, v_g, segment_ids=SegmentIds(q=segment, kv=segment))

    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(grouped_q, k, v, segments)   # [B,G,n,T,H]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, length, N, H)[:, :T]


# ----------------------------------------------------------------------------- choice

_KERNELS = {"xla": xla_attention, "chunked": chunked_attention, "cudnn": cudnn_attention, "splash": splash_attention}
FUSED = ("cudnn", "splash")  # kernels XLA cannot partition: run under shard_map on a mesh
# What a fused kernel raises while tracing when it refuses (no cuDNN, unsupported GPU or shape, a Pallas
# block it cannot tile); "auto" then falls back to the chunked kernel.
REFUSALS = (ValueError, NotImplementedError, RuntimeError)
CUDNN_MIN_COMPUTE_CAPABILITY = 8.0  # cuDNN flash attention needs Ampere or newer (a T4 is 7.5)

_target_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_target_backend", default=None)
_kernel_mesh: contextvars.ContextVar = contextvars.ContextVar("attention_kernel_mesh", default=None)
_reported_refusals: set = set()


@contextlib.contextmanager
def lowering_for(backend: str):
    """Trace programs as for `backend` ("tpu", "gpu"): "auto" resolves as there and splash is not
    interpreted, so a CPU can `jax.export` the accelerator's program (platforms=[...])."""
    jax.clear_caches()  # jit's trace caches do not know the target: trace afresh inside and after
    token = _target_backend.set(backend)
    try:
        yield
    finally:
        _target_backend.reset(token)
        jax.clear_caches()


@contextlib.contextmanager
def kernel_mesh(mesh):
    """The mesh fused kernels are partitioned over (shard_map) where no context mesh is set: the
    sampler's programs, which run on the sampling mesh without one."""
    token = _kernel_mesh.set(mesh)
    try:
        yield
    finally:
        _kernel_mesh.reset(token)


def target_backend() -> str:
    return _target_backend.get() or jax.default_backend()


def gpu_compute_capability() -> float | None:
    """The first GPU's compute capability (8.0 for an A100), None without a GPU (cross-lowering)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    capability = getattr(devices[0], "compute_capability", None) if devices else None
    return float(capability) if capability else None


def resolve(impl: str, dtype, head_dim: int, length: int, backend: str | None = None,
            compute_capability: float | None = None) -> str:
    """The kernel `impl` names; "auto" picks by backend, dtype and length (see the module docstring).
    compute_capability: the GPU's (None: this machine's first GPU, or assumed supported without one)."""
    if check_impl(impl) != "auto":
        return impl
    backend = backend or target_backend()
    if backend == "gpu":
        capability = compute_capability or gpu_compute_capability()
        supported_gpu = capability is None or capability >= CUDNN_MIN_COMPUTE_CAPABILITY
        if supported_gpu and cudnn_supports(dtype, head_dim, length):
            return "cudnn"
    if backend == "tpu":
        return "splash"
    return "chunked" if length >= CHUNKED_MIN_LENGTH else "xla"


def partition_mesh():
    """The mesh a fused kernel is partitioned over: the context mesh, else `kernel_mesh`'s; None for
    none or a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = _kernel_mesh.get()
    return None if mesh is None or mesh.size == 1 else mesh


def head_split(num_heads: int, num_kv_heads: int, tensor: int) -> tuple[bool, bool]:
    """(split heads over "tensor", repeat k/v to one head per query head first): split where the
    key/value heads divide; else, where the query heads divide, repeat k/v so q, k and v split alike."""
    if tensor <= 1:
        return False, False
    if num_kv_heads % tensor == 0:
        return True, False
    return (True, True) if num_heads % tensor == 0 else (False, False)


def partitioned(kernel, q, k, v, key_valid, mesh):
    """`kernel` under shard_map over `mesh`: rows over the batch axes that divide them, heads over
    "tensor" as head_split says; each device runs the kernel on its own rows and heads."""
    if mesh is None:
        return kernel(q, k, v, key_valid)
    B, N, G = q.shape[0], q.shape[2], k.shape[2]
    rows, split = [], 1
    for axis in BATCH_AXES:
        size = mesh.shape.get(axis, 1)
        if size > 1 and B % (split * size) == 0:
            rows.append(axis)
            split *= size
    heads, repeat = head_split(N, G, mesh.shape.get("tensor", 1))
    if repeat:
        k, v = (jnp.repeat(x, N // G, axis=2) for x in (k, v))
    row_spec = tuple(rows) if rows else None
    spec = P(row_spec, None, "tensor" if heads else None, None)
    mapped = jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, P(row_spec, None)), out_specs=spec,
                           check_vma=False)
    return mapped(q, k, v, key_valid)


def _fused_kernel(name: str):
    if name == "splash":
        return functools.partial(splash_attention, interpret=target_backend() != "tpu")
    return _KERNELS[name]


def report_refusal(kernel: str, error: Exception) -> None:
    """One warning per (kernel, reason) naming why the kernel refused and what runs instead."""
    reason = " ".join(str(error).split()) or type(error).__name__
    if (kernel, reason) not in _reported_refusals:
        _reported_refusals.add((kernel, reason))
        log.warning("attention kernel %s refused (%s: %s); using the chunked kernel instead",
                    kernel, type(error).__name__, reason[:300])


def causal_attention(q, k, v, key_valid, impl: str = "auto"):
    """Causal self-attention of a padded batch (module docstring). q [B,T,N,H]; k, v [B,T,G,H];
    key_valid [B,T] bool (False marks padding) -> [B,T,N,H] in q's dtype."""
    name = resolve(impl, q.dtype, q.shape[-1], q.shape[1])
    if name not in FUSED:
        return _KERNELS[name](q, k, v, key_valid)
    try:
        return partitioned(_fused_kernel(name), q, k, v, key_valid, partition_mesh())
    except REFUSALS as error:
        if impl != "auto":
            raise
        report_refusal(name, error)
    return chunked_attention(q, k, v, key_valid)
