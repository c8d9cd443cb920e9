"""One device mesh with named axes, and one table from logical axis names to mesh axes.

Mesh axes: "data" (pure data parallel), "fsdp" (data parallel that also shards parameters),
"tensor" (splits heads / MLP width / vocabulary). Every parameter of the Flax model carries the
logical names of its dimensions in its `out_sharding` metadata (("layers", "embed", "mlp") for a
stacked gate projection); LoRA factors, optimizer moments, the KV cache and batches are named the
same way, and `LOGICAL_AXIS_RULES` alone turns names into placements. The same table serves 1 CPU,
8 fake CPU devices, a GPU and a TPU slice. A parameter dimension that its mesh axes do not divide
is replicated, and that is logged once per (name, size, mesh); a batch that does not divide its
data-parallel axes is an error (replicating it would run every row on every device).

Activations are pinned the same way (`constrain`, names like ("batch", None, "activation_embed") for
the residual stream), on the context mesh that `under_mesh` sets around the training programs: rows
split over the data-parallel axes, the hidden width whole; heads and the MLP width over "tensor".
Without a context mesh (eager use, a single device, the sampler) `constrain` does nothing.

Sampling has a mesh of its own, read through the same table; its shape, chosen from the model's
size, is ssb_jax.sampling.mesh's business (this module needs nothing from the model), and
`parse_mesh_setting` reads the setting that may fix it.
"""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace
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
    # the hidden width of activations (the residual stream, normed inputs): whole on every device, so that
    # a projection is a local product with its layer's gathered weights, not a partial sum to all-reduce
    "activation_embed": None,
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


