"""The planner's memory figures equal the real per-device sizes of sharded arrays on a tiny model."""
import json
import random
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ssb_jax import plan as plan_module
from ssb_jax.config import base_config, load_config_file
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.qwen2 import CACHE_AXES, abstract_model, init_model
from ssb_jax.plan import (ACCELERATORS, Accelerator, array_bytes_per_device, cache_shape, format_plan, plan,
                          state_bytes_per_device)
from ssb_jax.sharding import make_mesh, named_sharding, shard_state

TINY = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8)


def device0_bytes(tree):
    """Bytes of the shards that live on the first device."""
    first = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == first)


def test_memory_figures_match_sharded_arrays():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    axes = dict(mesh.shape)
    params = shard_state(nnx.state(init_model(TINY, 0)), mesh)
    assert state_bytes_per_device(nnx.state(abstract_model(TINY)), axes) == device0_bytes(params)
    assert device0_bytes(params) < TINY.param_count() * 4 / 2  # really split

    from ssb_jax.model.lora import LoraConfig, init_lora, student_split
    lora_config = LoraConfig(rank=4)
    lora = init_lora(TINY, lora_config, jax.random.key(1), mesh)
    assert state_bytes_per_device(student_split(TINY, lora_config)[1], axes) == device0_bytes(lora)

    shape = cache_shape(TINY, 8, 24)
    k = jax.device_put(np.zeros(shape, np.float32), named_sharding(CACHE_AXES["k"], shape, mesh))
    assert array_bytes_per_device(CACHE_AXES["k"], shape, axes, 4) == device0_bytes(k)
    assert device0_bytes(k) == k.nbytes // 8  # batch over data x fsdp, kv heads over tensor


def test_plan_end_to_end_and_fit_verdicts(tmp_path, monkeypatch):
    import ssb_jax.plan as plan_module
    monkeypatch.setitem(plan_module.ACCELERATORS, "tiny-4", Accelerator(4, 0.001, 1.0, 1.0))
    c = base_config()
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    c.model.path = str(directory)
    c.model.dtype = "float32"
    c.sampler.batch_size = 4
    c.sampler.max_prompt_tokens = 64
    c.curate.rollout_max_new_tokens = c.curate.solution_max_new_tokens = 64
    result = plan(c, "tiny-4")
    m = result["memory_gib_per_device"]
    params_bytes = TINY.param_count() * 4
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert m["base_weights"] * 2**30 <= params_bytes  # sharded over fsdp
    assert m["base_weights"] * 2**30 >= params_bytes / 4
    assert result["fits"]["sampling"] is True  # ~1 MiB of capacity holds this toy's weights and cache
    big = ml_collections.ConfigDict(c.to_dict())
    big.sampler.batch_size = 4096
    assert plan(big, "tiny-4")["fits"]["sampling"] is False
    assert "DOES NOT FIT" in format_plan(plan(big, "tiny-4"))


def test_real_3b_config_on_h100():
    from ssb_jax.paths import shared_data_path
    c = base_config()
    c.model.path = str(shared_data_path("qwen2.5_configs", "Qwen2.5-3B-Instruct"))
    result = plan(c, "H100-80G")
    # 3.09B parameters in bf16 on one device
    assert abs(result["memory_gib_per_device"]["base_weights"] * 2**30 - 2 * result["model_parameters"]) < 1e6
    assert result["model_parameters"] == 3085938688
    assert "H100-80G" in ACCELERATORS and np.isfinite(result["time_estimate_s"]["train"])


def test_plan_command_line_applies_overrides_and_names_a_typo(tmp_path, capsys):
    """python -m ssb_jax.plan takes the same --config.key=value overrides as ssb_jax.main."""
    seed = random.randrange(2**31)
    batch = random.Random(seed).randint(5, 64)  # qwen3b's own is 4
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    config_file = str(Path(__file__).resolve().parents[1] / "configs" / "qwen3b.py")
    common = ["--config", config_file, f"--config.model.path={model_dir}", "--accelerator", "H200"]
    plan_module.main(common)
    default_out = capsys.readouterr().out
    plan_module.main(common + [f"--config.train.batch_size={batch}", "--devices=1"])
    overridden_out = capsys.readouterr().out
    reference = load_config_file(config_file)  # the override applied by hand, planned directly
    reference.model.path = str(model_dir)
    reference.train.batch_size = batch
    assert overridden_out.strip() == format_plan(plan(reference, "H200", 1)), f"seed {seed}"
    assert overridden_out != default_out, f"seed {seed}"  # the training activations grow with the batch
    with pytest.raises(SystemExit):
        plan_module.main(common + ["--config.train.bach_size=8"])
    assert "config.train has no key 'bach_size'; did you mean config.train.batch_size?" in capsys.readouterr().err
