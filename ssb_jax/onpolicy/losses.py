"""On-policy losses at the student's own tokens, and the lambda mix with SSB's offline loss.

The teacher is either hidden states [B, A, D] (the full vocabulary, projected chunk by chunk) or a
`CachedTeacher` (top-k log-probs of softmax(t/T), their ids and one tail bucket: the cached teacher's
layout, here computed each step). Per answer token, with teacher and student distributions t, s at
temperature T over the buckets (the k ids plus the tail, or the whole vocabulary):

- forward_kl: KL(t || s), today's SSB term (ssb_jax.distill.loss.token_terms, shared, not copied);
- jsd: the generalised Jensen-Shannon divergence with weight alpha,
      M = alpha * t + (1 - alpha) * s,   JSD = alpha * KL(t || M) + (1 - alpha) * KL(s || M)
  (alpha = 0.5 is the symmetric JSD);
- reverse_kl: the sampled token's log-ratio a = log t(x) - log s(x) at T = 1, as a per-token advantage
  with no gradient, in  -a * log s(x): its expected gradient over the student's own samples is the
  gradient of KL(s || t) (on-policy distillation with the reverse KL as the reward).

Per-token clipping (OPSD-style): a token's divergence counts at most `clip` (min(d, clip): a clipped token
passes no gradient); for reverse_kl the advantage is clipped to [-clip, clip]. The divergences are scaled
by T², as SSB's KL is, and averaged over real tokens (or per sequence, then over sequences).

`mixed_objective` mixes the on-policy loss with SSB's offline loss by lambda (GKD's mix of student-generated
and fixed data): lambda * on-policy + (1 - lambda) * offline. At lambda = 0 it returns the offline loss
itself, so the program is SSB's (tests/onpolicy/test_losses.py checks bit-equality).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssb_jax.distill.batch import CachedTeacher
from ssb_jax.distill.loss import _chunking, _project, masked_mean, target_logprobs, token_terms


def generalized_jsd(t_logp, s_logp, alpha: float):
    """alpha * KL(t || M) + (1 - alpha) * KL(s || M), M = alpha * t + (1 - alpha) * s, over the last axis
    (log-probabilities; -1e30 marks an empty bucket)."""
    log_m = jnp.logaddexp(jnp.log(alpha) + t_logp, jnp.log1p(-alpha) + s_logp)
    return (alpha * jnp.sum(jnp.exp(t_logp) * (t_logp - log_m), axis=-1)
            + (1 - alpha) * jnp.sum(jnp.exp(s_logp) * (s_logp - log_m), axis=-1))


def bucket_logprobs(s_logits, teacher, head, temperature: float):
    """(teacher, student) log-probabilities at temperature T over the teacher's buckets, [..., n]: the top-k
    ids plus the tail bucket (CachedTeacher; no tail when k is the vocabulary), or every token (teacher
    hidden states, projected by the frozen head)."""
    s_logp = jax.nn.log_softmax(s_logits / temperature, axis=-1)
    if not isinstance(teacher, CachedTeacher):
        t_logits = _project(jax.lax.stop_gradient(teacher), head)
        return jax.nn.log_softmax(t_logits / temperature, axis=-1), s_logp
    t_k = jax.lax.stop_gradient(teacher.logprobs).astype(s_logp.dtype)
    s_k = jnp.take_along_axis(s_logp, teacher.ids, axis=-1)
    if teacher.ids.shape[-1] >= s_logits.shape[-1]:
        return t_k, s_k
    in_topk = jnp.put_along_axis(jnp.zeros(s_logp.shape, bool), teacher.ids, True, axis=-1, inplace=False)
    # an empty bucket is -1e30, not -inf: 0 * (-inf) in the divergences would be nan
    s_tail = jnp.maximum(jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, s_logp), axis=-1), -1e30)
    t_tail = jnp.maximum(jax.lax.stop_gradient(teacher.tail_logprob).astype(s_logp.dtype), -1e30)
    return jnp.concatenate([t_k, t_tail[..., None]], -1), jnp.concatenate([s_k, s_tail[..., None]], -1)


def jsd_terms(student_hidden, teacher, head, temperature: float, alpha: float, chunk: int = 0):
    """Per-token generalised JSD [B, A] at temperature T (without T²). With 0 < chunk < A the vocabulary
    projection runs chunk by chunk under lax.map, each chunk rematerialised in the backward pass, so one
    chunk of logits is alive at a time."""
    def per_chunk(args):
        s_h, t = args
        return generalized_jsd(*bucket_logprobs(_project(s_h, head), t, head, temperature), alpha)

    A = student_hidden.shape[1]
    if not chunk or chunk >= A:
        return per_chunk((student_hidden, teacher))
    split, merge = _chunking(A, chunk)
    chunks = (split(student_hidden), jax.tree_util.tree_map(split, teacher))
    return merge(jax.lax.map(jax.checkpoint(per_chunk), chunks))


def teacher_target_logprobs(teacher, targets, head, chunk: int = 0):
    """The teacher's log-prob at T = 1 of each sampled token [B, A], no gradient."""
    if isinstance(teacher, CachedTeacher):
        return jax.lax.stop_gradient(teacher.target_logprob)
    return jax.lax.stop_gradient(target_logprobs(jax.lax.stop_gradient(teacher), targets, head, chunk))


