"""The plain SFT baseline: its loss is the cross-entropy alone (float64 NumPy reference, value and
gradient). The sft stage end to end (its own adapters beside SSB's, with learning curves) is in
tests/pipeline/test_main.py, on that file's finished run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.loss import distill_objective


def numpy_cross_entropy(hidden, head, targets, mask):
    """(mean CE over the masked answer tokens, its gradient with respect to hidden), in float64."""
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    count = mask.sum()
    onehot = np.eye(head.shape[1])[targets]
    grad = ((np.exp(logp) - onehot) * (mask[..., None] / count)) @ head.T.astype(np.float64)
    return (nll * mask).sum() / count, grad


@pytest.mark.parametrize("chunk", [0, 4])
def test_sft_loss_is_cross_entropy_alone(chunk, rng):
    B, A, D, V = 3, 11, 16, 37
    student = rng.standard_normal((B, A, D)).astype(np.float32)
    teacher = rng.standard_normal((B, A, D)).astype(np.float32)  # far from the student: a large KL
    head = rng.standard_normal((D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, A))
    mask = np.arange(A)[None] < rng.integers(1, A + 1, B)[:, None]
    tc = TrainConfig().as_sft()
    assert (tc.kl_weight, tc.ce_weight) == (0.0, 1.0)

    def loss(hidden):
        return distill_objective(hidden, jnp.asarray(teacher), jnp.asarray(targets), jnp.asarray(mask),
                                 jnp.asarray(head), temperature=tc.temperature, kl_weight=tc.kl_weight,
                                 ce_weight=tc.ce_weight, chunk=chunk)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(student))
    expected, expected_grad = numpy_cross_entropy(student, head, targets, mask)
    assert float(metrics["kl"]) > 0.1  # the KL is there to leave out
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="both 0"):
        TrainConfig(kl_weight=0.0, ce_weight=0.0)
