"""Full-sequence attention kernels (ssb_jax.model.attention) against the XLA einsum reference.

Inputs are random from the run's seed (conftest's `seed`, which a failing test reports): a batch with left-padded, right-padded and unpadded rows,
grouped-query heads (4 query / 2 key-value), lengths that are not a multiple of the block size.
Outputs are compared at real query rows only (padding queries are unspecified), gradients of a loss
over the real rows with respect to q, k and v everywhere.
"""
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import ssb_jax
from ssb_jax.model import attention
from ssb_jax.model.config import ModelConfig
from tests.hf_models import hf_logits
from tests.model.test_model import padded_batch

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
# Error allowed, relative to the reference's largest magnitude: float32 sums reorder, bfloat16 rounds
# the probabilities (and, in the kernels, per-block partial sums) to 8 bits of mantissa.
TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}


def random_inputs(seed, batch_lengths, total, dtype, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
    """q, k, v, key_valid, and loss weights that are zero on padding queries."""
    rng = np.random.default_rng(seed)
    key_valid = np.zeros((len(batch_lengths), total), bool)
    for row, (start, stop) in enumerate(batch_lengths):
        key_valid[row, start:stop] = True
    shape_q, shape_kv = (len(batch_lengths), total, heads, head_dim), (len(batch_lengths), total, kv_heads, head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in (shape_q, shape_kv, shape_kv))
    weights = jnp.asarray(rng.normal(size=shape_q) * key_valid[:, :, None, None], dtype)
    return q, k, v, jnp.asarray(key_valid), weights


def assert_matches_reference(kernel, q, k, v, key_valid, weights):
    def loss(fn):
        return lambda q, k, v: jnp.sum((fn(q, k, v, key_valid) * weights).astype(jnp.float32))

    tol = TOLERANCE[jnp.dtype(q.dtype).name]
    real = np.asarray(key_valid)[:, :, None, None]
    reference = np.asarray(attention.xla_attention(q, k, v, key_valid), np.float32)
    out = np.asarray(jax.jit(kernel)(q, k, v, key_valid), np.float32)
    assert np.isfinite(out).all(), "padding queries must stay finite"
    scale = np.abs(reference).max()
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, reference, 0), atol=tol * scale, rtol=0)
    ref_grads = jax.grad(loss(attention.xla_attention), argnums=(0, 1, 2))(q, k, v)
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        ref = np.asarray(ref, np.float32)
        assert g.dtype == q.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), ref, atol=tol * np.abs(ref).max(), rtol=0,
                                   err_msg=f"d{name}")


# (start, stop) of the real tokens per row: left padded, right padded, unpadded, one real token.
ROWS = [(9, 37), (0, 23), (0, 37), (36, 37)]


@pytest.mark.parametrize("dtype, chunk", [("float32", 8), ("bfloat16", 8), ("float32", 64)],
                         ids=["float32-5_blocks", "bfloat16-5_blocks", "float32-one_block"])
