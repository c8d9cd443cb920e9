"""Config plumbing: sections <-> dataclasses, named typos, stage lists, distributed switch."""
import types
from pathlib import Path

import pytest

from ssb_jax import config as config_lib
from ssb_jax.curate import CurationConfig
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distributed import maybe_initialize


def test_sections_round_trip_to_dataclasses():
    c = config_lib.base_config()
    c.train.lora_targets = "q,v"
    c.train.length_buckets = "64,128"
    tc = config_lib.section_to(TrainConfig, c.train, "config.train")
    assert tc.lora_targets == ("q", "v") and tc.length_buckets == (64, 128)
    assert config_lib.section_to(CurationConfig, c.curate, "config.curate") == CurationConfig()


def test_unknown_section_key_is_named():
    with pytest.raises(ValueError, match=r"config.curate.num_rollout is not a setting of CurationConfig; "
                                         r"did you mean config.curate.num_rollouts\?"):
        config_lib.section_to(CurationConfig, {"num_rollout": 3}, "config.curate")


def test_override_checks_and_apply():
    c = config_lib.base_config()
    with pytest.raises(ValueError, match="config.eval has no key 'n_sample'; did you mean config.eval.n_samples"):
        config_lib.check_overrides(c, ["--config.eval.n_sample=3"])
    config_lib.apply_overrides(c, {"eval.n_samples": 3, "train.learning_rate": 1e-4})
    assert c.eval.n_samples == 3 and c.train.learning_rate == 1e-4


def test_stage_list():
    c = config_lib.base_config()
    c.stages = "eval, report"
    assert config_lib.stage_list(c) == ["eval", "report"]
    c.stages = "curate,evl"
    with pytest.raises(ValueError, match="did you mean 'eval'"):
        config_lib.stage_list(c)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_configs_load():
    for name in ("tiny", "qwen05b", "qwen3b"):
        c = config_lib.load_config_file(str(CONFIGS / f"{name}.py"))
        config_lib.section_to(TrainConfig, c.train, "config.train")
    assert config_lib.load_config_file(str(CONFIGS / "qwen3b.py")).curate.target_pairs == 256


def test_distributed_switch(monkeypatch):
    settings = types.SimpleNamespace(initialize="auto", coordinator_address="", num_processes=0, process_id=-1)
    for name in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
                 "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert maybe_initialize(settings) is False  # single host: nothing to do
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr("jax.distributed.is_initialized", lambda: False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert maybe_initialize(settings) is True and calls == [{}]  # auto-detected from the environment
    explicit = types.SimpleNamespace(initialize="yes", coordinator_address="h:1", num_processes=2, process_id=1)
    maybe_initialize(explicit)
    assert calls[-1] == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="must be auto, yes or no"):
        maybe_initialize(types.SimpleNamespace(initialize="maybe", coordinator_address="", num_processes=0,
                                               process_id=-1))
