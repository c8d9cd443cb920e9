"""Paged attention against float64 NumPy over a dense copy of each row's keys, pages shuffled in the pool;
the Pallas TPU and GPU kernels lowered for platforms "tpu" and "cuda" (jax.export, on this CPU), the GPU one
also run in interpret mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssb_jax.engine.paged_cache import PagedLayerCache, copy_pages, flat_slots


def dense_reference(q, keys, values, positions):
    """q [B, T, N, H], keys/values [B, S, G, H] in float64; query t of row b sees slots <= positions[b, t]."""
    B, T, N, H = q.shape
    G = keys.shape[2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for t in range(T):
            for n in range(N):
                g = n // (N // G)
                seen = positions[b, t] + 1
                scores = keys[b, :seen, g] @ q[b, t, n] / np.sqrt(H)
                weights = np.exp(scores - scores.max())
                out[b, t, n] = weights @ values[b, :seen, g] / weights.sum()
    return out


def test_paged_write_then_attend_matches_dense_attention(rng):
    G, N, H, page_size, pages_per_row, B, T = 2, 4, 8, 4, 5, 3, 3
    pool_pages = 1 + B * pages_per_row
    lengths = rng.integers(T, pages_per_row * page_size - T, B)  # slots filled before this call
    table = rng.permutation(np.arange(1, pool_pages)).reshape(B, pages_per_row).astype(np.int32)
    keys = rng.standard_normal((B, pages_per_row * page_size, G, H)).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    pool_k = np.zeros((G, pool_pages, page_size, H), np.float32)
    pool_v = np.zeros_like(pool_k)
    for b in range(B):  # the rows' earlier slots, page by page; the rest of the pool holds noise
        for s in range(lengths[b]):
            pool_k[:, table[b, s // page_size], s % page_size] = keys[b, s]
            pool_v[:, table[b, s // page_size], s % page_size] = values[b, s]
    positions = (lengths[:, None] + np.arange(T)).astype(np.int32)
    new_k = keys[np.arange(B)[:, None], positions]
    new_v = values[np.arange(B)[:, None], positions]
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    slots = flat_slots(jnp.asarray(table), jnp.asarray(positions), jnp.ones((B, T), bool), page_size)
    cache = PagedLayerCache(jnp.asarray(pool_k), jnp.asarray(pool_v), None, jnp.asarray(table), slots,
                            jnp.asarray(positions)).write(jnp.asarray(new_k), jnp.asarray(new_v))
    out = np.asarray(cache.attend(jnp.asarray(q)))
    np.testing.assert_allclose(out, dense_reference(q.astype(np.float64), keys.astype(np.float64),
                                                    values.astype(np.float64), positions), atol=1e-5)
    copied = copy_pages({"k": cache.k[None]}, jnp.asarray([int(table[0, 0]), 0]), jnp.asarray([int(table[1, 0]), 0]))
    np.testing.assert_array_equal(np.asarray(copied["k"])[0][:, table[1, 0]], np.asarray(cache.k)[:, table[0, 0]])


def test_the_pallas_tpu_kernel_lowers_for_tpu():
    """The decode step's TPU path is a Mosaic custom call once lowered for "tpu" (not run: no TPU here)."""
    G, N, H, pages, page_size, B, P = 2, 4, 128, 16, 16, 4, 8
    pool = jax.ShapeDtypeStruct((G, pages, page_size, H), jnp.bfloat16)

    def decode_attention(q, k, v, table, positions):
        return PagedLayerCache(k, v, None, table, jnp.zeros((B, 1), jnp.int32), positions, kernel="pallas_tpu").attend(q)

    exported = jax.export.export(jax.jit(decode_attention), platforms=["tpu"])(
        jax.ShapeDtypeStruct((B, 1, N, H), jnp.bfloat16), pool, pool, jax.ShapeDtypeStruct((B, P), jnp.int32),
        jax.ShapeDtypeStruct((B, 1), jnp.int32))
    assert "tpu_custom_call" in exported.mlir_module()


