"""Distillation loss at answer positions, projected to the vocabulary in chunks.

    loss = λ_KL · T² · KL(softmax(t/T) ‖ softmax(s/T)) + λ_CE · CE(student, solution token)

(λ_KL = 1 for SSB; λ_KL = 0, λ_CE = 1 is plain SFT on the teacher's solution.)

averaged over answer tokens (or per sequence, then over sequences). Only the hidden states at
answer positions are gathered ([B, A, D]); the vocabulary projection then runs over chunks of
`chunk` answer positions per sequence under `lax.map`, so at most one chunk of [B, chunk, V] logits
(teacher and student) is alive. Each chunk's gradient with respect to the student's hidden states is
formed in the same pass, so the backward never projects to the vocabulary again.

Teacher modes:
- online: teacher hidden states [B, A, D] (base model, LoRA off, on the teacher sequence), full vocabulary.
- cached: per answer token the teacher's top-k log-probs of softmax(t/T) (at the distillation
  temperature) with their ids, plus the log of the remaining tail mass; the KL runs over the
  k ids plus one tail bucket, whose student mass is logsumexp of the student's tempered
  log-probs outside the k ids. With k = V there is no tail and the KL is exact.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssb_jax.distill.batch import CachedTeacher
from ssb_jax.model.qwen2 import HIDDEN_AXES
from ssb_jax.sharding import constrain

_NEG = -1e30
# On a training mesh (sharding.constrain; nothing without a context mesh) each chunk's hidden states and
# their gradient keep the model's rows split and width whole: XLA then gathers the head once over fsdp and
# both products with it are local to a device's rows. (Unpinned, it gathered every chunk's logits'
# gradient over all rows, [B, chunk, V], for the product back to the hidden width.)


def _project(hidden, head):
    dtype = jnp.promote_types(hidden.dtype, jnp.float32)
    return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=dtype).astype(dtype)


def _back_to_hidden(d_logits, head):
    """d_logits [..., V] (float32 or wider) @ headᵀ -> [..., D] in d_logits' dtype: the product takes the
    head's dtype for both inputs and accumulates in d_logits' dtype (preferred_element_type). With a bf16
    head that is a bf16 product with float32 sums, as for the forward projection, instead of a float32
    product over a float32 copy of the head ([D, V]: 1.2 GB at the 3B shape) each chunk."""
    dtype = jnp.promote_types(head.dtype, d_logits.dtype) if jnp.finfo(head.dtype).bits >= 32 else head.dtype
    return jnp.einsum("...v,dv->...d", d_logits.astype(dtype), head, preferred_element_type=d_logits.dtype)


def _token_terms_online(s_logits, t_logits, targets, temperature):
    t_logits = jax.lax.stop_gradient(t_logits)
    s_logp_T = jax.nn.log_softmax(s_logits / temperature, axis=-1)
    t_logp_T = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp_T) * (t_logp_T - s_logp_T), axis=-1)
    s_logp = jax.nn.log_softmax(s_logits, axis=-1)
    t_logp = jax.nn.log_softmax(t_logits, axis=-1)
    ce = -jnp.take_along_axis(s_logp, targets[..., None], axis=-1)[..., 0]
    teacher_ce = -jnp.take_along_axis(t_logp, targets[..., None], axis=-1)[..., 0]
    agree = (jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1)).astype(s_logits.dtype)
    return kl, ce, teacher_ce, agree


def _token_terms_cached(s_logits, cached: CachedTeacher, targets, temperature):
    lp = jax.lax.stop_gradient(cached.logprobs).astype(s_logits.dtype)   # [..., k]
    ids = cached.ids
    tail = jnp.maximum(jax.lax.stop_gradient(cached.tail_logprob).astype(s_logits.dtype), _NEG)
    V, k = s_logits.shape[-1], ids.shape[-1]
    s_logp_T = jax.nn.log_softmax(s_logits / temperature, axis=-1)
    s_k = jnp.take_along_axis(s_logp_T, ids, axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - s_k), axis=-1)
    if k < V:  # one tail bucket: everything outside the teacher's top-k
        in_topk = jnp.zeros(s_logp_T.shape, bool)
        in_topk = jnp.put_along_axis(in_topk, ids, True, axis=-1, inplace=False)
        s_tail = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, s_logp_T), axis=-1)
        kl = kl + jnp.exp(tail) * (tail - s_tail)
    s_logp = jax.nn.log_softmax(s_logits, axis=-1)
    ce = -jnp.take_along_axis(s_logp, targets[..., None], axis=-1)[..., 0]
    teacher_ce = -jax.lax.stop_gradient(cached.target_logprob).astype(s_logits.dtype)
    agree = (jnp.argmax(s_logits, -1) == ids[..., 0]).astype(s_logits.dtype)
    return kl, ce, teacher_ce, agree


def token_terms(student_hidden, teacher, targets, head, temperature: float, chunk: int = 0, ce_grad: bool = True):
    """Per-answer-token (kl at T without T², ce, teacher_ce, agree), each [B, A].

    student_hidden [B, A, D]; teacher: hidden [B, A, D] (online) or a CachedTeacher (logprobs, ids
    [B, A, k], tail_logprob, target_logprob [B, A]); targets [B, A]; head [D, V].

    With 0 < chunk < A the terms are computed chunk by chunk (see `_chunked_terms`): only kl and, when
    ce_grad, ce carry a gradient, and only to student_hidden (the teacher and the head are frozen).
    """
    if chunk and chunk < targets.shape[1]:
        return _chunked_terms(student_hidden, teacher, targets, head, float(temperature), int(chunk), bool(ce_grad))
    return _terms_of_student_logits(teacher, targets, head, temperature)(_project(student_hidden, head))


def _terms_of_student_logits(teacher, targets, head, temperature):
    """student logits -> per-token terms against this teacher (online teacher logits projected here, once)."""
    if isinstance(teacher, CachedTeacher):
        return functools.partial(_token_terms_cached, cached=teacher, targets=targets, temperature=temperature)
    t_logits = _project(jax.lax.stop_gradient(teacher), head)
    return functools.partial(_token_terms_online, t_logits=t_logits, targets=targets, temperature=temperature)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_terms(student_hidden, teacher, targets, head, temperature, chunk, ce_grad):
    """token_terms over chunks of `chunk` answer positions under `lax.map`, one chunk of logits alive.

    Its gradient is formed in the forward pass: per chunk, d kl / d student_hidden (and d ce when
    ce_grad) = (d term / d logits) @ headᵀ, kept as [B, A, D]. The backward only scales these by the
    incoming per-token cotangents, so no chunk is projected to the vocabulary twice: three [rows, V]
    products per chunk (teacher, student, kl gradient; four with the ce gradient), against five when
    the backward recomputes the chunk under jax.checkpoint."""
    return _map_chunks(student_hidden, teacher, targets, head, temperature, chunk, ())[0]


def _chunked_terms_fwd(student_hidden, teacher, targets, head, temperature, chunk, ce_grad):
    return _map_chunks(student_hidden, teacher, targets, head, temperature, chunk, (0, 1) if ce_grad else (0,))


def _map_chunks(student_hidden, teacher, targets, head, temperature, chunk, grad_terms):
    """(terms, grads): the per-token terms and, for each index in grad_terms, d term / d student_hidden."""
    split, merge = _chunking(targets.shape[1], chunk)

    def one_chunk(args):
        s_h, t, y = args
        s_h = constrain(s_h, HIDDEN_AXES)
        from_logits = _terms_of_student_logits(t, y, head, temperature)
        if not grad_terms:
            return from_logits(_project(s_h, head)), ()
        terms, pullback = jax.vjp(from_logits, _project(s_h, head))
        zeros, ones = jnp.zeros_like(terms[0]), jnp.ones_like(terms[0])

        def hidden_grad(which):  # rows are independent, so a cotangent of ones gives every row's gradient
            d_logits = pullback(tuple(ones if i == which else zeros for i in range(len(terms))))[0]
            return constrain(_back_to_hidden(d_logits, head).astype(s_h.dtype), HIDDEN_AXES)

        return terms, tuple(hidden_grad(i) for i in grad_terms)

    terms, grads = jax.lax.map(one_chunk, (split(student_hidden), jax.tree_util.tree_map(split, teacher),
                                           split(targets)))
    return tuple(merge(t) for t in terms), tuple(merge(g) for g in grads)


def _chunking(A: int, chunk: int):
    """(split, merge) for chunks of `chunk` positions along axis 1: split [B, A, ...] -> [n, B, chunk, ...]
    (zero padded), merge back. lax.map over the leading axis keeps one chunk's vocabulary projection alive."""
    n = -(-A // chunk)
    pad = n * chunk - A

    def split(x):
        B = x.shape[0]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)

    def merge(x):
        return jnp.moveaxis(x, 0, 1).reshape((x.shape[1], n * chunk) + x.shape[3:])[:, :A]

    return split, merge


