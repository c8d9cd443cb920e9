"""The mesh sampling runs on, chosen from the model's size.

Read through the one table of ssb_jax.sharding: weights replicated and rows data parallel when
they fit on one device, else tensor parallel over as few devices as hold them. Its fsdp axis is 1
unless set explicitly (config.sampler.mesh, parsed by sharding.parse_mesh_setting), so "embed" is
not split and no decode step gathers weights.
"""
from __future__ import annotations

import logging
import os

import jax
from flax import nnx
from jax.sharding import Mesh

from ssb_jax.model.qwen2 import abstract_model
from ssb_jax.sharding import make_mesh, state_bytes_per_device

log = logging.getLogger(__name__)

# The share of a device's memory the sampling copy of the weights may take; the rest is left to the
# KV cache (rows x (prompt + new tokens)) and the decode step's activations.
SAMPLING_WEIGHT_SHARE = 0.5


def device_memory_bytes(device) -> int | None:
    """What one device can hold: the backend's own limit, else on CPU this host's memory shared by
    its CPU devices; None when neither is known."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
        return host // max(1, sum(d.platform == "cpu" for d in jax.local_devices()))
    return None


def sampling_tensor_size(model_config, devices: int, memory_per_device: float | None) -> int:
    """The fewest of `devices` (a divisor) to split the weights over on the tensor axis so that one
    device's part takes at most SAMPLING_WEIGHT_SHARE of its memory; all of them when none does
    (logged). Memory None (unknown): 1."""
    if memory_per_device is None:
        return 1
    state = nnx.state(abstract_model(model_config))
    sizes = [t for t in range(1, devices + 1) if devices % t == 0]
    for tensor in sizes:
        axes = {"data": devices // tensor, "fsdp": 1, "tensor": tensor}
        if state_bytes_per_device(state, axes) <= SAMPLING_WEIGHT_SHARE * memory_per_device:
            return tensor
    log.warning("the weights take more than %.0f%% of each device's %.1f GiB even split over all %d devices; "
                "sampling may run out of memory (set config.sampler.mesh, e.g. with fsdp)",
                100 * SAMPLING_WEIGHT_SHARE, memory_per_device / 2**30, devices)
    return devices


def sampling_mesh_shape(model_config, devices: int, shape="auto", memory_per_device: float | None = None) -> dict:
    """The sampling mesh's shape on `devices` devices: an explicit shape as given; "auto": weights
    replicated and rows data parallel over every device when the weights fit one device (see
    sampling_tensor_size), else tensor parallel over as few devices as hold them and data parallel
    over the rest, with fsdp 1 so that no decode step gathers weights."""
    if shape != "auto":
        return dict(shape)
    tensor = sampling_tensor_size(model_config, devices, memory_per_device)
    return {"data": devices // tensor, "fsdp": 1, "tensor": tensor}


def sampling_mesh(model_config, devices=None, *, shape="auto", memory_per_device: float | None = None) -> Mesh:
    """The mesh sampling runs on (see sampling_mesh_shape), over `devices` (default: this process's
    own, so that under several processes each samples its share of the prompts alone).
    memory_per_device: bytes (None: device_memory_bytes of the first device)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if shape == "auto" and not memory_per_device:
        memory_per_device = device_memory_bytes(devices[0])
    return make_mesh(sampling_mesh_shape(model_config, len(devices), shape, memory_per_device), devices)
