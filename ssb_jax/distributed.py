"""Multi-process JAX: `jax.distributed.initialize` when the config or the environment asks for it.

One process per host (TPU VM worker, SLURM task or GPU node); every process runs the same
`python -m ssb_jax.main` and sees the global device mesh. Must run before any other JAX call.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_UNKNOWN = object()  # JAX's cluster detection could not be asked


def _multi_host_environment() -> bool:
    """Environment variables that mean "this process is one of several" even where JAX's own cluster
    detection finds nothing or cannot be asked (its private API moved)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _cluster_kinds():
    """The cluster environments `jax.distributed.initialize()` tries, in its order (GceTpuCluster,
    GkeTpuCluster, SlurmCluster, OmpiCluster, ...). JAX has no public way to ask, so this reads
    jax._src.clusters; None when that has moved."""
    try:
        from jax._src.clusters import ClusterEnv
        return [kind for kind in ClusterEnv._cluster_types if not getattr(kind, "opt_in_only_method", False)]
    except (ImportError, AttributeError) as error:
        log.debug("jax cluster detection unavailable (%r); using environment hints", error)
        return None


def _jax_cluster():
    """The cluster environment JAX's auto-detection finds (its class), None when none, _UNKNOWN when
    JAX cannot be asked. On a TPU VM the answer comes from the metadata server, not the environment."""
    kinds = _cluster_kinds()
    if kinds is None:
        return _UNKNOWN
    for kind in kinds:
        try:
            if kind.is_env_present():
                return kind
        except Exception as error:  # e.g. a metadata server that does not answer: not this cluster
            log.debug("jax cluster %s: detection failed: %r", getattr(kind, "__name__", kind), error)
    return None


def _process_count(kind) -> int | None:
    try:
        return int(kind.get_process_count())
    except Exception as error:
        log.debug("jax cluster %s: process count unavailable: %r", getattr(kind, "__name__", kind), error)
        return None


def _whole_node_devices() -> list[int] | None:
    """Under SLURM with one process per node, all of the node's GPUs (JAX's SLURM detection would
    otherwise give each process only the GPU numbered by its local rank, i.e. GPU 0)."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    nodes = (os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES")
             or os.environ.get("SLURM_JOB_NUM_NODES"))
    if not tasks or not nodes or tasks != nodes:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    count = len(visible.split(",")) if visible else int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0)
    return list(range(count)) if count > 0 else None


def maybe_initialize(settings) -> bool:
    """settings: initialize ("auto" | "yes" | "no"), coordinator_address, num_processes, process_id.
    Returns True when this call initialized the distributed runtime.

    "auto" without explicit settings asks JAX's own cluster detection (the one a bare
    `jax.distributed.initialize()` uses: TPU VM metadata, GKE, SLURM, Open MPI) and initializes with
    no arguments when it finds a cluster of more than one process; explicit settings always win."""
    mode = str(settings.initialize)
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize must be auto, yes or no, got {mode!r}")
    if mode == "no":
        return False
    explicit = bool(settings.coordinator_address) or int(settings.num_processes) > 0
    kwargs = {}
    if settings.coordinator_address:
        kwargs["coordinator_address"] = settings.coordinator_address
    if int(settings.num_processes) > 0:
        kwargs["num_processes"] = int(settings.num_processes)
    if int(settings.process_id) >= 0:
        kwargs["process_id"] = int(settings.process_id)
    cluster = _jax_cluster() if not explicit or mode == "yes" else None
    if mode == "auto" and not explicit:
        if cluster is None or cluster is _UNKNOWN:
            if not _multi_host_environment():
                return False
        elif _process_count(cluster) == 1:
            return False  # a one-host cluster (a v4-8 TPU VM, a one-task SLURM job): nothing to do
    if jax.distributed.is_initialized():
        return False
    if getattr(cluster, "name", None) == "slurm" or (cluster is None and "SLURM_JOB_ID" in os.environ):
        devices = _whole_node_devices()
        if devices is not None:
            kwargs["local_device_ids"] = devices
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


# ----------------------------------------------------------------------------- helpers for the stages
#
# Sampling stages (curation, teacher cache, evaluation) are embarrassingly parallel: each process
# takes every process_count-th item, samples on a mesh of its own local devices and writes its own
# shard file; process 0 merges the shards after a barrier. Training is one SPMD program over the
# global mesh. The run directory must be shared by all processes (NFS, Filestore, gcsfuse).


def is_main_process() -> bool:
    return jax.process_index() == 0


# Processes can reach a meeting point minutes apart (process 0 builds the toy world; curation waves
# take as long as their slowest rollout), longer than device collectives tolerate (gloo gives up
# after 30 s). So the stages meet through the coordination service's barrier and key-value store,
# which wait as long as this says and fail at once if a peer dies.
BARRIER_TIMEOUT_S = float(os.environ.get("SSB_BARRIER_TIMEOUT_S", 6 * 3600))
_meetings = 0  # every process meets in the same order, so a counter makes the ids unique and equal


def _coordination(name: str):
    """(client, unique id) for the next meeting; the client is None with one process."""
    global _meetings
    if jax.process_count() == 1:
        return None, name
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("several JAX processes but no jax.distributed client; call maybe_initialize first")
    _meetings += 1
    return client, f"ssb_jax/{_meetings}/{name}"


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op with one process)."""
    client, key = _coordination(name)
    if client is not None:
        client.wait_at_barrier(key, int(BARRIER_TIMEOUT_S * 1000))