def onpolicy_objective(student_hidden, teacher, targets, mask, head, *, loss: str, temperature: float,
                       jsd_alpha: float = 0.5, clip: float = 0.0, per_sequence_mean: bool = False, chunk: int = 0):
    """(loss, metrics) of the student's hidden states [B, A, D] at its own sampled tokens `targets` [B, A]
    (`mask`: the real ones) against the teacher; see the module docstring."""
    metrics = {}
    if loss == "reverse_kl":
        s_lp = target_logprobs(student_hidden, targets, head, chunk)
        log_ratio = teacher_target_logprobs(teacher, targets, head, chunk) - jax.lax.stop_gradient(s_lp)
        advantage = jnp.clip(log_ratio, -clip, clip) if clip else log_ratio
        value = -masked_mean(advantage * s_lp, mask, per_sequence_mean)
        metrics["reverse_kl"] = masked_mean(-log_ratio, mask, per_sequence_mean)  # k1 estimate of KL(s || t)
        clipped = jnp.abs(log_ratio) > clip
    else:
        if loss == "forward_kl":
            divergence = token_terms(student_hidden, teacher, targets, head, temperature, chunk, ce_grad=False)[0]
        elif loss == "jsd":
            divergence = jsd_terms(student_hidden, teacher, head, temperature, jsd_alpha, chunk)
        else:
            raise ValueError(f"unknown on-policy loss {loss!r}")
        metrics["divergence"] = masked_mean(divergence, mask, per_sequence_mean)
        clipped = divergence > clip
        if clip:
            divergence = jnp.minimum(divergence, clip)
        value = temperature ** 2 * masked_mean(divergence, mask, per_sequence_mean)
    metrics["clipped_share"] = masked_mean(clipped.astype(value.dtype), mask) if clip else jnp.zeros((), value.dtype)
    metrics["loss"] = value
    metrics["answer_tokens"] = jnp.sum(mask.astype(jnp.int32))
    return value, metrics


def mixed_objective(onpolicy, offline, weight: float):
    """lambda * on-policy + (1 - lambda) * offline; `onpolicy` and `offline` are () -> (loss, metrics). At
    lambda = 0 (1) only the offline (on-policy) term is traced, and its (loss, metrics) are returned as they
    are; in between, the metrics are both terms' with the prefixes onpolicy_ and offline_."""
    if weight == 0:
        return offline()
    if weight == 1:
        return onpolicy()
    on_loss, on_metrics = onpolicy()
    off_loss, off_metrics = offline()
    metrics = {**{f"onpolicy_{k}": v for k, v in on_metrics.items()},
               **{f"offline_{k}": v for k, v in off_metrics.items()}}
    metrics["loss"] = weight * on_loss + (1 - weight) * off_loss
    return metrics["loss"], metrics
