"""Qwen2 / Qwen2.5 decoder as pure functions over a parameter pytree.

One forward serves every use: full sequences (training, teacher scoring), prefill into a
preallocated KV cache, and single-token decode. Layers are stacked on a leading axis and
run under `lax.scan`.

Parameter tree (L = layers, D = hidden, Q = heads*head_dim, K = kv_heads*head_dim, F = mlp):
    embed [V, D], final_norm [D], lm_head [D, V] (untied only)
    layers: attn_norm [L, D], mlp_norm [L, D],
            q_proj {kernel [L, D, Q], bias [L, Q]}, k_proj/v_proj {kernel [L, D, K], bias [L, K]},
            o_proj {kernel [L, Q, D]}, gate_proj/up_proj {kernel [L, D, F]}, down_proj {kernel [L, F, D]}

LoRA tree (optional, see ssb_jax.model.lora): {"layers": {proj_name: {"a": [L, d_in, r], "b": [L, r, d_out]}}}.

KV cache: {"k", "v": [L, B, S, kv_heads, head_dim], "valid": [B, S] bool, "index": int32 scalar}.
All rows share the write slot `index` (prompts are left-padded to a common length), while each
row carries its own positions, so left padding changes nothing in the math.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ssb_jax.model.config import ModelConfig

Params = Mapping[str, Any]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MASKED = -1e30  # finite, so a query with no visible key (a pad) softmaxes to uniform, not NaN


# ----------------------------------------------------------------------------- init

def param_shapes(config: ModelConfig) -> dict:
    """Shapes of the parameter tree, as nested dicts of tuples."""
    L, D, F = config.num_layers, config.hidden_size, config.intermediate_size
    Q, K = config.q_size, config.kv_size
    shapes = {
        "embed": (config.vocab_size, D),
        "final_norm": (D,),
        "layers": {
            "attn_norm": (L, D),
            "mlp_norm": (L, D),
            "q_proj": {"kernel": (L, D, Q), "bias": (L, Q)},
            "k_proj": {"kernel": (L, D, K), "bias": (L, K)},
            "v_proj": {"kernel": (L, D, K), "bias": (L, K)},
            "o_proj": {"kernel": (L, Q, D)},
            "gate_proj": {"kernel": (L, D, F)},
            "up_proj": {"kernel": (L, D, F)},
            "down_proj": {"kernel": (L, F, D)},
        },
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (D, config.vocab_size)
    return shapes


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def init_params(config: ModelConfig, key: jax.Array, std: float = 0.02) -> dict:
    """Random parameters (normal(0, std) matrices and biases, unit norms), for tests and benchmarks."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=_is_shape)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, config.jnp_dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(config.jnp_dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None, per_layer: bool = False) -> dict:
    """k/v stacked [L, B, S, G, H], or (per_layer, for unstacked params) lists of L [B, S, G, H]."""
    dtype = dtype or config.jnp_dtype
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    if per_layer:
        k = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
        v = [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]
    else:
        k, v = jnp.zeros((config.num_layers, *shape), dtype), jnp.zeros((config.num_layers, *shape), dtype)
    return {"k": k, "v": v, "valid": jnp.zeros((batch, length), bool), "index": jnp.zeros((), jnp.int32)}