def _chunked_terms_bwd(temperature, chunk, ce_grad, grads, cotangents):
    d_hidden = cotangents[0][..., None] * grads[0]
    if ce_grad:
        d_hidden = d_hidden + cotangents[1][..., None] * grads[1]
    return d_hidden.astype(grads[0].dtype), None, None, None


_chunked_terms.defvjp(_chunked_terms_fwd, _chunked_terms_bwd)


def target_logprobs(hidden, targets, head, chunk: int = 0):
    """log softmax(hidden @ head)[target] per position [B, A], float32 (at least), differentiable in hidden.

    hidden [B, A, D] (positions already gathered), targets [B, A], head [D, V] (frozen). With
    0 < chunk < A the projection runs chunk by chunk and each chunk's gradient with respect to hidden,
    (onehot(target) - softmax) @ headᵀ, is formed in the same pass, as `token_terms` does for the
    distillation terms: at most one [B, chunk, V] block of logits is alive, forward or backward."""
    if chunk and chunk < targets.shape[1]:
        return _chunked_target_logprobs(hidden, targets, head, int(chunk))
    return _target_logprob_of_logits(_project(hidden, head), targets)


def _target_logprob_of_logits(logits, targets):
    return (jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            - jax.nn.logsumexp(logits, axis=-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_target_logprobs(hidden, targets, head, chunk):
    return _map_target_logprobs(hidden, targets, head, chunk, with_grad=False)[0]


def _chunked_target_logprobs_fwd(hidden, targets, head, chunk):
    return _map_target_logprobs(hidden, targets, head, chunk, with_grad=True)


def _map_target_logprobs(hidden, targets, head, chunk, with_grad):
    """(log-probs [B, A], d log-prob / d hidden [B, A, D] when with_grad)."""
    split, merge = _chunking(targets.shape[1], chunk)

    def one_chunk(args):
        h, y = args
        h = constrain(h, HIDDEN_AXES)
        logits = _project(h, head)
        logp = _target_logprob_of_logits(logits, y)
        if not with_grad:
            return logp, ()
        d_logits = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype) - jax.nn.softmax(logits, axis=-1)
        d_hidden = _back_to_hidden(d_logits, head)
        return logp, constrain(d_hidden.astype(h.dtype), HIDDEN_AXES)

    logp, d_hidden = jax.lax.map(one_chunk, (split(hidden), split(targets)))
    return merge(logp), (merge(d_hidden) if with_grad else ())


def _chunked_target_logprobs_bwd(chunk, d_hidden, cotangent):
    return (cotangent[..., None] * d_hidden).astype(d_hidden.dtype), None, None


_chunked_target_logprobs.defvjp(_chunked_target_logprobs_fwd, _chunked_target_logprobs_bwd)


def masked_mean(x, mask, per_sequence: bool = False):
    """Mean of x [B, A] over mask; per_sequence: mean per row, then over rows with any token."""
    mask = mask.astype(x.dtype)
    if per_sequence:
        counts = jnp.sum(mask, axis=1)
        per_row = jnp.sum(x * mask, axis=1) / jnp.maximum(counts, 1)
        rows = (counts > 0).astype(x.dtype)
        return jnp.sum(per_row * rows) / jnp.maximum(jnp.sum(rows), 1)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1)


