"""The on-policy update on a tiny model: lambda 0 is SSB's loss bit for bit; one step raises the log-probability
of sampled tokens the teacher prefers and lowers the others'; one step lowers the divergence to the teacher;
the EMA teacher follows the adapters."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssb_jax.distill.batch import build_batch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.onpolicy.config import OnPolicyConfig

V = 64


@pytest.fixture(scope="module")
def tiny():
    from ssb_jax.distill.synthetic import tiny_model_config
    from ssb_jax.model.lora import LoraConfig
    from ssb_jax.model.qwen2 import init_model
    config = tiny_model_config(vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    return config, init_model(config, 0, std=0.2), LoraConfig(rank=4, alpha=8.0)


def _settings(**changes):
    base = dict(steps=10, prompts_per_step=1, samples_per_prompt=1, max_new_tokens=8, logits_chunk=3, grad_clip=0.0,
                learning_rate=1e-4, schedule="constant", lora_rank=4, lora_alpha=8.0, min_bucket=8)
    return OnPolicyConfig(**{**base, **changes})


def test_lambda_zero_is_ssb_loss_bit_for_bit(tiny, rng):
    """The same batch through the on-policy loss at lambda 0 and through SSB's distill_loss: the two gradient
    programs are the same program (equal jaxprs), so loss, metrics and gradients agree bit for bit; and the
    loss is SSB's value."""
    from ssb_jax.distill.step import base_state_for_training, distill_loss, graph_definitions, init_state
    from ssb_jax.distill.synthetic import random_records
    from ssb_jax.onpolicy.step import offline_config, onpolicy_loss
    from ssb_jax.training.optim import make_optimizer
    config, model, lora_config = tiny
    tc = TrainConfig(batch_size=3, logits_chunk=4, temperature=2.0, ce_weight=0.3, lora_rank=4, lora_alpha=8.0)
    oc = _settings(onpolicy_weight=0.0)
    offline = build_batch(random_records(rng, 3, V), batch_size=3, min_bucket=8).for_step("online")
    graphdefs = graph_definitions(config, lora_config)
    base = base_state_for_training(model)
    key = jax.random.key(int(rng.integers(1 << 30)))
    lora = init_state(config, lora_config, make_optimizer(tc, 10)[0], key)["lora"]
    lora = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.ones_like(x), lora)  # B != 0: the adapters matter
    ssb = lambda l: distill_loss(l, base, offline, graphdefs=graphdefs, tc=tc)  # noqa: E731
    mixed = lambda l: onpolicy_loss(l, base, None, {"offline": offline}, graphdefs=graphdefs, oc=oc,  # noqa: E731
                                    tc=offline_config(oc, tc))
    grads = [jax.value_and_grad(f, has_aux=True) for f in (mixed, ssb)]
    assert str(jax.make_jaxpr(grads[0])(lora)) == str(jax.make_jaxpr(grads[1])(lora))
    got, metrics = jax.jit(mixed)(lora)  # the value: SSB's terms
    want_kl = float(metrics["kl"])
    assert float(got) == pytest.approx(tc.temperature ** 2 * want_kl + tc.ce_weight * float(metrics["ce"]), rel=1e-6)
    assert want_kl > 0


def _logprobs_after(tiny):
    """(lora state as a pure dict, prompt) -> float64 log-probs of the token after the prompt, under base +
    adapters (fresh adapters are the base: their B factors start at 0); one program for every call."""
    from ssb_jax.distill.step import base_state_for_training, graph_definitions
    from ssb_jax.model.qwen2 import apply
    config, model, lora_config = tiny
    graphdef = graph_definitions(config, lora_config)[0]
    base = base_state_for_training(model)
    program = jax.jit(lambda lora, tokens, mask: apply(graphdef, (lora, base), tokens,
                                                       jnp.arange(16, dtype=jnp.int32)[None], mask)[0])

    def logprobs(lora, prompt):
        tokens = np.zeros((1, 16), np.int32)
        tokens[0, :len(prompt)] = prompt
        z = np.asarray(program(lora, tokens, tokens != 0)[0, len(prompt) - 1], np.float64)
        return z - np.log(np.exp(z - z.max()).sum()) - z.max()
    return logprobs


