"""LoRA adapters as their own pytree, next to a frozen base.

Tree layout (what `ssb_jax.model.qwen2.forward(..., lora=...)` consumes):

    {"layers": {proj_name: {"a": [L, d_in, r], "b": [L, r, d_out]}}}

and the forward adds `scale * (x @ a) @ b` to each adapted projection, with the static
per-projection scales of `LoraConfig.scales()` (alpha / r, or alpha / sqrt(r) with rsLoRA).
A is random at init and B is zero, so a fresh adapter leaves the base model unchanged.

PEFT naming (for export/import): base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
holds a[i].T ([r, d_in]) and ...lora_B.weight holds b[i].T ([d_out, r]).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ssb_jax.model.config import ModelConfig
from ssb_jax.model.qwen2 import PROJECTIONS

SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def canonical_target(name: str) -> str:
    full = SHORT_NAMES.get(name, name)
    if full not in PROJECTIONS:
        raise ValueError(f"unknown LoRA target {name!r}; choose from {sorted(SHORT_NAMES)} or {list(PROJECTIONS)}")
    return full


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hashable (usable as a jit static argument). `rank` is an int or a {target: rank} mapping
    (targets missing from the mapping get `default_rank`)."""
    targets: tuple[str, ...] = PROJECTIONS
    rank: Any = 32
    alpha: float = 32.0
    use_rslora: bool = False
    dtype: str = "float32"
    init: str = "kaiming_uniform"   # or "gaussian" (A ~ N(0, 1/r), as PEFT's init_lora_weights="gaussian")
    default_rank: int = 32

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        targets = tuple(dict.fromkeys(canonical_target(t) for t in targets))
        if not targets:
            raise ValueError("LoraConfig.targets is empty")
        object.__setattr__(self, "targets", tuple(t for t in PROJECTIONS if t in targets))
        rank = self.rank
        if isinstance(rank, Mapping) or (isinstance(rank, tuple) and rank and isinstance(rank[0], tuple)):
            rank = tuple(sorted((canonical_target(k), int(v)) for k, v in dict(rank).items()))
            if any(r <= 0 for _, r in rank):
                raise ValueError(f"LoRA ranks must be positive, got {dict(rank)}")
        else:
            rank = int(rank)
            if rank <= 0:
                raise ValueError(f"LoRA rank must be positive, got {rank}")
        object.__setattr__(self, "rank", rank)
        if self.dtype not in _DTYPES:
            raise ValueError(f"LoraConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.init not in ("kaiming_uniform", "gaussian"):
            raise ValueError(f"LoraConfig.init must be 'kaiming_uniform' or 'gaussian', got {self.init!r}")

    def rank_of(self, target: str) -> int:
        target = canonical_target(target)
        if isinstance(self.rank, int):
            return self.rank
        return dict(self.rank).get(target, self.default_rank)

    def scale_of(self, target: str) -> float:
        r = self.rank_of(target)
        return float(self.alpha) / (math.sqrt(r) if self.use_rslora else r)

    def scales(self) -> dict[str, float]:
        return {t: self.scale_of(t) for t in self.targets}

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict:
        rank = self.rank if isinstance(self.rank, int) else dict(self.rank)
        return {"targets": list(self.targets), "rank": rank, "alpha": self.alpha, "use_rslora": self.use_rslora,
                "dtype": self.dtype, "init": self.init, "default_rank": self.default_rank}


def projection_dims(config: ModelConfig, target: str) -> tuple[int, int]:
    """(d_in, d_out) of a projection."""
    D, F, Q, K = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {"q_proj": (D, Q), "k_proj": (D, K), "v_proj": (D, K), "o_proj": (Q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}[canonical_target(target)]


def lora_shapes(config: ModelConfig, lora_config: LoraConfig) -> dict:
    L = config.num_layers
    out = {}
    for t in lora_config.targets:
        d_in, d_out = projection_dims(config, t)
        r = lora_config.rank_of(t)
        out[t] = {"a": (L, d_in, r), "b": (L, r, d_out)}
    return {"layers": out}


def init_lora(config: ModelConfig, lora_config: LoraConfig, key: jax.Array) -> dict:
    """A random (PEFT's default kaiming-uniform: U(-1/sqrt(d_in), 1/sqrt(d_in)); or N(0, 1/r)), B zero."""
    dtype = lora_config.jnp_dtype
    layers = {}
    keys = jax.random.split(key, len(lora_config.targets))
    for k, (t, shapes) in zip(keys, lora_shapes(config, lora_config)["layers"].items()):
        L, d_in, r = shapes["a"]
        if lora_config.init == "gaussian":
            a = jax.random.normal(k, shapes["a"], jnp.float32) / r
        else:
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, shapes["a"], jnp.float32, -bound, bound)
        layers[t] = {"a": a.astype(dtype), "b": jnp.zeros(shapes["b"], dtype)}
    return {"layers": layers}


def lora_param_count(lora: Mapping) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(lora)))