AUTO = 0  # a config.mesh axis chosen by auto_mesh_shape


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def auto_mesh_shape(requested: Mapping[str, int], devices: int, batch_size: int, kv_heads: int | None = None,
                    processes: int = 1) -> dict[str, int]:
    """The training mesh (config.mesh) on `devices` devices: each axis a size, -1 (the devices the others
    leave) or 0 (chosen here). The chosen axes take as much data parallelism as the batch allows (data x
    fsdp divides batch_size) and put the rest on tensor, but only as far as the model's KV heads divide
    (kv_heads None: unknown, no limit); fsdp before data, except one data row per process under several
    processes. A request nothing fits is a one-line ValueError naming the settings to change."""
    sizes = {axis: int(requested.get(axis, AUTO)) for axis in MESH_AXES}
    named = ", ".join(f"config.mesh.{axis}={size}" for axis, size in sizes.items())
    if any(size < -1 for size in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"{named}: each axis is a positive size, -1 (the rest, at most one axis) or 0 (auto)")
    fixed = math.prod(size for size in sizes.values() if size > 0)
    if devices % fixed:
        raise ValueError(f"{named} cannot fill {devices} devices: {fixed} does not divide {devices}; "
                         "change config.mesh (0 lets an axis be chosen)")
    free = [axis for axis, size in sizes.items() if size <= 0]
    if not free:
        if fixed != devices:
            raise ValueError(f"{named} needs {fixed} devices, {devices} are available; change config.mesh "
                             "(0 lets an axis be chosen)")
        return sizes
    rest = devices // fixed
    fixed_rows = math.prod(sizes[a] for a in BATCH_AXES if sizes[a] > 0)
    if "tensor" in free and not all(sizes[a] > 0 for a in BATCH_AXES):
        # the least tensor parallelism that leaves a data-parallel size dividing the batch
        choices = [t for t in _divisors(rest) if batch_size % (fixed_rows * (rest // t)) == 0
                   and (t == 1 or kv_heads is None or kv_heads % t == 0)]
        if not choices:
            raise ValueError(f"config.train.batch_size={batch_size} cannot be split over {devices} devices with "
                             f"{named}: data x fsdp must divide the batch and tensor (the rest) the model's "
                             f"{kv_heads} KV heads; change config.train.batch_size (e.g. to a multiple of "
                             f"{devices // fixed * fixed_rows}) or config.mesh")
        sizes["tensor"], rest = choices[0], rest // choices[0]
    elif "tensor" in free:
        sizes["tensor"], rest = rest, 1
    rows = [a for a in BATCH_AXES if a in free]
    if len(rows) == 2:
        data = processes if processes > 1 and rest % processes == 0 else 1
        sizes["data"], sizes["fsdp"] = data, rest // data
    elif rows:
        sizes[rows[0]] = rest
    return sizes


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
            if name == "batch":
                raise ValueError(f"a batch of {dim} rows does not divide the data-parallel mesh axes {axes} "
                                 f"(size {size}); pad it to a multiple of {size}")
            key = (name, dim, tuple(sorted(mesh.shape.items())))
            if key not in _reported_fallbacks:
                _reported_fallbacks.add(key)
                log.warning("logical axis %r (size %d) is not divisible by mesh axes %s (size %d): replicated",
                            name, dim, axes, size)
            axes = ()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def constrain(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by the logical names of its dimensions (None: replicated), on the
    context mesh (`jax.set_mesh`, as `under_mesh` sets it). Without one, or on a single device, x is
    returned as it is. A batch its data-parallel axes do not divide is an error, as in logical_to_spec."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_names, x.shape, mesh))


class MeshBound:
    """A jitted function traced, lowered and called with `mesh` as the context mesh (see under_mesh)."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def under_mesh(jitted, mesh: Mesh | None):
    """`jitted` run with `mesh` as the context mesh, so that the activation constraints inside it
    (`constrain`) take effect; mesh None: `jitted` itself."""
    return jitted if mesh is None else MeshBound(jitted, mesh)


def placement_mesh(tree):
    """The mesh of the first array in `tree` placed by a NamedSharding over more than one device, or None:
    what a program without a context mesh runs on (the teacher cache on the sampling mesh)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


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


def data_parallel_size(mesh) -> int:
    """Devices the rows of a batch are split over (the mesh axes of "batch"); mesh: a Mesh or a shape dict."""
    shape = getattr(mesh, "shape", mesh)
    return math.prod(int(shape[a]) for a in _mesh_axes_for("batch"))


def check_batch_divides(rows: int, mesh, setting: str) -> None:
    """A one-line error naming `setting` when `rows` cannot be split evenly over the data-parallel axes."""
    size = data_parallel_size(mesh)
    if rows % size:
        shape = dict(getattr(mesh, "shape", mesh))
        raise ValueError(f"{setting}={rows} is not a multiple of the data-parallel size {size} (data x fsdp of "
                         f"mesh {shape}); change {setting} or config.mesh")


# ----------------------------------------------------------------------------- bytes per device

def array_bytes_per_device(logical_axes, shape, axes: Mapping[str, int], itemsize: int) -> int:
    """Bytes on one device of an array with these logical axes on a mesh of this shape."""
    split = 1
    for entry in logical_to_spec(logical_axes, shape, SimpleNamespace(shape=dict(axes))):
        for a in ((entry,) if isinstance(entry, str) else (entry or ())):
            split *= axes[a]
    return int(np.prod(shape)) * itemsize // split


def state_bytes_per_device(state, axes: Mapping[str, int], itemsize: int | None = None) -> int:
    """Bytes on one device of an (abstract) model state; itemsize None: each variable's own dtype."""
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return sum(array_bytes_per_device(variable_axes(v), v.shape, axes, itemsize or np.dtype(v.dtype).itemsize)
               for v in variables)


# ----------------------------------------------------------------------------- the sampling mesh setting

def parse_mesh_setting(text: str):
    """config.sampler.mesh: "auto", or a mesh shape "data=4,tensor=2" (axes left out are 1, one may
    be -1) -> "auto" or {axis: size}; anything else is a ValueError naming the setting."""
    text = str(text).strip()
    if text == "auto":
        return text
    shape = {}
    for part in text.split(","):
        axis, equals, size = part.partition("=")
        axis = axis.strip()
        if not equals or axis not in MESH_AXES or axis in shape:
            raise ValueError(f"config.sampler.mesh={text!r}: expected 'auto' or sizes of the axes {MESH_AXES} "
                             "like 'data=4,tensor=2'")
        try:
            shape[axis] = int(size)
        except ValueError:
            raise ValueError(f"config.sampler.mesh={text!r}: {axis} size {size.strip()!r} is not an integer") from None
        if shape[axis] == 0 or shape[axis] < -1:
            raise ValueError(f"config.sampler.mesh={text!r}: {axis} must be a positive size or -1")
    if list(shape.values()).count(-1) > 1:
        raise ValueError(f"config.sampler.mesh={text!r}: at most one axis may be -1")
    return {axis: shape.get(axis, 1) for axis in MESH_AXES}