def sum_over_processes(value: int) -> int:
    """The sum of an integer over all processes (the value itself with one process)."""
    client, key = _coordination("sum")
    if client is None:
        return int(value)
    client.key_value_set(f"{key}/{jax.process_index()}", str(int(value)))
    timeout = int(BARRIER_TIMEOUT_S * 1000)
    return sum(int(client.blocking_key_value_get(f"{key}/{i}", timeout)) for i in range(jax.process_count()))


def process_shard(items, index: int | None = None, count: int | None = None) -> list:
    """This process's items: every count-th, starting at its index (stable, order preserving)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return list(items)[index::count]


def to_host(tree):
    """A pytree of (possibly multi-process) arrays as numpy arrays holding the global values."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def fold_process_shards(paths, name: str, orders=None) -> None:
    """All processes meet; the main process folds each store's shard files into the store (see
    ssb_jax.data.records.fold_shards); all meet again, so every reader then sees the merged file.
    orders: {path: {id: position}} for stores kept in a particular order (default: by id)."""
    from ssb_jax.data.records import fold_shards
    barrier(f"{name}:before-fold")
    if is_main_process():
        for path in paths:
            fold_shards(path, (orders or {}).get(path))
    barrier(f"{name}:after-fold")


def check_shared_directory(directory) -> None:
    """Under several processes, fail early (on every process) unless all of them see the same
    `directory`: the stages exchange shard files and checkpoints through it."""
    if jax.process_count() == 1:
        return
    import uuid
    from pathlib import Path
    client, key = _coordination("run-token")  # marks left by an earlier run must not count
    if is_main_process():
        client.key_value_set(key, uuid.uuid4().hex)
    token = client.blocking_key_value_get(key, int(BARRIER_TIMEOUT_S * 1000))
    marks = Path(directory) / ".processes"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{jax.process_index()}").write_text(token)
    barrier("shared-directory")
    missing = [i for i in range(jax.process_count())
               if not (marks / str(i)).exists() or (marks / str(i)).read_text() != token]
    if missing:
        raise RuntimeError(f"{directory} is not shared by all processes: process {jax.process_index()} does not see "
                           f"the marks of processes {missing}; put the run directory on a file system every host "
                           "mounts (NFS, Filestore, gcsfuse)")
