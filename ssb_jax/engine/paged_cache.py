"""A paged KV cache: a pool of fixed-size pages, a page table per row, and the model run over it.

The pool holds the keys and values of every layer in pages of `page_size` slots, KV heads first (the
layout of JAX's Pallas paged-attention kernel): stacked {"k", "v": [shards, L, kv_heads, pages,
page_size, head_dim]} for the scan layout, or lists of L arrays [shards, kv_heads, pages, page_size,
head_dim] for the CPU decode layout (ssb_jax.sampling.decode_layout). The leading axis is the
data-parallel shard (placed over the sampling mesh's data axes, POOL_AXES): each shard has pages of its
own, numbered from 0 in each, and the model runs over one shard's pool at a time (`shard_forward`).
A row's logical slot s (its token at position s) lives in page `page_table[row, s // page_size]` at
offset `s % page_size`. Page 0 (NULL_PAGE) belongs to nobody: padding tokens and idle rows write
there and unused page-table entries point there, so every index stays in bounds and nothing
real is ever overwritten.

`PagedLayerCache` has the two methods the model's attention calls on a layer cache (`write`,
`attend`; see ssb_jax.model.qwen2.Attention), so the model's own layers run over the pool
unchanged (`paged_forward`). Attention (`kernel="xla"`, the reference and the CPU path) gathers the
row's whole page-table row: a static shape (rows x max pages per row), masked by position, with no
data-dependent loop inside the step. On TPU and GPU a decode step (one query per row) runs JAX's own
Pallas paged-attention kernel for that platform instead (`kernel="pallas_tpu"` or `"pallas_gpu"`,
`attention_kernel`), which reads only the pages below each row's length (its loop bound is inside the
kernel, not an XLA loop). `PageAllocator` is the host side: free list and reference counts (the
prompt's pages are shared by its n samples).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssb_jax.model.attention import MASKED, at_least_f32
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.kv_cache import CACHE_AXES
from ssb_jax.sharding import array_bytes_per_device, named_sharding

NULL_PAGE = 0

# Logical axes of the stacked pool's k and v (the per-layer layout drops "layers"): a shard's pages on
# the devices of its data-parallel index, the KV heads split over `tensor` like the weights' heads.
POOL_AXES = ("batch", "layers", "kv_heads", None, "cache_slots", "head_dim")


def init_pool(config: ModelConfig, num_pages: int, page_size: int, dtype=None, *, per_layer: bool = False,
              shards: int = 1, mesh=None) -> dict:
    """An empty page pool of `shards` x `num_pages` pages (page 0 of each shard included: the null page),
    made in place on `mesh` (POOL_AXES) when given."""
    dtype = dtype or config.jnp_dtype
    shape = (shards, config.num_kv_heads, num_pages, page_size, config.head_dim)
    stacked = shape[:1] + (config.num_layers,) + shape[1:]

    def make():
        if per_layer:
            return {name: [jnp.zeros(shape, dtype) for _ in range(config.num_layers)] for name in ("k", "v")}
        return {name: jnp.zeros(stacked, dtype) for name in ("k", "v")}
    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=pool_shardings(jax.eval_shape(make), mesh))()


def pool_shardings(pool: dict, mesh) -> dict:
    """NamedShardings of a pool of either layout (arrays or shape structs), from POOL_AXES."""
    def place(x):
        axes = POOL_AXES if x.ndim == len(POOL_AXES) else POOL_AXES[:1] + POOL_AXES[2:]
        return named_sharding(axes, x.shape, mesh)
    return jax.tree.map(place, pool)


def page_bytes(config: ModelConfig, page_size: int, axes: dict | None = None) -> int:
    """Bytes of one page of keys and values over all layers on one device (the planner's table: the
    cache's kv_heads axis is split over `tensor` like the weights' heads)."""
    axes = axes or {"data": 1, "fsdp": 1, "tensor": 1}
    shape = (config.num_layers, 1, page_size, config.num_kv_heads, config.head_dim)
    return 2 * array_bytes_per_device(CACHE_AXES["k"], shape, axes, np.dtype(config.jnp_dtype).itemsize)


def pages_for_memory(config: ModelConfig, page_size: int, memory_bytes: float, weight_bytes: float,
                     working_bytes: float, axes: dict | None = None, share: float = 0.9) -> int:
    """How many pages fit in `share` of a device's memory next to the weights and a step's working set."""
    free = share * memory_bytes - weight_bytes - working_bytes
    return max(int(free // page_bytes(config, page_size, axes)), 0)


@dataclasses.dataclass(frozen=True)
class PagedLayerCache:
    """One layer's view of the pool during a call (a trace-time helper, like kv_cache.LayerCache).

    k, v: the stacked pool with `layer` the traced layer index, or one layer's pool with layer None.
    page_table [B, P]: each row's pages; write_slots [B, T]: the flat pool slot (page * page_size +
    offset) each new token is written to (NULL_PAGE's for padding); query_positions [B, T]: each new
    token's position, so a query sees the row's slots at or before it. kernel: one of KERNELS (decode steps
    only; see attention_kernel).
    """
    k: jax.Array
    v: jax.Array
    layer: jax.Array | None
    page_table: jax.Array
    write_slots: jax.Array
    query_positions: jax.Array
    kernel: str = "xla"

    def _layer(self, pool):
        """This layer's [G, pages, page_size, H]."""
        return pool if self.layer is None else jax.lax.dynamic_index_in_dim(pool, self.layer, keepdims=False)

    def write(self, k, v) -> "PagedLayerCache":
        """These tokens' keys and values [B, T, G, H] into their slots of the pool."""
        slots = self.write_slots.reshape(-1)

        def put(pool, new):
            G, H = new.shape[-2:]
            flat = pool.reshape(pool.shape[:-3] + (-1, H))  # [(L,) G, pages * page_size, H]
            new = new.astype(pool.dtype).reshape(-1, G, H)  # [B * T, G, H]
            if self.layer is None:
                flat = flat.at[:, slots].set(jnp.moveaxis(new, 1, 0), mode="promise_in_bounds")
            else:  # two array indices apart: their dimension comes first in the indexed shape
                flat = flat.at[self.layer, :, slots].set(new, mode="promise_in_bounds")
            return flat.reshape(pool.shape)
        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))

    def gathered(self, pool, dtype):
        """The row's pages in order [B, P * page_size, G, H]."""
        pages = jnp.take(self._layer(pool), self.page_table, axis=1)  # [G, B, P, page_size, H]
        G, B, P, S, H = pages.shape
        return jnp.moveaxis(pages.reshape(G, B, P * S, H), 0, 2).astype(dtype)

    def attend(self, q) -> jax.Array:
        """q [B, T, N, H] -> [B, T, N, H] over each row's slots at or before the query's position.

        The same scores and normalisation as attention.dense_attention over one static-width gather of
        the row's pages: positions beyond the query (later, unfilled, or another row's stale data in a
        reused page) get the finite MASKED score and weigh nothing.
        """
        B, T, N, H = q.shape
        if self.kernel == "pallas_tpu" and T == 1:
            return self._pallas_tpu(q)
        if self.kernel in ("pallas_gpu", "pallas_gpu_interpret") and T == 1:
            return self._pallas_gpu(q, interpret=self.kernel == "pallas_gpu_interpret")
        keys, values = self.gathered(self.k, q.dtype), self.gathered(self.v, q.dtype)
        G = keys.shape[-2]
        acc_dtype = at_least_f32(q.dtype)
        grouped = q.reshape(B, T, G, N // G, H)
        slots = jnp.arange(keys.shape[1])
        visible = slots[None, None, :] <= self.query_positions[:, :, None]  # [B, T, S]
        scores = jnp.einsum("btgnh,bsgh->bgnts", grouped, keys, preferred_element_type=acc_dtype)
        scores = jnp.where(visible[:, None, None], scores * (1.0 / np.sqrt(H)), MASKED)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bgnts,bsgh->btgnh", weights.astype(values.dtype), values, preferred_element_type=acc_dtype)
        return out.astype(q.dtype).reshape(B, T, N, H)

    def _pallas_tpu(self, q):
        """One query per row through jax.experimental.pallas.ops.tpu.paged_attention: it reads the pages
        below each row's length (position + 1) only; the query is scaled here (the kernel does not)."""
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
        B, _, N, H = q.shape
        pages_per_row = self.page_table.shape[1]
        block = math.gcd(pages_per_row, 8)
        out = paged_attention((q[:, 0] * (1.0 / np.sqrt(H))).astype(q.dtype), self._layer(self.k).astype(q.dtype),
                              self._layer(self.v).astype(q.dtype), (self.query_positions[:, 0] + 1).astype(jnp.int32),
                              self.page_table.astype(jnp.int32), pages_per_compute_block=block)
        return out.reshape(B, 1, N, H)


    def _pallas_gpu(self, q, interpret: bool = False):
        """One query per row through jax.experimental.pallas.ops.gpu.paged_attention (Triton): it reads the
        pages below each row's length only, split over min(16, P) partitions of the page table (P a power of
        two, so they divide it); the query is scaled here (the kernel does not). interpret: Pallas's
        interpreter instead of Triton, on any backend (the tests' numerics on a CPU)."""
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        B, _, N, H = q.shape
        pages_per_row = self.page_table.shape[1]
        splits = math.gcd(pages_per_row, 16)
        out = paged_attention((q[:, 0] * (1.0 / np.sqrt(H))).astype(q.dtype), self._layer(self.k).astype(q.dtype),
                              self._layer(self.v).astype(q.dtype), self.page_table.astype(jnp.int32),
                              (self.query_positions[:, 0] + 1).astype(jnp.int32), k_splits=splits,
                              pages_per_compute_block=math.gcd(pages_per_row // splits, 8),
                              interpret=interpret)
        return out.reshape(B, 1, N, H)


# pallas_gpu_interpret: the GPU kernel through Pallas's interpreter, which runs anywhere (tests)
KERNELS = ("xla", "pallas_tpu", "pallas_gpu", "pallas_gpu_interpret")


def attention_kernel(backend: str | None = None, choice: str = "auto") -> str:
    """The decode attention: `choice` when it names a kernel, else (auto) the platform's Pallas paged-attention
    kernel on TPU and GPU, the XLA gather elsewhere."""
    if choice != "auto":
        if choice not in KERNELS:
            raise ValueError(f"decode attention {choice!r}: one of auto, {', '.join(KERNELS)}")
        return choice
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(backend or jax.default_backend(), "xla")


def flat_slots(page_table: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int) -> jax.Array:
    """The pool slot of each (row, position) [B, T]; NULL_PAGE's first slot where not valid."""
    pages = jnp.take_along_axis(page_table, positions // page_size, axis=1)
    return jnp.where(valid, pages * page_size + positions % page_size, NULL_PAGE * page_size)


def paged_forward(model, pool: dict, tokens, positions, page_table, write_slots, kernel: str = "xla"):
    """The model's layers over the pool: tokens, positions, write_slots [B, T]; page_table [B, P].
    Returns (final-normed hidden states [B, T, D], the updated pool). Works for the stacked model
    (layers under scan, the pool in the carry) and the CPU decode layout (an unrolled layer loop)."""
    hidden = model.embed(tokens)
    view = functools.partial(PagedLayerCache, page_table=page_table, write_slots=write_slots,
                             query_positions=positions, kernel=kernel)
    if isinstance(pool["k"], list):
        new_k, new_v = [], []
        for i, layer in enumerate(model.layers):
            hidden, layer_cache = layer(hidden, positions, None, view(pool["k"][i], pool["v"][i], None))
            new_k.append(layer_cache.k)
            new_v.append(layer_cache.v)
        pool = {"k": new_k, "v": new_v}
    else:
        graphdef, state = nnx.split(model.layers)

        def body(carry, xs):
            h, k, v = carry
            layer_state, layer = xs
            h, layer_cache = nnx.merge(graphdef, layer_state)(h, positions, None, view(k, v, layer))
            return (h, layer_cache.k, layer_cache.v), None

        layers = jnp.arange(model.config.num_layers)
        (hidden, k, v), _ = jax.lax.scan(body, (hidden, pool["k"], pool["v"]), (state, layers))
        pool = {"k": k, "v": v}
    return model.final_norm(hidden), pool


def shard_forward(model, pool: dict, tokens, positions, page_table, write_slots, kernel: str = "xla"):
    """paged_forward on every shard at once: pool with the leading shard axis, the other arguments
    [shards, B, ...] with shard-local page ids. One program for all shards (vmapped over the shard axis,
    which the pool's placement splits over the data axes); one shard runs paged_forward itself."""
    forward = functools.partial(paged_forward, model, kernel=kernel)
    if tokens.shape[0] == 1:  # the single-device program unchanged (no batched gathers over a shard axis)
        first = lambda tree: jax.tree.map(lambda x: x[0], tree)
        hidden, pool = forward(first(pool), tokens[0], positions[0], page_table[0], write_slots[0])
        return hidden[None], jax.tree.map(lambda x: x[None], pool)
    return jax.vmap(forward)(pool, tokens, positions, page_table, write_slots)


def copy_pages(pool: dict, sources: jax.Array, targets: jax.Array) -> dict:
    """Each target page becomes a copy of its source page (NULL_PAGE -> NULL_PAGE pairs are no-ops):
    a sample's own copy of its prompt's partly filled last page. One shard's pool (see shard_copy_pages)."""
    def copy(array):  # the pages axis is the one before [page_size, H]
        axis = array.ndim - 3
        index = (slice(None),) * axis
        return array.at[index + (targets,)].set(array[index + (sources,)])
    return {name: [copy(a) for a in value] if isinstance(value, list) else copy(value) for name, value in pool.items()}


def shard_copy_pages(pool: dict, sources: jax.Array, targets: jax.Array) -> dict:
    """copy_pages in every shard: pool with the leading shard axis, sources and targets [shards, copies]."""
    return jax.vmap(copy_pages)(pool, sources, targets)


class PageAllocator:
    """The host's book of the pool: a free list and a reference count per page (page 0 never given out)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self.refs = np.zeros(num_pages, np.int32)

    @property
    def available(self) -> int:
        return len(self.free)

    def take(self, count: int, refs: int = 1) -> list[int]:
        if count > len(self.free):
            raise MemoryError(f"{count} pages asked, {len(self.free)} free")
        pages = [self.free.pop() for _ in range(count)]
        self.refs[pages] = refs
        return pages

    def release(self, pages) -> None:
        """Drop one reference to each page; a page nobody holds goes back to the free list at once."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free.append(page)
            elif self.refs[page] < 0:
                raise RuntimeError(f"page {page} released more often than taken")
