"""The sampling mesh (sampling.mesh.sampling_mesh) on 8 fake CPU devices: a model that fits decodes with
replicated weights and rows split over every device, with no weight gathered in the compiled decode
program; one that does not fit is tensor parallel; both give the single-device greedy tokens. Batches
are padded to the data-parallel size, never replicated."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssb_jax
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.weights import save_params
from ssb_jax.sampling.driver import Sampler
from ssb_jax.sampling.sampler import SamplingParams, row_keys_for
from ssb_jax.sampling.mesh import SAMPLING_WEIGHT_SHARE, sampling_mesh
from ssb_jax.sharding import logical_to_spec, make_mesh, parse_mesh_setting, state_bytes_per_device

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)

pytestmark = pytest.mark.multidevice  # every test builds meshes over the 8 fake devices


# untied; Qwen2.5's vocabulary size (the tensor axis divides it, and the run context's load check wants the
# shared tokenizer's ids within the embedding)
CONFIG = ModelConfig(vocab_size=151936, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=16, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, seed):
    return save_params(ssb_jax.init_model(CONFIG, seed, std=0.2), CONFIG, tmp_path_factory.mktemp("sampling_mesh"))


@pytest.fixture(scope="module")
def model_config(checkpoint):
    return ModelConfig.from_json(checkpoint / "config.json")


@pytest.fixture(scope="module")
def prompts_and_reference(checkpoint, model_config, seed):
    """Random prompts and their greedy tokens from a single-device Sampler."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, model_config.vocab_size, size=n).tolist() for n in (5, 9, 2, 7, 4, 11)]
    _, model = ssb_jax.load_model(checkpoint)
    reference = Sampler(model, batch_size=8, show_progress=False).generate_ids(prompts, GREEDY)
    return prompts, [c[0].token_ids for c in reference]


