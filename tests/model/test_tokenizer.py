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


# --- the chat template is rendered once at load ---------------------------------------------------------

def _tokenizer_dir(tmp_path, template=None, config_template=None):
    """A copy of the Qwen2.5 tokenizer files in tmp_path, with a chat_template.jinja of its own and/or another
    template inside tokenizer_config.json."""
    import json
    import shutil
    directory = tmp_path / "tokenizer"
    shutil.copytree(shared_data_path("qwen2.5_tokenizer"), directory)
    if template is not None:
        (directory / "chat_template.jinja").write_text(template)
    if config_template is not None:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["chat_template"] = config_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("template, error", [
    ("{% for m in messages %}{{ m.content }\n", r"TemplateSyntaxError at line 1"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", r"SecurityError: .*__class__"),
    ("{{ messages | no_such_filter }}", r"TemplateAssertionError at line 1: No filter named 'no_such_filter'"),
])
def test_a_broken_or_hostile_template_file_stops_the_load_in_one_line(tmp_path, template, error):
    directory = _tokenizer_dir(tmp_path, template=template)
    with pytest.raises(ValueError) as refused:
        load_tokenizer(directory)
    message = str(refused.value)
    assert message.startswith(f"{directory / 'chat_template.jinja'}: the chat template cannot be rendered (")
    assert "\n" not in message and __import__("re").search(error, message), message


def test_a_broken_template_inside_tokenizer_config_names_that_file(tmp_path):
    directory = _tokenizer_dir(tmp_path, config_template="{% if messages %}{{ messages[0].content }}")
    with pytest.raises(ValueError, match=rf"^{directory / 'tokenizer_config.json'} \(its chat_template\): the chat "
                                         r"template cannot be rendered \(TemplateSyntaxError"):
        load_tokenizer(directory)


def test_a_template_that_refuses_system_turns_on_purpose_loads(tmp_path):
    template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                "{{ m.content }}{% endfor %}")
    tokenizer = load_tokenizer(_tokenizer_dir(tmp_path, template=template))
    assert render_chat(tokenizer, "Q") == "Q"


def test_the_run_stops_on_a_broken_template_before_the_weights_load(tmp_path, monkeypatch):
    """RunContext.load_base loads (and so renders) the tokenizer before any model work."""
    from types import SimpleNamespace

    import ssb_jax
    from ssb_jax.pipeline.context import RunContext

    def no_model_work(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer was checked")
    monkeypatch.setattr(ssb_jax, "load_model", no_model_work)
    directory = _tokenizer_dir(tmp_path, template="{{ messages[0].content")
    model = SimpleNamespace(path=str(shared_data_path("qwen2.5_configs") / "Qwen2.5-0.5B-Instruct"),
                            tokenizer=str(directory), dtype="float32")
    ctx = SimpleNamespace(config=SimpleNamespace(model=model, sampler=None))
    with pytest.raises(ValueError, match=r"chat_template.jinja: the chat template cannot be rendered"):
        RunContext.load_base(ctx)
