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
    from ssb_jax.pipeline.registry import REGISTRY
    assert REGISTRY.parse("eval, report") == ["eval", "report"]
    with pytest.raises(ValueError, match="did you mean 'eval'"):
        REGISTRY.parse("curate,evl")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_configs_load():
    for name in ("tiny", "qwen05b", "qwen3b"):
        c = config_lib.load_config_file(str(CONFIGS / f"{name}.py"))
        config_lib.section_to(TrainConfig, c.train, "config.train")
    assert config_lib.load_config_file(str(CONFIGS / "qwen3b.py")).curate.target_pairs == 256


def test_grpo_baseline_config_has_the_students_lora_shape():
    from ssb_jax.grpo.config import GRPOConfig
    ssb, grpo = (config_lib.load_config_file(str(CONFIGS / f"{name}.py")) for name in ("qwen3b", "qwen3b_grpo"))
    from ssb_jax.pipeline.registry import REGISTRY
    assert "grpo" in REGISTRY.parse(grpo.stages) and "grpo" not in REGISTRY.parse(ssb.stages)
    assert dict(grpo.train) == dict(ssb.train) and dict(grpo.data) == dict(ssb.data)
    lora = config_lib.section_to(TrainConfig, grpo.train, "config.train").lora_config()
    assert (lora.rank, lora.alpha, len(lora.targets)) == (32, 32.0, 7)
    config_lib.section_to(GRPOConfig, grpo.grpo, "config.grpo")


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


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "learning_rate", 0.0, "config.train: learning_rate must be > 0, got 0.0"),
    ("train", "learning_rate", -1e-4, "config.train: learning_rate must be > 0"),
    ("train", "epochs", 0, "config.train: epochs must be > 0, got 0"),
    ("train", "lora_rank", 0, "config.train: lora_rank must be a positive integer"),
    ("train", "lora_rank", -4, "config.train: lora_rank must be a positive integer"),
    ("curate", "rollout_temperature", -0.1, "config.curate: rollout_temperature must be >= 0"),
    ("curate", "solution_top_p", 1.5, "config.curate: solution_top_p must be in (0, 1]"),
    ("curate", "rollout_top_p", 0.0, "config.curate: rollout_top_p must be in (0, 1]"),
    ("eval", "temperature", -1.0, "config.eval: temperature must be >= 0"),
    ("eval", "top_p", 0.0, "config.eval: top_p must be in (0, 1]"),
    ("eval", "top_p", 1.01, "config.eval: top_p must be in (0, 1]"),
    ("grpo", "group_size", 1, "config.grpo: group_size must be >= 2"),
    ("grpo", "clip_epsilon", -0.2, "config.grpo: clip_epsilon must be >= 0"),
    ("grpo", "kl_beta", -1.0, "config.grpo: kl_beta must be >= 0"),
    ("grpo", "loss_normalization", "mean", "config.grpo: loss_normalization must be one of"),
    ("grpo", "temperature", 0.0, "config.grpo: temperature must be > 0"),
    ("grpo", "top_p", 0.0, "config.grpo: top_p must be in (0, 1]"),
])
def test_absurd_values_are_refused_by_name(section, key, value, expected):
    from ssb_jax.evaluation import EvalConfig
    from ssb_jax.grpo.config import GRPOConfig
    classes = {"train": TrainConfig, "curate": CurationConfig, "eval": EvalConfig, "grpo": GRPOConfig}
    c = config_lib.base_config()
    c[section][key] = value
    with pytest.raises(ValueError) as error:
        config_lib.section_to(classes[section], c[section], f"config.{section}")
    assert str(error.value).startswith(expected)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("key, value", [("sampler.batch_size", 0), ("num_rounds", 0), ("sampler.max_prompt_tokens", -1),
                                        ("data.on_bad_line", "ignore"), ("sampler.memory_per_device_gib", -1.0)])
def test_absurd_run_settings_are_refused_by_name(key, value):
    c = config_lib.apply_overrides(config_lib.base_config(), {key: value})
    with pytest.raises(ValueError, match=f"config.{key} must be"):
        config_lib.check_values(c)


@pytest.mark.parametrize("value", ["data=4,tensr=2", "tensor=two", "data=-1,fsdp=-1", "manual"])
def test_a_sampling_mesh_that_is_not_auto_or_axis_sizes_is_refused_by_name(value):
    c = config_lib.apply_overrides(config_lib.base_config(), {"sampler.mesh": value})
    with pytest.raises(ValueError, match=rf"^config.sampler.mesh={value!r}: "):
        config_lib.check_values(c)
    config_lib.check_values(config_lib.apply_overrides(c, {"sampler.mesh": "data=-1,tensor=2"}))


def test_missing_config_file_is_one_line():
    with pytest.raises(ValueError, match=r"--config=configs/nope.py: no such file"):
        config_lib.load_config_file("configs/nope.py")


def test_overwrite_allows_the_named_stage_and_every_stage_that_reads_it():
    from ssb_jax.pipeline.registry import REGISTRY
    c = config_lib.base_config()
    assert REGISTRY.downstream(REGISTRY.parse(c.overwrite)) == set()
    assert REGISTRY.downstream(["curate"]) == {"curate", "teacher_cache", "train", "sft", "onpolicy", "opsd", "sdpo",
                                               "eval", "export"}  # the on-policy stages may read curation
    assert REGISTRY.downstream(["teacher_cache"]) == {"teacher_cache", "train", "eval", "export"}  # sft reads no cache
    assert "sft" not in REGISTRY.parse(c.stages) and "grpo" not in REGISTRY.parse(c.stages)  # baselines: when named
    assert REGISTRY.downstream(["grpo"]) == {"grpo", "eval"}  # export reads the student only
    assert REGISTRY.downstream(["opsd"]) == {"opsd", "eval"}
    with pytest.raises(ValueError, match=r"unknown stage 'trian' in config.overwrite.*did you mean 'train'"):
        REGISTRY.parse("trian", "config.overwrite")