def weight_bytes(model_config, tensor: int, devices: int = 8) -> int:
    state = nnx.state(ssb_jax.abstract_model(model_config))
    return state_bytes_per_device(state, {"data": devices // tensor, "fsdp": 1, "tensor": tensor})


def collective_lines(hlo_text: str) -> list[str]:
    return [line for line in hlo_text.splitlines() if any(f" {op}(" in line or f" {op}-start(" in line
                                                           for op in COLLECTIVES)]


@pytest.mark.parametrize("unstack", [True, False], ids=["decode_layout", "scan"])
def test_fitting_model_decodes_data_parallel_without_gathering_weights(checkpoint, model_config, unstack):
    mesh = sampling_mesh(model_config, jax.devices(), memory_per_device=2**30)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    _, model = ssb_jax.load_model(checkpoint, mesh=mesh)
    sampler = Sampler(model, batch_size=16, mesh=mesh, show_progress=False, unstack=unstack)
    for leaf in jax.tree.leaves(sampler.state):  # every device holds the whole of every weight
        assert all(shard.data.shape == leaf.shape for shard in leaf.addressable_shards)
    rows, width = 16, 16
    tokens = sampler._place(np.ones((rows, width), np.int32))
    mask = sampler._place(np.ones((rows, width), bool))
    keys = sampler._place(row_keys_for(0, list(range(rows)), 1))
    args = (sampler.state, tokens, mask, keys, jnp.asarray(GREEDY.knobs()))
    compiled = sampler._generate.lower(*args, sampling=GREEDY.program(), n=1).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo
    # the one collective left: whether every row has stopped (the loop's condition), never in its body
    assert collective_lines(hlo) and all("/while/cond/" in line for line in collective_lines(hlo)), \
        collective_lines(hlo)
    out = compiled(*args)
    assert len(out["tokens"].addressable_shards) == 8
    assert {shard.data.shape for shard in out["tokens"].addressable_shards} == {(rows // 8, GREEDY.max_new_tokens)}


def test_model_too_big_for_one_device_is_tensor_parallel(checkpoint, model_config, prompts_and_reference):
    # room for half the weights per device and no more: two devices on the tensor axis hold them
    memory = weight_bytes(model_config, 2) / SAMPLING_WEIGHT_SHARE
    assert weight_bytes(model_config, 1) > SAMPLING_WEIGHT_SHARE * memory
    mesh = sampling_mesh(model_config, jax.devices(), memory_per_device=memory)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    _, model = ssb_jax.load_model(checkpoint, mesh=mesh)
    q = model.layers.attn.q_proj.kernel[...]  # [layers, embed, heads]: heads split in two
    assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0], q.shape[1], q.shape[2] // 2)}
    sampler = Sampler(model, batch_size=8, mesh=mesh, show_progress=False)
    prompts, reference = prompts_and_reference
    got = sampler.generate_ids(prompts, GREEDY)
    assert [c[0].token_ids for c in got] == reference


def test_a_batch_smaller_than_the_data_parallel_size_is_padded(checkpoint, model_config, prompts_and_reference):
    """batch_size 4 on 8 data-parallel devices: each batch padded with filler rows to 8, one row a
    device, never replicated; the greedy tokens are the single device's."""
    mesh = sampling_mesh(model_config, jax.devices(), memory_per_device=2**30)
    _, model = ssb_jax.load_model(checkpoint, mesh=mesh)
    sampler = Sampler(model, batch_size=4, mesh=mesh, show_progress=False)
    assert sampler.batch_buckets == [8]
    shard_shapes = []
    run = sampler._generate

    def recording(state, tokens, *args, **kwargs):
        shard_shapes.append({s.data.shape for s in tokens.addressable_shards})
        return run(state, tokens, *args, **kwargs)

    sampler._generate = recording
    prompts, reference = prompts_and_reference
    got = sampler.generate_ids(prompts, GREEDY)
    assert len(shard_shapes) == 2 and all(len(s) == 1 and next(iter(s))[0] == 1 for s in shard_shapes)
    assert [c[0].token_ids for c in got] == reference


def test_the_batch_axis_is_never_replicated_and_parameters_may_be():
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="a batch of 4 rows does not divide the data-parallel mesh axes"):
        logical_to_spec(("batch", None), (4, 3), mesh)
    assert logical_to_spec(("batch", None), (16, 3), mesh) == jax.sharding.PartitionSpec("data", None)
    tensor = make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    assert logical_to_spec(("embed", "kv_heads"), (32, 12), tensor) == jax.sharding.PartitionSpec(None, None)


def test_train_batch_that_the_mesh_does_not_divide_is_refused_by_name():
    from ssb_jax.distill.config import TrainConfig
    from ssb_jax.distill.step import TrainStep
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match=r"^train.batch_size=4 is not a multiple of the data-parallel size 8"):
        TrainStep(config, TrainConfig(batch_size=4), 10, make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    TrainStep(config, TrainConfig(batch_size=4), 10, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))


def test_pipeline_refuses_a_train_batch_the_mesh_does_not_divide_before_any_stage(tmp_path):
    from ssb_jax import config as config_lib
    from ssb_jax.pipeline import REGISTRY, RunContext
    c = config_lib.base_config()
    c.workdir, c.compile_cache_dir = str(tmp_path / "run"), ""
    c.train.batch_size = 4  # the automatic mesh fits it: 4 rows over fsdp, the model's 2 KV heads over tensor
    assert dict(RunContext(c, REGISTRY).mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1  # an explicit mesh is used as given
    with pytest.raises(ValueError) as error:
        RunContext(c, REGISTRY)
    assert str(error.value) == ("config.train.batch_size=4 is not a multiple of the data-parallel size 8 (data x fsdp "
                                "of mesh {'data': 1, 'fsdp': 8, 'tensor': 1}); change config.train.batch_size or "
                                "config.mesh")
    c.stages = "eval"  # no training: no constraint on its batch
    RunContext(c, REGISTRY)


def test_explicit_sampling_mesh_setting():
    assert parse_mesh_setting("auto") == "auto"
    assert parse_mesh_setting("data=4, tensor=2") == {"data": 4, "fsdp": 1, "tensor": 2}
    assert parse_mesh_setting("tensor=2,data=-1") == {"data": -1, "fsdp": 1, "tensor": 2}
    for bad in ("dta=4", "data=4,data=2", "data=x", "data=0", "data=-1,tensor=-1", "data"):
        with pytest.raises(ValueError, match=r"^config.sampler.mesh="):
            parse_mesh_setting(bad)
    mesh = sampling_mesh(None, jax.devices(), shape=parse_mesh_setting("tensor=2,data=-1"))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_pipeline_places_the_base_on_the_sampling_mesh(tmp_path, checkpoint, prompts_and_reference):
    """The run context: the training mesh is config.mesh (auto: all 8 devices on fsdp for 8 rows), the base is loaded onto
    the sampling mesh (this toy fits a device: 8-way data parallel, weights whole on each device), and
    its samplers give the single-device greedy tokens; an explicit sampler.mesh is used as given, one
    the devices cannot fill is named."""
    from ssb_jax import config as config_lib
    from ssb_jax.pipeline import REGISTRY, RunContext
    from ssb_jax.paths import shared_data_path
    c = config_lib.base_config()
    c.workdir, c.compile_cache_dir = str(tmp_path / "run"), ""
    c.model.path, c.model.dtype = str(checkpoint), "float32"
    c.model.tokenizer = str(shared_data_path("qwen2.5_tokenizer"))
    c.train.batch_size, c.sampler.batch_size = 8, 8
    ctx = RunContext(c, REGISTRY)
    ctx.load_base()
    assert dict(ctx.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(ctx.sample_mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    embedding = ctx.base_model.embed.embedding[...]
    assert {s.data.shape for s in embedding.addressable_shards} == {embedding.shape}
    prompts, reference = prompts_and_reference
    sampler = ctx.sampler(ctx.base_model)
    sampler.show_progress = False
    assert [c[0].token_ids for c in sampler.generate_ids(prompts, GREEDY)] == reference

    c.sampler.mesh = "data=2,tensor=4"
    explicit = RunContext(c, REGISTRY)
    explicit.load_base()
    assert dict(explicit.sample_mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    c.sampler.mesh = "data=3"
    with pytest.raises(ValueError, match=r"^config.sampler.mesh='data=3': mesh .* needs 3 devices, 8 are available"):
        RunContext(c, REGISTRY).load_base()
