"""The KV cache and the attention of cached calls over its filled blocks.

A cache is a dict {"k", "v": [L, B, S, kv_heads, head_dim], "valid": [B, S] bool, "index": int32
scalar} (`init_cache`); the decode layout (ssb_jax.sampling.decode_layout) keeps k and v as lists of
L arrays [B, S, kv_heads, head_dim] instead (`per_layer=True`). All rows share the write slot
`index` (prompts are left-padded to a common length), while each row carries its own positions, so
left padding changes nothing in the math. A cached call writes only its own slots of each layer
(`dynamic_update_slice` into the cache, which XLA does in place when the cache is a loop carry or a
donated argument: jit a decode step with `donate_argnames="cache"`) and attends blockwise, over
blocks of `ModelConfig.cache_block` slots, up to a static bound (`LayerCache.attend`): the sampler
decodes in phases whose bounds follow the filled length (`decode_phases`), so no loop inside a step
has a trip count that depends on data (on GPU each iteration of such a loop copies its predicate to
the host and waits).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssb_jax.model.attention import MASKED, at_least_f32
from ssb_jax.model.config import ModelConfig
from ssb_jax.sharding import named_sharding

# Logical axes of the stacked cache's arrays (the per-layer layout drops the leading "layers").
CACHE_AXES = {"k": ("layers", "batch", "cache_slots", "kv_heads", "head_dim"),
              "v": ("layers", "batch", "cache_slots", "kv_heads", "head_dim"),
              "valid": ("batch", "cache_slots"), "index": ()}


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None, *, per_layer: bool = False) -> dict:
    """An empty cache of `batch` rows and `length` slots, in the model's dtype unless `dtype` is
    given; k and v stacked [L, B, S, G, H], or with per_layer a list of L arrays [B, S, G, H]."""
    dtype = dtype or config.jnp_dtype
    if per_layer:
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        k = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
        v = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
    else:
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return {"k": k, "v": v, "valid": jnp.zeros((batch, length), bool), "index": jnp.zeros((), jnp.int32)}


def cache_shardings(cache: dict, mesh) -> dict:
    """NamedShardings for a cache of either layout, from CACHE_AXES."""
    out = {}
    for name, value in cache.items():
        if isinstance(value, list):  # the per-layer layout: each array lacks the leading "layers" axis
            out[name] = [named_sharding(CACHE_AXES[name][1:], x.shape, mesh) for x in value]
        else:
            out[name] = named_sharding(CACHE_AXES[name], value.shape, mesh)
    return out


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of the KV cache during a cached call (a trace-time helper, not a pytree).

    k, v: the whole stacked cache [L, B, S, G, H] with `layer` the (traced) layer index (the scan
    layout carries the stack through its layer loop), or one layer's [B, S, G, H] with layer None
    (the decode layout's per-layer list). Either way a call writes and reads slices of the one
    buffer, never a layer's whole slab, so XLA updates the cache in place. valid [B, S]: the
    filled slots, this call's included; index: the first slot this call writes; block: the slots
    per attended block (ModelConfig.cache_block); slots: a static bound on the slots this call may
    see (index + T <= slots; None: the whole allocated cache).
    """
    k: jax.Array
    v: jax.Array
    layer: jax.Array | None
    valid: jax.Array
    index: jax.Array
    block: int
    slots: int | None = None  # static: attend over the first `slots` slots only (None: all of them)

    def _start(self, slot) -> tuple:
        return ((self.layer,) if self.layer is not None else ()) + (0, slot, 0, 0)

    def _slice(self, cache, slot, size):
        """[B, size, G, H] of this layer from `slot` on."""
        shape = (cache.shape[-4], size) + cache.shape[-2:]
        lead = (1,) if self.layer is not None else ()
        return jax.lax.dynamic_slice(cache, self._start(slot), lead + shape).reshape(shape)

    def write(self, k, v) -> "LayerCache":
        """These tokens' keys and values [b, T, G, H] at slots [index, index + T). A cache of n * b rows
        takes each row n times in a row (prompt-major): one prefill serves n samples per prompt."""
        def put(cache, new):
            new = jnp.repeat(new.astype(cache.dtype), cache.shape[-4] // new.shape[0], axis=0)
            lead = (1,) if self.layer is not None else ()
            return jax.lax.dynamic_update_slice(cache, new.reshape(lead + new.shape), self._start(self.index))
        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))

    def attend(self, q) -> jax.Array:
        """q [B, T, N, H] at slots [index, index + T) over the filled slots before and among them -> [B, T, N, H].

        A loop over the blocks below the static bound `slots`, with a running max and sum (online
        softmax): its trip count is known at compile time, so on GPU no iteration waits on the host
        (a trip count read from the traced index did, once per block and layer and step). Blocks past
        the filled ones are masked whole and add exactly zero (weight exp(-1e30 - max) = 0, rescale 1),
        so the result does not depend on the bound: a caller keeps the cost near the filled length by
        choosing it (the sampler's phases, `decode_phases`). Exact (the same scores and normalisation
        as `attention.dense_attention`, summed in another order), and plain XLA ops that every
        backend runs. Masked scores are the same finite -1e30.
        """
        B, T, N, H = q.shape
        S, G = self.k.shape[-3], self.k.shape[-2]
        size = min(self.block, S)
        acc_dtype = at_least_f32(q.dtype)
        grouped = q.reshape(B, T, G, N // G, H)
        query_slots = self.index + jnp.arange(T)
        within = jnp.arange(size)

        def add_block(j, carry):
            running_max, total, acc = carry  # [B, G, n, T], [B, G, n, T], [B, G, n, T, H]
            first = j * size
            start = jnp.minimum(first, S - size)  # a last partial block overlaps its predecessor: mask those
            slots = start + within
            keys = self._slice(self.k, start, size).astype(q.dtype)
            values = self._slice(self.v, start, size).astype(q.dtype)
            visible = (jax.lax.dynamic_slice_in_dim(self.valid, start, size, axis=1)[:, None, :]
                       & (slots[None, None, :] <= query_slots[None, :, None]) & (slots >= first)[None, None, :])
            scores = jnp.einsum("btgnh,bsgh->bgnts", grouped, keys, preferred_element_type=acc_dtype)
            scores = jnp.where(visible[:, None, None], scores * (1.0 / np.sqrt(H)), MASKED)
            new_max = jnp.maximum(running_max, scores.max(axis=-1))
            rescale = jnp.exp(running_max - new_max)
            weights = jnp.exp(scores - new_max[..., None])
            total = total * rescale + weights.sum(axis=-1)
            acc = acc * rescale[..., None] + jnp.einsum("bgnts,bsgh->bgnth", weights.astype(values.dtype), values,
                                                        preferred_element_type=acc_dtype)
            return new_max, total, acc

        stats = jnp.full((B, G, N // G, T), MASKED, acc_dtype)
        init = (stats, jnp.zeros_like(stats), jnp.zeros((B, G, N // G, T, H), acc_dtype))
        blocks = -(-min(S if self.slots is None else self.slots, S) // size)
        if blocks == 1:
            _, total, acc = add_block(0, init)
        else:  # static bounds: a scan, whose trip count XLA knows
            _, total, acc = jax.lax.fori_loop(0, blocks, add_block, init)
        out = (acc / total[..., None]).astype(q.dtype)
        return jnp.moveaxis(out, 3, 1).reshape(B, T, N, H)


def decode_phases(prompt_slots: int, max_new_tokens: int, block: int) -> list[int]:
    """The attention bounds (slots) of a decode loop's phases, in order, for a cache of
    prompt_slots + max_new_tokens slots whose first prompt_slots are filled by the prefill.

    Decode step s (1 <= s < max_new_tokens) attends over prompt_slots + s slots; a phase of bound b
    runs the steps with prompt_slots + s <= b, each attending over b slots (LayerCache.slots). The
    bounds are whole blocks, doubling from the first step's blocks up to the allocated cache, so a
    step attends over less than twice its filled blocks, and a program holds a copy of the decode step
    per phase: at most log2(cache blocks) + 1 of them (one while the cache fits in a block)."""
    slots = prompt_slots + max_new_tokens
    size = min(block, slots)
    if max_new_tokens < 2:
        return []
    blocks, last = -(-(prompt_slots + 1) // size), -(-(slots - 1) // size)
    bounds = []
    while True:
        bounds.append(min(blocks * size, slots))
        if blocks >= last:
            return bounds
        blocks *= 2
