"""cuDNN flash attention on a GPU against the XLA reference (skipped without a GPU; benchmarks/device_check.sh
runs it with JAX_PLATFORMS=cuda): bf16, head dims 64 and 128, left- and right-padded rows, values and
gradients; and "auto" picks cuDNN on this GPU without a refusal. What the CPU cannot check of this path
is listed in tests/accelerators/test_cross_lowering.py."""
import logging

import jax
import jax.numpy as jnp
import pytest

from ssb_jax.model import attention
from tests.model.test_attention import assert_matches_reference, random_inputs

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")

# (start, stop) of the real tokens: left padded (a prompt), right padded (a training row), whole, one token.
ROWS = [(40, 128), (0, 100), (0, 128), (127, 128)]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 8)], ids=["gqa", "mha"])
def test_cudnn_equals_reference(head_dim, heads, kv_heads, seed):
    inputs = random_inputs(seed, ROWS, 128, jnp.bfloat16, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    assert_matches_reference(attention.cudnn_attention, *inputs)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_auto_runs_cudnn_on_this_gpu_without_falling_back(head_dim, seed, caplog):
    capability = attention.gpu_compute_capability()
    if capability is not None and capability < attention.CUDNN_MIN_COMPUTE_CAPABILITY:
        assert attention.resolve("auto", jnp.bfloat16, head_dim, 128) == "chunked"
        pytest.skip(f"compute capability {capability}: cuDNN flash attention is not chosen here")
    assert attention.resolve("auto", jnp.bfloat16, head_dim, 128) == "cudnn"
    inputs = random_inputs(seed, ROWS, 128, jnp.bfloat16, head_dim=head_dim)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        assert_matches_reference(lambda q, k, v, m: attention.causal_attention(q, k, v, m, "auto"), *inputs)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]
    text = jax.jit(attention.causal_attention).lower(*inputs[:4]).as_text()
    assert "cudnn" in text.lower(), "the lowered program has no cuDNN call"
