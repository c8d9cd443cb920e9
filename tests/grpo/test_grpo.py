"""GRPO: the objective and its gradient against a float64 NumPy formula, chunked completion log-probs,
group advantages, one update on a tiny model (the one right sample gains probability, the others lose
it; a group of equal rewards moves nothing), the sampler's in-place adapters, and the pipeline stage."""
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssb_jax.distill.loss import target_logprobs
from ssb_jax.grpo.config import NORMALIZATIONS, GRPOConfig
from ssb_jax.grpo.loss import group_advantages, grpo_objective


# ----------------------------------------------------------------------------- the objective

def numpy_objective(logp, old, ref, adv, mask, *, eps, beta, normalization, max_len):
    """(loss, d loss / d logp) in float64, the derivative written out by hand."""
    logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
    m = np.asarray(mask, np.float64)
    ratio = np.exp(logp - old)
    a = adv[:, None]
    unclipped, clipped = ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a
    per_token = -np.minimum(unclipped, clipped)
    # the unclipped branch is the min (or both agree inside the band): d/dlogp of -ρA is -ρA
    d_per_token = np.where(unclipped <= clipped, -a * ratio, 0.0)
    if beta:
        d = ref - logp
        per_token = per_token + beta * (np.exp(d) - d - 1)
        d_per_token = d_per_token + beta * (1 - np.exp(d))
    lengths = m.sum(1, keepdims=True)
    samples = max((lengths[:, 0] > 0).sum(), 1)
    if normalization == "token_mean":
        w = m / m.sum()
    elif normalization == "sequence_mean":
        w = m / np.maximum(lengths, 1) / samples
    else:
        w = m / (samples * max_len)
    return float((w * per_token).sum()), w * d_per_token, ratio, unclipped, clipped


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_objective_and_gradient_match_numpy(rng, normalization, beta):
    B, A, eps, max_len = 6, 9, 0.2, 12
    old = rng.normal(-2.0, 1.0, (B, A)).astype(np.float32)
    logp = (old + rng.normal(0.0, 0.3, (B, A))).astype(np.float32)  # ratios on both sides of the band
    ref = (old + rng.normal(0.0, 0.5, (B, A))).astype(np.float32)
    adv = rng.normal(0.0, 1.0, B).astype(np.float32)
    lengths = rng.integers(1, A + 1, B)
    lengths[-1] = 0  # a padding row: no tokens, not a sample
    mask = np.arange(A)[None, :] < lengths[:, None]

    def loss_of(lp):
        return grpo_objective(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip_epsilon=eps,
                              normalization=normalization, max_len=max_len, kl_beta=beta, ref_logprobs=jnp.asarray(ref))

    (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(logp))
    want, want_grad, ratio, unclipped, clipped = numpy_objective(logp, old, ref, adv, mask, eps=eps, beta=beta,
                                                                 normalization=normalization, max_len=max_len)
    active = mask & (clipped < unclipped)
    assert active.any() and (mask & ~active).any(), "the draw should clip some tokens and not others"
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    assert float(metrics["clip_fraction"]) == pytest.approx(active.sum() / mask.sum(), rel=1e-6)
    if beta:
        d = (ref - logp).astype(np.float64)
        assert float(metrics["kl"]) == pytest.approx(((np.exp(d) - d - 1) * mask).sum() / mask.sum(), rel=1e-5)


def test_normalizations_differ_as_documented(rng):
    """A long and a short completion with equal per-token loss: token_mean weighs the long one by its
    length, sequence_mean weighs both alike, dr_grpo divides by the constant max_len."""
    mask = np.zeros((2, 8), bool)
    mask[0, :8], mask[1, :2] = True, True
    logp = jnp.zeros((2, 8))
    adv = jnp.asarray([1.0, -1.0])
    loss = {n: float(grpo_objective(logp, logp, adv, jnp.asarray(mask), clip_epsilon=0.2, normalization=n,
                                    max_len=16)[0]) for n in NORMALIZATIONS}
    assert loss["token_mean"] == pytest.approx((-8 + 2) / 10)
    assert loss["sequence_mean"] == pytest.approx(0.0, abs=1e-7)
    assert loss["dr_grpo"] == pytest.approx((-8 + 2) / (2 * 16))


