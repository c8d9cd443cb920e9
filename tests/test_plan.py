"""The planner's memory figures equal the real per-device sizes of sharded arrays on a tiny model."""
import jax
import ml_collections
import numpy as np
from flax import nnx

from ssb_jax.config import base_config
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
    import json
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
