"""Train step (single device vs a (2, 2, 2) mesh), optimizer schedules, grain pipeline, the
training loop: KL goes down, kill + resume reproduces the uninterrupted run, cached = online at k = V."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssb_jax.compile_options import vocab_program_options
from ssb_jax.distill.batch import build_batch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.data import make_dataset
from ssb_jax.distill.step import TrainStep, init_state, total_steps_for, train_step_program
from ssb_jax.distill.synthetic import random_records, tiny_model_config
from ssb_jax.distill.train import load_lora, run
from ssb_jax.model.qwen2 import init_model
from ssb_jax.sharding import make_mesh, shard_state
from ssb_jax.training.metrics import read_metrics
from ssb_jax.training.optim import make_optimizer, make_schedule
from tests.xla_text import ynn_fused_bodies


@pytest.fixture(scope="module")
def model(seed):
    config = tiny_model_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    return config, init_model(config, seed, std=0.2)


def _randomize_b(state, key):
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(jax.random.fold_in(key, x.size + len(str(p))), x.shape, x.dtype)
        if "lora_b" in str(p) else x, state["lora"])
    return {**state, "lora": lora}


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.multidevice
def test_sharded_step_equals_single_device(model, rng, seed):
    assert jax.device_count() == 8
    config, params = model
    base = nnx.state(params)
    tc = TrainConfig(lora_rank=4, lora_alpha=8.0, learning_rate=1e-3, adam_eps=1e-4, logits_chunk=8, ce_weight=0.2)
    optimizer, _ = make_optimizer(tc, 10)
    key = jax.random.key(seed + 1)
    state0 = _randomize_b(init_state(config, tc.lora_config(), optimizer, key), jax.random.fold_in(key, 7))
    batches = [build_batch(random_records(rng, 4, config.vocab_size), batch_size=4, buckets=(32,), max_seq_len=32)
               for _ in range(2)]

    single = TrainStep(config, tc, 10)
    s1 = jax.tree_util.tree_map(jnp.copy, state0)
    m1 = []
    for b in batches:
        s1, m = single(s1, base, b)
        m1.append(jax.device_get(m))

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = TrainStep(config, tc, 10, mesh)
    s8 = init_state(config, tc.lora_config(), optimizer, key, mesh)
    s8 = jax.tree_util.tree_map(lambda x, ref: jax.device_put(ref, x.sharding), s8, state0)
    p8 = nnx.to_pure_dict(shard_state(base, mesh))  # the step takes states as pure dicts (nnx.State works too)
    m8 = []
    for b in batches:
        s8, m = sharded(s8, p8, b)
        m8.append(jax.device_get(m))
    gate = s8["lora"]["layers"]["mlp"]["gate_proj"]
    assert gate["lora_a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert gate["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    mu = optax.tree_utils.tree_get(s8["opt_state"], "mu")["layers"]["mlp"]["gate_proj"]["lora_a"]  # follows its adapter
    assert mu.sharding.spec == gate["lora_a"].sharding.spec
    for a, b in zip(m1, m8):
        assert a["loss"] > 1e-4
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    diffs = jax.tree_util.tree_map(lambda x, y: float(jnp.abs(x - y).max()), s1["lora"], s8["lora"])
    assert max(jax.tree_util.tree_leaves(diffs)) < 1e-5, diffs
    moved = jax.tree_util.tree_map(lambda x, y: float(jnp.abs(x - y).max()), s1["lora"], state0["lora"])
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-4  # every factor was updated
    assert int(s8["step"]) == int(s1["step"]) == 2


def test_schedules():
    tc = TrainConfig(learning_rate=2e-4)
    s = make_schedule(tc, 100)
    assert float(s(0)) == pytest.approx(2e-4) and float(s(50)) == pytest.approx(1e-4) and float(s(100)) == 0.0
    w = make_schedule(tc.replace(warmup_steps=10, schedule="cosine"), 110)
    assert float(w(0)) == 0.0 and float(w(5)) == pytest.approx(1e-4) and float(w(10)) == pytest.approx(2e-4)
    assert float(w(60)) == pytest.approx(1e-4, rel=1e-3) and float(w(110)) == pytest.approx(0.0, abs=1e-10)
    assert float(make_schedule(tc.replace(schedule="constant"), 10)(9)) == pytest.approx(2e-4)
    assert total_steps_for(10, TrainConfig(batch_size=4, epochs=3)) == 8
    assert total_steps_for(10, TrainConfig(batch_size=4, epochs=3, max_steps=5)) == 5


def test_grain_pipeline_epochs_and_shuffle(rng):
    records = random_records(rng, 10, 50)
    tc = TrainConfig(batch_size=4, epochs=3, seed=5)
    ds = make_dataset(records, tc)
    batches = list(ds)
    assert len(batches) == total_steps_for(10, tc) == 8
    seen = [tuple(b.answer_tokens[i, :b.answer_mask[i].sum()]) for b in batches for i in range(4) if b.row_valid[i]]
    sols = [tuple(r["solution_ids"]) for r in records]
    assert len(seen) == 30 and all(seen.count(s) == 3 for s in sols)  # every record once per epoch
    assert seen[:10] != seen[10:20]  # a fresh permutation each epoch
    again = [tuple(b.answer_tokens[i, :b.answer_mask[i].sum()]) for b in make_dataset(records, tc) for i in range(4)
             if b.row_valid[i]]
    assert again == seen  # seeded
    assert batches[-1].row_valid.tolist() == [True, True, False, False]  # padded to the batch size


def _tiny_run_config(**kw):
    base = dict(lora_rank=8, lora_alpha=16.0, learning_rate=1e-2, batch_size=4, epochs=1, logits_chunk=8,
                min_bucket=8, checkpoint_every=3, seed=3, length_buckets=(32,), max_seq_len=32)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.e2e
@pytest.mark.multidevice  # the trained adapters are loaded back onto a mesh too
def test_training_drives_kl_down(model, tmp_path, rng):
    config, params = model
    records = random_records(rng, 8, config.vocab_size, solution=(6, 14))
    tc = _tiny_run_config(epochs=15, schedule="constant", checkpoint_every=100)
    result = run(tc, config, params, records, tmp_path, progress=False)
    kl = np.array([h["kl"] for h in result["history"]])
    assert len(kl) == 30
    first, last = kl[:2].mean(), kl[-2:].mean()
    assert first > 1e-3 and last < first / 5, (first, last)  # typically /20 or more; /10 was flaky
    for name in ("metrics.jsonl", "training.png", "train_config.json", "lora_config.json"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    row = read_metrics(tmp_path)[0]
    for k in ("loss", "kl", "ce", "teacher_ce", "agree", "grad_norm", "lr", "answer_tokens", "tokens_per_s",
              "answer_len_mean"):
        assert np.isfinite(row[k]), k
    assert json.loads((tmp_path / "train_config.json").read_text())["lora_rank"] == 8
    lora, lc = load_lora(tmp_path, config)
    diffs = jax.tree_util.tree_map(lambda x, y: float(jnp.abs(x - y).max()), lora, result["lora"])
    assert max(jax.tree_util.tree_leaves(diffs)) == 0.0 and lc.rank_of("q") == 8
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = load_lora(tmp_path, config, mesh=mesh)
    assert len(sharded["layers"]["mlp"]["up_proj"]["lora_a"][...].sharding.device_set) == 8
    diffs = jax.tree_util.tree_map(lambda x, y: float(jnp.abs(x - y).max()), sharded, result["lora"])
    assert max(jax.tree_util.tree_leaves(diffs)) == 0.0


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.e2e
def test_kill_and_resume_reproduces_losses(model, tmp_path, rng):
    config, params = model
    records = random_records(rng, 10, config.vocab_size)
    tc = _tiny_run_config(epochs=3)  # 8 steps, checkpoints at 3, 6, 8
    full = run(tc, config, params, records, tmp_path / "full", progress=False, plot=False, tensorboard=False)
    part = run(tc, config, params, records, tmp_path / "resumed", progress=False, plot=False, tensorboard=False,
               stop_after=5)  # "killed" after step 5; the last checkpoint is step 3
    assert part["interrupted"] and len(part["history"]) == 5
    rest = run(tc, config, params, records, tmp_path / "resumed", progress=False, plot=False, tensorboard=False)
    assert rest["start_step"] == 3 and len(rest["history"]) == 5
    a = [h["loss"] for h in read_metrics(tmp_path / "full")]
    b = [h["loss"] for h in read_metrics(tmp_path / "resumed")]
    assert [h["step"] for h in read_metrics(tmp_path / "resumed")] == list(range(1, 9))
    np.testing.assert_allclose(b, a, rtol=1e-6)
    assert len(set(np.round(a, 6))) > 4
    diffs = jax.tree_util.tree_map(lambda x, y: float(jnp.abs(x - y).max()), full["lora"], rest["lora"])
    assert max(jax.tree_util.tree_leaves(diffs)) < 1e-6
    # a finished run resumes to nothing
    again = run(tc, config, params, records, tmp_path / "full", progress=False, plot=False, tensorboard=False)
    assert again["history"] == [] and again["start_step"] == 8


@pytest.mark.e2e
@pytest.mark.slow  # three training runs and two teacher caches
def test_cached_teacher_full_vocab_trains_like_online(model, tmp_path, rng):
    config, params = model
    records = random_records(rng, 6, config.vocab_size)
    tc = _tiny_run_config(epochs=2, ce_weight=0.1)
    online = run(tc, config, params, records, tmp_path / "online", progress=False, plot=False, tensorboard=False)
    cached = run(tc.replace(teacher_mode="cached", topk=config.vocab_size), config, params, records, tmp_path / "cached",
                 progress=False, plot=False, tensorboard=False)
    assert (tmp_path / "cached" / "teacher_cache" / "index.json").exists()
    for key in ("loss", "kl", "ce", "teacher_ce", "agree"):
        np.testing.assert_allclose([h[key] for h in cached["history"]], [h[key] for h in online["history"]],
                                   rtol=1e-4, atol=1e-6, err_msg=key)
    topk = run(tc.replace(teacher_mode="cached", topk=8), config, params, records, tmp_path / "top8",
               progress=False, plot=False, tensorboard=False)
    assert all(np.isfinite(h["loss"]) for h in topk["history"])
    assert json.loads((tmp_path / "top8" / "teacher_cache" / "index.json").read_text())["bytes_per_token"] == 72


def test_bf16_base_with_f32_lora_step(model, rng):
    """The frozen base may be bf16 while LoRA and its optimizer state stay f32."""
    config, params = model
    config16 = config.replace(dtype="bfloat16")
    params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), nnx.state(params))
    tc = TrainConfig(lora_rank=4, learning_rate=1e-2, logits_chunk=8)
    step = TrainStep(config16, tc, 5)
    state = _randomize_b(init_state(config16, tc.lora_config(), step.optimizer, jax.random.key(0)), jax.random.key(1))
    batch = build_batch(random_records(rng, 4, config.vocab_size), buckets=(32,), max_seq_len=32)
    new, metrics = step(state, params16, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new["lora"]))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree_util.tree_leaves(new["opt_state"]))


@pytest.mark.parametrize("sharded", [False, pytest.param(True, marks=pytest.mark.multidevice)], ids=["one_device", "mesh"])
def test_step_leaves_vocabulary_reductions_to_xla(sharded, rng):
    """The compiled train step hands YNNPACK no reduction (on CPU, where its fused vocabulary-wide
    reductions ran 10-15x slower); see ssb_jax.compile_options."""
    if not vocab_program_options():
        pytest.skip("this backend or jaxlib does not take the YNNPACK fusion option")
    config = tiny_model_config(vocab_size=4096, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    params = nnx.state(init_model(config, 0, std=0.2))
    tc = TrainConfig(lora_rank=4, logits_chunk=8)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}) if sharded else None
    step = TrainStep(config, tc, 10, mesh)
    batch = step.place_batch(build_batch(random_records(rng, 4, 4096), batch_size=4,
                                         buckets=(32,), max_seq_len=32))
    state = init_state(config, step.lora_config, step.optimizer, jax.random.key(1), mesh)
    params = nnx.to_pure_dict(shard_state(params, mesh)) if sharded else nnx.to_pure_dict(params)
    fn = train_step_program(config, tc, step.lora_config, 10, mesh)
    bodies = ynn_fused_bodies(fn.lower(state, params, batch).compile().as_text())
    assert bodies, "no YNNPACK fusion at all: the matrix products should still use it"
    assert not [b for b in bodies if " reduce(" in b]
