"""ssb_jax: Semantic Soft Bootstrapping (RL-free self-distillation for math reasoning) in JAX/Flax.

Public API in a few lines (docs/api.md has more):

    import ssb_jax
    config, model = ssb_jax.load_model("Qwen/Qwen2.5-0.5B-Instruct")   # or a local HF directory
    logits = ssb_jax.compute_logits(model, config, tokens, mask)       # [B, T, V] float32

`model` is a `flax.nnx` module (ssb_jax.model.qwen2.Qwen2ForCausalLM): callable eagerly, or split
once with `nnx.split(model)` for jitted use through `ssb_jax.apply(graphdef, state, ...)`.

The names below are imported on first use, so `import ssb_jax.<module>` (the command line's --help, the
notebook's setup) does not import jax until something needs it.
"""
from ssb_jax.lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "ModelConfig": "ssb_jax.model.config",
    **dict.fromkeys(("Qwen2ForCausalLM", "abstract_model", "apply", "init_model", "positions_from_mask"),
                    "ssb_jax.model.qwen2"),
    **dict.fromkeys(("encode_chat", "load_tokenizer", "render_chat"), "ssb_jax.model.tokenizer"),
    **dict.fromkeys(("CheckpointError", "load_params", "save_params"), "ssb_jax.model.weights"),
    **dict.fromkeys(("load_model", "compute_logits"), "ssb_jax.api"),
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports("ssb_jax", _EXPORTS, globals())


def __dir__():
    return sorted(set(globals()) | set(__all__))