def test_group_advantages(rng):
    rewards = rng.integers(0, 2, 12).astype(float)
    rewards[4:8] = 1.0  # a group of equal rewards
    adv = group_advantages(rewards, 4, eps=1e-4)
    for g in range(3):
        r = rewards[4 * g:4 * g + 4]
        want = [(x - statistics.fmean(r)) / (statistics.pstdev(r) + 1e-4) for x in r]
        np.testing.assert_allclose(adv[4 * g:4 * g + 4], want, rtol=1e-6, atol=1e-6)
    assert not adv[4:8].any()
    centred = group_advantages(rewards, 4, scale_by_std=False)
    np.testing.assert_allclose(centred, rewards - np.repeat(rewards.reshape(3, 4).mean(1), 4), atol=1e-7)


@pytest.mark.parametrize("chunk", [0, 3])
def test_chunked_target_logprobs_and_gradient_match_numpy(rng, chunk):
    B, A, D, V = 2, 7, 5, 23
    hidden = rng.normal(0, 1, (B, A, D)).astype(np.float32)
    head = rng.normal(0, 1, (D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, A))
    cotangent = rng.normal(0, 1, (B, A)).astype(np.float32)
    logp, pullback = jax.vjp(lambda h: target_logprobs(h, jnp.asarray(targets), jnp.asarray(head), chunk),
                             jnp.asarray(hidden))
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)
    softmax = np.exp(log_softmax)
    want_grad = cotangent[..., None] * (head.T.astype(np.float64)[targets] - softmax @ head.T.astype(np.float64))
    np.testing.assert_allclose(np.asarray(pullback(jnp.asarray(cotangent))[0]), want_grad, rtol=1e-4, atol=1e-5)


def test_questions_follow_from_the_iteration_number_and_cover_each_pass():
    from ssb_jax.data.datasets import Problem
    from ssb_jax.grpo.run import questions_for
    problems = [Problem(id=f"q{i}", question=str(i), answer=str(i), source="test") for i in range(10)]
    gc = GRPOConfig(prompts_per_step=4, group_size=2)
    seen = [p.id for i in range(5) for p in questions_for(i, problems, gc)]  # two passes
    assert sorted(seen[:10]) == sorted(seen[10:]) == sorted(p.id for p in problems)
    assert seen[:10] != seen[10:]  # each pass its own shuffle
    assert [p.id for p in questions_for(3, problems, gc)] == seen[12:16]  # no state: a resumed run agrees


def test_settings_are_range_checked():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="loss_normalization"):
        GRPOConfig(loss_normalization="mean")
    with pytest.raises(ValueError, match="clip_epsilon"):
        GRPOConfig(clip_epsilon=-0.1)
    with pytest.raises(ValueError, match="minibatches"):
        GRPOConfig(prompts_per_step=3, group_size=3, minibatches=2)


# ----------------------------------------------------------------------------- one update on a tiny model

@pytest.fixture(scope="module")
def tiny():
    from ssb_jax.distill.synthetic import tiny_model_config
    from ssb_jax.model.lora import LoraConfig
    from ssb_jax.model.qwen2 import init_model
    config = tiny_model_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    return config, init_model(config, 0, std=0.2), LoraConfig(rank=4, alpha=8.0)


