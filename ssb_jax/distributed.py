"""Multi-process JAX: `jax.distributed.initialize` when the config or the environment asks for it.

One process per host (TPU VM worker, SLURM task or GPU node); every process runs the same
`python -m ssb_jax.main` and sees the global device mesh. Must run before any other JAX call.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

# Environment variables that mean "this process is one of several" to jax.distributed's auto-detection.
_CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                  "JAX_COORDINATOR_ADDRESS")


def _multi_host_environment() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize(settings) -> bool:
    """settings: initialize ("auto" | "yes" | "no"), coordinator_address, num_processes, process_id.
    Returns True when this call initialized the distributed runtime."""
    mode = str(settings.initialize)
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize must be auto, yes or no, got {mode!r}")
    explicit = bool(settings.coordinator_address) or int(settings.num_processes) > 0
    if mode == "no" or (mode == "auto" and not explicit and not _multi_host_environment()):
        return False
    if jax.distributed.is_initialized():
        return False
    kwargs = {}
    if settings.coordinator_address:
        kwargs["coordinator_address"] = settings.coordinator_address
    if int(settings.num_processes) > 0:
        kwargs["num_processes"] = int(settings.num_processes)
    if int(settings.process_id) >= 0:
        kwargs["process_id"] = int(settings.process_id)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
