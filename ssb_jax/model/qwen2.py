"""Qwen2 / Qwen2.5 as Flax NNX modules.

`Qwen2ForCausalLM(config, rngs=...)` is an ordinary `flax.nnx` model: call it eagerly in a notebook,
or split it once (`nnx.split`) and run the pure function `apply(graphdef, state, ...)` under `jit`.
One forward serves every use: full sequences (training, teacher scoring), prefill into a preallocated
KV cache, and single-token decode.

    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    logits, _ = model(tokens, positions, mask)                      # [B, T, V] float32
    cache = model.init_cache(batch, length)
    logits, cache = model(prompt, positions, mask, cache)           # prefill, then decode the same way
    graphdef, state = nnx.split(model)                              # once; then, under jit,
    jax.jit(functools.partial(apply, graphdef))(nnx.to_pure_dict(state), tokens, positions, mask)

Parameters (every one names its dimensions' logical axes in `out_sharding`, see ssb_jax.sharding):
    embed.embedding [V, D], final_norm.scale [D], lm_head.kernel [D, V] (untied only)
    layers (stacked on a leading L axis by nnx.vmap, run under lax.scan):
        attn_norm.scale, mlp_norm.scale [L, D]
        attn.{q,k,v}_proj.kernel [L, D, Q|K], .bias [L, Q|K]; attn.o_proj.kernel [L, Q, D]
        mlp.{gate,up}_proj.kernel [L, D, F]; mlp.down_proj.kernel [L, F, D]
    With a LoraConfig, each adapted projection also holds lora_a [L, d_in, r] and lora_b [L, r, d_out],
    `LoRAParam` variables (not `nnx.Param`), and its scale as a static attribute.

KV cache (ssb_jax.model.kv_cache): `model.init_cache(batch, length)` makes an empty one for this
model's layout; a cached call writes its keys and values into it and attends over its filled blocks.

Dtypes: parameters in ModelConfig.dtype (LoRA factors in LoraConfig.dtype, the optimiser's master
copy); every product takes its inputs in the activations' dtype and sums in float32 at least
(preferred_element_type); norms, softmax and logits are float32. On a CPU keep float32: XLA:CPU's bf16
products are slower than float32 ones without bf16 units (Zen 3: 1.37x for 1024 x 896 x 4864) and,
in jax 0.10.2, do not reach oneDNN's AVX512-BF16/AMX kernels by default where there are some.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssb_jax.model.attention import at_least_f32 as _at_least_f32
from ssb_jax.model.attention import causal_attention
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.kv_cache import LayerCache, init_cache
from ssb_jax.model.variables import LoRAParam, param
from ssb_jax.sharding import constrain

if TYPE_CHECKING:  # for annotations only: ssb_jax.model.lora builds on this module
    from ssb_jax.model.lora import LoraConfig

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The residual stream [B, T, D]: rows over the data-parallel axes, the width whole (pinned on the
# context mesh by sharding.constrain; left to XLA without one). Unpinned, XLA would take the width split
# of the embedding table ("embed" on fsdp) and make every projection a partial sum to all-reduce.
HIDDEN_AXES = ("batch", None, "activation_embed")
# Inside a layer, the rows stay split and the tensor axis takes the heads or the MLP width, as it does
# for the weights that produce them.
QUERY_AXES = ("batch", None, "heads", "head_dim")
KEY_VALUE_AXES = ("batch", None, "kv_heads", "head_dim")
MLP_AXES = ("batch", None, "mlp")


def _normal(rngs: nnx.Rngs, shape, dtype, std: float):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------- modules

class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ lora_scale * (x @ lora_a) @ lora_b). kernel [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool,
                 dtype, rngs: nnx.Rngs, lora: tuple[int, float, Any, str] | None = None, std: float = 0.02):
        self.kernel = param(_normal(rngs, (in_features, out_features), dtype, std), axes)
        self.bias = param(_normal(rngs, (out_features,), dtype, std), axes[1:]) if use_bias else None
        if lora is None:
            self.lora_a = self.lora_b = None
            self.lora_scale = 0.0
        else:
            rank, scale, lora_dtype, init = lora
            if init == "gaussian":
                a = jax.random.normal(rngs.params(), (in_features, rank), jnp.float32) / rank
            else:  # PEFT's default: kaiming-uniform, U(-1/sqrt(d_in), 1/sqrt(d_in))
                bound = 1.0 / math.sqrt(in_features)
                a = jax.random.uniform(rngs.params(), (in_features, rank), jnp.float32, -bound, bound)
            self.lora_a = LoRAParam(a.astype(lora_dtype), out_sharding=(axes[0], "lora_rank"), eager_sharding=False)
            self.lora_b = LoRAParam(jnp.zeros((rank, out_features), lora_dtype), out_sharding=("lora_rank", axes[1]),
                                    eager_sharding=False)
            self.lora_scale = float(scale)

    def project(self, x: jax.Array) -> jax.Array:
        """x @ kernel alone (the decode layout overrides this)."""
        return jnp.einsum("...i,io->...o", x, self.kernel[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.project(x)
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora_a is not None:
            # The factors are master weights (LoraConfig.dtype, float32 by default: the optimiser updates
            # them there); the products run in the input's dtype with float32 sums, so a bf16 model's
            # projections stay bf16 instead of upcasting every input to float32.
            compute, sums = x.dtype, _at_least_f32(x.dtype)
            a, b = self.lora_a[...].astype(compute), self.lora_b[...].astype(compute)
            low_rank = jnp.einsum("...i,ir->...r", x, a, preferred_element_type=sums).astype(compute)
            delta = jnp.einsum("...r,ro->...o", low_rank, b, preferred_element_type=sums)
            y = y + (self.lora_scale * delta).astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype):
        self.scale = param(jnp.ones((size,), dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        wide = x.astype(_at_least_f32(x.dtype))
        normed = wide * jax.lax.rsqrt(jnp.mean(wide * wide, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, size: int, dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.embedding = param(_normal(rngs, (vocab_size, size), dtype, std), ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the half-split layout HF Qwen2 uses. x [B,T,N,H], positions [B,T]."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(x.shape[-1], theta))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _lora_for(lora_config: LoraConfig | None, target: str):
    if lora_config is None or target not in lora_config.targets:
        return None
    return (lora_config.rank_of(target), lora_config.scale_of(target), lora_config.jnp_dtype, lora_config.init)


class Attention(nnx.Module):
    """Grouped-query self-attention with q/k/v biases and RoPE."""

    def __init__(self, config: ModelConfig, lora_config: LoraConfig | None, rngs: nnx.Rngs, init_std: float = 0.02):
        D, Q, K, dt = config.hidden_size, config.q_size, config.kv_size, config.jnp_dtype
        lin = lambda d_in, d_out, axes, bias, name: Linear(d_in, d_out, axes=axes, use_bias=bias, dtype=dt,  # noqa: E731
                                                          rngs=rngs, lora=_lora_for(lora_config, name), std=init_std)
        self.q_proj = lin(D, Q, ("embed", "heads"), True, "q_proj")
        self.k_proj = lin(D, K, ("embed", "kv_heads"), True, "k_proj")
        self.v_proj = lin(D, K, ("embed", "kv_heads"), True, "v_proj")
        self.o_proj = lin(Q, D, ("heads", "embed"), False, "o_proj")
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.rope_theta, self.impl = config.rope_theta, config.attention_impl

    def __call__(self, x, positions, visible, layer_cache):
        """x [B, T, D]; visible: the key mask [B, T] of causal self-attention among these tokens (the
        configured kernel, ssb_jax.model.attention), or None to attend over the layer cache's filled
        slots. With a layer cache the new keys and values are written into it first (a prefill into an
        empty cache passes `visible`: the prompt attends to itself alone). Returns (output [B, T, D],
        the updated layer cache or None)."""
        B, T, _ = x.shape
        N, G, H = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(constrain(self.q_proj(x).reshape(B, T, N, H), QUERY_AXES), positions, self.rope_theta)
        k = apply_rope(constrain(self.k_proj(x).reshape(B, T, G, H), KEY_VALUE_AXES), positions, self.rope_theta)
        v = constrain(self.v_proj(x).reshape(B, T, G, H), KEY_VALUE_AXES)
        if layer_cache is not None:
            layer_cache = layer_cache.write(k, v)
        if visible is None:
            out = layer_cache.attend(q)
        else:
            out = causal_attention(q, k, v, visible, self.impl)
        return self.o_proj(out.reshape(B, T, N * H)), layer_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, lora_config: LoraConfig | None, rngs: nnx.Rngs, init_std: float = 0.02):
        D, F, dt = config.hidden_size, config.intermediate_size, config.jnp_dtype
        self.gate_proj = Linear(D, F, axes=("embed", "mlp"), use_bias=False, dtype=dt, rngs=rngs,
                                lora=_lora_for(lora_config, "gate_proj"), std=init_std)
        self.up_proj = Linear(D, F, axes=("embed", "mlp"), use_bias=False, dtype=dt, rngs=rngs,
                              lora=_lora_for(lora_config, "up_proj"), std=init_std)
        self.down_proj = Linear(F, D, axes=("mlp", "embed"), use_bias=False, dtype=dt, rngs=rngs,
                                lora=_lora_for(lora_config, "down_proj"), std=init_std)

    def __call__(self, x):
        gate, up = constrain(self.gate_proj(x), MLP_AXES), constrain(self.up_proj(x), MLP_AXES)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, lora_config: LoraConfig | None, rngs: nnx.Rngs, init_std: float = 0.02):
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.jnp_dtype)
        self.attn = Attention(config, lora_config, rngs, init_std)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.jnp_dtype)
        self.mlp = MLP(config, lora_config, rngs, init_std)

    def __call__(self, hidden, positions, visible, layer_cache):
        """One pre-norm block; returns (hidden, this layer's updated cache or None)."""
        attn, new_cache = self.attn(self.attn_norm(hidden), positions, visible, layer_cache)
        hidden = constrain(hidden + attn, HIDDEN_AXES)
        return hidden + self.mlp(self.mlp_norm(hidden)), new_cache


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions that count only real tokens (left padding gets position 0), as HF generate does."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


class Qwen2ForCausalLM(nnx.Module):
    """The decoder with its LM head (tied to the embedding or not), optionally with LoRA adapters.
    Random init: normal(0, init_std) matrices, embeddings and biases, unit norms (a loaded checkpoint
    replaces all of it)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, lora_config: LoraConfig | None = None,
                 init_std: float = 0.02):
        self.config = config
        self.embed = Embed(config.vocab_size, config.hidden_size, config.jnp_dtype, rngs, init_std)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_layers(rngs):
            return DecoderLayer(config, lora_config, rngs, init_std)

        self.layers = stacked_layers(rngs)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.jnp_dtype)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=config.jnp_dtype,
            rngs=rngs, std=init_std)

    # ------------------------------------------------------------------ forward

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None,
                 cache: dict | None = None, *, return_hidden: bool = False, cache_is_empty: bool = False,
                 attend_slots: int | None = None):
        """tokens, positions [B, T] int; mask [B, T] bool (False marks padding; default all True;
        positions default to counting the unmasked tokens).

        Without a cache, token t attends to tokens s <= t that are not padding. With a cache, the T
        tokens are written at slots [index, index+T) and attend to every valid earlier slot: prefill
        (T = prompt length) and decode (T = 1) alike. `cache_is_empty` (static) promises that the cache
        holds no filled slot yet: the tokens then attend among themselves only, by the same attention
        as without a cache, and the cache may have n * B rows, each row written n times in a row.
        `attend_slots` (static) promises that every token sees only the first attend_slots slots
        (index + T <= attend_slots): the attention over the cache then stops there (LayerCache.slots;
        None: over the whole allocated cache, whose unfilled blocks are masked).

        Returns (float32 logits [B, T, V], or with return_hidden the final-normed hidden states
        [B, T, D]; the updated cache or None).
        """
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
        positions = positions_from_mask(mask) if positions is None else positions
        B, T = tokens.shape
        hidden = constrain(self.embed(tokens), HIDDEN_AXES)
        # Full sequences (and a prefill into an empty cache) pass only the key mask [B, T]: the attention
        # kernels apply causality themselves, without a [T, T] mask. None: attend over the cache.
        visible = mask
        new_cache = None
        if cache is not None:
            rows = cache["valid"].shape[0]
            if rows != B and not (cache_is_empty and rows % B == 0):
                raise ValueError(f"a cache of {rows} rows for {B} rows of tokens (only an empty cache may hold "
                                 "a multiple)")
            valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], jnp.repeat(mask, rows // B, axis=0),
                                                        cache["index"], axis=1)
            new_cache = {"k": cache["k"], "v": cache["v"], "valid": valid, "index": cache["index"]}
            visible = visible if cache_is_empty else None
        hidden, new_cache = self.run_layers(hidden, positions, visible, new_cache, attend_slots)
        hidden = self.final_norm(hidden)
        if new_cache is not None:
            new_cache["index"] = new_cache["index"] + T
        return (hidden if return_hidden else self.logits(hidden)), new_cache

    def run_layers(self, hidden, positions, visible, cache, attend_slots=None):
        """The stacked layers under lax.scan (each step merges one layer's slice of the state). Without a
        cache, with the configured remat policy. With one ({"k", "v", "valid", "index"}, this call's
        slots already marked valid), the whole stacked k and v ride in the scan carry and each layer
        writes its own slots of them (passed through as scan outputs they would be copied, layer by
        layer, every call). Returns (hidden, the cache with k and v updated, or None)."""
        graphdef, state = nnx.split(self.layers)
        if cache is None:
            def body(h, layer_state):
                h = nnx.merge(graphdef, layer_state)(h, positions, visible, None)[0]
                return constrain(h, HIDDEN_AXES), None

            if self.config.remat != "none":
                body = jax.checkpoint(body, policy=REMAT[self.config.remat])
            return jax.lax.scan(body, hidden, state)[0], None

        def cached_body(carry, xs):
            h, k, v = carry
            layer_state, layer = xs
            layer_cache = LayerCache(k, v, layer, cache["valid"], cache["index"], self.config.cache_block,
                                     attend_slots)
            h, layer_cache = nnx.merge(graphdef, layer_state)(h, positions, visible, layer_cache)
            return (constrain(h, HIDDEN_AXES), layer_cache.k, layer_cache.v), None

        layers = jnp.arange(self.config.num_layers)
        (hidden, k, v), _ = jax.lax.scan(cached_body, (hidden, cache["k"], cache["v"]), (state, layers))
        return hidden, dict(cache, k=k, v=v)

    def head_matrix(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied)."""
        return self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
        return jnp.einsum("...d,dv->...v", hidden, self.head_matrix(), preferred_element_type=_at_least_f32(hidden.dtype))

    # ------------------------------------------------------------------ KV cache

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """An empty KV cache of this model's layout (stacked over layers; see kv_cache.init_cache)."""
        return init_cache(self.config, batch, length, dtype)


# ----------------------------------------------------------------------------- functional use

def apply(graphdef: nnx.GraphDef, state, tokens, positions=None, mask=None, cache=None, *, return_hidden=False,
          cache_is_empty=False, attend_slots=None):
    """The model as a pure function of (graph definition, state(s), inputs), for use under jit.
    `state` is one nnx.State or a tuple of them (base and LoRA, split apart), or their pure dicts
    (`nnx.to_pure_dict(state)`: the graph definition restores the variable types and metadata). Jit it
    with the graph definition closed over, `jax.jit(functools.partial(apply, graphdef))`, and pass pure
    dicts: per call that skips hashing the graph definition and flattening Variables (tiny-model
    decode step 635 -> 247 us of host time, `python -m benchmarks.overhead`)."""
    states = state if isinstance(state, tuple) else (state,)
    return nnx.merge(graphdef, *states)(tokens, positions, mask, cache, return_hidden=return_hidden,
                                        cache_is_empty=cache_is_empty, attend_slots=attend_slots)


def init_model(config: ModelConfig, key: jax.Array | int = 0, *, lora_config: LoraConfig | None = None,
               std: float = 0.02) -> Qwen2ForCausalLM:
    """A randomly initialised model (normal(0, std) matrices and biases, unit norms), for tests and
    benchmarks, built inside one jit (one compiled program instead of an eager op per parameter)."""
    key = jax.random.key(key) if isinstance(key, int) else key
    graphdef, _ = nnx.split(abstract_model(config, lora_config))

    @jax.jit
    def make(key):
        return nnx.state(Qwen2ForCausalLM(config, rngs=nnx.Rngs(key), lora_config=lora_config, init_std=std))

    return nnx.merge(graphdef, make(key))


def abstract_model(config: ModelConfig, lora_config: LoraConfig | None = None) -> Qwen2ForCausalLM:
    """The model with ShapeDtypeStructs for arrays: shapes, dtypes and logical axes, nothing allocated."""
    return nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0), lora_config=lora_config))


def base_state(model: Qwen2ForCausalLM) -> nnx.State:
    """The frozen base parameters (every nnx.Param; LoRA adapters are not Params)."""
    return nnx.state(model, nnx.Param)