def _one_token_update(tiny, oc, state, student_prompt, teacher_prompt, token):
    """One update of a copy of `state` on a batch of one sample, `token`; (state after, metrics)."""
    from ssb_jax.distill.step import base_state_for_training
    from ssb_jax.onpolicy.run import onpolicy_batch
    from ssb_jax.onpolicy.step import OnPolicyStep
    config, model, lora_config = tiny
    batch = onpolicy_batch([{"id": "q#0", "student_prompt_ids": student_prompt, "teacher_prompt_ids": teacher_prompt,
                             "solution_ids": [int(token)]}], 1, oc.min_bucket)
    copy = jax.tree_util.tree_map(jnp.array, state)  # the update donates its state
    return OnPolicyStep(config, lora_config, oc).update(copy, base_state_for_training(model), {"onpolicy": batch})


def _initial_state(tiny, oc, rng):
    from ssb_jax.onpolicy.step import OnPolicyStep
    config, _, lora_config = tiny
    return OnPolicyStep(config, lora_config, oc).init_state(jax.random.key(int(rng.integers(1 << 30))))


def _prompts(rng):
    student = rng.integers(2, V, 6).tolist()
    return student, rng.integers(2, V, 5).tolist() + student  # the teacher's: a "context", then the question


def test_one_step_raises_the_tokens_the_teacher_prefers_and_lowers_the_others(tiny, rng):
    """Reverse KL as the per-token advantage (log teacher - log student of the sampled token): a sample the
    teacher likes more than the student gains log-probability in one step, one it likes less loses it. With
    one token per batch, Adam's first step moves each parameter by lr·sign(advantage · ∂log p/∂θ), so to first
    order the change of log p is sign(advantage) · lr · Σ|∂log p/∂θ|."""
    logprobs = _logprobs_after(tiny)
    student_prompt, teacher_prompt = _prompts(rng)
    oc = _settings(loss="reverse_kl", topk=0)
    state = _initial_state(tiny, oc, rng)
    student = logprobs(state["lora"], student_prompt)  # fresh adapters: the base itself, the teacher's weights
    gap = logprobs(state["lora"], teacher_prompt) - student
    for token, sign in ((int(np.argmax(gap)), 1), (int(np.argmin(gap)), -1)):
        after, metrics = _one_token_update(tiny, oc, state, student_prompt, teacher_prompt, token)
        change = logprobs(after["lora"], student_prompt)[token] - student[token]
        assert float(metrics["reverse_kl"]) == pytest.approx(-gap[token], abs=1e-4)
        assert sign * change > 0, (token, gap[token], change)


@pytest.mark.slow  # two update programs compiled (about 25 s each on 2 busy cores)
@pytest.mark.parametrize("loss,topk,teacher", [("forward_kl", 8, "base"), ("jsd", 0, "ema")])
def test_one_step_lowers_the_divergence_to_the_teacher(tiny, rng, loss, topk, teacher):
    """Forward KL over the top-k + tail from the frozen base, JSD over the vocabulary from the EMA teacher:
    one small step lowers the divergence at the trained position (Adam's first step is a descent direction),
    and the EMA teacher moves a (1 - decay) share of the way to the new adapters."""
    from ssb_jax.onpolicy.losses import generalized_jsd
    logprobs = _logprobs_after(tiny)
    student_prompt, teacher_prompt = _prompts(rng)
    oc = _settings(loss=loss, topk=topk, teacher=teacher, temperature=1.0, ema_decay=0.75)
    before = _initial_state(tiny, oc, rng)
    after, metrics = _one_token_update(tiny, oc, before, student_prompt, teacher_prompt, 5)
    t = logprobs(before["ema" if teacher == "ema" else "lora"], teacher_prompt)  # fresh adapters: the base

    def divergence(state):
        s = logprobs(state["lora"], student_prompt)
        if loss == "jsd":
            return float(generalized_jsd(jnp.asarray(t), jnp.asarray(s), oc.jsd_alpha))
        top = np.argsort(-t)[:topk]
        rest = np.setdiff1d(np.arange(V), top)
        a = np.append(t[top], np.log(np.exp(t[rest]).sum()))
        b = np.append(s[top], np.log(np.exp(s[rest]).sum()))
        return float((np.exp(a) * (a - b)).sum())

    assert float(metrics["divergence"]) == pytest.approx(divergence(before), rel=1e-3, abs=1e-6)
    assert divergence(after) < divergence(before)
    if teacher == "ema":
        jax.tree_util.tree_map(
            lambda e0, l1, e1: np.testing.assert_allclose(np.asarray(e1), 0.75 * np.asarray(e0) + 0.25 * np.asarray(l1),
                                                          rtol=1e-6, atol=1e-7), before["ema"], after["lora"],
            after["ema"])


