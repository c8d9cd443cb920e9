"""Parity of the Flax NNX Qwen2 with Hugging Face transformers, cache consistency, dtypes, checkpoints,
eager vs. jitted use, logical axes and sharding."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ssb_jax
from ssb_jax.model import attention
from ssb_jax.model.config import REMAT_POLICIES, ModelConfig
from ssb_jax.model.qwen2 import Qwen2ForCausalLM, apply, positions_from_mask
from ssb_jax.sampling.decode_layout import DecodeLayoutModel, RowsFirstLinear, to_decode_layout
from ssb_jax.model.weights import CheckpointError, load_params, save_params
from tests.hf_models import hf_logits, make_hf_checkpoint, make_hf_model

TOL = 1e-4


def padded_batch(rng, vocab, lengths, total, left):
    tokens = rng.integers(0, vocab, size=(len(lengths), total))
    mask = np.zeros((len(lengths), total), bool)
    for i, n in enumerate(lengths):
        if left:
            mask[i, total - n:] = True
        else:
            mask[i, :n] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def prefill_then_decode(model, tokens, mask, positions, prompt, cache):
    """Logits [B, T, V] from a prefill of the first `prompt` tokens, then one decode step per token,
    through the jitted functional form (split once)."""
    graphdef, state = nnx.split(model)
    step = jax.jit(apply, static_argnums=0)
    logits, cache = step(graphdef, state, tokens[:, :prompt], positions[:, :prompt], mask[:, :prompt], cache)
    pieces = [logits]
    for t in range(prompt, tokens.shape[1]):
        logits, cache = step(graphdef, state, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        pieces.append(logits)
    return np.concatenate([np.asarray(p) for p in pieces], axis=1), cache


def assert_parity(directory, rng, left, lengths=(9, 5, 1), total=9):
    config, params = load_params(directory)
    tokens, mask, positions = padded_batch(rng, config.vocab_size, lengths, total, left)
    ours = np.asarray(ssb_jax.compute_logits(params, config, tokens, mask, positions))
    ref = hf_logits(directory, tokens, mask, positions)
    err = np.abs(ours - ref)[mask].max()
    assert err < TOL, f"max abs logit error {err}"
    return config


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_match_transformers(request, tied, left, rng):
    directory = request.getfixturevalue("tiny_checkpoint" if tied else "tiny_untied_checkpoint")
    config = assert_parity(directory, rng, left)
    assert config.tie_word_embeddings == tied


def test_sharded_checkpoint_matches(tmp_path, rng):
    directory = make_hf_checkpoint(tmp_path, tie=False, seed=3, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("*.safetensors"))) > 2
    assert_parity(directory, rng, left=True)


def test_real_qwen05b_widths_and_vocab(tmp_path, rng):
    """Qwen2.5-0.5B's real widths and 151,936 vocab, 2 layers."""
    from ssb_jax.paths import shared_data_path
    real = json.loads(shared_data_path("qwen2.5_configs", "Qwen2.5-0.5B-Instruct", "config.json").read_text())
    fields = dict(vocab_size=real["vocab_size"], hidden_size=real["hidden_size"],
                  intermediate_size=real["intermediate_size"], num_hidden_layers=2,
                  num_attention_heads=real["num_attention_heads"],
                  num_key_value_heads=real["num_key_value_heads"], rope_theta=real["rope_theta"],
                  rms_norm_eps=real["rms_norm_eps"])
    directory = make_hf_checkpoint(tmp_path, tie=True, seed=4, **fields)
    config = assert_parity(directory, rng, left=True, lengths=(12, 7), total=12)
    assert config.vocab_size == 151936 and config.hidden_size == 896


