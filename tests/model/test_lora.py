"""LoRA: its variable type, config, init, forward with B = 0, merge, PEFT naming and parity with PEFT's forward."""
import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from ssb_jax.distill.synthetic import tiny_model_config
from ssb_jax.model.config import PROJECTIONS
from ssb_jax.model.lora import (LoraConfig, adapter_factors, init_lora, lora_from_peft, lora_param_count, lora_to_peft,
                                merge_lora, peft_adapter_config, with_adapters)
from ssb_jax.model.qwen2 import Linear, Qwen2ForCausalLM, init_model, positions_from_mask
from ssb_jax.model.variables import LoRAParam


def randomize_b(lora, key, scale=0.1):
    """The same adapters with B drawn from normal(0, scale) (a fresh adapter's B is zero)."""
    def one(path, x):
        return scale * jax.random.normal(jax.random.fold_in(key, hash(str(path)) % 2**31), x.shape, x.dtype) \
            if "lora_b" in str(path) else x
    return jax.tree_util.tree_map_with_path(one, lora)


def test_config_short_names_ranks_and_scales():
    c = LoraConfig(targets=("q", "v", "down"), rank={"q": 8, "v_proj": 4}, alpha=16, default_rank=2)
    assert c.targets == ("q_proj", "v_proj", "down_proj")
    assert (c.rank_of("q"), c.rank_of("v"), c.rank_of("down")) == (8, 4, 2)
    assert {t: c.scale_of(t) for t in c.targets} == {"q_proj": 2.0, "v_proj": 4.0, "down_proj": 8.0}
    rs = LoraConfig(rank=16, alpha=32, use_rslora=True)
    assert rs.targets == PROJECTIONS and math.isclose(rs.scale_of("o"), 32 / 4)
    hash(c), hash(rs)  # static jit arguments
    assert c == LoraConfig(targets=("down", "q", "v"), rank={"v": 4, "q": 8}, alpha=16, default_rank=2)
    with pytest.raises(ValueError):
        LoraConfig(targets=("qq",))
    with pytest.raises(ValueError):
        LoraConfig(rank=0)


def test_init_shapes_b_zero_and_student_equals_base(seed, rng):
    config = tiny_model_config()
    lc = LoraConfig(rank={"q": 3, "gate": 5}, default_rank=4, alpha=8)
    lora = init_lora(config, lc, jax.random.key(seed))
    L, D, F = config.num_layers, config.hidden_size, config.intermediate_size
    factors = adapter_factors(lora)
    assert factors["q_proj"][0].shape == (L, D, 3)
    assert factors["q_proj"][1].shape == (L, 3, config.q_size)
    assert factors["gate_proj"][0].shape == (L, D, 5)
    assert factors["down_proj"][0].shape == (L, F, 4)
    assert factors["k_proj"][1].shape == (L, 4, config.kv_size)
    for t in lc.targets:
        assert not np.any(np.asarray(factors[t][1]))
        a = np.asarray(factors[t][0])
        assert np.abs(a).max() <= 1 / math.sqrt(a.shape[1]) and a.std() > 0
    assert lora_param_count(lora) == sum(x.size for x in jax.tree_util.tree_leaves(lora))

    model = init_model(config, seed + 1, std=0.1)
    tokens = rng.integers(0, config.vocab_size, (2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    pos = positions_from_mask(mask)
    base, _ = model(tokens, pos, mask)
    student, _ = with_adapters(model, lora, lc)(tokens, pos, mask)
    np.testing.assert_array_equal(np.asarray(student)[mask], np.asarray(base)[mask])


def test_filters_split_frozen_base_from_trainable_adapters():
    """nnx.state(model, LoRAParam) is exactly the adapters (what init_lora gives and what the optimizer
    sees), nnx.state(model, nnx.Param) exactly the base; each adapted Linear holds its own scale."""
    config = tiny_model_config(tie_word_embeddings=False)
    lc = LoraConfig(targets=("q", "v", "down"), rank={"q": 8, "v": 4}, default_rank=2, alpha=16, use_rslora=True)
    student = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0), lora_config=lc)
    adapters = dict(nnx.to_flat_state(nnx.state(student, LoRAParam)))
    base = dict(nnx.to_flat_state(nnx.state(student, nnx.Param)))
    assert sorted(adapters) == sorted((("layers", "attn" if t != "down_proj" else "mlp", t, f"lora_{f}"))
                                      for t in lc.targets for f in "ab")
    assert all(isinstance(v, LoRAParam) and not isinstance(v, nnx.Param) for v in adapters.values())
    assert not set(adapters) & set(base) and all("lora" not in "/".join(p) for p in base)
    assert set(adapters) | set(base) == set(dict(nnx.to_flat_state(nnx.state(student))))
    plain = nnx.state(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    assert set(base) == set(dict(nnx.to_flat_state(plain)))
    assert lora_param_count(nnx.state(student, LoRAParam)) == lora_param_count(init_lora(config, lc, jax.random.key(0)))
    linears = {p[-1]: m for p, m in nnx.iter_graph(student) if isinstance(m, Linear)}
    assert linears["q_proj"].lora_scale == 16 / math.sqrt(8) and linears["down_proj"].lora_scale == 16 / math.sqrt(2)
    assert linears["k_proj"].lora_a is None and linears["k_proj"].lora_scale == 0.0
    # only adapters get optimizer state
    opt_state = optax.adam(1e-3).init(nnx.state(student, LoRAParam))
    assert lora_param_count(opt_state) == 2 * lora_param_count(nnx.state(student, LoRAParam)) + 1  # mu, nu, count


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_equals_forward_with_lora(dtype, jax_key, rng):
    config = tiny_model_config(dtype=dtype)
    lc = LoraConfig(rank=4, alpha=8, use_rslora=dtype == "bfloat16")
    key = jax_key
    model = init_model(config, key, std=0.1)
    lora = randomize_b(init_lora(config, lc, jax.random.fold_in(key, 1)), jax.random.fold_in(key, 2))
    tokens = rng.integers(0, config.vocab_size, (2, 7))
    mask = np.ones((2, 7), bool)
    pos = positions_from_mask(mask)
    with_lora, _ = with_adapters(model, lora, lc)(tokens, pos, mask)
    merged, _ = merge_lora(model, lora, lc)(tokens, pos, mask)
    base, _ = model(tokens, pos, mask)
    tol = 1e-4 if dtype == "float32" else 0.15
    assert np.abs(np.asarray(base) - np.asarray(with_lora)).max() > 10 * (tol if dtype == "float32" else 0.01)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(with_lora), atol=tol)


