"""Exports of a trained student: a PEFT LoRA adapter, and the merged model as HF safetensors.

The merged directory loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` (and so vLLM
can serve it); the adapter with `peft.AutoPeftModelForCausalLM.from_pretrained(dir)` from any working
directory (a local base is recorded by its absolute path). Both carry the tokenizer, and the stock
`AutoTokenizer` on either gives the ids ssb_jax trained with (checked on export; a mismatch is logged).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.numpy import save_file

from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, lora_to_peft, merge_lora, peft_adapter_config
from ssb_jax.model.weights import save_params

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Tokenized on export by the tokenizer in use and by a stock AutoTokenizer on the written files.
PROBE_CHAT = [{"role": "system", "content": "You are a helpful math tutor. Put the final answer in \\boxed{}."},
              {"role": "user", "content": "Ana has 17 apples. She buys 3 bags with 12 apples each; then?  \n\t café 🙂"}]


def base_model_reference(name_or_path: str | Path) -> str:
    """How an adapter names its base: an existing local directory by its absolute path (so the adapter
    loads from any working directory), anything else (a hub id) as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if str(name_or_path) and path.is_dir() else str(name_or_path)


def export_peft_adapter(lora_state, lora_config: LoraConfig, out_dir: str | Path, base_model_name_or_path: str = "",
                        *, tokenizer=None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(lora_to_peft(lora_state), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    adapter_config = peft_adapter_config(lora_config, base_model_reference(base_model_name_or_path))
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    if tokenizer is not None:
        write_tokenizer(tokenizer, out_dir)
    return out_dir


def export_merged_model(model, lora_state, lora_config: LoraConfig | None, model_config: ModelConfig,
                        out_dir: str | Path, *, tokenizer=None, dtype: str | None = None) -> Path:
    """Fold the adapters (if any) into the model and save config.json + safetensors (+ the tokenizer files)."""
    merged = merge_lora(model, lora_state, lora_config) if lora_state is not None else model
    config = model_config if dtype is None else model_config.replace(dtype=dtype)
    if dtype is not None:  # save_params casts nothing: cast the state, keep the graph
        import jax
        from flax import nnx
        graphdef, state = nnx.split(merged)
        merged = nnx.merge(graphdef, jax.tree_util.tree_map(lambda x: x.astype(config.jnp_dtype), state))
    out_dir = save_params(merged, config, out_dir)
    if tokenizer is not None:
        write_tokenizer(tokenizer, out_dir)
    return Path(out_dir)


def write_tokenizer(tokenizer, out_dir: Path) -> None:
    """Write the tokenizer files and warn when stock AutoTokenizer would tokenize differently from them."""
    tokenizer.save_pretrained(str(out_dir))
    mismatch = stock_tokenizer_mismatch(tokenizer, out_dir)
    if mismatch:
        log.warning("%s: %s", out_dir / "tokenizer_config.json", mismatch)


def stock_tokenizer_mismatch(tokenizer, directory: str | Path) -> str | None:
    """None when `transformers.AutoTokenizer.from_pretrained(directory)` encodes PROBE_CHAT (rendered by
    the chat template, and as plain text) to the same ids as `tokenizer`; else what differs."""
    from transformers import AutoTokenizer
    from ssb_jax.model.tokenizer import encode_chat
    stock = AutoTokenizer.from_pretrained(str(directory))
    text = "\n".join(m["content"] for m in PROBE_CHAT)
    for what, ours, theirs in (("chat prompt", encode_chat(tokenizer, PROBE_CHAT), encode_chat(stock, PROBE_CHAT)),
                               ("text", tokenizer.encode(text, add_special_tokens=False),
                                stock.encode(text, add_special_tokens=False))):
        if ours != theirs:
            return (f"stock AutoTokenizer loads {type(stock).__name__}, which encodes a {what} to {len(theirs)} "
                    f"ids where the tokenizer in use gives {len(ours)}; stock tools will tokenize differently "
                    "(a tokenizer for a Qwen2 model must split text as transformers' Qwen2Tokenizer does)")
    return None
