"""Stage fingerprints: outputs made from other settings or inputs are never silently reused or redone."""
import json
import shutil

import numpy as np
import pytest

from ssb_jax import fingerprint as fp
from ssb_jax.paths import shared_data_path


def test_first_run_records_and_same_settings_pass(tmp_path):
    stage = tmp_path / "train"
    fp.check(stage, "train", {"settings": {"learning_rate": 2e-4}})
    assert fp.read(stage) == {"settings": {"learning_rate": 2e-4}}
    (stage / "DONE.json").write_text("{}")
    fp.check(stage, "train", {"settings": {"learning_rate": 2e-4}})  # unchanged: reuse
    assert (stage / "DONE.json").exists()


def test_changed_setting_is_named_with_both_values_and_the_ways_on(tmp_path):
    stage = tmp_path / "train"
    fp.check(stage, "train", {"settings": {"learning_rate": 2e-4, "lora_rank": 32}, "base": "a"})
    (stage / "DONE.json").write_text("{}")
    with pytest.raises(fp.StaleOutputsError) as error:
        fp.check(stage, "train", {"settings": {"learning_rate": 1e-3, "lora_rank": 32}, "base": "a"})
    message = str(error.value)
    assert "settings.learning_rate: 0.0002 -> 0.001" in message
    assert "lora_rank" not in message
    assert "--config.workdir" in message and "--config.overwrite=train" in message
    assert "\n" not in message
    assert (stage / "DONE.json").exists()  # nothing deleted without being asked


def test_overwrite_deletes_stale_outputs_and_records_the_new_fingerprint(tmp_path):
    stage = tmp_path / "curate"
    fp.check(stage, "curate", {"data": "x"})
    (stage / "records.jsonl").write_text('{"id": 1}\n')
    fp.check(stage, "curate", {"data": "y"}, overwrite=True)
    assert not (stage / "records.jsonl").exists()
    assert fp.read(stage) == {"data": "y"}


def test_outputs_without_a_fingerprint_are_not_trusted(tmp_path):
    stage = tmp_path / "train"
    stage.mkdir()
    (stage / "DONE.json").write_text("{}")
    with pytest.raises(fp.StaleOutputsError, match="no fingerprint"):
        fp.check(stage, "train", {"a": 1})


def test_compare_only_never_writes(tmp_path):
    stage = tmp_path / "eval"
    fp.check(stage, "eval", {"a": 1}, write=False)
    assert not stage.exists()


def test_dataset_identity_follows_content_not_name_or_place(tmp_path):
    first, second = tmp_path / "a" / "test.jsonl", tmp_path / "b" / "test.jsonl"
    first.parent.mkdir()
    second.parent.mkdir()
    first.write_text('{"question": "1+1", "answer": "2"}\n')
    second.write_text('{"question": "1+2", "answer": "3"}\n')
    assert fp.dataset_identity(str(first)) != fp.dataset_identity(str(second))  # same stem, other questions
    moved = tmp_path / "moved.jsonl"
    shutil.copy(first, moved)
    assert fp.dataset_identity(str(moved)) == fp.dataset_identity(str(first))


def _fake_model(directory, values):
    from safetensors.numpy import save_file
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"hidden_size": 8}))
    save_file({"w": values}, str(directory / "model.safetensors"))