def test_the_pallas_tpu_kernel_lowers_for_tpu_over_shards():
    """The same decode attention vmapped over two data-parallel shards of the pool (paged_cache.shard_forward)
    is still the Mosaic custom call once lowered for "tpu"."""
    D, G, N, H, pages, page_size, B, P = 2, 2, 4, 128, 16, 16, 4, 8
    pool = jax.ShapeDtypeStruct((D, G, pages, page_size, H), jnp.bfloat16)

    def decode_attention(q, k, v, table, positions):
        return PagedLayerCache(k, v, None, table, jnp.zeros((B, 1), jnp.int32), positions, kernel="pallas_tpu").attend(q)

    exported = jax.export.export(jax.jit(jax.vmap(decode_attention)), platforms=["tpu"])(
        jax.ShapeDtypeStruct((D, B, 1, N, H), jnp.bfloat16), pool, pool, jax.ShapeDtypeStruct((D, B, P), jnp.int32),
        jax.ShapeDtypeStruct((D, B, 1), jnp.int32))
    assert "tpu_custom_call" in exported.mlir_module()


def random_pool(rng, G, H, page_size, pages_per_row, B):
    """A pool holding B rows' keys and values on shuffled pages (the rest noise), each row's table and length."""
    pool_pages = 1 + B * pages_per_row
    table = rng.permutation(np.arange(1, pool_pages)).reshape(B, pages_per_row).astype(np.int32)
    pool_k = rng.standard_normal((G, pool_pages, page_size, H)).astype(np.float32)
    pool_v = rng.standard_normal(pool_k.shape).astype(np.float32)
    lengths = rng.integers(1, pages_per_row * page_size + 1, B)
    lengths[0] = 1  # a row that has fed one token only
    rows_k = pool_k[:, table].reshape(G, B, pages_per_row * page_size, H).transpose(1, 2, 0, 3)
    rows_v = pool_v[:, table].reshape(G, B, pages_per_row * page_size, H).transpose(1, 2, 0, 3)
    return pool_k, pool_v, table, lengths, rows_k, rows_v


def test_the_pallas_gpu_kernel_matches_dense_attention(rng):
    """The decode step's GPU path (jax.experimental.pallas.ops.gpu.paged_attention, here in Pallas's interpret
    mode) against float64 NumPy, at page-table widths that give it 1, 2 and 16 partitions."""
    G, N, H, page_size, B = 2, 4, 16, 16, 3
    for pages_per_row in (1, 2, 32):
        pool_k, pool_v, table, lengths, rows_k, rows_v = random_pool(rng, G, H, page_size, pages_per_row, B)
        q = rng.standard_normal((B, 1, N, H)).astype(np.float32)
        positions = (lengths - 1)[:, None].astype(np.int32)
        cache = PagedLayerCache(jnp.asarray(pool_k), jnp.asarray(pool_v), None, jnp.asarray(table),
                                jnp.zeros((B, 1), jnp.int32), jnp.asarray(positions), kernel="pallas_gpu_interpret")
        np.testing.assert_allclose(np.asarray(cache.attend(jnp.asarray(q))),
                                   dense_reference(q.astype(np.float64), rows_k.astype(np.float64),
                                                   rows_v.astype(np.float64), positions), atol=1e-5)


@pytest.mark.parametrize("shards", [None, 2])
def test_the_pallas_gpu_kernel_lowers_for_gpu(shards):
    """The decode step's GPU path is a Triton custom call once lowered for "cuda", alone and vmapped over two
    data-parallel shards of the pool (paged_cache.shard_forward); not run: no GPU here, the Triton IR is
    compiled for the device only there."""
    G, N, H, pages, page_size, B, P = 2, 4, 128, 16, 16, 4, 8
    lead = () if shards is None else (shards,)

    def decode_attention(q, k, v, table, positions):
        return PagedLayerCache(k, v, None, table, jnp.zeros((B, 1), jnp.int32), positions, kernel="pallas_gpu").attend(q)

    triton = "__gpu$xla.gpu.triton"
    pool = jax.ShapeDtypeStruct(lead + (G, pages, page_size, H), jnp.bfloat16)
    exported = jax.export.export(jax.jit(decode_attention if shards is None else jax.vmap(decode_attention)),
                                 platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(
        jax.ShapeDtypeStruct(lead + (B, 1, N, H), jnp.bfloat16), pool, pool,
        jax.ShapeDtypeStruct(lead + (B, P), jnp.int32), jax.ShapeDtypeStruct(lead + (B, 1), jnp.int32))
    assert triton in exported.mlir_module()
