"""The two-stage top-k (per chunk, then over the chunks' candidates) against lax.top_k over the whole
row, and the tokens the sampler draws with it against today's one-stage formula, on logits full of ties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssb_jax.sampling import sampler
from ssb_jax.sampling.sampler import TOP_K_TIE_SLACK, SamplingParams, choose_tokens, filter_logits, top_k_in_chunks


def tied_logits(rng, rows, vocab, levels):
    """Integer-valued logits drawn from `levels` values: every row is full of ties, at the k-th value too."""
    logits = rng.integers(0, levels, size=(rows, vocab)).astype(np.float32)
    logits[0, -5:] = logits[0].max()  # ties at the top in the padded last chunk
    logits[1, :] = 1.0  # a row of one value
    logits[2, ::7] = -np.inf  # masked tokens (stop ids before min_new_tokens)
    return jnp.asarray(logits)


@pytest.mark.parametrize("vocab,chunk,k", [(1000, 16, 13), (1003, 64, 58), (4096, 512, 1), (997, 8, 7)])
def test_two_stage_top_k_equals_one_stage(rng, vocab, chunk, k):
    for levels in (3, 40, 10_000):
        logits = tied_logits(rng, 5, vocab, levels)
        values, ids = top_k_in_chunks(logits, k, chunk)
        expected_values, expected_ids = jax.lax.top_k(logits, k)
        np.testing.assert_array_equal(np.asarray(values), np.asarray(expected_values))
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(expected_ids))


def one_stage_choice(logits, row_keys, step, sampling):
    """choose_tokens' top-k draw as it was: lax.top_k over the whole vocabulary."""
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
    values, ids = jax.lax.top_k(logits, sampling.top_k + TOP_K_TIE_SLACK)
    choice = jax.vmap(jax.random.categorical)(step_keys, filter_logits(values, sampling))
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (50, 0.9)])
def test_sampled_tokens_equal_the_one_stage_formula(rng, monkeypatch, top_k, top_p):
    """choose_tokens with the two-stage top-k (here on the CPU too) draws the tokens the one-stage formula draws."""
    monkeypatch.setattr(sampler, "TOP_K_CHUNK", 64)
    monkeypatch.setattr(sampler, "TOP_K_IN_CHUNKS_ON", ("cpu",))
    sampling = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 6)
    for levels in (4, 50):
        logits = tied_logits(rng, 6, 1500, levels) / 3.0
        for step in (1, 7):
            tokens, logprobs = choose_tokens(logits, keys, step, sampling)
            expected_tokens = one_stage_choice(logits, keys, step, sampling)
            np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected_tokens))
            expected = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
            np.testing.assert_array_equal(np.asarray(logprobs), np.asarray(expected))


def test_two_stages_are_lowered_for_accelerators_only(monkeypatch):
    """The candidate top-k lowered for GPU and TPU is the two-stage one (two top-k ops), for the CPU XLA's own."""
    monkeypatch.setattr(sampler, "TOP_K_CHUNK", 64)
    traced = jax.jit(lambda x: sampler.candidate_top_k(x, 13)).trace(jnp.zeros((2, 1000), jnp.float32))
    for platform, stages in (("cpu", 1), ("cuda", 2), ("tpu", 2)):
        assert traced.lower(lowering_platforms=(platform,)).as_text().count("chlo.top_k") == stages, platform
