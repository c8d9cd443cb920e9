"""PEFT adapter and merged-model exports load in peft/transformers with ssb_jax's logits."""
import jax
import numpy as np

import ssb_jax
from ssb_jax.export import export_merged_model, export_peft_adapter
from ssb_jax.model.lora import LoraConfig, init_lora, with_adapters
from ssb_jax.model.weights import load_params
from tests.hf_models import hf_logits


def random_trained_lora(config, lora_config, seed):
    """A LoRA with non-zero B (a fresh one is a no-op and would prove nothing)."""
    lora = init_lora(config, lora_config, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), lora)


def batch(config, rng):
    tokens = rng.integers(0, config.vocab_size, size=(2, 9))
    mask = np.ones(tokens.shape, bool)
    mask[1, :3] = False  # left padding in row 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return tokens, mask, positions


def ours_with_lora(model, config, lora, lora_config, tokens, mask, positions):
    return np.asarray(ssb_jax.compute_logits(with_adapters(model, lora, lora_config), config, tokens, mask, positions))


def test_peft_adapter_loads_with_same_logits(tiny_untied_checkpoint, tmp_path, rng):
    import torch
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM
    config, params = load_params(tiny_untied_checkpoint)
    lora_config = LoraConfig(targets=("q", "k", "v", "o", "gate", "up", "down"), rank=4, alpha=8.0)
    lora = random_trained_lora(config, lora_config, seed=0)
    export_peft_adapter(lora, lora_config, tmp_path / "adapter", str(tiny_untied_checkpoint))
    base = Qwen2ForCausalLM.from_pretrained(str(tiny_untied_checkpoint), attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tokens, mask, positions = batch(config, rng)
    theirs = hf_logits(model, tokens, mask, positions)
    ours = ours_with_lora(params, config, lora, lora_config, tokens, mask, positions)
    assert np.abs(ours - theirs)[mask].max() < 1e-4
    # and the adapter really changes the model
    plain = hf_logits(tiny_untied_checkpoint, tokens, mask, positions)
    assert np.abs(plain - theirs)[mask].max() > 1e-3
    del torch


def test_merged_model_loads_with_same_logits(tiny_checkpoint, tmp_path, rng):
    config, params = load_params(tiny_checkpoint)
    lora_config = LoraConfig(targets=("q", "v", "down"), rank=3, alpha=6.0, use_rslora=True)
    lora = random_trained_lora(config, lora_config, seed=2)
    out = export_merged_model(params, lora, lora_config, config, tmp_path / "merged")
    tokens, mask, positions = batch(config, rng)
    theirs = hf_logits(out, tokens, mask, positions)
    ours = ours_with_lora(params, config, lora, lora_config, tokens, mask, positions)
    assert np.abs(ours - theirs)[mask].max() < 1e-4