def test_chunked_equals_reference(dtype, chunk, seed):
    inputs = random_inputs(seed, ROWS, 37, jnp.dtype(dtype))
    assert_matches_reference(lambda q, k, v, m: attention.chunked_attention(q, k, v, m, chunk=chunk), *inputs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cudnn_arguments_equal_reference(dtype, seed):
    """The call the cuDNN path makes (causal + key-padding mask), run by JAX's XLA implementation."""
    inputs = random_inputs(seed, ROWS, 37, jnp.dtype(dtype))
    assert_matches_reference(lambda q, k, v, m: attention.cudnn_attention(q, k, v, m, implementation="xla"), *inputs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_splash_interpreted_equals_reference(dtype, seed):
    """The Pallas TPU splash kernel in interpret mode (the CPU runs the kernel body as plain JAX)."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention",
                        reason="this jax has no Pallas TPU splash-attention kernel")
    rows = [(40, 100), (0, 70), (0, 100)]  # 100 tokens: padded to one 128-lane tile inside
    inputs = random_inputs(seed, rows, 100, jnp.dtype(dtype))
    assert_matches_reference(lambda q, k, v, m: attention.splash_attention(q, k, v, m, interpret=True), *inputs)


def test_splash_segment_ids_give_the_causal_padding_mask(rng):
    """Same segment and causal is exactly "key real and not in the future" for every real query, and
    leaves no query without a visible key (splash's requirement)."""
    key_valid = jnp.asarray(rng.random((5, 50)) < 0.7)
    segments = np.asarray(attention.splash_segment_ids(key_valid, 128))
    assert segments.shape == (5, 128) and (segments[:, 50:] == 0).all()
    causal = np.tril(np.ones((128, 128), bool))
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    visible = np.asarray(attention.causal_visible(key_valid))
    real = np.asarray(key_valid)
    np.testing.assert_array_equal(allowed[:, :50, :50][real], visible[real])
    assert allowed.any(-1).all()


def test_chunked_loops_have_static_trip_counts():
    """The chunked kernel's loops visit the causal triangle's block pairs from a static list: the forward
    and backward trace to scans (fixed trip counts) and no while loop, whose data-dependent bound would cost
    a copy to the host and a wait per iteration on a GPU."""
    q, k, v, key_valid, _ = random_inputs(0, ROWS, 37, jnp.float32)

    def primitives(jaxpr, found):
        for eqn in jaxpr.eqns:
            found.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                primitives(sub, found)
        return found

    grad = jax.grad(lambda q, k, v: jnp.sum(attention.chunked_attention(q, k, v, key_valid, chunk=8)), argnums=(0, 1, 2))
    used = primitives(jax.make_jaxpr(grad)(q, k, v).jaxpr, set())
    assert "scan" in used and "while" not in used, sorted(used)
    query_blocks, key_blocks = attention.causal_block_pairs(3, queries_outer=True)
    assert list(zip(query_blocks, key_blocks)) == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    query_blocks, key_blocks = attention.causal_block_pairs(3, queries_outer=False)
    assert list(zip(query_blocks, key_blocks)) == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (2, 2)]


def test_chunked_never_forms_the_whole_score_matrix():
    """At T = 1024 the chunked gradient needs a fraction of the reference's temporary memory."""
    q, k, v, key_valid, weights = random_inputs(0, [(100, 1024)], 1024, jnp.float32)

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, key_valid) * weights), argnums=(0, 1, 2)))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    scores = HEADS * 1024 * 1024 * 4  # one float32 [B=1, N, T, T]
    chunked = temp_bytes(lambda q, k, v, m: attention.chunked_attention(q, k, v, m, chunk=128))
    assert temp_bytes(attention.xla_attention) > scores
    assert chunked < scores / 4, (chunked, scores)


def test_auto_picks_by_backend_dtype_and_length():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert attention.resolve("auto", bf16, 64, 2048, backend="gpu") == "cudnn"
    # not on a GPU cuDNN flash attention does not support (a T4 is compute capability 7.5)
    assert attention.resolve("auto", bf16, 64, 2048, backend="gpu", compute_capability=7.5) == "chunked"
    assert attention.resolve("auto", bf16, 64, 2048, backend="gpu", compute_capability=8.0) == "cudnn"
    assert attention.resolve("auto", jnp.float16, 128, 512, backend="gpu") == "cudnn"
    long, short = attention.CHUNKED_MIN_LENGTH, attention.CHUNKED_MIN_LENGTH - 2
    # float32, an odd length (training with cuDNN's bias) or a too-wide head: no cuDNN
    assert attention.resolve("auto", f32, 64, long, backend="gpu") == "chunked"
    assert attention.resolve("auto", f32, 64, short, backend="gpu") == "xla"
    assert attention.resolve("auto", bf16, 64, long + 1, backend="gpu") == "chunked"
    assert attention.resolve("auto", bf16, 512, long, backend="gpu") == "chunked"
    assert attention.resolve("auto", bf16, 64, 100, backend="tpu") == "splash"
    assert attention.resolve("auto", f32, 64, long, backend="cpu") == "chunked"
    assert attention.resolve("auto", f32, 64, short, backend="cpu") == "xla"
    assert attention.resolve("xla", bf16, 64, 2048, backend="gpu") == "xla"