def unstack_layers(params: Params) -> Params:
    """The same weights in the CPU decode layout: `layers` is a list of per-layer trees, each projection
    holds its kernel transposed as `kernel_t` [out, in], and an untied LM head is stored as `lm_head_t`
    [V, D] (a tied one is the embedding, already [V, D]).

    `forward` then runs the layers as an unrolled loop. Both choices are for decoding a few rows on
    XLA:CPU. Inside `scan`, every step copies each layer's weights out of the stacked arrays (measured
    at batch 8 on the 0.5B shape: MLP + q/o projections of 24 layers 198 ms in scan, 103 ms unrolled).
    And XLA:CPU multiplies a few rows by a [out, in] matrix into an [out, rows] result faster than
    rows @ [in, out] (8 rows, 896 x 4864: 0.77 vs 1.00 ms; the vocabulary projection 25 vs 47 ms).
    Together: a batch-8 greedy decode step 236 ms with scan, 110 ms in this layout (batch 1: 179, 76).
    Costs one more copy of the weights while the stacked tree is also alive.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    num_layers = jax.tree_util.tree_leaves(layers)[0].shape[0]

    def layer(i):
        out = {}
        for name, leaf in layers.items():
            if isinstance(leaf, Mapping) and "kernel" in leaf:
                out[name] = {k: (v[i].T if k == "kernel" else v[i]) for k, v in leaf.items()}
                out[name]["kernel_t"] = out[name].pop("kernel")
            else:
                out[name] = jax.tree_util.tree_map(lambda a: a[i], leaf)
        return out

    unstacked = {k: v for k, v in params.items() if k not in ("layers", "lm_head")}
    if "lm_head" in params:
        unstacked["lm_head_t"] = params["lm_head"].T
    return {**unstacked, "layers": [layer(i) for i in range(num_layers)]}


def has_unstacked_layers(params: Params) -> bool:
    return isinstance(params["layers"], (list, tuple))


# ----------------------------------------------------------------------------- pieces

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


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


def linear(x: jax.Array, weights: Mapping, lora: Mapping | None, lora_scale: float) -> jax.Array:
    if "kernel_t" in weights:  # the decode layout (see unstack_layers): [out, in] times rows
        y = jnp.moveaxis(jnp.einsum("oi,...i->o...", weights["kernel_t"], x), 0, -1)
    else:
        y = jnp.einsum("...i,io->...o", x, weights["kernel"])
    if "bias" in weights:
        y = y + weights["bias"]
    if lora is not None:
        a, b = lora["a"], lora["b"]
        low_rank = jnp.einsum("...i,ir->...r", x.astype(a.dtype), a)
        y = y + (lora_scale * jnp.einsum("...r,ro->...o", low_rank, b)).astype(y.dtype)
    return y


def attention(q, k, v, visible, impl: str = "xla"):
    """Grouped-query attention. q [B,T,N,H]; k, v [B,S,G,H]; visible [B,T,S] bool -> [B,T,N,H]."""
    B, T, N, H = q.shape
    G = k.shape[2]
    if impl == "dot_product_attention":
        return jax.nn.dot_product_attention(q, k, v, mask=visible[:, None, :, :])
    q = q.reshape(B, T, G, N // G, H)
    scores = jnp.einsum("btgnh,bsgh->bgnts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(H))
    scores = jnp.where(visible[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgnts,bsgh->btgnh", probs, v)
    return out.reshape(B, T, N, H)


# ----------------------------------------------------------------------------- forward

def _layer(config: ModelConfig, lora_scales: Mapping[str, float], hidden, positions, visible,
           cache_index, layer_params, layer_lora, layer_cache):
    """One decoder block. Returns the new hidden state and this layer's updated cache (or None)."""
    p = layer_params
    lora_of = (lambda name: None) if layer_lora is None else (lambda name: layer_lora.get(name))
    B, T, _ = hidden.shape
    N, G, H = config.num_heads, config.num_kv_heads, config.head_dim

    def proj(name, x):
        return linear(x, p[name], lora_of(name), lora_scales.get(name, 0.0))

    x = rms_norm(hidden, p["attn_norm"], config.rms_norm_eps)
    q = apply_rope(proj("q_proj", x).reshape(B, T, N, H), positions, config.rope_theta)
    k = apply_rope(proj("k_proj", x).reshape(B, T, G, H), positions, config.rope_theta)
    v = proj("v_proj", x).reshape(B, T, G, H)
    if layer_cache is not None:
        k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache[0], k.astype(layer_cache[0].dtype), cache_index, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache[1], v.astype(layer_cache[1].dtype), cache_index, axis=1)
        new_cache = (k_all, v_all)
        k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
    else:
        new_cache = None
    attn = attention(q, k, v, visible, config.attention_impl)
    hidden = hidden + proj("o_proj", attn.reshape(B, T, N * H))

    x = rms_norm(hidden, p["mlp_norm"], config.rms_norm_eps)
    mlp = jax.nn.silu(proj("gate_proj", x)) * proj("up_proj", x)
    hidden = hidden + proj("down_proj", mlp)
    return hidden, new_cache


