"""LoRA: config, init, forward with B = 0, merge, PEFT naming and parity with PEFT's forward."""
import math

import jax
import numpy as np
import pytest

from ssb_jax.distill.synthetic import tiny_model_config
from ssb_jax.model.lora import (LoraConfig, init_lora, lora_from_peft, lora_param_count, lora_to_peft, merge_lora,
                                peft_adapter_config)
from ssb_jax.model.qwen2 import PROJECTIONS, forward, init_params, positions_from_mask


def randomize_b(lora, key, scale=0.1):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(key, len(leaves))
    out = [scale * jax.random.normal(k, x.shape, x.dtype) if str(p[-1]) == "['b']" else x
           for (p, x), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


def test_config_short_names_ranks_and_scales():
    c = LoraConfig(targets=("q", "v", "down"), rank={"q": 8, "v_proj": 4}, alpha=16, default_rank=2)
    assert c.targets == ("q_proj", "v_proj", "down_proj")
    assert (c.rank_of("q"), c.rank_of("v"), c.rank_of("down")) == (8, 4, 2)
    assert c.scales() == {"q_proj": 2.0, "v_proj": 4.0, "down_proj": 8.0}
    rs = LoraConfig(rank=16, alpha=32, use_rslora=True)
    assert rs.targets == PROJECTIONS and math.isclose(rs.scale_of("o"), 32 / 4)
    hash(c), hash(rs)  # static jit arguments
    assert c == LoraConfig(targets=("down", "q", "v"), rank={"v": 4, "q": 8}, alpha=16, default_rank=2)
    with pytest.raises(ValueError):
        LoraConfig(targets=("qq",))
    with pytest.raises(ValueError):
        LoraConfig(rank=0)


def test_init_shapes_b_zero_and_student_equals_base():
    config = tiny_model_config()
    lc = LoraConfig(rank={"q": 3, "gate": 5}, default_rank=4, alpha=8)
    lora = init_lora(config, lc, jax.random.key(np.random.randint(1 << 30)))
    L, D, F = config.num_layers, config.hidden_size, config.intermediate_size
    assert lora["layers"]["q_proj"]["a"].shape == (L, D, 3)
    assert lora["layers"]["q_proj"]["b"].shape == (L, 3, config.q_size)
    assert lora["layers"]["gate_proj"]["a"].shape == (L, D, 5)
    assert lora["layers"]["down_proj"]["a"].shape == (L, F, 4)
    assert lora["layers"]["k_proj"]["b"].shape == (L, 4, config.kv_size)
    for t in lc.targets:
        assert not np.any(np.asarray(lora["layers"][t]["b"]))
        a = np.asarray(lora["layers"][t]["a"])
        assert np.abs(a).max() <= 1 / math.sqrt(a.shape[1]) and a.std() > 0
    assert lora_param_count(lora) == sum(x.size for x in jax.tree_util.tree_leaves(lora))

    params = init_params(config, jax.random.key(np.random.randint(1 << 30)), std=0.1)
    rng = np.random.default_rng()
    tokens = rng.integers(0, config.vocab_size, (2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    pos = positions_from_mask(mask)
    base, _ = forward(params, tokens, pos, mask, config=config)
    student, _ = forward(params, tokens, pos, mask, lora=lora, config=config, lora_scales=lc.scales())
    np.testing.assert_array_equal(np.asarray(student)[mask], np.asarray(base)[mask])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_equals_forward_with_lora(dtype):
    config = tiny_model_config(dtype=dtype)
    lc = LoraConfig(rank=4, alpha=8, use_rslora=dtype == "bfloat16")
    key = jax.random.key(np.random.randint(1 << 30))
    params = init_params(config, key, std=0.1)
    lora = randomize_b(init_lora(config, lc, jax.random.fold_in(key, 1)), jax.random.fold_in(key, 2))
    tokens = np.random.default_rng().integers(0, config.vocab_size, (2, 7))
    mask = np.ones((2, 7), bool)
    pos = positions_from_mask(mask)
    with_lora, _ = forward(params, tokens, pos, mask, lora=lora, config=config, lora_scales=lc.scales())
    merged, _ = forward(merge_lora(params, lora, lc), tokens, pos, mask, config=config)
    base, _ = forward(params, tokens, pos, mask, config=config)
    tol = 1e-4 if dtype == "float32" else 0.15
    assert np.abs(np.asarray(base) - np.asarray(with_lora)).max() > 10 * (tol if dtype == "float32" else 0.01)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(with_lora), atol=tol)


def test_peft_roundtrip_and_parity(tiny_checkpoint):
    """Our LoRA exported under PEFT names and loaded into a PEFT model gives the same logits."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import Qwen2ForCausalLM

    from ssb_jax.model.weights import load_params
    config, params = load_params(tiny_checkpoint)
    lc = LoraConfig(rank={"q": 4, "down": 2}, default_rank=3, alpha=6.0)
    key = jax.random.key(np.random.randint(1 << 30))
    lora = randomize_b(init_lora(config, lc, key), jax.random.fold_in(key, 1), scale=0.3)
    tensors = lora_to_peft(lora)
    back = lora_from_peft(tensors, config, lc)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), lora, back)

    cfg = peft_adapter_config(lc)
    hf = Qwen2ForCausalLM.from_pretrained(str(tiny_checkpoint), attn_implementation="eager").eval()
    peft_model = get_peft_model(hf, PeftLoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], rank_pattern=cfg["rank_pattern"],
                                                   target_modules=cfg["target_modules"], lora_dropout=0.0,
                                                   use_rslora=cfg["use_rslora"]))
    result = set_peft_model_state_dict(peft_model, {k: torch.as_tensor(v) for k, v in tensors.items()})
    assert not [k for k in result.unexpected_keys if "lora" in k]
    tokens = np.random.default_rng().integers(0, config.vocab_size, (1, 8))
    mask = np.ones((1, 8), bool)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    ours, _ = forward(params, tokens, positions_from_mask(mask), mask, lora=lora, config=config, lora_scales=lc.scales())
    base, _ = forward(params, tokens, positions_from_mask(mask), mask, config=config)
    assert np.abs(ref - np.asarray(base)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4)
