"""LoRA adapters: their config, their states beside the base model's, merging, and PEFT import/export.

An adapted projection (ssb_jax.model.qwen2.Linear) holds `lora_a` [d_in, r] and `lora_b` [r, d_out]
as `LoRAParam` variables, stacked over layers like every layer weight, and its scale (alpha / r, or
alpha / sqrt(r) with rsLoRA) as a static attribute; it adds `scale * (x @ a) @ b`. `LoRAParam` (the
adapters' own variable type, in ssb_jax.model.variables so that the model modules need nothing from
here) is not an `nnx.Param`, so `nnx.state(model, nnx.Param)` is exactly the frozen base and
`nnx.state(model, LoRAParam)` exactly the trainable adapters. A is random at init and B is zero, so a
fresh adapter leaves the base model unchanged.

The adapter state (an nnx.State of LoRAParams) travels apart from the base: `with_adapters` joins
them into a student model without copying the base.

PEFT naming (for export/import): base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
holds a[i].T ([r, d_in]) and ...lora_B.weight holds b[i].T ([d_out, r]).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssb_jax.model.config import PROJECTIONS, ModelConfig
from ssb_jax.model.qwen2 import Qwen2ForCausalLM, abstract_model, base_state
from ssb_jax.model.variables import LoRAParam
from ssb_jax.sharding import state_shardings


SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_HF_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
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

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict:
        rank = self.rank if isinstance(self.rank, int) else dict(self.rank)
        return {"targets": list(self.targets), "rank": rank, "alpha": self.alpha, "use_rslora": self.use_rslora,
                "dtype": self.dtype, "init": self.init, "default_rank": self.default_rank}


_MODULE_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def projection_dims(config: ModelConfig, target: str) -> tuple[int, int]:
    """(d_in, d_out) of a projection."""
    D, F, Q, K = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {"q_proj": (D, Q), "k_proj": (D, K), "v_proj": (D, K), "o_proj": (Q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}[canonical_target(target)]


# ----------------------------------------------------------------------------- states

@functools.lru_cache(maxsize=16)
def student_split(model_config: ModelConfig, lora_config: LoraConfig):
    """(graph definition of base + adapters, abstract LoRA state, abstract base state); nothing allocated."""
    return nnx.split(abstract_model(model_config, lora_config), LoRAParam, nnx.Param)


def student_graphdef(model_config: ModelConfig, lora_config: LoraConfig) -> nnx.GraphDef:
    """Merge it with a base state and a LoRA state: `nnx.merge(graphdef, lora_state, base_state)`."""
    return student_split(model_config, lora_config)[0]


def init_lora(model_config: ModelConfig, lora_config: LoraConfig, key: jax.Array, mesh=None) -> nnx.State:
    """Fresh adapters (the init of qwen2.Linear), placed on `mesh` by their logical axes if given.
    Built in one jit that constructs the whole student and keeps only the adapters (XLA drops the rest)."""
    def make(key):
        model = Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(key), lora_config=lora_config)
        return nnx.state(model, LoRAParam)
    if mesh is None:
        return jax.jit(make)(key)
    return jax.jit(make, out_shardings=state_shardings(student_split(model_config, lora_config)[1], mesh))(key)


def with_adapters(model, lora_state: nnx.State, lora_config: LoraConfig):
    """The student: `model`'s base parameters (shared, not copied) with these adapters."""
    return nnx.merge(student_graphdef(model.config, lora_config), lora_state, base_state(model))


def as_lora_state(pure: Mapping, model_config: ModelConfig, lora_config: LoraConfig) -> nnx.State:
    """Adapters as an nnx.State of LoRAParams (with their logical axes) from a pure dict of arrays."""
    state = jax.tree.map(lambda x: x, student_split(model_config, lora_config)[1])
    nnx.replace_by_pure_dict(state, pure)
    return state


def lora_param_count(lora_state) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(lora_state)))


def adapter_factors(lora_state) -> dict[str, tuple[Any, Any]]:
    """{target: (a [L, d_in, r], b [L, r, d_out])} from a LoRA state."""
    pure = nnx.to_pure_dict(lora_state) if isinstance(lora_state, nnx.State) else lora_state
    out = {}
    for target, module in _MODULE_OF.items():
        factors = pure.get("layers", {}).get(module, {}).get(target)
        if factors:
            out[target] = (factors["lora_a"], factors["lora_b"])
    return out


def merge_lora(model, lora_state: nnx.State, lora_config: LoraConfig):
    """A new base model with W + scale * A @ B folded into each adapted kernel (in the kernel's dtype)."""
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    for target, (a, b) in adapter_factors(lora_state).items():
        linear = pure["layers"][_MODULE_OF[target]][target]
        kernel = linear["kernel"]
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        linear["kernel"] = (kernel.astype(jnp.float32) + lora_config.scale_of(target) * delta).astype(kernel.dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- PEFT naming

def peft_tensor_name(layer: int, target: str, factor: str) -> str:
    """PEFT state-dict name, factor "a" or "b"."""
    target = canonical_target(target)
    letter = {"a": "A", "b": "B"}[factor]
    return f"base_model.model.model.layers.{layer}.{_HF_MODULE[target]}.{target}.lora_{letter}.weight"


def lora_to_peft(lora_state) -> dict[str, np.ndarray]:
    """PEFT-layout tensors (lora_A [r, d_in], lora_B [d_out, r]) as float32 numpy arrays."""
    out = {}
    for t, (a, b) in adapter_factors(lora_state).items():
        a = np.asarray(jax.device_get(a), np.float32)
        b = np.asarray(jax.device_get(b), np.float32)
        for i in range(a.shape[0]):
            out[peft_tensor_name(i, t, "a")] = np.ascontiguousarray(a[i].T)
            out[peft_tensor_name(i, t, "b")] = np.ascontiguousarray(b[i].T)
    return out


def lora_from_peft(tensors: Mapping[str, Any], config: ModelConfig, lora_config: LoraConfig) -> nnx.State:
    """Inverse of lora_to_peft; also accepts names without the "base_model.model." prefix or with
    PEFT's ".default" adapter infix. Raises on a missing or misshaped tensor."""
    normalised = {}
    for name, value in tensors.items():
        name = name.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight")
        if not name.startswith("base_model.model."):
            name = "base_model.model." + name
        normalised[name] = value
    abstract = student_split(config, lora_config)[1]
    pure = jax.tree.map(lambda x: None, nnx.to_pure_dict(abstract))
    dtype = lora_config.jnp_dtype
    for t in lora_config.targets:
        d_in, d_out = projection_dims(config, t)
        want = {"a": (d_in, lora_config.rank_of(t)), "b": (lora_config.rank_of(t), d_out)}
        for factor in ("a", "b"):
            rows = []
            for i in range(config.num_layers):
                name = peft_tensor_name(i, t, factor)
                if name not in normalised:
                    raise KeyError(f"PEFT adapter lacks tensor {name!r}")
                x = np.asarray(normalised[name], np.float32).T
                if x.shape != want[factor]:
                    raise ValueError(f"{name}: shape {x.T.shape}, expected {tuple(reversed(want[factor]))}")
                rows.append(x)
            pure["layers"][_MODULE_OF[t]][t][f"lora_{factor}"] = jnp.asarray(np.stack(rows), dtype)
    return as_lora_state(pure, config, lora_config)


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
