"""The automatic training mesh (config.mesh axes left at 0: sharding.auto_mesh_shape): every shipped config
starts on 1, 4 and 8 devices and qwen05b on a TPU v5e-8 (the planner plans it), tensor parallelism only as
far as the KV heads allow; an impossible request is one line naming the settings to change."""
from pathlib import Path

import pytest

from ssb_jax.config import load_config_file
from ssb_jax.plan.analytic import model_config_of, plan
from ssb_jax.sharding import AUTO, auto_mesh_shape, check_batch_divides

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))


def kv_heads_of(config) -> int:
    """The KV heads of the config's model (the toy world's from its settings: its model is built later)."""
    return config.world.num_kv_heads if config.world.enabled else model_config_of(config).num_kv_heads


def test_auto_takes_the_batch_on_data_axes_and_the_rest_on_tensor_within_the_kv_heads():
    auto = {"data": AUTO, "fsdp": AUTO, "tensor": AUTO}
    assert auto_mesh_shape(auto, 8, 8, kv_heads=2) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert auto_mesh_shape(auto, 8, 4, kv_heads=2) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert auto_mesh_shape(auto, 1, 4, kv_heads=2) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert auto_mesh_shape(auto, 16, 16, kv_heads=2, processes=2) == {"data": 2, "fsdp": 8, "tensor": 1}
    assert auto_mesh_shape({"data": 4, "fsdp": AUTO, "tensor": AUTO}, 16, 16, kv_heads=2) == {
        "data": 4, "fsdp": 4, "tensor": 1}
    assert auto_mesh_shape({"data": -1, "fsdp": 1, "tensor": AUTO}, 8, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert auto_mesh_shape({"data": 1, "fsdp": 4, "tensor": 2}, 8, 4) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError) as error:  # 2 rows on 8 devices: tensor 4 would exceed the 2 KV heads
        auto_mesh_shape(auto, 8, 2, kv_heads=2)
    message = str(error.value)
    assert "\n" not in message and "config.train.batch_size=2" in message and "config.mesh" in message
    with pytest.raises(ValueError, match=r"^config.mesh.data=3, .* cannot fill 8 devices"):
        auto_mesh_shape({"data": 3, "fsdp": AUTO, "tensor": AUTO}, 8, 6)
    with pytest.raises(ValueError, match=r"needs 4 devices, 8 are available"):
        auto_mesh_shape({"data": 1, "fsdp": 4, "tensor": 1}, 8, 4)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("devices", [1, 4, 8])
def test_every_config_starts_on_1_4_and_8_devices(name, devices):
    config = load_config_file(str(ROOT / "configs" / name))
    kv_heads = kv_heads_of(config)
    shape = auto_mesh_shape(dict(config.mesh), devices, config.train.batch_size, kv_heads)
    check_batch_divides(config.train.batch_size, shape, "config.train.batch_size")
    assert shape["tensor"] == 1 or kv_heads % shape["tensor"] == 0, shape


def test_qwen05b_is_planned_on_a_tpu_v5e_8():
    config = load_config_file(str(ROOT / "configs" / "qwen05b.py"))
    result = plan(config, "v5e-8", include_eval=False)
    assert result["mesh"]["data"] * result["mesh"]["fsdp"] * result["mesh"]["tensor"] == 8
