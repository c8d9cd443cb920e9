"""Typed batches: frozen dataclasses registered as JAX pytrees, each field an array with named dimensions.

A batch kind (distill.batch.DistillBatch, grpo.batch.RolloutBatch) subclasses `TypedBatch` and declares
its fields with `array_field("batch", "length", dtype=np.int32)`: the names of the array's dimensions
(the first is always "batch", the rows) and its dtype. From that one declaration come the
`jax.ShapeDtypeStruct`s a program is lowered with (`abstract_fields`, behind each kind's `abstract`),
the check that a built batch matches it (`dims`), the placement of a host batch on a mesh (`place`:
rows over the data-parallel axes) and row selection (`take`). An optional field is None when absent;
None is an empty pytree, so an absent field is no argument of a jitted program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

from ssb_jax.sharding import batch_sharding

Batch = TypeVar("Batch", bound="TypedBatch")


def array_field(*dims: str, dtype, optional: bool = False) -> Any:
    """A batch field: an array whose dimensions have these names (the first is "batch") and this dtype;
    an optional field defaults to None (absent)."""
    if not dims or dims[0] != "batch":
        raise ValueError(f"a batch field's first dimension is 'batch', got {dims}")
    metadata = {"dims": tuple(dims), "dtype": np.dtype(dtype)}
    if optional:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(metadata=metadata)


class TypedBatch:
    """Base of the typed batches. Subclasses are `@jax.tree_util.register_dataclass` over
    `@dataclasses.dataclass(frozen=True, kw_only=True)` with every field made by `array_field`."""

    @classmethod
    def field_specs(cls) -> dict[str, tuple[tuple[str, ...], np.dtype]]:
        """{field: (dimension names, dtype)} in declaration order."""
        return {f.name: (f.metadata["dims"], f.metadata["dtype"]) for f in dataclasses.fields(cls)}

    @classmethod
    def abstract_fields(cls: type[Batch], names: Iterable[str], sizes: Mapping[str, int],
                        sharding: Sharding | None = None) -> Batch:
        """A batch of ShapeDtypeStructs for the fields `names` (the others None), each dimension sized by
        `sizes`; `sharding` (one for every field, e.g. the rows over the data axes) when given."""
        specs = cls.field_specs()
        return cls(**{name: jax.ShapeDtypeStruct(tuple(sizes[d] for d in specs[name][0]), specs[name][1],
                                                 sharding=sharding) for name in names})

    def present(self) -> dict[str, Any]:
        """{field: array} of the fields that are not None."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @property
    def rows(self) -> int:
        return next(iter(self.present().values())).shape[0]

    def replace(self: Batch, **changes) -> Batch:
        return dataclasses.replace(self, **changes)

    def take(self: Batch, index) -> Batch:
        """The rows `index` of every present field (host arrays)."""
        return jax.tree.map(lambda x: x[index], self)

    def dims(self) -> dict[str, int]:
        """The size of each named dimension; a ValueError when a field's dtype, rank or sizes disagree
        with the declaration or with another field."""
        specs, sizes = self.field_specs(), {}
        for name, array in self.present().items():
            names, dtype = specs[name]
            if np.dtype(array.dtype) != dtype or len(array.shape) != len(names):
                raise ValueError(f"{type(self).__name__}.{name}: {array.dtype}{list(array.shape)}, declared "
                                 f"{dtype} over {names}")
            for dim, size in zip(names, array.shape):
                if sizes.setdefault(dim, size) != size:
                    raise ValueError(f"{type(self).__name__}.{name}: {dim} is {size}, elsewhere {sizes[dim]}")
        return sizes

    def place(self: Batch, mesh: Mesh | None) -> Batch:
        """Host batch (numpy) -> device arrays, the rows split over the mesh's data-parallel axes when there
        is a mesh. Under several processes each copies only the rows of its own devices."""
        if mesh is None:
            return jax.device_put(self)
        sharding = batch_sharding(mesh, (self.rows,))
        if jax.process_count() > 1:
            return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]),
                                self)
        return jax.device_put(self, sharding)
