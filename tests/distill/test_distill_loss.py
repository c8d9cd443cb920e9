"""The distillation loss against the reference PyTorch formula; chunking; the cached top-k KL."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssb_jax.distill.loss import distill_objective, masked_mean, token_terms
from ssb_jax.distill.teacher_cache import topk_from_logits
from tests.xla_text import ynn_fused_bodies


def torch_reference(s, t, T):
    s, t = torch.as_tensor(np.asarray(s, np.float64)), torch.as_tensor(np.asarray(t, np.float64))
    return float(F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T ** 2)


def random_logits(rng, B, A, V, scale=3.0):
    return (scale * rng.standard_normal((B, A, V))).astype(np.float32)


def random_mask(rng, B, A):
    lengths = rng.integers(1, A + 1, B)
    return np.arange(A)[None, :] < lengths[:, None]


@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
def test_loss_matches_torch_kl_div(T, rng):
    B, A, V = 3, 11, 53
    s, t = random_logits(rng, B, A, V), random_logits(rng, B, A, V)
    mask = random_mask(rng, B, A)
    targets = rng.integers(0, V, (B, A))
    eye = jnp.eye(V, dtype=jnp.float32)  # hidden = logits when the head is the identity
    for chunk in (0, 4):
        loss, metrics = distill_objective(jnp.asarray(s), jnp.asarray(t), jnp.asarray(targets), jnp.asarray(mask), eye,
                                          temperature=T, chunk=chunk)
        ref = torch_reference(s[mask], t[mask], T)
        assert abs(float(loss) - ref) < 1e-5 * max(1.0, abs(ref)), (float(loss), ref)
        assert abs(float(metrics["kl"]) * T ** 2 - ref) < 1e-5 * max(1.0, abs(ref))
        ce_ref = float(F.cross_entropy(torch.as_tensor(s[mask], dtype=torch.float64), torch.as_tensor(targets[mask])))
        assert abs(float(metrics["ce"]) - ce_ref) < 1e-5 * max(1.0, ce_ref)
        tce_ref = float(F.cross_entropy(torch.as_tensor(t[mask], dtype=torch.float64), torch.as_tensor(targets[mask])))
        assert abs(float(metrics["teacher_ce"]) - tce_ref) < 1e-5 * max(1.0, tce_ref)
        agree = (s.argmax(-1) == t.argmax(-1))[mask].mean()
        assert abs(float(metrics["agree"]) - agree) < 1e-6
        assert int(metrics["answer_tokens"]) == mask.sum()
    # with a CE term
    lam = 0.3
    loss, _ = distill_objective(jnp.asarray(s), jnp.asarray(t), jnp.asarray(targets), jnp.asarray(mask), eye,
                                temperature=T, ce_weight=lam)
    assert abs(float(loss) - (torch_reference(s[mask], t[mask], T) + lam * ce_ref)) < 1e-5 * max(1.0, float(loss))


def test_per_sequence_mean(rng):
    B, A, V = 4, 9, 31
    s, t = random_logits(rng, B, A, V), random_logits(rng, B, A, V)
    mask = random_mask(rng, B, A)
    mask[2] = False  # an all-padding row does not count
    T = 2.0
    loss, _ = distill_objective(jnp.asarray(s), jnp.asarray(t), jnp.zeros((B, A), jnp.int32), jnp.asarray(mask),
                                jnp.eye(V), temperature=T, per_sequence_mean=True)
    per_row = [torch_reference(s[i][mask[i]], t[i][mask[i]], T) for i in range(B) if mask[i].any()]
    assert abs(float(loss) - np.mean(per_row)) < 1e-5 * max(1.0, float(loss))
    x = rng.standard_normal((B, A)).astype(np.float32)
    assert abs(float(masked_mean(jnp.asarray(x), jnp.asarray(mask))) - x[mask].mean()) < 1e-6


@pytest.mark.parametrize("ce_weight", [0.0, 0.1])
@pytest.mark.parametrize("cached", [False, True])
def test_chunked_equals_unchunked(cached, ce_weight, rng):
    B, A, D, V = 2, 13, 16, 41
    head = jnp.asarray(rng.standard_normal((D, V)).astype(np.float32))
    s_h = jnp.asarray(rng.standard_normal((B, A, D)).astype(np.float32))
    t_h = jnp.asarray(rng.standard_normal((B, A, D)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, V, (B, A)))
    mask = jnp.asarray(random_mask(rng, B, A))
    T = 2.0
    teacher = t_h
    if cached:
        teacher = topk_from_logits(t_h @ head, 7, T, targets)

    def f(s_h, chunk, per_sequence_mean=False):
        return distill_objective(s_h, teacher, targets, mask, head, temperature=T, ce_weight=ce_weight, chunk=chunk,
                                 per_sequence_mean=per_sequence_mean)

    (l0, m0), g0 = jax.value_and_grad(f, has_aux=True)(s_h, 0)
    # the chunked gradient sums in another order: float32 rounding relative to the largest entry
    grad_atol = 1e-6 * float(np.abs(np.asarray(g0)).max())
    for chunk in (1, 4, 5, 13):
        (l1, m1), g1 = jax.value_and_grad(f, has_aux=True)(s_h, chunk)
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
        for k in m0:
            np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=grad_atol)
    # the per-sequence mean weighs tokens differently: the chunked gradient follows
    (_, _), g0 = jax.value_and_grad(f, has_aux=True)(s_h, 0, True)
    (_, _), g1 = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=(1, 2))(s_h, 4, True)
    grad_atol = 1e-6 * float(np.abs(np.asarray(g0)).max())
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=grad_atol)
    # per-token terms too
    for a, b in zip(token_terms(s_h, teacher, targets, head, T, 0), token_terms(s_h, teacher, targets, head, T, 4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_cached_topk_full_vocab_equals_full_kl(rng):
    B, A, V = 2, 7, 37
    s, t = random_logits(rng, B, A, V), random_logits(rng, B, A, V)
    targets = jnp.asarray(rng.integers(0, V, (B, A)))
    mask = jnp.asarray(random_mask(rng, B, A))
    T = 2.0
    eye = jnp.eye(V)
    cached = topk_from_logits(jnp.asarray(t), V, T, targets)

    def f(s, teacher):
        return distill_objective(s, teacher, targets, mask, eye, temperature=T, chunk=3)

    (lc, mc), gc = jax.value_and_grad(f, has_aux=True)(jnp.asarray(s), cached)
    (lo, mo), go = jax.value_and_grad(f, has_aux=True)(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(float(lc), float(lo), rtol=1e-5)
    np.testing.assert_allclose(float(lc), torch_reference(s[np.asarray(mask)], t[np.asarray(mask)], T), rtol=1e-5)
    for k in ("kl", "ce", "teacher_ce", "agree"):
        np.testing.assert_allclose(float(mc[k]), float(mo[k]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gc), np.asarray(go), rtol=1e-4, atol=1e-7)


def test_cached_topk_with_tail_bucket(rng):
    """k < V: KL over the k ids plus one tail bucket, against a float64 numpy reference."""
    A, V, k, T = 6, 29, 5, 1.5
    s, t = random_logits(rng, 1, A, V)[0], random_logits(rng, 1, A, V)[0]
    cached = jax.tree.map(lambda x: x[None], topk_from_logits(jnp.asarray(t), k, T, jnp.zeros(A, jnp.int32)))
    loss, _ = distill_objective(jnp.asarray(s)[None], cached, jnp.zeros((1, A), jnp.int32), jnp.ones((1, A), bool),
                                jnp.eye(V), temperature=T)

    def logsoftmax(x):
        x = x.astype(np.float64) / T
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

    p, q = np.exp(logsoftmax(t)), np.exp(logsoftmax(s))
    top = np.argsort(-t, axis=-1)[:, :k]
    assert (np.sort(np.asarray(cached.ids[0]), -1) == np.sort(top, -1)).all()
    kl = 0.0
    for a in range(A):
        pk, qk = p[a, top[a]], q[a, top[a]]
        pt, qt = 1 - pk.sum(), 1 - qk.sum()
        kl += (pk * np.log(pk / qk)).sum() + pt * np.log(pt / qt)
    np.testing.assert_allclose(float(loss), T ** 2 * kl / A, rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(cached.tail_logprob)), 1 - np.exp(np.asarray(cached.logprobs)).sum(-1),
                               rtol=1e-4, atol=1e-7)


def test_vocab_programs_leave_reductions_to_xla(rng):
    """On CPU the distillation step compiles with YNNPACK for matrix products only (its fused
    vocabulary-wide reductions ran 10-15x slower); the loss and its gradient stay exact."""
    from ssb_jax.compile_options import YNN_DOTS_ONLY, YNN_FUSION_FLAG, vocab_program_options
    options = vocab_program_options()
    if not options:
        pytest.skip("this backend or jaxlib does not take the YNNPACK fusion option")
    assert options == {YNN_FUSION_FLAG: YNN_DOTS_ONLY}
    B, A, D, V, T = 2, 6, 16, 512, 2.0
    s_h, t_h = rng.standard_normal((2, B, A, D)).astype(np.float32)
    head = rng.standard_normal((D, V)).astype(np.float32) / 4
    targets, mask = rng.integers(0, V, (B, A)), random_mask(rng, B, A)

    def loss(s):
        return distill_objective(s, t_h, targets, mask, head, temperature=T)[0]

    default = jax.jit(jax.value_and_grad(loss))
    tuned = jax.jit(jax.value_and_grad(loss), compiler_options=options)
    if not [b for b in ynn_fused_bodies(default.lower(s_h).compile().as_text()) if " reduce(" in b]:
        pytest.skip("this jaxlib hands no reduction to YNNPACK: nothing to keep from it")
    assert not [b for b in ynn_fused_bodies(tuned.lower(s_h).compile().as_text()) if " reduce(" in b]
    value, grad = tuned(s_h)
    s64, t64, h64 = (np.asarray(x, np.float64) for x in (s_h, t_h, head))
    reference = torch_reference((s64 @ h64)[mask], (t64 @ h64)[mask], T)
    np.testing.assert_allclose(float(value), reference, rtol=1e-5)
    _, default_grad = default(s_h)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(default_grad), rtol=1e-4, atol=1e-6)


def _vocab_products(jaxpr, V: int) -> int:
    """dot_generals anywhere in a (closed) jaxpr whose operands or result have a vocabulary axis."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = [v.aval.shape for v in list(eqn.invars) + list(eqn.outvars)]
            count += any(V in shape for shape in shapes)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)  # open or closed jaxpr
                if hasattr(inner, "eqns"):
                    count += _vocab_products(inner, V)
    return count


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_chunked_gradient_projects_each_chunk_once(ce_weight, rng):
    """Teacher and student logits, then one product per gradient term: the backward adds none."""
    B, A, D, V = 2, 12, 8, 97
    head = rng.standard_normal((D, V)).astype(np.float32)
    s_h, t_h = rng.standard_normal((2, B, A, D)).astype(np.float32)
    targets, mask = rng.integers(0, V, (B, A)), random_mask(rng, B, A)

    def loss(s):
        return distill_objective(s, t_h, targets, mask, head, temperature=2.0, ce_weight=ce_weight, chunk=4)[0]

    assert _vocab_products(jax.make_jaxpr(loss)(s_h).jaxpr, V) == 2  # without a gradient: logits only
    assert _vocab_products(jax.make_jaxpr(jax.grad(loss))(s_h).jaxpr, V) == 2 + (2 if ce_weight else 1)
