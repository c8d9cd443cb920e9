"""The CPU decoding layout: the training model's weights rearranged for decoding a few rows on XLA:CPU.

`to_decode_layout(model)` returns a `DecodeLayoutModel`, a Qwen2ForCausalLM with the same weights
arranged for XLA:CPU, which only the sampler uses:

- the layers are a list run as an unrolled loop instead of a stack under `scan`, because inside `scan`
  every step copies each layer's weights out of the stacked arrays;
- every matrix is stored [out, in] (`RowsFirstLinear`) and the LM head as [V, D], because XLA:CPU
  multiplies a few rows by an [out, in] matrix into an [out, rows] result faster than rows @ [in, out].

The timings behind both choices are in docs/benchmarks.md ("CPU sampling: decode layout vs scan layout").
The decoder blocks are the training model's own modules (`DecoderLayer`, `Attention`, `MLP`); only the
linear maps, the layer loop and the head differ. It costs one more copy of the weights while the
training layout is alive; `copies` lets samplers of the same base (base and student) share one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ssb_jax.model.kv_cache import LayerCache, init_cache
from ssb_jax.model.qwen2 import Linear, Qwen2ForCausalLM
from ssb_jax.model.variables import param


class RowsFirstLinear(Linear):
    """A Linear whose kernel is stored transposed, `kernel_t` [out, in]."""

    def __init__(self, linear: Linear):
        """`linear`'s kernel variable already holds the [out, in] matrix (see DecodeLayoutModel); its
        logical axes still read [in, out]."""
        axes = linear.kernel.get_metadata()["out_sharding"]
        self.kernel_t = param(linear.kernel[...], (axes[1], axes[0]))
        self.bias, self.lora_a, self.lora_b, self.lora_scale = linear.bias, linear.lora_a, linear.lora_b, linear.lora_scale

    def project(self, x):
        return jnp.moveaxis(jnp.einsum("oi,...i->o...", self.kernel_t[...], x), 0, -1)


class DecodeLayoutModel(Qwen2ForCausalLM):
    """Qwen2ForCausalLM with unrolled per-layer weights, [out, in] kernels and a [V, D] head."""

    def __init__(self, model: Qwen2ForCausalLM, copies: dict | None = None):
        copies = {} if copies is None else copies

        def converted(array, key, fn):  # one conversion per source array, shared through `copies`
            entry = copies.get((id(array), key))
            if entry is None or entry[0] is not array:
                entry = copies[(id(array), key)] = (array, fn(array))
            return entry[1]

        self.config = model.config
        self.embed, self.final_norm = model.embed, model.final_norm
        self.lm_head = None
        self.head_t = None if model.lm_head is None else param(
            converted(model.lm_head.kernel[...], "T", lambda a: a.T), ("vocab", "embed"))
        graphdef, stacked = nnx.split(model.layers)
        layers = []
        for i in range(model.config.num_layers):
            def layer_slice(path, variable, i=i):
                # kernels come out already transposed to [out, in]; their Linear becomes a RowsFirstLinear
                is_kernel = getattr(path[-1], "key", path[-1]) == "kernel"
                value = converted(variable[...], (is_kernel, i), (lambda s: s[i].T) if is_kernel else (lambda s: s[i]))
                out = variable.replace(value)
                out.set_metadata("out_sharding", tuple(variable.get_metadata()["out_sharding"])[1:])
                return out
            layer = nnx.merge(graphdef, jax.tree.map_with_path(layer_slice, stacked,
                                                               is_leaf=lambda x: isinstance(x, nnx.Variable)))
            for block, names in ((layer.attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    setattr(block, name, RowsFirstLinear(getattr(block, name)))
            layers.append(layer)
        self.layers = nnx.List(layers)

    def run_layers(self, hidden, positions, visible, cache, attend_slots=None):
        """The unrolled layer loop; a cache holds one [B, S, G, H] array per layer, each written in place."""
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else LayerCache(cache["k"][i], cache["v"][i], None, cache["valid"],
                                                                cache["index"], self.config.cache_block, attend_slots)
            hidden, layer_cache = layer(hidden, positions, visible, layer_cache)
            if layer_cache is not None:
                new_k.append(layer_cache.k)
                new_v.append(layer_cache.v)
        return hidden, (None if cache is None else dict(cache, k=new_k, v=new_v))

    def _head_rows(self) -> jax.Array:
        """The LM head as [V, D]: the tied embedding itself, or the untied head stored transposed."""
        return self.embed.embedding[...] if self.head_t is None else self.head_t[...]

    def head_matrix(self) -> jax.Array:
        return self._head_rows().T

    def logits(self, hidden):
        """[V, D] times rows, then one transpose."""
        head = self._head_rows()
        rows = hidden.reshape(-1, hidden.shape[-1])
        by_vocab = jnp.einsum("vd,rd->vr", head, rows, preferred_element_type=jnp.float32)
        # Materialized, then transposed: left to fusion, the transpose ran inside every consumer of the
        # logits and slowed the whole projection.
        by_vocab = jax.lax.optimization_barrier(by_vocab)
        return by_vocab.T.reshape(*hidden.shape[:-1], head.shape[0])

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """An empty KV cache of this layout: k and v as one [B, S, G, H] array per layer."""
        return init_cache(self.config, batch, length, dtype, per_layer=True)


def unstacked_layers(pure_adapters: dict, num_layers: int) -> dict:
    """A training-layout pure dict of adapters ({"layers": {...: [L, ...]}}) in the decode layout's
    places ({"layers": {i: {...: [...]}}}): the same arrays sliced per layer, nothing transposed (only
    kernels are)."""
    stacked = pure_adapters["layers"]
    return {**pure_adapters, "layers": {i: jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
                                        for i in range(num_layers)}}


def to_decode_layout(model: Qwen2ForCausalLM, copies: dict | None = None) -> DecodeLayoutModel:
    """The same weights (and adapters) in the decode layout; `model` itself is left as it is."""
    if isinstance(model, DecodeLayoutModel):
        return model
    return DecodeLayoutModel(model, copies)