def merge_lora(params: Mapping, lora: Mapping, lora_config: LoraConfig) -> dict:
    """A new base tree with W + scale * A @ B folded into each adapted kernel (in the kernel's dtype)."""
    layers = dict(params["layers"])
    for t, factors in lora["layers"].items():
        kernel = layers[t]["kernel"]
        delta = jnp.einsum("lir,lro->lio", factors["a"].astype(jnp.float32), factors["b"].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        merged = (kernel.astype(jnp.float32) + lora_config.scale_of(t) * delta).astype(kernel.dtype)
        layers[t] = {**layers[t], "kernel": merged}
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- PEFT naming

def peft_tensor_name(layer: int, target: str, factor: str) -> str:
    """PEFT state-dict name, factor "a" or "b"."""
    target = canonical_target(target)
    letter = {"a": "A", "b": "B"}[factor]
    return f"base_model.model.model.layers.{layer}.{_MODULE[target]}.{target}.lora_{letter}.weight"


def lora_to_peft(lora: Mapping) -> dict[str, np.ndarray]:
    """PEFT-layout tensors (lora_A [r, d_in], lora_B [d_out, r]) as float32 numpy arrays."""
    out = {}
    for t, factors in lora["layers"].items():
        a = np.asarray(jax.device_get(factors["a"]), np.float32)
        b = np.asarray(jax.device_get(factors["b"]), np.float32)
        for i in range(a.shape[0]):
            out[peft_tensor_name(i, t, "a")] = np.ascontiguousarray(a[i].T)
            out[peft_tensor_name(i, t, "b")] = np.ascontiguousarray(b[i].T)
    return out


def lora_from_peft(tensors: Mapping[str, Any], config: ModelConfig, lora_config: LoraConfig) -> dict:
    """Inverse of lora_to_peft; also accepts names without the "base_model.model." prefix or with
    PEFT's ".default" adapter infix. Raises on a missing or misshaped tensor."""
    normalised = {}
    for name, value in tensors.items():
        name = name.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight")
        if not name.startswith("base_model.model."):
            name = "base_model.model." + name
        normalised[name] = value
    shapes = lora_shapes(config, lora_config)["layers"]
    dtype = lora_config.jnp_dtype
    layers = {}
    for t, s in shapes.items():
        stacked = {}
        for factor in ("a", "b"):
            rows = []
            for i in range(config.num_layers):
                name = peft_tensor_name(i, t, factor)
                if name not in normalised:
                    raise KeyError(f"PEFT adapter lacks tensor {name!r}")
                x = np.asarray(normalised[name], np.float32).T
                if x.shape != s[factor][1:]:
                    raise ValueError(f"{name}: shape {x.T.shape}, expected {tuple(reversed(s[factor][1:]))}")
                rows.append(x)
            stacked[factor] = jnp.asarray(np.stack(rows), dtype)
        layers[t] = stacked
    return {"layers": layers}


def peft_adapter_config(lora_config: LoraConfig, base_model_name_or_path: str = "") -> dict:
    """An adapter_config.json that PEFT's LoraConfig accepts."""
    ranks = {t: lora_config.rank_of(t) for t in lora_config.targets}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": lora_config.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(lora_config.targets), "use_rslora": lora_config.use_rslora,
        "rank_pattern": {t: v for t, v in ranks.items() if v != r}, "alpha_pattern": {},
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
    }