def test_model_identity_sees_a_weight_change_in_the_middle_but_not_a_copy(tmp_path, rng):
    values = rng.standard_normal(3 * 2**20 // 4).astype(np.float32)  # 3 MiB of data
    _fake_model(tmp_path / "m", values)
    identity = fp.model_identity(str(tmp_path / "m"))
    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    assert fp.model_identity(str(tmp_path / "copy")) == identity
    changed = values.copy()
    changed[len(values) // 2] += 1.0  # inside the sample that starts half way through the file
    _fake_model(tmp_path / "other", changed)
    assert fp.model_identity(str(tmp_path / "other")) != identity
    assert fp.model_identity("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"


def test_a_half_written_fingerprint_is_not_an_output(tmp_path):
    """Another process may compare while the main one writes FINGERPRINT.json through a hidden temp file."""
    stage = tmp_path / "curate"
    stage.mkdir()
    (stage / ".FINGERPRINT.json.1234.tmp").write_text("{")
    fp.check(stage, "curate", {"a": 1}, write=False)  # nothing made yet: no error
    (stage / "records.jsonl").write_text("{}\n")
    with pytest.raises(fp.StaleOutputsError):
        fp.check(stage, "curate", {"a": 1}, write=False)


def test_fingerprints_of_several_outputs_in_one_directory(tmp_path):
    """Evaluation's use: one fingerprint file per outputs file, some keys recorded but not compared."""
    folder = tmp_path / "outputs"
    options = dict(outputs=["a.jsonl"], file_name="a.settings.json", unchecked=["model"])
    fp.check(folder, "eval", {"grader": "x", "model": "m1"}, **options)
    assert fp.read(folder, "a.settings.json") == {"grader": "x", "model": "m1"}
    (folder / "a.jsonl").write_text("{}\n")
    (folder / "b.jsonl").write_text("{}\n")  # another file's outputs
    fp.check(folder, "eval", {"grader": "x", "model": None}, **options)  # unchecked: the outputs stand
    assert fp.read(folder, "a.settings.json")["model"] == "m1"  # and so does their record
    with pytest.raises(fp.StaleOutputsError, match=r"the outputs \S*/outputs/a.jsonl were made .*grader: 'x' -> 'y'"):
        fp.check(folder, "eval", {"grader": "y", "model": "m1"}, **options)
    fp.check(folder, "eval", {"grader": "y", "model": "m1"}, overwrite=True, **options)
    assert not (folder / "a.jsonl").exists() and (folder / "b.jsonl").exists()  # only the named outputs go
    assert fp.read(folder, "a.settings.json")["grader"] == "y"


def test_missing_or_unreadable_fingerprint_files_are_named(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "a.jsonl").write_text("{}\n")
    options = dict(outputs=["a.jsonl"], file_name="a.settings.json")
    with pytest.raises(fp.StaleOutputsError, match="no fingerprint: a.settings.json is missing"):
        fp.check(folder, "eval", {"grader": "x"}, **options)
    (folder / "a.settings.json").write_text("{")
    with pytest.raises(fp.StaleOutputsError, match="unreadable a.settings.json"):
        fp.check(folder, "eval", {"grader": "x"}, **options)


@pytest.mark.parametrize("edit", ["chat_template.jinja", "template in tokenizer_config.json", "generation_config.json",
                                  "merges.txt", "config.json"])
def test_model_identity_covers_what_the_model_sees_or_says(tmp_path, rng, edit):
    """Weights, config, tokenizer files, the chat template (a file of its own or inside tokenizer_config.json)
    and the generation config each change the identity; the model card does not."""
    model = tmp_path / "m"
    _fake_model(model, rng.standard_normal(64).astype(np.float32))
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(shared_data_path("qwen2.5_tokenizer") / name, model / name)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    identity = fp.model_identity(str(model))
    (model / "README.md").write_text("a model card")
    assert fp.model_identity(str(model)) == identity
    if edit == "template in tokenizer_config.json":
        tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = tokenizer_config["chat_template"].replace("You are", "You were")
        (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    else:
        with open(model / edit, "a") as handle:
            handle.write(" ")
    assert fp.model_identity(str(model)) != identity


def test_editing_the_chat_template_invalidates_finished_stages(tmp_path, rng):
    """A finished stage fingerprinted with RunContext.base_identity stops as stale after the model's
    chat_template.jinja changes (and after a separate model.tokenizer directory's template changes)."""
    from types import SimpleNamespace

    from ssb_jax.pipeline.context import RunContext
    model, tokenizer = tmp_path / "model", tmp_path / "tokenizer"
    _fake_model(model, rng.standard_normal(64).astype(np.float32))
    tokenizer.mkdir()
    for directory in (model, tokenizer):
        (directory / "chat_template.jinja").write_text("{{ messages[0].content }}")

    def stage_fingerprint(tokenizer_setting=""):
        settings = SimpleNamespace(path=str(model), tokenizer=tokenizer_setting, dtype="float32", attention_impl="auto")
        ctx = SimpleNamespace(config=SimpleNamespace(model=settings), _model_identity=None)
        return {"base": RunContext.base_identity(ctx, 1)}

    for tokenizer_setting, edited in (("", model), (str(tokenizer), tokenizer)):
        stage = tmp_path / f"curate-{edited.name}"
        fp.check(stage, "curate", stage_fingerprint(tokenizer_setting))
        (stage / "records.jsonl").write_text("{}\n")
        fp.check(stage, "curate", stage_fingerprint(tokenizer_setting))  # unchanged: reused
        (edited / "chat_template.jinja").write_text("{{ messages[-1].content }}")
        with pytest.raises(fp.StaleOutputsError, match=r"curate: .*base\.model"):
            fp.check(stage, "curate", stage_fingerprint(tokenizer_setting))
