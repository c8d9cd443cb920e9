"""The model's two kinds of variables, apart from the modules that hold them.

Base weights are `nnx.Param`s made by `param`, each naming its dimensions' logical axes in its
`out_sharding` metadata (placed by ssb_jax.sharding). LoRA adapter factors are `LoRAParam`s, a
variable type of their own and not an `nnx.Param`, so `nnx.state(model, nnx.Param)` is exactly the
frozen base and `nnx.state(model, LoRAParam)` exactly the trainable adapters. Both the model modules
(ssb_jax.model.qwen2) and the adapter code built on them (ssb_jax.model.lora) use these types, so
they live here, below both.
"""
from __future__ import annotations

from flax import nnx


def param(value, axes) -> nnx.Param:
    """A base parameter with its logical axis names (placed later, by ssb_jax.sharding)."""
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class LoRAParam(nnx.Variable):
    """A trainable low-rank adapter factor (the base model's weights are nnx.Param)."""