def _one_group_update(tiny, rng, rewards, **settings):
    """One GRPO update on one group of random completions of one prompt; (log-probs per sample before,
    after, the update's metrics, adapters before, after)."""
    from ssb_jax.distill.step import base_state_for_training
    from ssb_jax.grpo.batch import rollout_batch
    from ssb_jax.grpo.step import GRPOStep
    config, model, lora_config = tiny
    G = len(rewards)
    gc = GRPOConfig(group_size=G, prompts_per_step=1, max_new_tokens=8, logits_chunk=3, grad_clip=0.0,
                    learning_rate=1e-3, steps=1, **settings)
    prompt = rng.integers(0, 64, 5).tolist()
    completions = [rng.integers(0, 64, rng.integers(4, 9)).tolist() for _ in range(G)]
    batch = rollout_batch([prompt] * G, completions, max_len=gc.max_new_tokens, length_buckets=[16])
    step = GRPOStep(config, lora_config, gc)
    base = base_state_for_training(model)
    state = step.init_state(jax.random.key(int(rng.integers(1 << 30))))
    before = step.logprobs(state["lora"], base, batch)
    lora_before = jax.tree_util.tree_map(np.asarray, state["lora"])
    batch = batch.replace(old_logprobs=before, advantages=group_advantages(rewards, G))
    state, metrics = step.update(state, base, batch)
    after = step.logprobs(state["lora"], base, batch)
    per_sample = lambda lp: (lp * batch.completion_mask).sum(1)
    return per_sample(before), per_sample(after), metrics, lora_before, state["lora"]


def test_completion_logprobs_are_the_models_at_the_completion_positions_and_temperature(tiny, rng):
    """Against the model's own full logits (float64 log-softmax of logits / T), read where each
    completion token was predicted: position prompt_len - 1 + j."""
    from flax import nnx
    from ssb_jax.grpo.batch import rollout_batch
    from ssb_jax.grpo.step import completion_logprobs
    config, model, _ = tiny
    prompts = [rng.integers(0, 64, rng.integers(2, 7)).tolist() for _ in range(3)]
    completions = [rng.integers(0, 64, rng.integers(1, 6)).tolist() for _ in range(3)]
    batch = rollout_batch(prompts, completions, max_len=6, length_buckets=[16], rows=4)
    graphdef, state = nnx.split(model)
    got = np.asarray(completion_logprobs(graphdef, (state,), batch, chunk=4, temperature=0.7))
    logits, _ = model(jnp.asarray(batch.tokens), jnp.asarray(batch.positions), jnp.asarray(batch.mask))
    scaled = np.asarray(logits, np.float64) / 0.7
    log_softmax = scaled - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - scaled.max(-1, keepdims=True)
    for r, (prompt, completion) in enumerate(zip(prompts, completions)):
        want = [log_softmax[r, len(prompt) - 1 + j, token] for j, token in enumerate(completion)]
        np.testing.assert_allclose(got[r, :len(completion)], want, rtol=1e-5, atol=1e-5)
    assert not batch.completion_mask[3].any()  # the padding row has no completion


def test_the_one_right_sample_gains_probability_and_the_others_lose_it(tiny, rng):
    rewards = np.zeros(4)
    rewards[rng.integers(4)] = 1.0
    before, after, metrics, _, _ = _one_group_update(tiny, rng, rewards)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)  # old log-probs in the update's numerics
    assert float(metrics["clip_fraction"]) == 0.0
    change = after - before
    right = int(np.argmax(rewards))
    assert change[right] > 0, change
    assert (np.delete(change, right) < 0).all(), change


def test_a_group_of_equal_rewards_moves_nothing(tiny, rng):
    _, _, metrics, lora_before, lora_after = _one_group_update(tiny, rng, np.ones(4))
    assert float(metrics["grad_norm"]) == 0.0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), lora_before, lora_after)


@pytest.mark.slow  # over 20 s on 2 cores
def test_sampler_takes_new_adapters_in_place_without_recompiling(tiny, rng):
    from ssb_jax.model.lora import init_lora, with_adapters
    from ssb_jax.sampling.driver import Sampler
    from ssb_jax.sampling.sampler import SamplingParams
    config, model, lora_config = tiny
    first = init_lora(config, lora_config, jax.random.key(1))
    second = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), first)
    prompts = [rng.integers(0, 64, 6).tolist() for _ in range(3)]
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    sampler = Sampler(with_adapters(model, first, lora_config), batch_size=4, max_prompt_tokens=16,
                      show_progress=False)
    sampler.generate_ids(prompts, params, n=2, seed=3)
    compiled = sampler.num_compilations
    sampler.set_adapters(second)
    updated = sampler.generate_ids(prompts, params, n=2, seed=3)
    assert sampler.num_compilations == compiled
    fresh = Sampler(with_adapters(model, second, lora_config), batch_size=4, max_prompt_tokens=16,
                    show_progress=False).generate_ids(prompts, params, n=2, seed=3)
    assert [[c.token_ids for c in row] for row in updated] == [[c.token_ids for c in row] for row in fresh]


