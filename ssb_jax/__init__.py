"""ssb_jax: Semantic Soft Bootstrapping (RL-free self-distillation for math reasoning) in JAX.

Public API in a few lines:

    import ssb_jax
    config, params = ssb_jax.load_model("Qwen/Qwen2.5-0.5B-Instruct")   # or a local HF directory
    logits = ssb_jax.compute_logits(params, config, tokens, mask)       # [B, T, V] float32
"""
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.qwen2 import forward, init_cache, init_params, logits_from_hidden, positions_from_mask
from ssb_jax.model.tokenizer import encode_chat, load_tokenizer, render_chat
from ssb_jax.model.weights import CheckpointError, load_params, save_params


def load_model(path_or_id, *, dtype=None, mesh=None):
    """(ModelConfig, params) from a local HF checkpoint directory or a hub id; placed on `mesh` if given."""
    shardings = None
    if mesh is not None:
        from ssb_jax.sharding import param_shardings
        from ssb_jax.model.weights import resolve_checkpoint
        config = ModelConfig.from_json(resolve_checkpoint(path_or_id) / "config.json")
        if dtype is not None:
            config = config.replace(dtype=dtype)
        shardings = param_shardings(config, mesh)
    return load_params(path_or_id, dtype=dtype, shardings=shardings)


def compute_logits(params, config, tokens, mask=None, positions=None):
    """Float32 logits [B, T, V] for a (left- or right-) padded batch of token ids."""
    import jax.numpy as jnp
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    positions = positions_from_mask(mask) if positions is None else jnp.asarray(positions)
    return _jitted_forward(params, tokens, positions, mask, config=config)[0]


def _forward_for_api(params, tokens, positions, mask, *, config):
    return forward(params, tokens, positions, mask, config=config)


import jax as _jax  # noqa: E402

_jitted_forward = _jax.jit(_forward_for_api, static_argnames="config")

__all__ = ["ModelConfig", "forward", "init_cache", "init_params", "logits_from_hidden", "positions_from_mask",
           "encode_chat", "load_tokenizer", "render_chat", "CheckpointError", "load_params", "save_params",
           "load_model", "compute_logits"]
