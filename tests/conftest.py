"""Shared test fixtures: tiny random Qwen2 checkpoints built with transformers (never downloaded)."""
import os

# Tests run on CPU, with 8 fake devices so sharding tests have a mesh; must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from tests.hf_models import make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tied-embedding tiny Qwen2 saved with save_pretrained; returns its directory."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tie=True, seed=0)


@pytest.fixture(scope="session")
def tiny_untied_checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tie=False, seed=1)