# ----------------------------------------------------------------------------- the stage's loop, in process

class HashTokenizer:
    """A stand-in tokenizer: a prompt is the 8 hex digits of its messages' CRC, each digit one token."""
    eos_token_id = 1

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        import zlib
        return f"{zlib.crc32(repr(messages).encode()):08x}"

    def encode(self, text, add_special_tokens=False):
        return [2 + int(c, 16) for c in text]

    def get_vocab(self):
        return {}


class ScriptedPolicy:
    """A stand-in sampler: each completion follows from (question id, sampling seed, sample index) alone,
    about a third of them right for a gold answer of "1"."""

    def __init__(self):
        self.adapters_set = 0

    def set_adapters(self, lora):
        self.adapters_set += 1

    def generate_ids(self, prompts, sampling, *, n, seed, ids):
        import zlib
        from ssb_jax.sampling.driver import Completion
        groups = []
        for key in ids:
            hashes = [zlib.crc32(f"{key}:{seed}:{i}".encode()) for i in range(n)]
            groups.append([Completion(token_ids=[2 + (h >> k) % 60 for k in range(1 + h % 6)], finish_reason="stop",
                                      text=f"so \\boxed{{{h % 3}}}") for h in hashes])
        return groups


@pytest.mark.e2e
@pytest.mark.slow  # three GRPO runs in-process: uninterrupted, stopped, resumed
def test_grpo_run_killed_and_resumed_repeats_the_uninterrupted_run(tiny, tmp_path):
    """Iteration position and sampled tokens survive the kill: the resumed run's records and adapters are
    the uninterrupted run's."""
    from ssb_jax.data.datasets import Problem
    from ssb_jax.grpo.run import run
    from ssb_jax.training.checkpoint import Checkpoints, abstract
    from ssb_jax.training.metrics import read_metrics
    config, model, lora_config = tiny
    problems = [Problem(id=f"q{i}", question=f"What is {i} - {i - 1}?", answer="1", source="test") for i in range(5)]
    gc = GRPOConfig(steps=4, prompts_per_step=2, group_size=3, max_new_tokens=8, logits_chunk=4, learning_rate=1e-2,
                    checkpoint_every=2, grader="string_match", kl_beta=0.04)

    def grpo(workdir, **kw):
        return run(gc, config, lora_config, model, ScriptedPolicy(), problems, HashTokenizer(), workdir,
                   progress=False, tensorboard=False, plot=False, **kw)

    def without_times(records):
        return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records]

    full = grpo(tmp_path / "full")
    assert not full["interrupted"] and [r["step"] for r in full["history"]] == [1, 2, 3, 4]
    part = grpo(tmp_path / "resumed", stop_after=3)  # killed after iteration 3; the last checkpoint is iteration 2
    assert part["interrupted"] and len(part["history"]) == 3
    rest = grpo(tmp_path / "resumed")
    assert rest["start"] == 2 and [r["step"] for r in rest["history"]] == [3, 4]
    assert without_times(read_metrics(tmp_path / "resumed")) == without_times(read_metrics(tmp_path / "full"))
    tokens = [r["sampled_tokens"] for r in full["history"]]
    assert tokens == sorted(tokens) and tokens[0] > 0 and len(set(r["reward_mean"] for r in full["history"])) > 1
    assert [r["updates"] for r in full["history"]] == [1, 2, 3, 4]
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), full["lora"], rest["lora"])
    assert max(jax.tree_util.tree_leaves(diffs)) < 1e-6
    with Checkpoints(tmp_path / "resumed", gc.keep_checkpoints, json_items=("progress",)) as checkpoints:
        _, items = checkpoints.restore(4, abstract(full["state"]))
    assert items["progress"] == {"iteration": 4, "sampled_tokens": tokens[-1]}
    for name in ("grpo_config.json", "lora_config.json"):
        assert (tmp_path / "resumed" / name).exists(), name


