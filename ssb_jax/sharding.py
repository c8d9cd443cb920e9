"""One device mesh with named axes, and one table of partition rules for everything we place.

Axes: "data" (pure data parallel), "fsdp" (data parallel that also shards parameters),
"tensor" (splits heads / MLP width / vocab). The same rules serve 1 CPU, 8 fake CPU
devices, a GPU and a TPU slice; a dimension that an axis does not divide stays replicated.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the "/"-joined leaf path, spec). First match wins. Leading L axis of stacked layers is None.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    # base model
    (r"^embed$", P("tensor", "fsdp")),
    (r"^lm_head$", P("fsdp", "tensor")),
    (r"^final_norm$", P()),
    (r"^layers/(attn_norm|mlp_norm)$", P(None, None)),
    (r"^layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P(None, "fsdp", "tensor")),
    (r"^layers/(q_proj|k_proj|v_proj)/bias$", P(None, "tensor")),
    (r"^layers/(o_proj|down_proj)/kernel$", P(None, "tensor", "fsdp")),
    # LoRA factors follow the matrix they adapt: A splits its input dim, B its output dim.
    (r"^lora/layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/a$", P(None, "fsdp", None)),
    (r"^lora/layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/b$", P(None, None, "tensor")),
    (r"^lora/layers/(o_proj|down_proj)/a$", P(None, "tensor", None)),
    (r"^lora/layers/(o_proj|down_proj)/b$", P(None, None, "fsdp")),
    # KV cache [L, B, S, G, H] and its [B, S] validity
    (r"^cache/(k|v)$", P(None, BATCH_AXES, None, "tensor", None)),
    (r"^cache/(k|v)/\d+$", P(BATCH_AXES, None, "tensor", None)),     # per-layer caches (unstacked params)
    (r"^cache/valid$", P(BATCH_AXES, None)),
    (r"^cache/index$", P()),
    # batches: leading batch axis over the data-parallel axes
    (r"^batch/.*", P(BATCH_AXES)),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One axis may be -1 (takes the remaining devices).
    Default: everything on fsdp."""
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        shape = {"data": 1, "fsdp": -1, "tensor": 1}
    if not isinstance(shape, Mapping):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def local_mesh(shape: Mapping[str, int] | None = None) -> Mesh:
    """A mesh of this process's own devices with the axes of `shape` (a global mesh shape): an axis
    of -1 takes the local devices left over; without one, "data" does. Sampling stages use it under
    several processes, each on its own share of the prompts."""
    devices = jax.local_devices()
    shape = dict(shape or {"data": 1, "fsdp": -1, "tensor": 1})
    flexible = next((axis for axis, size in shape.items() if int(size) == -1), "data")
    fixed = math.prod(int(size) for axis, size in shape.items() if axis != flexible)
    if len(devices) % fixed:
        raise ValueError(f"mesh {shape}: the {'x'.join(str(s) for a, s in shape.items() if a != flexible)} "
                         f"non-{flexible} axes do not divide this process's {len(devices)} devices")
    return make_mesh({**shape, flexible: -1}, devices)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The rule's spec for this leaf, with axes that do not divide their dimension dropped."""
    for pattern, spec in PARTITION_RULES:
        if re.match(pattern, path):
            break
    else:
        raise KeyError(f"no partition rule matches {path!r}; add one to PARTITION_RULES")
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, entry in zip(shape, entries):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            fitted.append(axes[0] if len(axes) == 1 else axes)
        else:
            fitted.append(None)
    return P(*fitted)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tree_shardings(tree: Any, mesh: Mesh, prefix: str = "") -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs or shape tuples)."""
    def one(path, leaf):
        shape = leaf if isinstance(leaf, tuple) else leaf.shape
        return NamedSharding(mesh, spec_for(prefix + _path_str(path), shape, mesh))
    return jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x))


def param_shardings(config, mesh: Mesh) -> dict:
    from ssb_jax.model.qwen2 import param_shapes
    return tree_shardings(param_shapes(config), mesh)


def shard(tree: Any, mesh: Mesh, prefix: str = "") -> Any:
    """Place a pytree on the mesh by the rules (prefix: "lora/", "cache/", "batch/")."""
    return jax.device_put(tree, tree_shardings(tree, mesh, prefix))