def test_prefill_then_decode_equals_full_forward(tiny_checkpoint, rng):
    config, model = load_params(tiny_checkpoint)
    total, prompt = 14, 6
    tokens, mask, positions = padded_batch(rng, config.vocab_size, (14, 10, 8), total, left=True)
    full, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))  # eager
    incremental, cache = prefill_then_decode(model, tokens, mask, positions, prompt,
                                             model.init_cache(tokens.shape[0], total + 2))
    err = np.abs(incremental - np.asarray(full))[mask].max()
    assert err < 1e-5, err
    assert int(cache["index"]) == total


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_decode_layout_matches_transformers(request, tied, rng):
    """The CPU decode layout (unstacked layers, [out, in] kernels, [V, D] head) gives HF's logits, both
    in one pass and prefill + one-token decode steps over per-layer caches."""
    directory = request.getfixturevalue("tiny_checkpoint" if tied else "tiny_untied_checkpoint")
    config, model = load_params(directory)
    decode = to_decode_layout(model)
    assert isinstance(decode, DecodeLayoutModel) and len(decode.layers) == config.num_layers
    first = decode.layers[1].mlp.gate_proj
    assert isinstance(first, RowsFirstLinear)
    np.testing.assert_array_equal(np.asarray(first.kernel_t[...]), np.asarray(model.layers.mlp.gate_proj.kernel[1]).T)
    np.testing.assert_array_equal(np.asarray(decode.layers[1].attn.q_proj.bias[...]),
                                  np.asarray(model.layers.attn.q_proj.bias[1]))
    assert (decode.head_t is not None) == (not tied)
    assert model.layers.mlp.gate_proj.kernel.shape[0] == config.num_layers  # the training model is untouched
    total, prompt = 11, 5
    tokens, mask, positions = padded_batch(rng, config.vocab_size, (11, 7, 3), total, left=True)
    reference = hf_logits(directory, tokens, mask, positions)
    full, _ = decode(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    assert np.abs(np.asarray(full) - reference)[mask].max() < TOL
    incremental, _ = prefill_then_decode(decode, tokens, mask, positions, prompt,
                                         decode.init_cache(tokens.shape[0], total))
    assert np.abs(incremental - reference)[mask].max() < TOL


def test_bf16_params_close_to_f32(tiny_checkpoint, rng):
    config32, params32 = load_params(tiny_checkpoint)
    config16, params16 = load_params(tiny_checkpoint, dtype="bfloat16")
    assert params16.layers.attn.q_proj.kernel.dtype == jnp.bfloat16
    tokens, mask, positions = padded_batch(rng, config32.vocab_size, (10, 6), 10, left=True)
    l32 = np.asarray(ssb_jax.compute_logits(params32, config32, tokens, mask, positions))
    l16 = np.asarray(ssb_jax.compute_logits(params16, config16, tokens, mask, positions))
    assert l16.dtype == np.float32
    rel = np.linalg.norm((l16 - l32)[mask]) / np.linalg.norm(l32[mask])
    assert rel < 2e-2, rel


def test_save_load_bit_exact(tiny_untied_checkpoint, tmp_path, rng):
    config, params = load_params(tiny_untied_checkpoint)
    save_params(params, config, tmp_path / "one")
    save_params(params, config, tmp_path / "many", max_shard_bytes=20_000)
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    for sub in ("one", "many"):
        config2, params2 = load_params(tmp_path / sub)
        assert config2 == config
        for a, b in zip(jax.tree.leaves(nnx.state(params)), jax.tree.leaves(nnx.state(params2)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and transformers reads what we wrote
    tokens, mask, positions = padded_batch(rng, config.vocab_size, (7, 4), 7, left=False)
    np.testing.assert_allclose(hf_logits(tmp_path / "many", tokens, mask, positions),
                               hf_logits(tiny_untied_checkpoint, tokens, mask, positions), atol=1e-6)


def _rewrite(src, dst, edit):
    """Copy a single-file checkpoint, passing its tensors through edit(dict) -> dict."""
    from safetensors.numpy import load_file, save_file
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = edit(load_file(str(src / "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    name = "model.layers.1.self_attn.k_proj.bias"
    bad = _rewrite(tiny_checkpoint, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_params(bad)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    bad = _rewrite(tiny_checkpoint, tmp_path / "bad", lambda t: {**t, "model.layers.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load_params(bad)


def test_shape_mismatch_is_named(tiny_checkpoint, tmp_path):
    name = "model.layers.2.mlp.up_proj.weight"
    bad = _rewrite(tiny_checkpoint, tmp_path / "bad", lambda t: {**t, name: t[name][:-1]})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape"):
        load_params(bad)


@pytest.mark.parametrize("keep", [0.5, 0.999, 6 / 10**9])
def test_truncated_file_is_named_in_one_line(tiny_checkpoint, tmp_path, keep):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: max(1, int(len(data) * keep))])  # in the data, near the end, in the header
    with pytest.raises(CheckpointError) as error:
        load_params(bad)
    message = str(error.value)
    assert message.startswith(f"{bad / 'model.safetensors'}: unreadable safetensors file") and "truncated" in message
    assert "\n" not in message


def test_pickle_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    from ssb_jax.model.weights import safetensors_files
    with pytest.raises(CheckpointError, match="pickle-format weights.*pytorch_model.bin"):
        safetensors_files(tmp_path)


QWEN25_SIZES = {  # (hidden, layers, heads, kv heads, intermediate, vocab, tied) of the released models
    "0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "3B": (2048, 36, 16, 2, 11008, 151936, True),
    "7B": (3584, 28, 28, 4, 18944, 152064, False),
    "14B": (5120, 48, 40, 8, 13824, 152064, False),
    "32B": (5120, 64, 40, 8, 27648, 152064, False),
    "72B": (8192, 80, 64, 8, 29568, 152064, False),
}


def _meta_param_count(hf_dict):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**hf_dict))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", sorted(QWEN25_SIZES))
def test_param_count_equals_transformers(size):
    h, layers, heads, kv, inter, vocab, tied = QWEN25_SIZES[size]
    hf = dict(model_type="qwen2", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied)
    assert ModelConfig.from_hf_dict(hf).param_count() == _meta_param_count(hf)


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B-Instruct", "Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct"])
def test_real_configs_param_count(name):
    from ssb_jax.paths import shared_data_path
    path = shared_data_path("qwen2.5_configs", name, "config.json")
    hf = json.loads(path.read_text())
    hf_fields = {k: v for k, v in hf.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    assert ModelConfig.from_json(path).param_count() == _meta_param_count(hf_fields)


@pytest.mark.multidevice
def test_sharded_forward_equals_single_device(tiny_untied_checkpoint, rng):
    from ssb_jax.sharding import make_mesh
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    config, params = load_params(tiny_untied_checkpoint)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config_s, params_s = ssb_jax.load_model(tiny_untied_checkpoint, mesh=mesh)
    kernel = params_s.layers.attn.q_proj.kernel[...]
    assert len(kernel.sharding.device_set) == 8
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # (layers, embed, heads)
    tokens, mask, positions = padded_batch(rng, config.vocab_size, (8, 3, 8, 5), 8, left=True)
    single = np.asarray(ssb_jax.compute_logits(params, config, tokens, mask, positions))
    from ssb_jax.sharding import batch_sharding
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.shape))
             for k, v in {"tokens": tokens, "mask": mask, "positions": positions}.items()}
    sharded = ssb_jax.compute_logits(params_s, config_s, batch["tokens"], batch["mask"], batch["positions"])
    assert len(sharded.sharding.device_set) > 1
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5)


def test_positions_from_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]])


