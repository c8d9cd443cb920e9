"""The package's two convenience functions (re-exported as `ssb_jax.load_model` and `ssb_jax.compute_logits`)."""
import functools

import jax
from flax import nnx

from ssb_jax.model.qwen2 import apply, positions_from_mask
from ssb_jax.model.weights import load_params


def load_model(path_or_id, *, dtype=None, mesh=None, finite_check="sample", **config_overrides):
    """(ModelConfig, Qwen2ForCausalLM) from a local HF checkpoint directory or a hub id; each weight is
    placed on `mesh` by its logical axes if a mesh is given. config_overrides: ModelConfig fields that
    are not in config.json (attention_impl="chunked", remat="full"). finite_check: "sample", "full" or
    "off" (the NaN/infinity check of the weights, model.weights.FINITE_CHECKS)."""
    return load_params(path_or_id, dtype=dtype, mesh=mesh, overrides=config_overrides, finite_check=finite_check)


def compute_logits(model, config, tokens, mask=None, positions=None):
    """Float32 logits [B, T, V] for a (left- or right-) padded batch of token ids."""
    import jax.numpy as jnp
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    positions = positions_from_mask(mask) if positions is None else jnp.asarray(positions)
    graphdef, state = nnx.split(model)
    return _jitted_apply(graphdef)(nnx.to_pure_dict(state), tokens, positions, mask)[0]


@functools.lru_cache(maxsize=8)
def _jitted_apply(graphdef):
    return jax.jit(functools.partial(apply, graphdef))
