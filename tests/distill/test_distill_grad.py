"""Gradients of the distillation loss w.r.t. LoRA against central finite differences in float64.

The model computes its RMS norms and attention scores in float32 even for float64 inputs (right
for real training); for a clean float64 check the test swaps in float64 versions of those two
functions (same math), so the finite differences are not drowned in float32 rounding.
"""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssb_jax.distill.batch import build_batch
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.step import distill_loss, graph_definitions
from ssb_jax.distill.synthetic import random_records, tiny_model_config
from ssb_jax.model.lora import init_lora
from ssb_jax.model.qwen2 import init_model


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.parametrize("mode", ["online", "cached"])
def test_lora_grads_match_finite_differences_f64(mode, seed, rng):
    """The model computes norms, attention softmax and logits in float64 when its weights are float64."""
    with jax.enable_x64(True):
        config = tiny_model_config(num_layers=2, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1)
        tc = TrainConfig(lora_rank=3, lora_alpha=6.0, lora_dtype="float64", temperature=2.0, ce_weight=0.5,
                         logits_chunk=4, teacher_mode=mode, topk=5)
        lc = tc.lora_config()
        key = jax.random.key(seed)
        graphdefs = graph_definitions(config, lc)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), nnx.state(init_model(config, key, std=0.3)))
        lora = init_lora(config, lc, jax.random.fold_in(key, 1))
        lora = jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape,
                                                                               jnp.float64), lora)
        records = random_records(rng, 2, config.vocab_size, solution=(4, 9))
        batch = build_batch(records, min_bucket=4)
        if mode == "cached":
            # random teacher top-k distributions (a proper distribution over k ids + tail)
            B, A = batch.answer_tokens.shape
            ids = np.stack([[rng.permutation(config.vocab_size)[:5] for _ in range(A)] for _ in range(B)])
            probs = rng.dirichlet(np.ones(6), size=(B, A))
            batch = batch.replace(teacher_topk_ids=ids.astype(np.int32), teacher_topk_logprobs=np.log(probs[..., :5]),
                                  teacher_tail_logprob=np.log(probs[..., 5]), teacher_target_logprob=np.zeros((B, A)))
        batch = jax.tree_util.tree_map(jnp.asarray, batch)

        def loss(l):
            return distill_loss(l, params, batch, graphdefs=graphdefs, tc=tc)[0]

        loss = jax.jit(loss)
        grads = jax.grad(loss)(lora)
        assert all(x.dtype == jnp.float64 for x in jax.tree_util.tree_leaves(grads))
        flat, unravel = jax.flatten_util.ravel_pytree(lora)
        g = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
        eps = 1e-5
        # random directions
        for _ in range(3):
            d = rng.standard_normal(flat.shape[0])
            d /= np.linalg.norm(d)
            fd = (float(loss(unravel(flat + eps * d))) - float(loss(unravel(flat - eps * d)))) / (2 * eps)
            np.testing.assert_allclose(g @ d, fd, rtol=1e-6, atol=1e-9)
        # the largest single coordinates
        for i in np.argsort(-np.abs(g))[:4]:
            e = np.zeros_like(g)
            e[i] = 1.0
            fd = (float(loss(unravel(flat + eps * e))) - float(loss(unravel(flat - eps * e)))) / (2 * eps)
            np.testing.assert_allclose(g[i], fd, rtol=1e-6, atol=1e-9)
        assert np.abs(g).max() > 1e-4


def _dot_operand_dtypes(jaxpr, found):
    """(lhs dtype, rhs dtype, lhs shape, rhs shape, out dtype) of every dot_general, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            found.append((lhs.dtype, rhs.dtype, lhs.shape, rhs.shape, eqn.outvars[0].aval.dtype))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _dot_operand_dtypes(inner, found)
    return found


def test_bf16_head_gradient_is_a_bf16_product_with_float32_sums(rng):
    """With a bf16 head, the chunked KL's gradient to the hidden states, (p_s - p_t) / T @ headᵀ, is a
    product of bf16 inputs accumulated in float32 (not a float32 product over an upcast head), and
    equals float64 NumPy on the same bf16 inputs to bf16 precision."""
    from ssb_jax.distill.loss import token_terms
    B, A, D, V, chunk, temperature = 2, 6, 32, 300, 4, 2.0
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    hidden, teacher = bf16(rng.normal(size=(B, A, D))), bf16(rng.normal(size=(B, A, D)))
    head = bf16(rng.normal(size=(D, V)) * 0.3)
    targets = jnp.asarray(rng.integers(0, V, size=(B, A)))

    def kl_sum(h):
        return token_terms(h, teacher, targets, head, temperature, chunk)[0].astype(jnp.float32).sum()

    dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(kl_sum))(hidden).jaxpr, [])
    back = [d for d in dots if d[3] == (D, V) and d[2][-1] == V]  # [..., V] @ [D, V]ᵀ: back to the hidden width
    assert back and all(d[:2] == (jnp.bfloat16, jnp.bfloat16) and d[4] == jnp.float32 for d in back), back
    grad = np.asarray(jax.jit(jax.grad(kl_sum))(hidden), np.float64)

    h, t, w = (np.asarray(x, np.float64) for x in (hidden, teacher, head))

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = ((softmax(h @ w / temperature) - softmax(t @ w / temperature)) / temperature) @ w.T
    error = np.abs(grad - expected).max() / np.abs(expected).max()
    assert error < 2e-2, error