def test_unknown_kernel_is_a_one_line_error_listing_the_choices():
    with pytest.raises(ValueError) as error:
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=4, attention_impl="flash")
    message = str(error.value)
    assert "\n" not in message and "'flash'" in message
    assert all(name in message for name in attention.IMPLEMENTATIONS)
    assert ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=4).attention_impl == "auto"


@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_model_matches_transformers_left_padded(tiny_checkpoint, monkeypatch, impl, rng):
    """The whole model with the default kernel choice (which on CPU is the chunked kernel from 8 tokens
    here) and with the chunked kernel forced, in 3-token blocks so a sequence spans several, equals HF
    transformers' logits on a left-padded batch."""
    monkeypatch.setattr(attention, "CHUNK_SIZE", 3)
    monkeypatch.setattr(attention, "CHUNKED_MIN_LENGTH", 8)
    config, model = ssb_jax.load_model(tiny_checkpoint, attention_impl=impl)
    tokens, mask, positions = padded_batch(rng, config.vocab_size, (11, 6, 1), 11, left=True)
    ours = np.asarray(ssb_jax.compute_logits(model, config, tokens, mask, positions))
    reference = hf_logits(tiny_checkpoint, tokens, mask, positions)
    assert np.abs(ours - reference)[mask].max() < 1e-4


# ----------------------------------------------------------------------------- fused kernels on a mesh

# (mesh, query heads, key/value heads): heads split with their key/value heads; k/v repeated so that
# 4 query heads split over tensor = 4 although 2 key/value heads do not; heads whole (3 over tensor 2).
MESH_CASES = {"data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, 4, 2),
              "fsdp2_tensor4": ({"data": 1, "fsdp": 2, "tensor": 4}, 4, 2),
              "data4_tensor2_whole_heads": ({"data": 4, "fsdp": 1, "tensor": 2}, 3, 1)}


def _on_mesh(mesh, heads, kv_heads, seed, total=40, dtype=jnp.float32):
    """Inputs placed as the model places them (rows over the batch axes, heads over tensor where they divide)."""
    from ssb_jax.sharding import named_sharding
    rows = [(9, 40), (0, 23), (0, 40), (39, 40)]
    rng = np.random.default_rng(seed)
    key_valid = np.zeros((len(rows), total), bool)
    for row, (start, stop) in enumerate(rows):
        key_valid[row, start:stop] = True
    shape_q, shape_kv = (len(rows), total, heads, 16), (len(rows), total, kv_heads, 16)
    q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in (shape_q, shape_kv, shape_kv))
    weights = jnp.asarray(rng.normal(size=shape_q) * key_valid[:, :, None, None], dtype)
    place = lambda x, names: jax.device_put(x, named_sharding(names, x.shape, mesh))  # noqa: E731
    return (place(q, ("batch", None, "heads", None)), place(k, ("batch", None, "kv_heads", None)),
            place(v, ("batch", None, "kv_heads", None)), place(jnp.asarray(key_valid), ("batch", None)), weights)


@pytest.mark.multidevice
@pytest.mark.parametrize("case", [pytest.param(name, marks=() if i == 0 else pytest.mark.slow)
                                  for i, name in enumerate(MESH_CASES)])
