"""The on-policy losses against float64 NumPy (value and gradient with respect to the student's hidden states,
with padding, chunking and per-token clipping, for a top-k + tail teacher and a full-vocabulary one), and the
lambda mix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssb_jax.distill.batch import CachedTeacher
from ssb_jax.onpolicy.losses import generalized_jsd, mixed_objective, onpolicy_objective

B, A, D, V, K = 3, 7, 6, 11, 4


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def teacher_buckets(t_logits, T, k):
    """float64: the teacher's top-k log-probs at T, their ids, the log tail mass, the log-prob at T = 1 of
    nothing yet (filled per target below)."""
    logp = log_softmax(t_logits / T)
    ids = np.argsort(-logp, axis=-1)[..., :k]
    top = np.take_along_axis(logp, ids, -1)
    tail = np.log1p(-np.exp(top).sum(-1)) if k < V else np.full(top.shape[:-1], -1e30)
    return top, ids, tail


def numpy_loss(s_h, head, t_logits, targets, mask, *, loss, T, alpha, clip, k):
    """(loss, d loss / d student hidden) in float64 from the formulas, the gradient written out by hand:
    per token a divergence d over buckets b (student log-masses at T), ∂d/∂b by hand, then
    ∂b_j/∂z_v = (1[v in j] s_v / S_j - s_v) / T and ∂/∂h = (∂/∂z) headᵀ."""
    s_h, head, t_logits = (np.asarray(x, np.float64) for x in (s_h, head, t_logits))
    z = s_h @ head                                          # [B, A, V]
    m = np.asarray(mask, np.float64)
    w = m / max(m.sum(), 1)
    if loss == "reverse_kl":
        s_lp = np.take_along_axis(log_softmax(z), targets[..., None], -1)[..., 0]
        t_lp = np.take_along_axis(log_softmax(t_logits), targets[..., None], -1)[..., 0]
        adv = t_lp - s_lp
        if clip:
            adv = np.clip(adv, -clip, clip)
        value = -(w * adv * s_lp).sum()
        d_z = -(w * adv)[..., None] * (np.eye(V)[targets] - np.exp(log_softmax(z)))
        return value, d_z @ head.T
    s = np.exp(log_softmax(z / T))                           # student probabilities at T [B, A, V]
    if k >= V:                                               # every token its own bucket
        member = np.broadcast_to(np.eye(V), (B, A, V, V))   # [B, A, bucket, vocab]
        a = log_softmax(t_logits / T)
    else:
        top, ids, tail = teacher_buckets(t_logits, T, k)
        member = np.zeros((B, A, k + 1, V))
        for j in range(k):
            np.put_along_axis(member[:, :, j], ids[..., j:j + 1], 1.0, -1)
        member[:, :, k] = 1 - member[:, :, :k].sum(2)
        a = np.concatenate([top, tail[..., None]], -1)
    S = np.einsum("bajv,bav->baj", member, s)                # student bucket masses
    b = np.log(S)
    t = np.exp(a)
    if loss == "forward_kl":
        d = (t * (a - b)).sum(-1)
        g = -t
    else:
        log_m = np.log(alpha * t + (1 - alpha) * S)
        d = alpha * (t * (a - log_m)).sum(-1) + (1 - alpha) * (S * (b - log_m)).sum(-1)
        g = (1 - alpha) * S * (b - log_m)
    # ∂d/∂z_v = Σ_j g_j (member_jv s_v / S_j - s_v) / T
    d_z = (np.einsum("baj,bajv->bav", g / S, member) * s - s * g.sum(-1, keepdims=True)) / T
    keep = np.ones_like(d) if not clip else (d <= clip).astype(np.float64)
    value = T ** 2 * (w * (np.minimum(d, clip) if clip else d)).sum()
    return value, (T ** 2 * (w * keep)[..., None] * d_z) @ head.T, d


def _inputs(rng):
    s_h = rng.normal(0, 1, (B, A, D)).astype(np.float32)
    t_h = rng.normal(0, 1, (B, A, D)).astype(np.float32)
    head = rng.normal(0, 0.8, (D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, A)).astype(np.int32)
    lengths = np.array([A, 4, 0])                            # a full row, a padded one, an empty one
    mask = np.arange(A)[None, :] < lengths[:, None]
    return s_h, t_h, head, targets, mask


def _between_middle(values):
    """A threshold half way between the two middle values: about half above, none on it (where min's
    gradient would be split)."""
    ordered = np.sort(values)
    return float(ordered[len(ordered) // 2 - 1:len(ordered) // 2 + 1].mean())


def _teacher(t_h, head, targets, T, k):
    """The teacher as the step gives it: hidden states (full vocabulary) or the cached layout from float64."""
    if k >= V:
        return jnp.asarray(t_h)
    t_logits = np.asarray(t_h, np.float64) @ np.asarray(head, np.float64)
    top, ids, tail = teacher_buckets(t_logits, T, k)
    target = np.take_along_axis(log_softmax(t_logits), targets[..., None], -1)[..., 0]
    return CachedTeacher(logprobs=jnp.asarray(top, jnp.float32), ids=jnp.asarray(ids, jnp.int32),
                         tail_logprob=jnp.asarray(tail, jnp.float32), target_logprob=jnp.asarray(target, jnp.float32))


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("k", [K, V], ids=["topk_tail", "full_vocab"])
@pytest.mark.parametrize("chunk,clipped", [(0, False), (3, True)], ids=["whole", "chunked_clipped"])
def test_loss_and_gradient_match_numpy(rng, loss, k, chunk, clipped):
    T, alpha = (1.0 if loss == "reverse_kl" else 1.5), 0.3
    s_h, t_h, head, targets, mask = _inputs(rng)
    t_logits = np.asarray(t_h, np.float64) @ np.asarray(head, np.float64)
    clip = 0.0
    if clipped:  # about half of the real tokens clipped
        if loss == "reverse_kl":
            z = np.asarray(s_h, np.float64) @ np.asarray(head, np.float64)
            ratio = np.abs(np.take_along_axis(log_softmax(t_logits) - log_softmax(z), targets[..., None], -1)[..., 0])
            clip = _between_middle(ratio[mask])
        else:
            d = numpy_loss(s_h, head, t_logits, targets, mask, loss=loss, T=T, alpha=alpha, clip=0.0, k=k)[2]
            clip = _between_middle(d[mask])
    want, want_grad = numpy_loss(s_h, head, t_logits, targets, mask, loss=loss, T=T, alpha=alpha, clip=clip, k=k)[:2]
    teacher = _teacher(t_h, head, targets, T, k)

    def objective(h):
        return onpolicy_objective(h, teacher, jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(head), loss=loss,
                                  temperature=T, jsd_alpha=alpha, clip=clip, chunk=chunk)

    (value, metrics), grad = jax.value_and_grad(objective, has_aux=True)(jnp.asarray(s_h))
    np.testing.assert_allclose(float(value), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-4, atol=2e-6)
    assert not np.asarray(grad)[~mask].any()  # padding positions get no gradient
    assert int(metrics["answer_tokens"]) == mask.sum()
    if clipped:
        assert 0 < float(metrics["clipped_share"]) < 1


def test_generalized_jsd_is_symmetric_at_one_half_and_zero_for_equal_distributions(rng):
    p = log_softmax(rng.normal(0, 1, (5, V)))
    q = log_softmax(rng.normal(0, 1, (5, V)))
    pq, qp = (np.asarray(generalized_jsd(jnp.asarray(x), jnp.asarray(y), 0.5)) for x, y in ((p, q), (q, p)))
    np.testing.assert_allclose(pq, qp, rtol=1e-5)
    assert (pq > 0).all() and (pq <= np.log(2) + 1e-6).all()
    np.testing.assert_allclose(np.asarray(generalized_jsd(jnp.asarray(p), jnp.asarray(p), 0.3)), 0, atol=1e-6)


def test_mixed_objective_weights_the_two_terms():
    on = lambda: (jnp.asarray(2.0), {"loss": jnp.asarray(2.0)})  # noqa: E731
    off = lambda: (jnp.asarray(5.0), {"loss": jnp.asarray(5.0), "kl": jnp.asarray(1.0)})  # noqa: E731
    assert mixed_objective(on, off, 0.0)[1] == off()[1]
    assert mixed_objective(on, off, 1.0)[1] == on()[1]
    loss, metrics = mixed_objective(on, off, 0.25)
    assert float(loss) == pytest.approx(0.25 * 2 + 0.75 * 5)
    assert float(metrics["offline_kl"]) == 1.0 and float(metrics["onpolicy_loss"]) == 2.0