@pytest.mark.parametrize("loss,topk,per_sequence,weight,microbatches", [
    ("forward_kl", 8, False, 1.0, 2),
    pytest.param("reverse_kl", 0, True, 1.0, 4, marks=pytest.mark.slow),  # each case compiles two programs
    pytest.param("jsd", 0, False, 0.5, 2, marks=pytest.mark.slow)])
def test_microbatches_accumulate_the_whole_batchs_gradient(tiny, rng, loss, topk, per_sequence, weight, microbatches):
    """An iteration's rows in microbatches, one at a time: the gradient and the metrics are the whole batch's
    (each slice weighted by its share of the tokens, or of the sequences), with rows of different lengths and
    one row that trains on nothing; lambda 0.5 splits SSB's offline batch alike."""
    from ssb_jax.distill.step import base_state_for_training, graph_definitions
    from ssb_jax.distill.synthetic import random_records
    from ssb_jax.onpolicy.run import onpolicy_batch
    from ssb_jax.onpolicy.step import OnPolicyStep, offline_config, onpolicy_gradients
    config, model, lora_config = tiny
    tc = TrainConfig(batch_size=4, logits_chunk=3, temperature=2.0, per_sequence_mean=per_sequence, lora_rank=4,
                     lora_alpha=8.0)
    samples = []
    for i, length in enumerate((1, 5, 3, 7)):
        student, teacher = _prompts(rng)
        samples.append({"id": f"q#{i}", "student_prompt_ids": student, "teacher_prompt_ids": teacher,
                        "solution_ids": rng.integers(2, V, length).tolist()})
    onpolicy = onpolicy_batch(samples, 4, 8)
    onpolicy = onpolicy.replace(answer_mask=onpolicy.answer_mask.copy())
    onpolicy.answer_mask[2] = False  # a row with nothing to train on (padding) weighs nothing
    batch = {"onpolicy": onpolicy.for_step("online")}
    if weight < 1:
        batch["offline"] = build_batch(random_records(rng, 4, V), batch_size=4, min_bucket=8).for_step("online")
    graphdefs = graph_definitions(config, lora_config)
    base = base_state_for_training(model)
    results = []
    for count in (1, microbatches):
        oc = _settings(loss=loss, topk=topk, clip=0.5 if loss == "reverse_kl" else 0.0, per_sequence_mean=per_sequence,
                       onpolicy_weight=weight, prompts_per_step=4, microbatches=count, temperature=1.5)
        state = OnPolicyStep(config, lora_config, oc, tc).init_state(jax.random.key(int(rng.integers(1 << 30))))
        lora = jax.tree_util.tree_map(lambda x: x + 0.05, state["lora"]) if not results else results[0][2]
        grads, metrics = jax.jit(functools.partial(onpolicy_gradients, graphdefs, oc, offline_config(oc, tc)))(
            lora, base, None, batch)
        results.append((grads, metrics, lora))
    (whole, whole_metrics, _), (split, split_metrics, _) = results
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6),
                           whole, split)
    assert float(np.abs(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(whole)])).max()) > 0
    assert set(split_metrics) == set(whole_metrics)
    for key, value in whole_metrics.items():
        if key != "clipped_share" or not per_sequence:  # a token mean weighted by sequences: not the whole's
            assert float(split_metrics[key]) == pytest.approx(float(value), rel=2e-4, abs=1e-6), key


def test_microbatches_must_divide_the_rows():
    with pytest.raises(ValueError, match="microbatches .3. must divide the rows"):
        _settings(prompts_per_step=4, microbatches=3)