def distill_objective(student_hidden, teacher, targets, mask, head, *, temperature: float, ce_weight: float = 0.0,
                      per_sequence_mean: bool = False, chunk: int = 0, kl_weight: float = 1.0):
    """(loss, metrics) from answer-position hidden states; see the module docstring."""
    kl, ce, teacher_ce, agree = token_terms(student_hidden, teacher, targets, head, temperature, chunk,
                                            ce_grad=bool(ce_weight))
    kl_mean = masked_mean(kl, mask, per_sequence_mean)
    ce_mean = masked_mean(ce, mask, per_sequence_mean)
    loss = jnp.zeros((), kl_mean.dtype)
    if kl_weight:  # left out of the graph when 0, so no gradient flows through the KL
        loss = loss + kl_weight * temperature ** 2 * kl_mean
    if ce_weight:
        loss = loss + ce_weight * ce_mean
    metrics = {
        "loss": loss,
        "kl": kl_mean,
        "ce": ce_mean,
        "teacher_ce": masked_mean(teacher_ce, mask, per_sequence_mean),
        "agree": masked_mean(agree, mask, per_sequence_mean),
        "answer_tokens": jnp.sum(mask.astype(jnp.int32)),
    }
    return loss, metrics


def gather_positions(hidden, index):
    """hidden [B, T, D], index [B, A] -> [B, A, D]."""
    return jnp.take_along_axis(hidden, index[..., None].astype(jnp.int32), axis=1)
