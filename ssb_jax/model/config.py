"""Model configuration, built from a Hugging Face Qwen2 `config.json`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")  # jax.numpy's names; jax is imported when a dtype is asked for
# The seven linear maps of a decoder layer, in HF order (LoRA targets name these).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What each decoder layer keeps for the backward pass (see qwen2.remat_policy):
#   none: everything (no recomputation); full: only the layer input (recompute the whole layer);
#   dots: the outputs of every matrix product; dots_no_batch: those without a batch dimension
#   (the projections, not attention's score and value products).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    # Storage and matmul dtype of the parameters; norms, softmax and logits run in f32.
    dtype: str = "float32"
    # Rematerialisation policy per decoder layer, one of REMAT_POLICIES (True/False mean "full"/"none").
    remat: str = "none"
    # Full-sequence attention kernel, one of attention.IMPLEMENTATIONS: "auto" (cuDNN on GPU, splash on
    # TPU, else chunked for long sequences and the XLA einsum for short), "xla", "chunked", "cudnn",
    # "splash" (see ssb_jax/model/attention.py).
    attention_impl: str = "auto"
    # Slots per block of the KV cache that a cached call attends over: it visits only the blocks
    # holding filled slots (see kv_cache.LayerCache.attend), so decode time follows the filled length.
    cache_block: int = 256
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.cache_block < 1:
            raise ValueError(f"ModelConfig.cache_block must be >= 1, got {self.cache_block}")
        from ssb_jax.model.attention import check_impl
        check_impl(self.attention_impl)

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp
        return getattr(jnp, self.dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        """Number of parameters, counting a tied embedding once (as HF does)."""
        d, f = self.hidden_size, self.intermediate_size
        attention = d * self.q_size + self.q_size + 2 * (d * self.kv_size + self.kv_size) + self.q_size * d
        per_layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        model_type = hf.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"only Qwen2/Qwen2.5 checkpoints are supported, config.json has model_type={model_type!r}")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {rope_scaling} is not supported (only the default RoPE)")
        heads = hf["num_attention_heads"]
        theta = hf.get("rope_theta")
        if theta is None:  # newer transformers nest it in rope_parameters
            theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(hf, **overrides)
        except KeyError as e:
            raise ValueError(f"{path}: missing field {e.args[0]!r}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """A Qwen2 config.json that transformers can load."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": 32768,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.dtype,
        }