@pytest.mark.slow  # over 20 s on 2 cores
def test_remat_policies_and_attention_kernels_agree(tiny_checkpoint, monkeypatch, rng):
    """Every remat policy, and the chunked attention kernel (2-token blocks) under several of them, give
    the XLA kernel's logits and gradients."""
    monkeypatch.setattr(attention, "CHUNK_SIZE", 2)
    tokens, mask, positions = padded_batch(rng, 97, (6, 4), 6, left=True)

    def loss(state, graphdef):
        logits, _ = apply(graphdef, state, tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0) ** 2)

    results = {}
    variants = [{"remat": r, "attention_impl": "xla"} for r in REMAT_POLICIES]
    variants += [{"remat": r, "attention_impl": "chunked"} for r in ("none", "full", "dots")]
    for variant in variants:
        config, model = ssb_jax.load_model(tiny_checkpoint, **variant)
        assert model.config == config and all(getattr(config, k) == v for k, v in variant.items())
        graphdef, state = nnx.split(model)
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, graphdef)
        results[str(variant)] = (float(value), jax.tree.leaves(grads))
    reference_value, reference_grads = results[str(variants[0])]
    for name, (value, grads) in results.items():
        np.testing.assert_allclose(value, reference_value, rtol=1e-5, err_msg=name)
        for g, ref in zip(grads, reference_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-5 * float(np.abs(ref).max()) + 1e-7,
                                       err_msg=name)


