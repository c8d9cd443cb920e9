"""A run's checkpoints: orbax, in workdir/checkpoints/, one directory per step holding the training
state (a pytree of arrays, restored into the shardings of an abstract state) and small JSON items
beside it (the data position: a grain iterator's state, GRPO's iteration and sampled tokens).

    checkpoints = Checkpoints(workdir, keep=3, json_items=("data",))
    checkpoints.save(step, state, data=iterator.get_state())
    state, items = checkpoints.restore(checkpoints.latest_step(), abstract(state))
    checkpoints.close()

Saving is synchronous, so a checkpoint is whole on disk before the next step runs (a killed run
resumes from the last one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"


def abstract(tree, shardings=None):
    """ShapeDtypeStructs of a tree of arrays, each with its array's sharding (or the one at its place in
    `shardings`, a tree of the same structure)."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
    """The orbax CheckpointManager of workdir/checkpoints/: the newest `keep` steps, each with the state
    and the JSON items named in `json_items`."""

    def __init__(self, workdir, keep: int, json_items: Sequence[str] = ()):
        self.json_items = tuple(json_items)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager((Path(workdir) / CHECKPOINT_DIR).absolute(),
                                             item_names=(STATE_ITEM, *self.json_items), options=options)

    def latest_step(self) -> int | None:
        step = self.manager.latest_step()
        return None if step is None else int(step)

    def save(self, step: int, state, **json_items: Any) -> None:
        """The state and every JSON item (all of `json_items`, by name) as checkpoint `step`."""
        if set(json_items) != set(self.json_items):
            raise ValueError(f"a checkpoint holds the JSON items {self.json_items}, got {sorted(json_items)}")
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        items.update({name: ocp.args.JsonSave(value) for name, value in json_items.items()})
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, *, json_items: bool = True) -> tuple[Any, dict[str, Any]]:
        """(state placed as `abstract_state` says, {name: JSON item}); json_items=False: the state alone."""
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if json_items:
            items.update({name: ocp.args.JsonRestore() for name in self.json_items})
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM], {name: restored[name] for name in items if name != STATE_ITEM}

    def close(self) -> None:
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
