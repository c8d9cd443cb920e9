import dataclasses

import pytest

from ssb_jax.prompts import (
    DEFAULT_PROMPTS, HINTED_TEACHER_USER_TEMPLATE, TUTOR_SYSTEM_PROMPT, PromptSet,
    hinted_messages, tutor_messages)

QUESTION = r"Let $f(x) = \frac{x^{2}}{2}$ and $S = \{1, 2\}$. Find {f(2)}."
CORRECT = r"f(2) = 2, so \boxed{2}."
WRONG = r"f(2) = 4 / 4 = 1, so \boxed{1}."


def test_no_leading_indentation_in_prompt_lines():
    rendered = hinted_messages(QUESTION, CORRECT, WRONG)[1]["content"]
    for text in (TUTOR_SYSTEM_PROMPT, HINTED_TEACHER_USER_TEMPLATE, rendered):
        for line in text.splitlines():
            assert line == line.lstrip(), repr(line)
            assert line == line.rstrip(), repr(line)


def test_tutor_messages_shape():
    messages = tutor_messages(f"  {QUESTION}\n")
    assert messages == [
        {"role": "system", "content": TUTOR_SYSTEM_PROMPT},
        {"role": "user", "content": QUESTION},
    ]
    assert "\\boxed{}" in TUTOR_SYSTEM_PROMPT
    assert "step by step" in TUTOR_SYSTEM_PROMPT


def test_hinted_messages_substitutes_fields_and_keeps_braces():
    system, user = hinted_messages(QUESTION, CORRECT, WRONG)
    assert system == {"role": "system", "content": TUTOR_SYSTEM_PROMPT}
    assert user["role"] == "user"
    content = user["content"]
    for field in (QUESTION, CORRECT, WRONG):
        assert field in content  # braces and backslashes survive formatting verbatim
    assert "{question}" not in content and "{correct_response}" not in content
    assert content.index(QUESTION) < content.index(CORRECT) < content.index(WRONG)
    assert content.rstrip().endswith("\\boxed{}.")
    assert "Do not mention" in content and "avoids that mistake" in content
    assert "  " not in content.replace(QUESTION, "")  # line joins left no double spaces


def test_prompt_set_overrides():
    custom = PromptSet(system_prompt="SYS", student_template="Q: {question}")
    assert custom.student_messages("1+1?") == [
        {"role": "system", "content": "SYS"}, {"role": "user", "content": "Q: 1+1?"}]
    assert custom.hinted_messages("q", "a", "b")[0]["content"] == "SYS"
    assert DEFAULT_PROMPTS.hinted_messages(QUESTION, CORRECT, WRONG) == hinted_messages(
        QUESTION, CORRECT, WRONG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        custom.system_prompt = "other"


def test_plain_student_input_is_system_space_question_without_the_template():
    """The reference code's student input (train.student_format=plain): the system and user contents
    joined by one space, tokenized as plain text; the solution's ids follow with nothing between."""
    from ssb_jax.model.tokenizer import encode_chat, encode_plain, load_tokenizer, plain_text
    from ssb_jax.paths import shared_data_path
    tokenizer = load_tokenizer(shared_data_path("qwen2.5_tokenizer"))
    prompts = PromptSet(system_prompt="Solve it. Box the answer: \\boxed{}.", student_template="Q: {question}")
    messages = prompts.student_messages(f"  {QUESTION}\n")
    assert plain_text(messages) == "Solve it. Box the answer: \\boxed{}. Q: " + QUESTION
    ids = encode_plain(tokenizer, messages)
    assert tokenizer.decode(ids) == plain_text(messages)  # no special token added (Qwen2 has no BOS)
    assert ids == tokenizer.encode("Solve it. Box the answer: \\boxed{}. Q: " + QUESTION, add_special_tokens=False)
    chat = encode_chat(tokenizer, messages)
    assert len(ids) < len(chat) and "<|im_start|>" in tokenizer.decode(chat)
    # a string is one user turn, as for the chat form; an empty system prompt leaves no leading space
    assert plain_text("  1+1?") == "1+1?" and plain_text(tutor_messages("1+1?", system_prompt="")) == "1+1?"