def test_remat_policy_changes_the_compiled_backward():
    """"full" recomputes the layer in the backward (more forward matmuls than "none"); the setting is real."""
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    tokens = jnp.zeros((2, 8), jnp.int32)

    def dot_count(remat):
        model = ssb_jax.init_model(config.replace(remat=remat), 0)
        graphdef, state = nnx.split(model)
        grad = jax.jit(jax.grad(lambda s: jnp.sum(apply(graphdef, s, tokens)[0])))
        return grad.lower(state).as_text().count("dot_general")

    assert dot_count("full") > dot_count("none")
    with pytest.raises(ValueError, match="remat must be one of"):
        config.replace(remat="sometimes")


def test_eager_call_equals_jitted_functional_call(seed, rng):
    """model(tokens, positions, mask) eagerly == jit(apply)(graphdef, state, ...) after one nnx.split,
    with and without a cache, and hidden states on request."""
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    tokens, mask, positions = padded_batch(rng, config.vocab_size, (7, 4), 7, left=True)
    tokens, mask, positions = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(apply, static_argnums=0, static_argnames="return_hidden")
    eager_logits, _ = model(tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(jitted(graphdef, state, tokens, positions, mask)[0]),
                               np.asarray(eager_logits), atol=1e-5)
    hidden, _ = model(tokens, positions, mask, return_hidden=True)
    assert hidden.shape == (2, 7, config.hidden_size)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), np.asarray(eager_logits), atol=1e-5)
    eager_cached, eager_cache = model(tokens, positions, mask, model.init_cache(2, 9))
    jit_cached, jit_cache = jitted(graphdef, state, tokens, positions, mask, model.init_cache(2, 9))
    np.testing.assert_allclose(np.asarray(jit_cached), np.asarray(eager_cached), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jit_cache["k"]), np.asarray(eager_cache["k"]), atol=1e-5)
    assert int(jit_cache["index"]) == 7 and eager_cache["k"].shape == (3, 2, 9, 2, 8)


def test_every_parameter_carries_logical_axes():
    """Each parameter names one logical axis per dimension; stacked layers lead with "layers"."""
    from ssb_jax.sharding import LOGICAL_AXIS_RULES, variable_axes
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    state = nnx.state(ssb_jax.abstract_model(config))
    variables = dict(nnx.to_flat_state(state))
    assert len(variables) == 15  # embedding, 2 norms x (layer) + final norm, q/k/v kernel+bias, o, 3 mlp, head
    for path, variable in variables.items():
        axes = variable_axes(variable)
        assert len(axes) == len(variable.shape), path
        assert all(a in LOGICAL_AXIS_RULES for a in axes), (path, axes)
        assert (axes[0] == "layers") == (path[0] == "layers"), path
    assert variable_axes(variables[("layers", "mlp", "down_proj", "kernel")]) == ("layers", "mlp", "embed")
    assert variable_axes(variables[("embed", "embedding")]) == ("vocab", "embed")


@pytest.mark.multidevice
def test_indivisible_axis_is_replicated_and_logged(caplog):
    """On a tensor axis of 4, 6 query heads x 2 (12) divide, 3 kv heads x 2 (6) do not: the k/v
    projections' output dimension is replicated, with one log line naming the logical axis."""
    from ssb_jax import sharding
    from ssb_jax.sharding import make_mesh, state_shardings
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=6,
                         num_kv_heads=3, head_dim=2)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    sharding._reported_fallbacks.clear()
    with caplog.at_level(logging.WARNING, logger="ssb_jax.sharding"):
        shardings = state_shardings(nnx.state(ssb_jax.abstract_model(config)), mesh)
        state_shardings(nnx.state(ssb_jax.abstract_model(config)), mesh)  # a second time: no new line
    P = jax.sharding.PartitionSpec
    assert shardings["layers"]["attn"]["q_proj"]["kernel"].get_value().spec == P(None, "fsdp", "tensor")
    assert shardings["layers"]["attn"]["k_proj"]["kernel"].get_value().spec == P(None, "fsdp", None)
    assert shardings["layers"]["attn"]["v_proj"]["bias"].get_value().spec == P(None, None)
    lines = [r.getMessage() for r in caplog.records if "not divisible" in r.getMessage()]
    assert len(lines) == 1 and "'kv_heads' (size 6)" in lines[0], lines
