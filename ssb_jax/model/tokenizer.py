"""Tokenizer loading, chat rendering and the reference code's plain student input, through
transformers.AutoTokenizer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

Message = dict  # {"role": ..., "content": ...}
Chat = Union[str, Sequence[Message]]


_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path_or_id: str | Path):
    """AutoTokenizer from a local directory or a hub id (the hub only when the path does not exist).

    transformers 5 picks the tokenizer class from config.json's model_type when the directory holds a
    model too, even when tokenizer_config.json declares a generic tokenizer.json-backed class; the
    Qwen2 class then swaps in its own normalizer and pre-tokenizer and the ids change. Such a directory
    (a toy world built before its tokenizer became a Qwen2Tokenizer) still loads its declared class, so
    a model keeps the ids it was trained with, with a warning: stock tools on it tokenize differently.
    """
    import json
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    path = Path(path_or_id).expanduser()
    source = str(path) if path.exists() else str(path_or_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        config_file = path / "tokenizer_config.json"
        if config_file.exists() and (path / "tokenizer.json").exists():
            declared = json.loads(config_file.read_text()).get("tokenizer_class")
            if declared in _GENERIC_CLASSES and type(tokenizer).__name__ not in _GENERIC_CLASSES:
                logging.getLogger(__name__).warning(
                    "%s: tokenizer_class %s, but stock transformers loads this directory as %s, which may split text "
                    "differently, so exports may tokenize differently in stock tools; rebuild the tokenizer (for the "
                    "toy world: a fresh world directory)", config_file, declared, type(tokenizer).__name__)
                tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path_or_id!r}: {e}") from e
    check_chat_template(tokenizer, template_source(path) if path.exists() else str(path_or_id))
    return tokenizer


def template_source(directory: Path) -> str:
    """Where a tokenizer directory's chat template is read from (transformers prefers a file of its own)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (directory / name).exists():
            return str(directory / name)
    return f"{directory / 'tokenizer_config.json'} (its chat_template)"


def check_chat_template(tokenizer, where: str) -> None:
    """Render the chat template once, as a run will (a system and a user turn, the assistant's turn
    opened), so a broken or hostile template stops the load with one line naming `where` instead of a
    traceback at the first prompt after the model has loaded: a Jinja syntax error, an operation the
    sandbox refuses, an undefined name. A template that refuses a system turn on purpose (its own
    `raise_exception`) passes if it renders a lone user turn. No template: nothing to check."""
    if not getattr(tokenizer, "chat_template", None):
        return
    from jinja2 import TemplateError
    try:
        try:
            render_chat(tokenizer, "2 + 2?", system_prompt="You are a tutor.")
        except TemplateError as refusal:
            if type(refusal) is not TemplateError:  # raise_exception raises the base class itself
                raise
            render_chat(tokenizer, "2 + 2?")
    except Exception as error:  # one line, whatever Jinja or transformers raised
        line = getattr(error, "lineno", None)
        detail = " ".join(str(getattr(error, "message", None) or error).split())
        raise ValueError(f"{where}: the chat template cannot be rendered ({type(error).__name__}"
                         f"{f' at line {line}' if line else ''}: {detail}); fix it or use another tokenizer "
                         "(config.model.tokenizer)") from None


def as_messages(chat: Chat, system_prompt: str | None = None) -> list[Message]:
    """A plain string becomes one user turn (after the system prompt, if given)."""
    if isinstance(chat, str):
        messages = [{"role": "user", "content": chat}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    return [dict(m) for m in chat]


def render_chat(tokenizer, chat: Chat, *, add_generation_prompt: bool = True,
                system_prompt: str | None = None) -> str:
    """The prompt text exactly as the model's chat template renders it."""
    return tokenizer.apply_chat_template(as_messages(chat, system_prompt), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, chat: Chat, **kwargs) -> list[int]:
    """Token ids of the rendered prompt (the template already holds the special tokens)."""
    return tokenizer.encode(render_chat(tokenizer, chat, **kwargs), add_special_tokens=False)


def plain_text(chat: Chat) -> str:
    """The SSB reference code's student input: the system and user contents joined by one space, with
    no chat template (no role markers, no assistant turn opened), outer whitespace stripped."""
    messages = as_messages(chat)
    parts = [m["content"] for m in messages if m["role"] == "system"]
    parts += [m["content"] for m in messages if m["role"] == "user"]
    return " ".join(parts).strip()


def encode_plain(tokenizer, chat: Chat) -> list[int]:
    """Token ids of `plain_text(chat)`, with the tokenizer's own special tokens (Qwen2 adds none), as
    the reference tokenizes its student prompt; the solution then follows directly."""
    return tokenizer.encode(plain_text(chat))


def stop_token_ids(tokenizer, extra: Sequence[str] = ("<|im_end|>", "<|endoftext|>")) -> list[int]:
    """EOS plus the ChatML end-of-turn tokens that exist in this vocabulary."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in extra if t in vocab]
    return sorted(set(ids))
