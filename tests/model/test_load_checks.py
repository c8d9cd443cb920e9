"""Broken checkpoints stop at load with one line naming the file and tensor (ssb_jax/model/weights.py):
non-finite values (sampled by default, every value on request), integer (quantized) weights, and a
tokenizer whose ids reach past the embedding's rows."""
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ssb_jax.model import weights
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.weights import CheckpointError, check_vocabulary, load_params
from ssb_jax.paths import shared_data_path

DOWN = "model.layers.1.mlp.down_proj.weight"  # stored [hidden, intermediate], loaded transposed


def _edited(tiny_checkpoint, directory, edit):
    """A copy of the tiny checkpoint whose tensors `edit` (a dict of numpy arrays) changed in place."""
    shutil.copytree(tiny_checkpoint, directory)
    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    return directory, file


def test_a_tensor_of_nans_is_named_with_its_file(tiny_checkpoint, tmp_path):
    def poison(tensors):
        tensors[DOWN] = np.full_like(tensors[DOWN], np.nan)
    directory, file = _edited(tiny_checkpoint, tmp_path / "nan", poison)
    with pytest.raises(CheckpointError) as error:
        load_params(directory)
    message = str(error.value)
    assert message.startswith(f"{file}: tensor '{DOWN}' holds a non-finite value at (0, 0) (stored as nan)")
    assert "\n" not in message
    load_params(directory, finite_check="off")  # asked not to look, it loads


def test_one_infinity_is_found_by_the_full_check_where_samples_miss_it(tiny_checkpoint, tmp_path, monkeypatch,
                                                                       rng):
    monkeypatch.setattr(weights, "FINITE_SAMPLES", 16)  # a stride of hundreds on this tiny model's matrices
    row, column = 5, 1 + int(rng.integers(0, 30))  # (5, c) in the stored [64, 96] layout: never a multiple of the stride

    def poison(tensors):
        tensors[DOWN][row, column] = np.inf
    directory, file = _edited(tiny_checkpoint, tmp_path / "inf", poison)
    load_params(directory)  # the samples miss it
    with pytest.raises(CheckpointError, match=rf"{DOWN}' holds a non-finite value at \({row}, {column}\) \(stored as inf\)"):
        load_params(directory, finite_check="full")


def test_a_value_that_overflows_the_models_dtype(tiny_checkpoint, tmp_path):
    def widen(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
        tensors["model.norm.weight"][3] = 1e300
    directory, _ = _edited(tiny_checkpoint, tmp_path / "f64", widen)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' holds a non-finite value at \(3,\) "
                                              r"\(1e\+300 overflows the model's dtype float32\)"):
        load_params(directory)


def test_integer_weights_are_refused(tiny_checkpoint, tmp_path):
    def quantize(tensors):
        tensors[DOWN] = np.clip(np.round(tensors[DOWN] * 100), -127, 127).astype(np.int8)
    directory, file = _edited(tiny_checkpoint, tmp_path / "int8", quantize)
    with pytest.raises(CheckpointError, match=rf"^{file}: tensor '{DOWN}' is stored as I8, not floating point"):
        load_params(directory)


def test_unknown_finite_check_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="finite_check='some'; expected one of sample, full, off"):
        load_params(tiny_checkpoint, finite_check="some")


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(tiny_checkpoint):
    from ssb_jax.model.tokenizer import load_tokenizer
    config = ModelConfig.from_json(tiny_checkpoint / "config.json")  # 97 rows
    tokenizer_dir = shared_data_path("qwen2.5_tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    with pytest.raises(CheckpointError, match=rf"^{tokenizer_dir}: the tokenizer has ids up to 1516\d\d, but "
                                              rf"model.embed_tokens.weight in .* has 97 rows"):
        check_vocabulary(tokenizer, config, tiny_checkpoint, tokenizer_dir)
    wide = config.replace(vocab_size=151936)  # Qwen2.5's padded embedding holds every id
    check_vocabulary(tokenizer, wide, tiny_checkpoint, tokenizer_dir)
