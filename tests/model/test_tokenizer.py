"""The real Qwen2.5 tokenizer (from ../shared/data) renders ChatML exactly as transformers does."""
import pytest

from ssb_jax.model.tokenizer import encode_chat, load_tokenizer, render_chat, stop_token_ids
from ssb_jax.paths import shared_data_path


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return load_tokenizer(shared_data_path("qwen2.5_tokenizer"))


def test_chatml_rendering(qwen_tokenizer):
    # The exact string the Qwen2.5-Instruct template gives for one user turn (default system prompt).
    expected = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(qwen_tokenizer, "Q") == expected
    custom = render_chat(qwen_tokenizer, "What is 2+2?", system_prompt="Be brief.")
    assert custom == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_encoding_matches_transformers_template(qwen_tokenizer):
    messages = [{"role": "system", "content": "Tutor."}, {"role": "user", "content": "Solve $x^2=4$."}]
    ids = encode_chat(qwen_tokenizer, messages)
    reference = qwen_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(reference, dict) or hasattr(reference, "keys"):
        reference = reference["input_ids"]
    assert ids == list(reference)
    im_start, im_end = qwen_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (im_start, im_end) == (151644, 151645)
    assert ids[0] == im_start and ids.count(im_end) == 2


def test_stop_ids(qwen_tokenizer):
    assert stop_token_ids(qwen_tokenizer) == [151643, 151645]
