"""Shared test fixtures: tiny random Qwen2 checkpoints built with transformers (never downloaded), and the
run's random seed, which a failing test reports so its draws can be repeated."""
import os

# Tests run on CPU, with 8 fake devices so sharding tests have a mesh; must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ.get("SSB_TEST_START_BACKEND") == "1":
    # the GPU run (benchmarks/device_check.sh): start JAX's backend, and with it JAX's own cuDNN, before any
    # test module imports torch (a torch with an older cuDNN loaded first can keep JAX from using cuDNN)
    jax.devices()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.hf_models import make_hf_checkpoint  # noqa: E402

SEED_VARIABLE = "SSB_TEST_SEED"


def _run_seed() -> int:
    """SSB_TEST_SEED when set, else a fresh draw from os.urandom; below 2**30 so `seed + i` stays an int32."""
    given = os.environ.get(SEED_VARIABLE, "").strip()
    return int(given) if given else int.from_bytes(os.urandom(4), "little") % (1 << 30)


# One seed for the whole run (per process), so one variable repeats every draw of a failing test, those made
# by module-scoped fixtures included.
RUN_SEED = _run_seed()


@pytest.fixture(scope="session")
def seed() -> int:
    """The run's random seed (SSB_TEST_SEED, or a fresh one); a test that uses it reports it when it fails."""
    return RUN_SEED


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """A numpy Generator seeded with the run's seed, fresh for each test."""
    return np.random.default_rng(seed)


@pytest.fixture
def jax_key(seed) -> jax.Array:
    """A JAX key made from the run's seed, fresh for each test."""
    return jax.random.key(seed)


def _uses_run_seed(item) -> bool:
    """The test reached the `seed` fixture (directly or through rng, jax_key or another fixture) and did not
    replace it with a parameter of the same name."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "seed" in getattr(item, "fixturenames", ()) and "seed" not in params


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and _uses_run_seed(item):
        report.sections.append(("seed", f"seed: {RUN_SEED} (rerun with {SEED_VARIABLE}={RUN_SEED})"))
    return report


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tied-embedding tiny Qwen2 saved with save_pretrained; returns its directory."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tie=True, seed=0)


@pytest.fixture(scope="session")
def tiny_untied_checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tie=False, seed=1)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The reduced toy world (tests/pipeline_runs.py) that every end-to-end run starts from, built once per
    test run: with pytest-xdist the workers share one build (a file lock in the run's common temp folder)."""
    from filelock import FileLock

    from ssb_jax.toyworld import build
    from tests.pipeline_runs import reduced_world_config
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    directory = shared / "reduced_toy_world"
    with FileLock(str(directory) + ".lock"):
        build(reduced_world_config(), directory)  # returns at once when this config's world is already there
    return directory
