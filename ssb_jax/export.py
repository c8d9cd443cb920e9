"""Exports of a trained student: a PEFT LoRA adapter, and the merged model as HF safetensors.

The adapter loads with `peft.PeftModel.from_pretrained(base, dir)`; the merged directory loads with
`transformers.AutoModelForCausalLM.from_pretrained(dir)` (and so vLLM can serve it).
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import save_file

from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, lora_to_peft, merge_lora, peft_adapter_config
from ssb_jax.model.weights import save_params

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_peft_adapter(lora_state, lora_config: LoraConfig, out_dir: str | Path, base_model_name_or_path: str = "") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(lora_to_peft(lora_state), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(lora_config, base_model_name_or_path),
                                                     indent=2))
    return out_dir


def export_merged_model(model, lora_state, lora_config: LoraConfig, model_config: ModelConfig,
                        out_dir: str | Path, *, tokenizer=None, dtype: str | None = None) -> Path:
    """Fold the adapters into the base model and save config.json + safetensors (+ the tokenizer files)."""
    merged = merge_lora(model, lora_state, lora_config) if lora_state is not None else model
    config = model_config if dtype is None else model_config.replace(dtype=dtype)
    if dtype is not None:  # save_params casts nothing: cast the state, keep the graph
        import jax
        from flax import nnx
        graphdef, state = nnx.split(merged)
        merged = nnx.merge(graphdef, jax.tree_util.tree_map(lambda x: x.astype(config.jnp_dtype), state))
    out_dir = save_params(merged, config, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
