"""The toy world's tokenizer: a byte-level BPE trained on the world's own conversations, with ChatML.

Digits are always single tokens (so arithmetic is learnable); the long fixed prompt texts and the
world's frequent phrases are added tokens, so sequences stay short enough to pre-train on a CPU. It
is a transformers Qwen2Tokenizer (so stock tools load the same ids), saved as a Hugging Face
tokenizer directory.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
from ssb_jax.toyworld.problems import Problem

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5's ChatML template, less its tool-calling branches and default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, prompts: PromptSet = DEFAULT_PROMPTS):
    """A Qwen2Tokenizer with its own BPE and phrases: byte-level (any text round-trips), every digit a token.

    It is transformers' Qwen2Tokenizer because that is what stock `AutoTokenizer` builds for any
    directory whose config.json says model_type "qwen2", whatever tokenizer.json holds (its own
    normalizer, and a pre-tokenizer that isolates each digit and never lets a merge cross a word): a
    tokenizer that split text otherwise would give other ids once exported. Sequences stay short
    enough to pre-train on a CPU in minutes through added tokens, which match before that split: the
    long fixed prompt texts (system prompt, hinted template) whole, and the world's frequent phrases
    (" more apples. She finds ", " = "), learnt by a BPE whose merges may cross words but never digits.
    Each BPE has at most vocab_size tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    qwen2 = Qwen2Tokenizer().backend_tokenizer  # the normalizer and pre-tokenizer stock tools will use

    def train_bpe(pre_tokenizer, pieces):
        bpe = Tokenizer(models.BPE())
        bpe.normalizer, bpe.pre_tokenizer = qwen2.normalizer, pre_tokenizer
        bpe.train_from_iterator(pieces, trainer=trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False, max_token_length=24,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return json.loads(bpe.to_str())["model"]

    def split_on(separators, strings):  # the pieces between separators, as added tokens leave them
        pattern = re.compile("|".join(map(re.escape, sorted(separators, key=len, reverse=True))))
        return [piece for text in strings for piece in pattern.split(text) if piece]

    fixed_texts = prompt_fixed_texts(prompts)
    pieces = split_on(SPECIAL_TOKENS + fixed_texts, texts)
    phrase_bpe = train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                           pieces)
    to_text = decoders.ByteLevel()
    phrases = [text for text in (to_text.decode([t]) for t in phrase_bpe["vocab"] if t not in SPECIAL_TOKENS)
               if len(qwen2.pre_tokenizer.pre_tokenize_str(text)) > 1]
    word_bpe = train_bpe(qwen2.pre_tokenizer, split_on(phrases, pieces))
    tokenizer = Qwen2Tokenizer(
        vocab=word_bpe["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                         for m in word_bpe["merges"]],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
        model_max_length=4096, clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in fixed_texts + tuple(phrases)])
    return tokenizer


def prompt_fixed_texts(prompts: PromptSet) -> tuple[str, ...]:
    """The system prompt and the hinted template's text between its fields, where more than one word."""
    hole = "\0"
    system, user = prompts.hinted_messages(hole, hole, hole)
    return tuple(dict.fromkeys(t for t in [system["content"], *user["content"].split(hole)] if len(t.split()) > 1))


def tokenizer_corpus(problems: Sequence[Problem], rng: random.Random, prompts: PromptSet) -> list[str]:
    """Rendered ChatML conversations (plain and hinted), so merges learn their words."""
    texts = []
    for p in problems:
        solution = p.solution()
        for messages in (prompts.student_messages(p.question()),
                         prompts.hinted_messages(p.question(), solution, p.wrong_solution(rng))):
            texts.append(render_chatml(messages + [{"role": "assistant", "content": solution}]))
    return texts


def render_chatml(messages: Sequence[dict]) -> str:
    """CHAT_TEMPLATE in Python (for building the tokenizer's corpus before the tokenizer exists)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def save_tokenizer(tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
