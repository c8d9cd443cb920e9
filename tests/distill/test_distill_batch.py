"""Aligned batches, the online teacher at aligned positions, the cached teacher files."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from ssb_jax.distill.batch import CachedTeacher, DistillBatch, bucket_length, build_batch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.step import distill_loss, graph_definitions, student_answer_hidden, teacher_answer_hidden
from ssb_jax.distill.synthetic import random_records, tiny_model_config
from ssb_jax.distill.teacher_cache import TeacherCache, build_teacher_cache
from ssb_jax.model.lora import init_lora
from ssb_jax.model.qwen2 import init_model


@pytest.fixture(scope="module")
def model(seed):
    config = tiny_model_config()
    return config, init_model(config, seed, std=0.15)


def test_default_buckets_pad_at_most_a_quarter():
    """Without configured buckets a length is padded by at most 25% (powers of two padded up to 2x), with
    four lengths per doubling."""
    lengths = np.arange(16, 20_000)
    padded = np.array([bucket_length(int(n)) for n in lengths])
    assert (padded >= lengths).all() and (padded <= 1.25 * lengths).all()
    assert len(set(padded[(lengths > 1024) & (lengths <= 2048)].tolist())) == 4


def test_bucket_lists_hold_every_length_padding_at_most_a_quarter():
    from ssb_jax.distill.batch import quarter_power_of_two_buckets
    buckets = quarter_power_of_two_buckets(16, 3000)
    assert buckets[0] == 16 and buckets[-2] < 3000 <= buckets[-1] and buckets == sorted(set(buckets))
    for n in range(16, 3001):  # the smallest bucket holding n pads it by under a quarter
        assert n <= min(b for b in buckets if b >= n) <= 1.25 * n


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 20, 40, 64, 80]
    assert bucket_length(5, min_bucket=4) == 5
    assert bucket_length(40, buckets=(32, 48, 96)) == 48
    with pytest.raises(ValueError):
        bucket_length(100, buckets=(32, 48, 96))


def test_batch_alignment_and_padding(rng):
    from ssb_jax.distill.batch import quarter_power_of_two
    records = random_records(rng, 3, 50)
    b = build_batch(records, batch_size=5, min_bucket=4)
    assert b.teacher_tokens.shape[0] == b.student_tokens.shape[0] == 5
    assert b.row_valid.tolist() == [True] * 3 + [False] * 2
    for side in ("teacher", "student"):
        L = getattr(b, f"{side}_tokens").shape[1]
        assert L == quarter_power_of_two(L) and L >= max(len(r[f"{side}_prompt_ids"]) + len(r["solution_ids"]) for r in records)
    for i, r in enumerate(records):
        n = len(r["solution_ids"])
        assert b.answer_mask[i].sum() == n and b.answer_tokens[i, :n].tolist() == r["solution_ids"]
        for side in ("teacher", "student"):
            seq = r[f"{side}_prompt_ids"] + r["solution_ids"]
            tokens, mask = getattr(b, f"{side}_tokens"), getattr(b, f"{side}_mask")
            assert tokens[i, :len(seq)].tolist() == seq and mask[i].sum() == len(seq)
            idx = getattr(b, f"{side}_index")[i, :n]
            # the logit at position p predicts token p + 1: these positions predict the solution tokens
            assert tokens[i, idx + 1].tolist() == r["solution_ids"]
            assert idx[0] == len(r[f"{side}_prompt_ids"]) - 1
    assert not b.answer_mask[3:].any() and not b.student_mask[3:].any()
    # truncation keeps both sequences within max_seq_len
    t = build_batch(records, max_seq_len=16, buckets=(16,))
    assert t.teacher_tokens.shape[1] == 16 and t.student_tokens.shape[1] == 16


def test_the_batch_holds_its_declared_shapes_and_abstract_gives_the_steps_inputs(rng):
    """build_batch's arrays have the dtypes and named dimensions DistillBatch declares; the fields the train
    step reads are those of DistillBatch.abstract, for either teacher mode."""
    records = random_records(rng, 3, 50)
    k = 4
    cache = {r["id"]: CachedTeacher(logprobs=np.zeros((len(r["solution_ids"]), k), np.float32),
                                    ids=np.zeros((len(r["solution_ids"]), k), np.int32),
                                    tail_logprob=np.zeros(len(r["solution_ids"]), np.float32),
                                    target_logprob=np.zeros(len(r["solution_ids"]), np.float32)) for r in records}
    online = build_batch(records, batch_size=4, min_bucket=4)
    cached = build_batch(records, batch_size=4, min_bucket=4, include_teacher=False, teacher_cache=cache.__getitem__)
    sizes = online.dims()
    assert cached.dims() == {**{d: n for d, n in sizes.items() if d != "teacher_len"}, "topk": k}
    assert sizes["batch"] == online.rows == 4

    def described(batch):
        return jax.tree.structure(batch), [(x.shape, np.dtype(x.dtype)) for x in jax.tree.leaves(batch)]

    for mode, batch in (("online", online), ("cached", cached)):
        abstract = DistillBatch.abstract(4, sizes["student_len"], sizes.get("teacher_len", 0), sizes["answer_len"],
                                         teacher_mode=mode, topk=k)
        assert described(batch.for_step(mode)) == described(abstract), mode
        assert batch.for_step(mode).row_valid is None
    with pytest.raises(ValueError, match="lacks"):
        online.for_step("cached")
    wrong = online.replace(answer_mask=online.answer_mask.astype(np.int32))
    with pytest.raises(ValueError, match="answer_mask"):
        wrong.dims()


def test_online_teacher_and_student_at_aligned_positions(model, rng, seed):
    config, params = model
    records = random_records(rng, 3, config.vocab_size)
    batch = build_batch(records, min_bucket=4)
    lc = TrainConfig(lora_rank=4).lora_config()
    lora = init_lora(config, lc, jax.random.key(seed + 1))
    graphdefs = graph_definitions(config, lc)
    base = nnx.state(params)
    head_logits = lambda h: np.asarray(params.logits(h))  # noqa: E731
    teacher = head_logits(teacher_answer_hidden(graphdefs[1], base, batch))
    student = head_logits(student_answer_hidden(graphdefs[0], lora, base, batch))
    for i, r in enumerate(records):
        n = len(r["solution_ids"])
        for side, got in (("teacher", teacher), ("student", student)):
            seq = np.asarray(r[f"{side}_prompt_ids"] + r["solution_ids"])[None]
            full, _ = params(seq, np.arange(seq.shape[1])[None], np.ones_like(seq, bool))
            p = len(r[f"{side}_prompt_ids"])
            want = np.asarray(full)[0, p - 1:p - 1 + n]
            # teacher: base (no LoRA); student with B = 0: also exactly the base
            np.testing.assert_allclose(got[i, :n], want, atol=2e-5, rtol=1e-5)
    # the loss on this batch: T^2 KL of the per-token distributions, by hand
    tc = TrainConfig(lora_rank=4, temperature=2.0, logits_chunk=4)
    loss, metrics = distill_loss(lora, base, batch, graphdefs=graphdefs, tc=tc)
    m = batch.answer_mask
    ls = jax.nn.log_softmax(student[m] / 2.0)
    lt = jax.nn.log_softmax(teacher[m] / 2.0)
    ref = 4.0 * float(jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1)))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    assert float(loss) > 1e-3  # hinted and plain prompts give different distributions


def test_teacher_cache_files_and_lookup(model, tmp_path, rng):
    config, params = model
    records = random_records(rng, 5, config.vocab_size)
    k = 6
    # a shard closes after the first batch of two, so the five records always span at least two files
    first_batch_tokens = len(records[0]["solution_ids"]) + len(records[1]["solution_ids"])
    index = build_teacher_cache(params, config, records, tmp_path, k=k, temperature=2.0, batch_size=2, chunk=3,
                                min_bucket=4, tokens_per_shard=first_batch_tokens)
    n_tokens = sum(len(r["solution_ids"]) for r in records)
    assert index["n_tokens"] == n_tokens
    assert index["bytes_per_token"] == 8 * k + 8
    assert len(index["files"]) >= 2 and not list(tmp_path.glob("*.pkl"))
    assert index["files"]["shard_00000.safetensors"] == ["ex0", "ex1"]
    assert json.loads((tmp_path / "index.json").read_text())["k"] == k
    with safe_open(str(tmp_path / "shard_00000.safetensors"), framework="np") as f:
        assert set(f.keys()) == {"logprobs", "ids", "tail_logprob", "target_logprob", "offsets"}
        assert float(f.metadata()["temperature"]) == 2.0
    cache = TeacherCache(tmp_path, temperature=2.0)
    with pytest.raises(ValueError):
        TeacherCache(tmp_path, temperature=1.0)
    assert len(cache) == 5
    batch = build_batch(records, min_bucket=4)
    base_graphdef, base = nnx.split(params)
    t_logits = np.asarray(params.logits(teacher_answer_hidden(base_graphdef, base, batch)))
    for i, r in enumerate(records):
        got = cache(r["id"])
        n = len(r["solution_ids"])
        assert got.logprobs.shape == (n, k) and got.ids.shape == (n, k)
        lp = np.asarray(jax.nn.log_softmax(t_logits[i, :n] / 2.0))
        np.testing.assert_allclose(got.logprobs, np.take_along_axis(lp, got.ids, -1), atol=1e-5)
        np.testing.assert_array_equal(np.sort(got.ids, -1), np.sort(np.argsort(-lp, -1)[:, :k], -1))
        np.testing.assert_allclose(np.exp(got.tail_logprob), 1 - np.exp(got.logprobs).sum(-1), atol=1e-5)
        lp1 = np.asarray(jax.nn.log_softmax(t_logits[i, :n]))
        np.testing.assert_allclose(got.target_logprob, lp1[np.arange(n), r["solution_ids"]], atol=1e-5)
    cb = build_batch(records[:2], batch_size=3, teacher_cache=cache, include_teacher=False, min_bucket=4)
    assert cb.teacher_tokens is None and cb.teacher_topk_ids.shape[-1] == k
    n0 = len(records[0]["solution_ids"])
    np.testing.assert_array_equal(cb.teacher_topk_ids[0, :n0], cache(records[0]["id"]).ids)


def _reference_style_records(rng):
    """Random records with a plain student prompt of its own length, solutions that stopped (last id is
    the stop token) and one cut at the token cap (no stop token)."""
    records = random_records(rng, 3, 50)
    for i, r in enumerate(records):
        r["student_plain_prompt_ids"] = rng.integers(0, 50, rng.integers(2, 12)).tolist()
        r["solution_finish_reason"] = "length" if i == 1 else "stop"
    return records


@pytest.mark.parametrize("student_format, stop_token_target", [("plain", False), ("plain", True), ("chat", False)])
def test_reference_student_input_and_targets(student_format, stop_token_target, rng, seed):
    records = _reference_style_records(rng)
    b = build_batch(records, min_bucket=4, student_format=student_format, stop_token_target=stop_token_target)
    student_key = "student_plain_prompt_ids" if student_format == "plain" else "student_prompt_ids"
    for i, r in enumerate(records):
        drop = not stop_token_target and r["solution_finish_reason"] == "stop"
        target = r["solution_ids"][:-1] if drop else r["solution_ids"]
        n = len(target)
        assert b.answer_mask[i].sum() == n and b.answer_tokens[i, :n].tolist() == target, seed
        for side, prompt in (("teacher", r["teacher_prompt_ids"]), ("student", r[student_key])):
            seq = prompt + target  # the solution right after the prompt, nothing between
            tokens, mask = getattr(b, f"{side}_tokens"), getattr(b, f"{side}_mask")
            assert tokens[i, :len(seq)].tolist() == seq and mask[i].sum() == len(seq), seed
            idx = getattr(b, f"{side}_index")[i, :n]
            assert idx[0] == len(prompt) - 1 and tokens[i, idx + 1].tolist() == target, seed


def test_reference_switches_reach_the_training_batches_and_a_full_teacher_cache_serves_them(rng, seed):
    from ssb_jax.distill.data import make_dataset
    records = _reference_style_records(rng)
    tc = TrainConfig(batch_size=3, epochs=1, min_bucket=4, student_format="plain", stop_token_target=False)
    batch = make_dataset(records, tc)[0]
    expected = build_batch(records, batch_size=3, min_bucket=4, student_format="plain", stop_token_target=False)
    keys = ("student_tokens", "student_mask", "student_index", "answer_tokens", "answer_mask")
    rows = lambda b: sorted(repr([getattr(b, k)[i].tolist() for k in keys]) for i in range(3))  # noqa: E731 (any order)
    assert rows(batch) == rows(expected), seed
    # a cache made with the stop token (the teacher cache always is) holds every target of a run without it
    cache = {r["id"]: CachedTeacher(logprobs=np.full((len(r["solution_ids"]), 2), -1.0, np.float32),
                                    ids=np.tile(np.arange(len(r["solution_ids"]))[:, None], (1, 2)).astype(np.int32),
                                    tail_logprob=np.zeros(len(r["solution_ids"]), np.float32),
                                    target_logprob=np.arange(len(r["solution_ids"]), dtype=np.float32))
             for r in records}
    cached = build_batch(records, min_bucket=4, include_teacher=False, teacher_cache=cache.__getitem__,
                         student_format="plain", stop_token_target=False)
    for i, r in enumerate(records):
        n = int(cached.answer_mask[i].sum())
        assert n == len(r["solution_ids"]) - (r["solution_finish_reason"] == "stop")
        assert cached.teacher_target_logprob[i, :n].tolist() == list(range(n))


def test_reference_switch_errors_name_the_fix():
    records = random_records(np.random.default_rng(0), 1, 50)
    with pytest.raises(KeyError, match="student_plain_prompt_ids.*--config.overwrite=curate"):
        build_batch(records, student_format="plain")
    with pytest.raises(ValueError, match="student_format must be"):
        TrainConfig(student_format="raw")
    records[0]["solution_ids"] = records[0]["solution_ids"][:1]
    with pytest.raises(ValueError, match="only its stop token"):
        build_batch(records, stop_token_target=False)