def test_peft_roundtrip_and_parity(tiny_checkpoint, jax_key, rng):
    """Our LoRA exported under PEFT names and loaded into a PEFT model gives the same logits."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import Qwen2ForCausalLM

    from ssb_jax.model.weights import load_params
    config, params = load_params(tiny_checkpoint)
    lc = LoraConfig(rank={"q": 4, "down": 2}, default_rank=3, alpha=6.0)
    key = jax_key
    lora = randomize_b(init_lora(config, lc, key), jax.random.fold_in(key, 1), scale=0.3)
    tensors = lora_to_peft(lora)
    back = lora_from_peft(tensors, config, lc)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), lora, back)
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(back))

    cfg = peft_adapter_config(lc)
    hf = Qwen2ForCausalLM.from_pretrained(str(tiny_checkpoint), attn_implementation="eager").eval()
    peft_model = get_peft_model(hf, PeftLoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], rank_pattern=cfg["rank_pattern"],
                                                   target_modules=cfg["target_modules"], lora_dropout=0.0,
                                                   use_rslora=cfg["use_rslora"]))
    result = set_peft_model_state_dict(peft_model, {k: torch.as_tensor(v) for k, v in tensors.items()})
    assert not [k for k in result.unexpected_keys if "lora" in k]
    tokens = rng.integers(0, config.vocab_size, (1, 8))
    mask = np.ones((1, 8), bool)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    ours, _ = with_adapters(params, lora, lc)(tokens, positions_from_mask(mask), mask)
    base, _ = params(tokens, positions_from_mask(mask), mask)
    assert np.abs(ref - np.asarray(base)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4)


def test_bf16_projection_computes_lora_in_bf16_with_float32_master_factors(jax_key, rng):
    """A bf16 model with float32 adapters (the default train.lora_dtype): the adapter products take bf16
    inputs with float32 sums (the projection's input is not upcast), the factors and their gradients stay
    float32 (the optimiser's master weights), and both match float64 NumPy to bf16 precision."""
    import jax.numpy as jnp
    d_in, d_out, rank, scale = 32, 24, 4, 2.0
    linear = Linear(d_in, d_out, axes=("embed", "mlp"), use_bias=False, dtype=jnp.bfloat16,
                    rngs=nnx.Rngs(jax_key), lora=(rank, scale, jnp.float32, "gaussian"), std=0.2)
    linear.lora_b[...] = jnp.asarray(rng.normal(size=(rank, d_out)) * 0.3, jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, d_in)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.normal(size=(3, d_out)), jnp.float32)
    graphdef, params, factors = nnx.split(linear, nnx.Param, LoRAParam)

    def objective(factors):
        return (nnx.merge(graphdef, params, factors)(x).astype(jnp.float32) * cotangent).sum()

    jaxpr = jax.make_jaxpr(objective)(factors).jaxpr
    dots = [tuple(v.aval.dtype for v in e.invars) for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3 and all(d == (jnp.bfloat16, jnp.bfloat16) for d in dots), dots
    grads = jax.grad(objective)(factors)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))

    x64, k64 = np.asarray(x, np.float64), np.asarray(linear.kernel[...], np.float64)
    a64, b64 = np.asarray(linear.lora_a[...], np.float64), np.asarray(linear.lora_b[...], np.float64)
    c64 = np.asarray(cotangent, np.float64)
    expected_y = x64 @ k64 + scale * (x64 @ a64) @ b64
    y = np.asarray(linear(x), np.float64)
    assert np.abs(y - expected_y).max() < 2e-2 * np.abs(expected_y).max()
    expected = {"lora_a": scale * x64.T @ (c64 @ b64.T), "lora_b": scale * (x64 @ a64).T @ c64}
    for name, want in expected.items():
        got = np.asarray(nnx.to_pure_dict(grads)[name], np.float64)
        assert np.abs(got - want).max() < 2e-2 * np.abs(want).max(), name
