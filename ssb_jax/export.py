"""Exports of a trained student: a PEFT LoRA adapter, and the merged model as HF safetensors.

The merged directory loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` (and so vLLM
can serve it); the adapter with `peft.AutoPeftModelForCausalLM.from_pretrained(dir)` from any working
directory (a local base is recorded by its absolute path). Both carry the tokenizer, and the stock
`AutoTokenizer` on either gives the ids ssb_jax trained with (checked on export; a mismatch is logged).

An export also carries what it was trained with (`ExportInfo`): the tokenizer's chat template renders the
training system prompt when a chat has no system message, `generation_config.json` holds the sampling
settings, `ssb_prompts.json` the prompts (`load_prompts`), and `README.md` is a model card (base, method,
data, prompt, settings, evaluation). Every exported file is world-readable (0644, directories 0755).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from safetensors.numpy import save_file

from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, lora_to_peft, merge_lora, peft_adapter_config
from ssb_jax.model.weights import save_params
from ssb_jax.prompts import DEFAULT_PROMPTS, NO_SYSTEM_MESSAGE, PromptSet

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GENERATION_CONFIG = "generation_config.json"
PROMPTS_FILE = "ssb_prompts.json"
MODEL_CARD = "README.md"
FILE_MODE, DIRECTORY_MODE = 0o644, 0o755  # exports are for others to read (safetensors writes 0600)
# Tokenized on export by the tokenizer in use and by a stock AutoTokenizer on the written files.
PROBE_CHAT = [{"role": "system", "content": "You are a helpful math tutor. Put the final answer in \\boxed{}."},
              {"role": "user", "content": "Ana has 17 apples. She buys 3 bags with 12 apples each; then?  \n\t café 🙂"}]


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What an export carries besides weights and tokenizer: the prompts it was trained with, the sampling
    settings for `generation_config.json` (transformers' field names), and the model card's sections
    (title -> markdown; empty ones are left out) under `model` (the card's title names it)."""
    prompts: PromptSet = DEFAULT_PROMPTS
    generation: dict = dataclasses.field(default_factory=dict)
    card: dict = dataclasses.field(default_factory=dict)
    model: str = "SSB student"


def generation_settings(temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                        stop_ids, pad_id: int | None) -> dict:
    """transformers' generation settings for sampling as ssb_jax samples (no repetition penalty; top_k 0:
    off, where transformers' default would be 50); temperature 0 is greedy."""
    stop_ids = [int(i) for i in stop_ids]
    settings = {"do_sample": temperature > 0, "top_k": int(top_k), "top_p": float(top_p), "repetition_penalty": 1.0,
                "max_new_tokens": int(max_new_tokens), "eos_token_id": stop_ids,
                "pad_token_id": stop_ids[0] if pad_id is None else int(pad_id)}
    if temperature > 0:
        settings["temperature"] = float(temperature)
    return settings


def load_prompts(path: str | Path) -> PromptSet:
    """The prompts a model was trained with, from an export directory (its ssb_prompts.json) or a run
    directory (its config.json), for `Sampler.generate([prompts.student_messages(question)], ...)`."""
    path = Path(path)
    if (path / PROMPTS_FILE).is_file():
        return PromptSet(**json.loads((path / PROMPTS_FILE).read_text()))
    config = path / "config.json"
    if config.is_file() and "prompts" in (run := json.loads(config.read_text())):
        overrides = {k: v for k, v in run["prompts"].items() if v}
        return dataclasses.replace(DEFAULT_PROMPTS, **overrides)
    raise ValueError(f"{path}: neither an export ({PROMPTS_FILE}) nor a run directory (config.json with prompts)")


def with_default_system_prompt(template: str, system_prompt: str) -> str:
    """The chat template with `system_prompt` as the system message of a chat that has none (so stock
    `apply_chat_template` on a bare question renders what the model was trained on)."""
    if system_prompt == NO_SYSTEM_MESSAGE:
        return template
    # a Jinja string literal: the lexer decodes Python escapes, so escape everything but printable ASCII
    literal = "'" + system_prompt.encode("unicode-escape").decode("ascii").replace("'", "\\'") + "'"
    return ("{%- if not messages or messages[0]['role'] != 'system' %}\n"
            f"    {{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}\n"
            "{%- endif %}\n" + template)


def model_card(title: str, sections: dict, *, base: str = "", library: str = "transformers") -> str:
    """README.md for an export: Hugging Face metadata, then each non-empty section."""
    meta = ["---", f"library_name: {library}", "tags:", "- ssb_jax", "- semantic-soft-bootstrapping"]
    if base and not Path(base).is_absolute():  # a hub id; a local path means nothing elsewhere
        meta.append(f"base_model: {base}")
    body = [f"# {title}", ""] + [f"## {name}\n\n{text.strip()}\n" for name, text in sections.items() if text]
    return "\n".join(meta + ["---", ""] + body)