def test_splash_under_shard_map_equals_reference(case, seed):
    """Splash (interpreted on CPU) under shard_map on the context mesh, as the training programs run it:
    values and gradients equal the XLA reference."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    from ssb_jax.sharding import make_mesh
    shape, heads, kv_heads = MESH_CASES[case]
    mesh = make_mesh(shape)
    q, k, v, key_valid, weights = _on_mesh(mesh, heads, kv_heads, seed)
    with jax.set_mesh(mesh):
        assert attention.partition_mesh() is not None
        assert_matches_reference(lambda q, k, v, m: attention.causal_attention(q, k, v, m, "splash"),
                                 q, k, v, key_valid, weights)


@pytest.mark.multidevice
def test_kernel_mesh_partitions_without_a_context_mesh(seed):
    """The sampler's way (no context mesh, `kernel_mesh` names the sampling mesh): cuDNN's call (run by
    JAX's XLA implementation) under shard_map with k/v repeated to split with q equals the reference."""
    from ssb_jax.sharding import make_mesh
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    q, k, v, key_valid, weights = _on_mesh(mesh, 4, 2, seed)
    kernel = functools.partial(attention.cudnn_attention, implementation="xla")

    def sharded(q, k, v, m):
        with attention.kernel_mesh(mesh):
            return attention.partitioned(kernel, q, k, v, m, attention.partition_mesh())
    assert_matches_reference(sharded, q, k, v, key_valid, weights)
    assert attention.head_split(4, 2, 4) == (True, True)
    assert attention.head_split(4, 2, 2) == (True, False)
    assert attention.head_split(3, 1, 2) == (False, False)


def test_a_fused_kernel_that_refuses_falls_back_to_chunked_with_one_warning(monkeypatch, caplog, seed):
    """"auto" on a GPU whose cuDNN refuses at trace time: the chunked kernel's result, one warning naming
    the kernel and the reason however often it is traced; a kernel named explicitly raises instead."""
    def refuse(*args, **kwargs):
        raise RuntimeError("cuDNN is not detected.")
    monkeypatch.setitem(attention._KERNELS, "cudnn", refuse)
    monkeypatch.setattr(attention, "_reported_refusals", set())
    q, k, v, key_valid, _ = random_inputs(seed, ROWS, 37, jnp.bfloat16)
    with attention.lowering_for("gpu"), caplog.at_level("WARNING", logger=attention.__name__):
        assert attention.resolve("auto", q.dtype, HEAD_DIM, 36) == "cudnn"
        outs = [np.asarray(attention.causal_attention(q[:, :36], k[:, :36], v[:, :36], key_valid[:, :36]), np.float32)
                for _ in range(2)]
        with pytest.raises(RuntimeError, match="not detected"):
            attention.causal_attention(q[:, :36], k[:, :36], v[:, :36], key_valid[:, :36], "cudnn")
    expected = np.asarray(attention.chunked_attention(q[:, :36], k[:, :36], v[:, :36], key_valid[:, :36]), np.float32)
    np.testing.assert_array_equal(outs[0], expected)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "cudnn" in warnings[0] and "cuDNN is not detected" in warnings[0] and "chunked" in warnings[0]


@pytest.mark.multidevice
@pytest.mark.parametrize("shape, heads, kv_heads", [({"data": 2, "fsdp": 1, "tensor": 4}, 4, 2),
                                                    ({"data": 1, "fsdp": 2, "tensor": 4}, 8, 4),
                                                    ({"data": 4, "fsdp": 1, "tensor": 2}, 3, 1)])
def test_fused_kernels_get_q_k_v_split_alike(shape, heads, kv_heads):
    """What JAX's cuDNN partitioner requires (and Mosaic, which partitions nothing): inside shard_map each
    device's q, k and v hold the same rows and matching heads, here with Qwen2.5's 2 KV heads on tensor = 4
    (k/v repeated per query head), with KV heads that divide, and with heads that stay whole."""
    from ssb_jax.sharding import make_mesh
    mesh = make_mesh(shape)
    seen = []

    def kernel(q, k, v, key_valid):
        seen.append((q.shape, k.shape, v.shape, key_valid.shape))
        return q

    q = jax.ShapeDtypeStruct((8, 32, heads, 16), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((8, 32, kv_heads, 16), jnp.bfloat16)
    jax.eval_shape(lambda q, k, v, m: attention.partitioned(kernel, q, k, v, m, mesh), q, kv, kv,
                   jax.ShapeDtypeStruct((8, 32), jnp.bool_))
    (q_local, k_local, v_local, valid_local), = seen
    rows = 8 // (shape["data"] * shape["fsdp"])
    assert q_local[0] == k_local[0] == valid_local[0] == rows
    assert k_local == v_local and q_local[2] % k_local[2] == 0
    split, _ = attention.head_split(heads, kv_heads, shape["tensor"])
    assert q_local[2] == (heads // shape["tensor"] if split else heads)
