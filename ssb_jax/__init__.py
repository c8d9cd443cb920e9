"""ssb_jax: Semantic Soft Bootstrapping (RL-free self-distillation for math reasoning) in JAX/Flax.

Public API in a few lines:

    import ssb_jax
    config, model = ssb_jax.load_model("Qwen/Qwen2.5-0.5B-Instruct")   # or a local HF directory
    logits = ssb_jax.compute_logits(model, config, tokens, mask)       # [B, T, V] float32

`model` is a `flax.nnx` module (ssb_jax.model.qwen2.Qwen2ForCausalLM): callable eagerly, or split
once with `nnx.split(model)` for jitted use through `ssb_jax.apply(graphdef, state, ...)`.
"""
import functools as _functools

import jax as _jax
from flax import nnx as _nnx

from ssb_jax.model.config import ModelConfig
from ssb_jax.model.qwen2 import Qwen2ForCausalLM, abstract_model, apply, init_model, positions_from_mask
from ssb_jax.model.tokenizer import encode_chat, load_tokenizer, render_chat
from ssb_jax.model.weights import CheckpointError, load_params, save_params


def load_model(path_or_id, *, dtype=None, mesh=None, finite_check="sample", **config_overrides):
    """(ModelConfig, Qwen2ForCausalLM) from a local HF checkpoint directory or a hub id; each weight is
    placed on `mesh` by its logical axes if a mesh is given. config_overrides: ModelConfig fields that
    are not in config.json (attention_impl="chunked", remat="full"). finite_check: "sample", "full" or
    "off" (NaN/infinity check of the weights, model.weights.FINITE_CHECKS)."""
    return load_params(path_or_id, dtype=dtype, mesh=mesh, overrides=config_overrides, finite_check=finite_check)


def compute_logits(model, config, tokens, mask=None, positions=None):
    """Float32 logits [B, T, V] for a (left- or right-) padded batch of token ids."""
    import jax.numpy as jnp
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    positions = positions_from_mask(mask) if positions is None else jnp.asarray(positions)
    graphdef, state = _nnx.split(model)
    return _jitted_apply(graphdef)(_nnx.to_pure_dict(state), tokens, positions, mask)[0]


@_functools.lru_cache(maxsize=8)
def _jitted_apply(graphdef):
    return _jax.jit(_functools.partial(apply, graphdef))

__all__ = ["ModelConfig", "Qwen2ForCausalLM", "abstract_model", "apply", "init_model", "positions_from_mask",
           "encode_chat", "load_tokenizer", "render_chat", "CheckpointError", "load_params", "save_params",
           "load_model", "compute_logits"]