def forward(params: Params, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
            cache: dict | None = None, lora: Params | None = None, *, config: ModelConfig,
            lora_scales: Mapping[str, float] | None = None, return_hidden: bool = False):
    """Run the decoder.

    tokens, positions [B, T] int; mask [B, T] bool (False marks padding).
    Without a cache, token t attends to tokens s <= t that are not padding.
    With a cache, the T tokens are written at slots [index, index+T) and attend to every valid
    earlier slot; this is prefill (T = prompt length) and decode (T = 1) alike.

    Returns (logits [B, T, V] float32, or the final-normed hidden [B, T, D] if return_hidden; new cache or None).
    """
    lora_scales = dict(lora_scales or {})
    T = tokens.shape[1]
    hidden = jnp.take(params["embed"], tokens, axis=0)
    mask = mask.astype(bool)
    query_slots = jnp.arange(T)
    if cache is None:
        key_valid = mask
        key_slots = query_slots
        cache_index = 0
        layer_caches = None
    else:
        cache_index = cache["index"]
        key_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], mask, cache_index, axis=1)
        key_slots = jnp.arange(key_valid.shape[1])
        query_slots = query_slots + cache_index
        layer_caches = (cache["k"], cache["v"])
    # visible[b, t, s]: key slot s is real and not in the future of query slot t.
    visible = key_valid[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])

    layer_fn = functools.partial(_layer, config, lora_scales)
    if config.remat:
        layer_fn = jax.checkpoint(layer_fn, policy=jax.checkpoint_policies.nothing_saveable)

    def body(h, xs):
        layer_params, layer_lora, layer_cache = xs
        h, new_cache = layer_fn(h, positions, visible, cache_index, layer_params, layer_lora, layer_cache)
        return h, new_cache

    layer_lora = None if lora is None else lora["layers"]
    if has_unstacked_layers(params):  # an unrolled loop (see unstack_layers); caches are per-layer lists
        outputs = []
        for i, layer_params in enumerate(params["layers"]):
            lora_i = None if layer_lora is None else jax.tree_util.tree_map(lambda a, i=i: a[i], layer_lora)
            cache_i = None if layer_caches is None else (layer_caches[0][i], layer_caches[1][i])
            hidden, new_cache_i = body(hidden, (layer_params, lora_i, cache_i))
            outputs.append(new_cache_i)
        new_layer_caches = None if layer_caches is None else ([c[0] for c in outputs], [c[1] for c in outputs])
    else:
        hidden, new_layer_caches = jax.lax.scan(body, hidden, (params["layers"], layer_lora, layer_caches))
    hidden = rms_norm(hidden, params["final_norm"], config.rms_norm_eps)

    new_cache = None
    if cache is not None:
        new_cache = {"k": new_layer_caches[0], "v": new_layer_caches[1], "valid": key_valid,
                     "index": cache["index"] + T}
    if return_hidden:
        return hidden, new_cache
    return logits_from_hidden(params, hidden, config), new_cache


def lm_head_matrix(params: Params, config: ModelConfig) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(params: Params, hidden: jax.Array, config: ModelConfig) -> jax.Array:
    """Project final-normed hidden states [..., D] to float32 logits [..., V]."""
    if has_unstacked_layers(params):  # the decode layout: [V, D] times rows, then one transpose
        head = params["lm_head_t"] if "lm_head_t" in params else params["embed"]
        rows = hidden.reshape(-1, hidden.shape[-1])
        by_vocab = jnp.einsum("vd,rd->vr", head, rows, preferred_element_type=jnp.float32)
        # Materialized, then transposed: left to fusion, the transpose ran inside every consumer of the
        # logits and doubled the time of the whole projection.
        by_vocab = jax.lax.optimization_barrier(by_vocab)
        return by_vocab.T.reshape(*hidden.shape[:-1], head.shape[0])
    return jnp.einsum("...d,dv->...v", hidden, lm_head_matrix(params, config),
                      preferred_element_type=jnp.float32)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions that count only real tokens (left padding gets position 0), as HF generate does."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