def test_read_only_workdir_is_named(tmp_path):
    import os
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions; a file in the way fails for everyone
            (tmp_path / "file").write_text("")
            target = str(tmp_path / "file" / "run")
        else:
            target = str(locked / "run")
        with pytest.raises(ValueError, match=r"config.workdir=.* is not a writable directory"):
            config_lib.writable_directory(target, "config.workdir")
    finally:
        locked.chmod(0o700)


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("override, expected", [
    ("eval.temperature=inf", "config.eval.temperature must be finite, got inf"),
    ("curate.rollout_temperature=nan", "config.curate.rollout_temperature must be finite, got nan"),
    ("train.adam_b1=1.5", "config.train.adam_b1 must be in [0, 1), got 1.5"),
    ("grpo.adam_b2=1.0", "config.grpo.adam_b2 must be in [0, 1), got 1.0"),
    ("train.warmup_ratio=5", "config.train.warmup_ratio must be in [0, 1], got 5.0"),
    ("log_level=bogus", "config.log_level must be one of DEBUG, INFO, WARNING, ERROR, got 'bogus'"),
    ("workdir=", "config.workdir must be a non-empty value, got ''"),
    ("workdir= ", "config.workdir must be a non-empty value, got ' '"),
    ("train.length_buckets=abc", "config.train.length_buckets must be comma-separated integers, got 'abc'"),
    ("model.check_weights=some", "config.model.check_weights must be one of sample, full, off, got 'some'"),
    ("model.remat=al", "config.model.remat must be one of none, full, dots, dots_no_batch, got 'al'"),
    ("train.learning_rate=0", "config.train: learning_rate must be > 0, got 0.0"),  # the dataclass's own check
    ("grpo.group_size=1", "config.grpo: group_size must be >= 2 (advantages compare samples of a question), got 1"),
])
def test_bad_settings_are_refused_at_parse_naming_the_setting(override, expected):
    """parse_config_args validates as a run does (a run, --print_config and the planner all parse)."""
    with pytest.raises(ValueError) as error:
        config_lib.parse_config_args([f"--config.{override}"], default_path=str(CONFIG_DIR / "tiny.py"))
    assert str(error.value) == expected


def test_stage_names_are_checked_at_parse():
    with pytest.raises(ValueError, match=r"^unknown stage 'trian' in config.overwrite"):
        config_lib.parse_config_args(["--config.overwrite=trian"], default_path=str(CONFIG_DIR / "tiny.py"))


def test_good_spellings_pass():
    config, _ = config_lib.parse_config_args(["--config.log_level=debug", "--config.train.adam_b1=0",
                                              "--config.train.warmup_ratio=1", "--config.train.length_buckets=64, 128"],
                                             default_path=str(CONFIG_DIR / "tiny.py"))
    assert config_lib.section_to(TrainConfig, config.train, "config.train").length_buckets == (64, 128)


def test_settings_built_in_python_check_their_declarations():
    from ssb_jax.training.settings import OptimizerSettings
    with pytest.raises(ValueError, match=r"^adam_b1 must be in \[0, 1\), got 1.5$"):
        OptimizerSettings(adam_b1=1.5)
    with pytest.raises(ValueError, match=r"^warmup_ratio must be in \[0, 1\], got 5"):
        TrainConfig(warmup_ratio=5)
    with pytest.raises(ValueError, match=r"^weight_decay must be finite, got inf"):
        TrainConfig(weight_decay=float("inf"))
    from ssb_jax.evaluation import EvalConfig
    for cls, name in ((EvalConfig, "temperature"), (CurationConfig, "solution_temperature")):
        with pytest.raises(ValueError, match=rf"^{name} must be finite, got nan"):
            cls(**{name: float("nan")})


def test_print_config_refuses_what_a_run_refuses(capsys):
    from ssb_jax.pipeline import cli
    with pytest.raises(SystemExit, match=r"^error: config.train.adam_b1 must be in \[0, 1\), got 1.5$"):
        cli.main(["ssb_jax.main", f"--config={CONFIG_DIR / 'tiny.py'}", "--config.train.adam_b1=1.5", "--print_config"])
    assert capsys.readouterr().out == ""


# the second: fsdp over the 8 test devices named explicitly (the automatic mesh would fit a batch of 3)
@pytest.mark.parametrize("override", [{"train.adam_b1": 1.5}, {"train.batch_size": 3, "mesh.fsdp": 8}])
def test_a_refused_run_leaves_no_run_directory(tmp_path, override):
    """Refused in run_pipeline (settings changed after parsing, or a batch the mesh cannot split): no
    directory is made."""
    from ssb_jax.pipeline import run_pipeline
    workdir = tmp_path / "run"
    config, _ = config_lib.parse_config_args([f"--config={CONFIG_DIR / 'tiny.py'}", f"--config.workdir={workdir}",
                                              "--config.compile_cache_dir="])
    config_lib.apply_overrides(config, override)
    with pytest.raises(ValueError, match=f"config.{next(iter(override))}"):
        run_pipeline(config)
    assert not workdir.exists()