def write_info(out_dir: Path, info: ExportInfo | None, tokenizer, form: str, base: str = "",
               library: str = "transformers") -> None:
    """The tokenizer (with the training system prompt as its default), generation config, prompts and card
    (titled "<info.model> (<form>)")."""
    prompts = info.prompts if info else DEFAULT_PROMPTS
    if tokenizer is not None:
        write_tokenizer(tokenizer, out_dir, system_prompt=prompts.system_prompt if info else NO_SYSTEM_MESSAGE)
    if info is None:
        return
    (out_dir / PROMPTS_FILE).write_text(json.dumps(dataclasses.asdict(prompts), indent=2))
    if info.generation:
        (out_dir / GENERATION_CONFIG).write_text(json.dumps(info.generation, indent=2))
    (out_dir / MODEL_CARD).write_text(model_card(f"{info.model} ({form})", info.card, base=base, library=library))


def make_world_readable(directory: Path) -> None:
    """0644 files and 0755 directories under `directory` (itself included)."""
    directory.chmod(DIRECTORY_MODE)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), DIRECTORY_MODE)
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE)


def base_model_reference(name_or_path: str | Path) -> str:
    """How an adapter names its base: an existing local directory by its absolute path (so the adapter
    loads from any working directory), anything else (a hub id) as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if str(name_or_path) and path.is_dir() else str(name_or_path)


def export_peft_adapter(lora_state, lora_config: LoraConfig, out_dir: str | Path, base_model_name_or_path: str = "",
                        *, tokenizer=None, info: ExportInfo | None = None) -> Path:
    """Write the adapters as a PEFT LoRA directory (adapter_config.json naming the base, safetensors), with
    the tokenizer and, given `info`, the prompts, generation config and model card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(lora_to_peft(lora_state), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    base = base_model_reference(base_model_name_or_path)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(lora_config, base), indent=2))
    write_info(out_dir, info, tokenizer, "PEFT LoRA adapter", base, library="peft")
    make_world_readable(out_dir)
    return out_dir


def export_merged_model(model, lora_state, lora_config: LoraConfig | None, model_config: ModelConfig,
                        out_dir: str | Path, *, tokenizer=None, dtype: str | None = None,
                        info: ExportInfo | None = None) -> Path:
    """Fold the adapters (if any) into the model and save config.json + safetensors (+ the tokenizer files,
    and given `info` the prompts, generation config and model card)."""
    merged = merge_lora(model, lora_state, lora_config) if lora_state is not None else model
    config = model_config if dtype is None else model_config.replace(dtype=dtype)
    if dtype is not None:  # save_params casts nothing: cast the state, keep the graph
        import jax
        from flax import nnx
        graphdef, state = nnx.split(merged)
        merged = nnx.merge(graphdef, jax.tree_util.tree_map(lambda x: x.astype(config.jnp_dtype), state))
    out_dir = Path(save_params(merged, config, out_dir))
    write_info(out_dir, info, tokenizer, "merged model")
    make_world_readable(out_dir)
    return out_dir


def write_tokenizer(tokenizer, out_dir: Path, system_prompt: str = NO_SYSTEM_MESSAGE) -> None:
    """Write the tokenizer files, the chat template defaulting to `system_prompt`; warn when stock
    AutoTokenizer would tokenize differently from the tokenizer in use."""
    template = tokenizer.chat_template
    if isinstance(template, str) and system_prompt != NO_SYSTEM_MESSAGE:
        tokenizer.chat_template = with_default_system_prompt(template, system_prompt)
    try:
        tokenizer.save_pretrained(str(out_dir))
    finally:
        tokenizer.chat_template = template  # the run's tokenizer is left as it was
    mismatch = stock_tokenizer_mismatch(tokenizer, out_dir, system_prompt)
    if mismatch:
        log.warning("%s: %s", out_dir / "tokenizer_config.json", mismatch)


def stock_tokenizer_mismatch(tokenizer, directory: str | Path, system_prompt: str = NO_SYSTEM_MESSAGE) -> str | None:
    """None when `transformers.AutoTokenizer.from_pretrained(directory)` encodes PROBE_CHAT (rendered by
    the chat template, and as plain text) to the same ids as `tokenizer`, and its template renders a chat
    without a system message as ours does with `system_prompt`; else what differs."""
    from transformers import AutoTokenizer
    from ssb_jax.model.tokenizer import encode_chat
    stock = AutoTokenizer.from_pretrained(str(directory))
    text = "\n".join(m["content"] for m in PROBE_CHAT)
    question = PROBE_CHAT[-1]["content"]
    default = None if system_prompt == NO_SYSTEM_MESSAGE else system_prompt
    for what, ours, theirs in (("chat prompt", encode_chat(tokenizer, PROBE_CHAT), encode_chat(stock, PROBE_CHAT)),
                               ("chat without a system message", encode_chat(tokenizer, question, system_prompt=default),
                                encode_chat(stock, question)),
                               ("text", tokenizer.encode(text, add_special_tokens=False),
                                stock.encode(text, add_special_tokens=False))):
        if ours != theirs:
            why = ("the exported chat template does not supply the training system prompt" if "system" in what else
                   "a tokenizer for a Qwen2 model must split text as transformers' Qwen2Tokenizer does")
            return (f"stock AutoTokenizer loads {type(stock).__name__}, which encodes a {what} to {len(theirs)} "
                    f"ids where the tokenizer in use gives {len(ours)}; stock tools will tokenize differently ({why})")
    return None
