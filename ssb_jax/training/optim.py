"""The one optimiser builder: AdamW (after an optional global-norm clip) on a learning-rate schedule of
linear warmup then linear, cosine or no decay, from OptimizerSettings."""
from __future__ import annotations

import optax

from ssb_jax.training.settings import OptimizerSettings


def make_schedule(settings: OptimizerSettings, total_steps: int, *, end_learning_rate: float = 0.0) -> optax.Schedule:
    """Warmup (warmup_steps, else warmup_ratio of the steps; at most all steps but one) from 0 to the
    peak, then the schedule's decay to `end_learning_rate` at `total_steps` ("constant": none)."""
    total_steps = max(int(total_steps), 1)
    warmup = settings.warmup_steps or int(round(settings.warmup_ratio * total_steps))
    warmup = min(warmup, total_steps - 1) if total_steps > 1 else 0
    decay_steps = max(total_steps - warmup, 1)
    lr = settings.learning_rate
    if settings.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif settings.schedule == "linear":
        main = optax.linear_schedule(lr, end_learning_rate, decay_steps)
    else:
        # the floor as a fraction of the peak, computed as optax.warmup_cosine_decay_schedule does
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_learning_rate / lr)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(settings: OptimizerSettings, total_steps: int, *,
                   end_learning_rate: float = 0.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimiser, its learning-rate schedule) for a run of `total_steps` optimiser steps."""
    schedule = make_schedule(settings, total_steps, end_learning_rate=end_learning_rate)
    parts = []
    if settings.grad_clip and settings.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(settings.grad_clip))
    parts.append(optax.adamw(schedule, b1=settings.adam_b1, b2=settings.adam_b2, eps=settings.adam_eps,
                             weight_decay=settings.weight_decay))
    return optax.chain(*parts), schedule
