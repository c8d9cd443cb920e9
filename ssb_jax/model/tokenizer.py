"""Tokenizer loading and chat rendering, through transformers.AutoTokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

Message = dict  # {"role": ..., "content": ...}
Chat = Union[str, Sequence[Message]]


def load_tokenizer(path_or_id: str | Path):
    """AutoTokenizer from a local directory or a hub id (the hub only when the path does not exist)."""
    from transformers import AutoTokenizer
    path = Path(path_or_id).expanduser()
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else str(path_or_id))
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path_or_id!r}: {e}") from e


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


def stop_token_ids(tokenizer, extra: Sequence[str] = ("<|im_end|>", "<|endoftext|>")) -> list[int]:
    """EOS plus the ChatML end-of-turn tokens that exist in this vocabulary."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in extra if t in vocab]
    return sorted(set(ids))