# ----------------------------------------------------------------------------- the pipeline stage

# On the shared reduced toy world (tests/pipeline_runs.py): a short GRPO run (GRPO only has to run).
GRPO_RUN = ["--config.sampler.batch_size=8",
            "--config.grpo.steps=4", "--config.grpo.prompts_per_step=4", "--config.grpo.group_size=4",
            "--config.grpo.max_new_tokens=48", "--config.grpo.checkpoint_every=1", "--config.grpo.kl_beta=0.04",
            "--config.grpo.learning_rate=1e-3", "--config.export.merged_model=False",
            "--config.eval.n_samples=0", "--config.eval.max_problems=4", "--config.eval.max_new_tokens=48"]


@pytest.mark.e2e
@pytest.mark.slow  # builds a toy world, then a GRPO run killed and resumed, evaluation and report
def test_grpo_stage_runs_resumes_after_a_kill_and_is_evaluated(tmp_path, toy_world):
    import json
    import subprocess
    from tests.pipeline_runs import check, copy_world, kill_after_steps, pipeline, pipeline_in_process
    workdir = tmp_path / "run"
    copy_world(toy_world, workdir)
    metrics = workdir / "grpo" / "metrics.jsonl"
    proc = pipeline(workdir, *GRPO_RUN, "--config.stages=grpo", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_steps(proc, metrics, 2, 900, "grpo")
    assert not (workdir / "grpo" / "DONE.json").exists()

    log = check(pipeline(workdir, *GRPO_RUN, "--config.stages=grpo,eval,report"))
    assert "grpo: resumed from step" in log  # the iteration count is the training loop's step
    from ssb_jax.curves import read_curve
    from ssb_jax.training.metrics import read_metrics
    records = read_metrics(metrics.parent)  # the iterations' records (learning-curve points apart)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # none twice, none missing
    # the learning curve (configs/tiny.py's cadence, in iterations): at 0 and the end, each once
    every = json.loads((workdir / "config.json").read_text())["curves"]["eval_every"]
    curve = read_curve(metrics)
    assert [p["step"] for p in curve] == sorted({*range(0, 4, every), 4}) and {p["method"] for p in curve} == {"grpo"}
    assert curve[0]["sampled_tokens"] == 0 and curve[-1]["sampled_tokens"] == records[-1]["sampled_tokens"]
    for key in ("reward_mean", "accuracy", "completion_len_mean", "truncated_share", "kl", "clip_fraction", "loss",
                "grad_norm", "sampled_tokens"):
        assert all(np.isfinite(r[key]) for r in records), key
    tokens = [r["sampled_tokens"] for r in records]
    assert tokens == sorted(tokens) and tokens[0] > 0
    for relative in ("grpo/DONE.json", "grpo/grpo.png", "grpo/FINGERPRINT.json",
                     "grpo/export/peft_adapter/adapter_model.safetensors", "grpo/export/peft_adapter/adapter_config.json"):
        assert (workdir / relative).exists(), relative
    assert list((workdir / "grpo" / "tb").iterdir())
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert {row["model"] for row in results["rows"]} == {"base", "grpo"}
    assert "GRPO baseline" in (workdir / "report.md").read_text()

    # a changed GRPO setting stops the stage rather than mixing runs
    stale = pipeline_in_process(workdir, *GRPO_RUN, "--config.stages=grpo", "--config.grpo.clip_epsilon=0.3")
    assert stale.returncode != 0 and "config.overwrite=grpo" in stale.stderr, stale.stderr[-2000:]
