"""The notebook's first hour on a fresh runtime (Colab CPU, GPU or TPU), once its first cell has found or
cloned the repository: tell which accelerator the runtime has, install what is missing (with the jax extra
for that accelerator), size the run for it, and keep the run directory on Google Drive when asked.

Standard library only: it runs before anything is installed, and it never imports jax (a jax imported
before the install would keep the old version until the runtime restarts).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

# What `import` needs for a run (setup.py's install_requires, by import name). The source folder of
# ssb_jax alone is not enough: it imports, and then `import flax` fails.
REQUIRED_MODULES = ("jax", "flax", "optax", "orbax.checkpoint", "transformers", "datasets", "grain",
                    "ml_collections", "safetensors", "huggingface_hub", "tokenizers", "math_verify", "numpy",
                    "tqdm", "tensorboardX", "matplotlib", "pyarrow")
# setup.py's extras: the jax build for each accelerator (a Colab T4's driver runs CUDA 12)
JAX_EXTRA = {"gpu": "cuda12", "tpu": "tpu", "cpu": None}
# the module each accelerator's jax plugin provides once installed
JAX_PLUGIN = {"gpu": "jax_cuda12_plugin", "tpu": "libtpu", "cpu": None}

# A free runtime (a T4 for a few hours, or a TPU v2-8): qwen05b with a smaller curation target, shorter
# caps, one greedy protocol on a few dozen problems per dataset; the full protocol is the config itself.
FREE_RUNTIME_OVERRIDES = {
    "curate.target_pairs": 64,
    "curate.rollout_max_new_tokens": 384,
    "curate.solution_max_new_tokens": 384,
    "train.epochs": 2,
    "eval.datasets": "gsm8k_test,math500",
    "eval.protocols": "math_verify",
    "eval.n_samples": 0,
    "eval.max_problems": 40,
    "eval.max_new_tokens": 512,
}
CONFIG_FOR = {"cpu": "configs/tiny.py", "gpu": "configs/qwen05b.py", "tpu": "configs/qwen05b.py"}


def accelerator() -> str:
    """"tpu", "gpu" or "cpu", from the runtime's devices and environment (without importing jax)."""
    if (os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
            or any(Path("/dev").glob("accel*")) or any(Path("/dev/vfio").glob("[0-9]*"))):
        return "tpu"
    if Path("/dev/nvidia0").exists() or os.environ.get("COLAB_GPU", "0") not in ("", "0"):
        return "gpu"
    return "cpu"


def missing_modules(modules=REQUIRED_MODULES) -> list[str]:
    """The modules of `modules` that do not import here (found by their spec, not imported)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package that is absent or broken
            found = False
        if not found:
            missing.append(name)
    return missing


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_command(repo: str | Path, device: str) -> list[str] | None:
    """The pip command that makes `repo` runnable on `device`, or None when nothing is missing: the
    package installed (not merely its source folder on the path), every dependency importable, and the
    jax plugin of the accelerator present."""
    extra = JAX_EXTRA[device]
    plugin = JAX_PLUGIN[device]
    needed = (installed_version("ssb_jax") is None or missing_modules()
              or (plugin is not None and missing_modules((plugin,))))
    if not needed:
        return None
    target = f"{Path(repo).resolve()}[{extra}]" if extra else str(Path(repo).resolve())
    return [sys.executable, "-m", "pip", "install", "-q", "-e", target]


def install(repo: str | Path, device: str) -> None:
    """Run install_command; say so when jax was imported before (the runtime must restart to use the new one)."""
    command = install_command(repo, device)
    if command is None:
        print("dependencies present:", ", ".join(REQUIRED_MODULES))
        return
    if "jax" in sys.modules:
        print("jax was imported before this install: restart the runtime (Runtime > Restart session) after it")
    print("installing:", " ".join(command[3:]))
    subprocess.run(command, check=True)
    importlib.invalidate_caches()
    still = missing_modules()
    if still:
        raise SystemExit(f"after the install these still do not import: {', '.join(still)}")


def run_settings(config: str, overrides: dict | None, device: str) -> tuple[str, dict]:
    """The config file and overrides for this runtime: CONFIG="auto" is tiny on a CPU and qwen05b on an
    accelerator; overrides=None is the free-runtime sizing for qwen05b and none for anything else."""
    config = CONFIG_FOR[device] if config == "auto" else config
    if overrides is None:
        overrides = dict(FREE_RUNTIME_OVERRIDES) if config.endswith("qwen05b.py") else {}
    return config, dict(overrides)


def restore_from_drive(workdir: str | Path, drive_copy: str | Path) -> bool:
    """Copy an earlier session's run back from Drive (so finished stages are skipped); False when there is
    none or the local run directory already exists."""
    workdir, drive_copy = Path(workdir), Path(drive_copy)
    if workdir.exists() or not drive_copy.is_dir():
        return False
    shutil.copytree(drive_copy, workdir)
    return True


def save_to_drive(workdir: str | Path, drive_copy: str | Path) -> Path:
    """Copy the run directory to Drive (files already there are overwritten)."""
    drive_copy = Path(drive_copy)
    drive_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(workdir, drive_copy, dirs_exist_ok=True)
    return drive_copy
