"""The GRPO objective on per-token log-probabilities, and group-normalised advantages.

Per completion token t of sample i (ratio ρ = exp(logp - logp_old), advantage A_i of its sample):

    ℓ_it = -min(ρ A_i, clip(ρ, 1-ε, 1+ε) A_i) + β · k3,   k3 = exp(q - p) - (q - p) - 1

with p the policy's and q the reference's (base, LoRA off) log-prob of the token (Schulman's k3
estimator of KL(π ‖ π_ref), non-negative). The loss is Σ w_it ℓ_it, the weights by `normalization`:

- token_mean:    1 / (all completion tokens of the batch)              (DAPO's token-level mean)
- sequence_mean: 1 / (tokens of sample i) / (samples)                  (the original GRPO)
- dr_grpo:       1 / (samples · max_len), max_len a constant            (Dr. GRPO: no length bias)
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ssb_jax.grpo.config import NORMALIZATIONS


def group_advantages(rewards, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-4) -> np.ndarray:
    """rewards [N·G] (prompt-major: a question's G samples in a row) -> advantages [N·G]:
    r - mean of its group, divided by (the group's standard deviation + eps) when scale_by_std.
    A group whose rewards are all equal gets zero advantages, so it adds no policy gradient."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale_by_std:
        centred = centred / (r.std(axis=1, keepdims=True) + eps)
    return centred.reshape(-1).astype(np.float32)


def token_weights(mask, normalization: str, max_len: int):
    """[B, A] weights whose sum with the per-token loss is the batch loss (module docstring). Rows
    without tokens (padding rows) get zero weight and are not counted as samples."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown loss normalization {normalization!r}; one of {', '.join(NORMALIZATIONS)}")
    mask = mask.astype(jnp.float32)
    lengths = jnp.sum(mask, axis=1, keepdims=True)
    samples = jnp.maximum(jnp.sum(lengths > 0), 1)
    if normalization == "token_mean":
        return mask / jnp.maximum(jnp.sum(mask), 1.0)
    if normalization == "sequence_mean":
        return mask / jnp.maximum(lengths, 1.0) / samples
    return mask / (samples * float(max_len))


def grpo_objective(logprobs, old_logprobs, advantages, mask, *, clip_epsilon: float, normalization: str,
                   max_len: int, kl_beta: float = 0.0, ref_logprobs=None):
    """(loss, metrics). logprobs, old_logprobs, ref_logprobs [B, A] (the completion tokens' log-probs under
    the policy being trained, the policy that sampled them, the reference); advantages [B]; mask [B, A]."""
    mask = mask.astype(bool)
    weights = token_weights(mask, normalization, max_len)
    # padding positions carry arbitrary log-probs; keep their ratios finite
    log_ratio = jnp.where(mask, logprobs - old_logprobs, 0.0)
    ratio = jnp.exp(log_ratio)
    a = advantages[:, None].astype(ratio.dtype)
    unclipped = ratio * a
    clipped = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * a
    per_token = -jnp.minimum(unclipped, clipped)
    token_mean = token_weights(mask, "token_mean", max_len)
    metrics = {"clip_fraction": jnp.sum(token_mean * (clipped < unclipped)),
               "ratio_mean": jnp.sum(token_mean * ratio),
               "policy_loss": jnp.sum(weights * per_token)}
    if kl_beta:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs the reference log-probs")
        q_minus_p = jnp.where(mask, ref_logprobs - logprobs, 0.0)
        k3 = jnp.exp(q_minus_p) - q_minus_p - 1.0
        per_token = per_token + kl_beta * k3
        metrics["kl"] = jnp.sum(token_mean * k3)
    loss = jnp.sum(weights * per_token)
    metrics["loss"] = loss
    return loss, metrics
