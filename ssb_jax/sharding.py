"""One device mesh with named axes, and one table from logical axis names to mesh axes.

Mesh axes: "data" (pure data parallel), "fsdp" (data parallel that also shards parameters),
"tensor" (splits heads / MLP width / vocabulary). Every parameter of the Flax model carries the
logical names of its dimensions in its `out_sharding` metadata (("layers", "embed", "mlp") for a
stacked gate projection); LoRA factors, optimizer moments, the KV cache and batches are named the
same way, and `LOGICAL_AXIS_RULES` alone turns names into placements. The same table serves 1 CPU,
8 fake CPU devices, a GPU and a TPU slice. A dimension that its mesh axes do not divide is
replicated, and that is logged once per (name, size, mesh).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axes (None: replicated). The whole placement policy lives here.
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,      # rows of a batch, and of the KV cache
    "vocab": "tensor",
    "embed": "fsdp",          # the hidden width of every weight matrix
    "heads": "tensor",        # query heads x head_dim (q/o projections)
    "kv_heads": "tensor",     # key/value heads (x head_dim in the k/v projections)
    "mlp": "tensor",
    "layers": None,           # the stacked-layer axis
    "norm": None,             # RMSNorm scales
    "lora_rank": None,
    "cache_slots": None,
    "head_dim": None,
}

_reported_fallbacks: set = set()


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


def _mesh_axes_for(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in LOGICAL_AXIS_RULES:
        raise KeyError(f"logical axis {name!r} has no entry in LOGICAL_AXIS_RULES ({sorted(LOGICAL_AXIS_RULES)})")
    axes = LOGICAL_AXIS_RULES[name]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """The mesh PartitionSpec for an array whose dimensions have these logical names. A dimension
    its mesh axes do not divide is replicated (logged once); a mesh axis is used at most once."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in _mesh_axes_for(name) if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size:
            key = (name, dim, tuple(sorted(mesh.shape.items())))
            if key not in _reported_fallbacks:
                _reported_fallbacks.add(key)
                log.warning("logical axis %r (size %d) is not divisible by mesh axes %s (size %d): replicated",
                            name, dim, axes, size)
            axes = ()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def variable_axes(variable: nnx.Variable) -> tuple:
    """The logical axis names a model variable carries (every parameter of ssb_jax's model has them)."""
    names = variable.get_metadata().get("out_sharding")
    if names is None:
        raise ValueError(f"{type(variable).__name__} of shape {variable.shape} has no logical axis names")
    return tuple(names)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for an nnx.State (of arrays or ShapeDtypeStructs), from each variable's logical axes."""
    def one(variable):
        return variable.replace(named_sharding(variable_axes(variable), variable.shape, mesh))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Place a model state (base or LoRA) on the mesh by its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """A batch array: its leading axis over the data-parallel axes, the rest replicated."""
    return named_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh)
