"""The rollout engine against the static sampler (the reference): the same tokens whatever the slot count,
page size, arrival order, pool size or sampling mesh (rows split over its data axis, weights replicated or
tensor parallel), logprobs within LOGPROB_ATOL; each shard's own pages; the page allocator's books; adapters in
place."""
import math

import jax
import numpy as np
import pytest

from ssb_jax.distill.synthetic import tiny_model_config
from ssb_jax.engine.engine import Engine
from ssb_jax.engine.paged_cache import NULL_PAGE, PageAllocator
from ssb_jax.model.qwen2 import init_model
from ssb_jax.sampling.driver import Sampler
from ssb_jax.sampling.sampler import SamplingParams

N = 3  # samples per prompt: they share their prompt's pages
GREEDY = SamplingParams(max_new_tokens=18, temperature=0.0)  # no stop id: each row runs to its cap
SAMPLED = SamplingParams(max_new_tokens=18, temperature=0.9, top_k=12, top_p=0.9, stop_ids=(5, 7))
# float32 rounding with other reduction widths, measured on these models over 40 seeds (the largest of 378
# logprobs per run): the reference against itself at batch 1 and batch 8 differs by up to 8e-6, the engine
# against it by up to 1.2e-5. The tokens, compared exactly, are the strict check.
LOGPROB_ATOL = 3e-5


@pytest.fixture(scope="module")
def model(seed):
    # std 0.3: peaked, varied next-token distributions (with 0.02 every row would sample near-uniformly)
    return init_model(tiny_model_config(cache_block=8), seed, std=0.3)


@pytest.fixture(scope="module")
def workload(seed, model):
    """Mixed prompt lengths (one of a single token: nothing to prefill) and per-prompt caps; the last prompt
    long, at the largest cap."""
    rng = np.random.default_rng(seed)
    lengths = [1] + rng.integers(2, 30, 5).tolist() + [29]
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in lengths]
    caps = rng.integers(1, GREEDY.max_new_tokens + 1, len(prompts) - 1).tolist() + [GREEDY.max_new_tokens]
    return prompts, caps, [f"q{i}" for i in range(len(prompts))]


def reference(model, workload, sampling, unstack):
    prompts, caps, ids = workload
    return Sampler(model, batch_size=8, show_progress=False, unstack=unstack).generate_ids(
        prompts, sampling, n=N, seed=11, ids=ids, caps=caps)


def record_decode_calls(engine) -> list:
    """The engine's decode calls' arguments as they come (arrays as shape structs with their placement),
    so a test can lower the program it ran."""
    calls, decode = [], engine._decode

    def spec(x):
        if not isinstance(x, jax.Array):
            return x
        placed = isinstance(x.sharding, jax.sharding.NamedSharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if placed else None)

    def recorded(*args, **kwargs):
        calls.append((jax.tree.map(spec, args), kwargs))
        return decode(*args, **kwargs)
    recorded.lower = decode.lower
    engine._decode = recorded
    return calls


@pytest.fixture(scope="module")
def expected(model, workload):
    """The single-device Sampler's outputs, computed once per (sampling, layout)."""
    cache = {}

    def get(sampling, unstack=True):
        key = (sampling, unstack)
        if key not in cache:
            cache[key] = reference(model, workload, sampling, unstack)
        return cache[key]
    return get


def assert_same(ours, theirs):
    for mine, ref in zip(ours, theirs):
        assert [c.token_ids for c in mine] == [c.token_ids for c in ref]
        assert [c.finish_reason for c in mine] == [c.finish_reason for c in ref]
        for a, b in zip(mine, ref):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=LOGPROB_ATOL)


def run_engine(engine, workload, sampling, order):
    """The engine on the prompts in `order` (the arrival order); results put back in the original order."""
    prompts, caps, ids = workload
    out = engine.generate_ids([prompts[i] for i in order], sampling, n=N, seed=11, ids=[ids[i] for i in order],
                              caps=[caps[i] for i in order])
    results = [None] * len(prompts)
    for position, i in enumerate(order):
        results[i] = out[position]
    return results


def test_greedy_matches_generate_in_the_scan_layout_with_rows_preempted(model, workload, expected):
    """A pool of 13 pages of 4 slots: the last prompt's 7 shared pages and its 3 samples, which need 5 pages
    each, cannot all fit, so rows wait and the youngest is preempted (it restarts: the same tokens again)."""
    engine = Engine(model, slots=3, page_size=4, steps_per_call=4, prefill_chunk=8, unstack=False, num_pages=13)
    assert_same(run_engine(engine, workload, GREEDY, range(len(workload[0]))), expected(GREEDY, unstack=False))
    assert engine.stats["preemptions"] > 0
    assert engine.allocator.available == engine.allocator.num_pages - 1  # every page back but the null page


def test_sampled_matches_generate_whatever_the_slots_pages_order_and_pool(model, workload, expected, rng):
    """temperature, top-k and top-p with stop ids; two slot counts and page sizes, shuffled arrivals, and a
    pool of fewer pages than the rows could use."""
    expected = expected(SAMPLED)
    order = rng.permutation(len(workload[0])).tolist()
    wide = Engine(model, slots=7, page_size=8, steps_per_call=6, prefill_chunk=16)
    assert_same(run_engine(wide, workload, SAMPLED, order), expected)
    narrow = Engine(model, slots=4, page_size=4, steps_per_call=5, prefill_chunk=8, num_pages=16)
    assert_same(run_engine(narrow, workload, SAMPLED, order[::-1]), expected)


def test_calls_compute_only_what_rows_use_and_compile_ahead(model, workload, expected):
    """Each decode call's page table is as wide as the most pages a running row holds (a power of two), not the
    call's longest possible row; once no prompt waits, calls run on half or a quarter of the slots; a prompt's
    last chunk is prefilled in the smallest power of two that holds it. compile_ahead compiles every such
    program, so the call compiles nothing new."""
    prompts, caps, ids = workload
    engine = Engine(model, slots=4, page_size=2, steps_per_call=3, prefill_chunk=16)
    engine.compile_ahead(prompts, GREEDY, n=N)
    decode, prefill = engine._decode, engine._prefill
    compiled = decode._cache_size(), prefill._cache_size()
    calls = record_decode_calls(engine)
    chunks = []
    engine._prefill = lambda state, pool, tokens, *rest: chunks.append(tokens.shape[-1]) or prefill(
        state, pool, tokens, *rest)
    assert_same(run_engine(engine, workload, GREEDY, range(len(prompts))), expected(GREEDY))
    widths = [args[2].shape[1] for args, _ in calls]
    full = 2 ** math.ceil(math.log2(math.ceil((max(map(len, prompts)) - 1 + GREEDY.max_new_tokens) / 2)))
    assert all(w & (w - 1) == 0 for w in widths) and min(widths) < full and max(widths) <= full, widths
    assert {args[2].shape[0] for args, _ in calls} <= {4, 2, 1}
    prefixes = [len(p) - 1 for p in prompts if len(p) > 1]
    assert sorted(chunks) == sorted([16] * sum(n // 16 for n in prefixes) + [8 if n % 16 <= 8 else 16
                                                                              for n in prefixes if n % 16]), chunks
    assert (decode._cache_size(), prefill._cache_size()) == compiled
    # three samples of one prompt stopping at 2, 9 and 18 tokens: on 4 slots, then 2, then 1
    calls.clear()
    caps = [(2, 9, GREEDY.max_new_tokens)]
    ours = engine.generate_ids(prompts[-1:], GREEDY, n=N, ids=ids[-1:], caps=caps)
    slot_counts = [args[2].shape[0] for args, _ in calls]
    assert slot_counts == sorted(slot_counts, reverse=True) and set(slot_counts) == {4, 2, 1}, slot_counts
    assert_same(ours, Sampler(model, batch_size=1, show_progress=False).generate_ids(
        prompts[-1:], GREEDY, n=N, ids=ids[-1:], caps=caps))


def test_rows_are_streamed_as_they_finish(model, workload):
    prompts, caps, ids = workload
    engine = Engine(model, slots=4, page_size=4, steps_per_call=5, prefill_chunk=8)
    seen = []
    results = engine.generate_ids(prompts, GREEDY, n=N, ids=ids, caps=caps,
                                  on_finish=lambda i, j, c: seen.append((i, j, len(c.token_ids))))
    assert sorted((i, j) for i, j, _ in seen) == [(i, j) for i in range(len(prompts)) for j in range(N)]
    assert [len(results[i][j].token_ids) for i, j, _ in seen] == [length for _, _, length in seen]
    # a short row is handed over before the longest one has finished
    longest = max(range(len(seen)), key=lambda k: seen[k][2])
    assert min(length for _, _, length in seen[:longest + 1]) < seen[longest][2]


@pytest.mark.slow  # the kernel interpreted at each slot level and width: about 20 s of CPU
def test_the_gpu_paged_kernel_gives_the_same_tokens(seed, workload):
    """Decode steps through JAX's Pallas GPU paged-attention kernel, which reads only the pages below each row's
    length: the tokens of generate. On a GPU the Triton kernel itself (benchmarks/device_check.sh runs this
    test), elsewhere Pallas's interpreter. Head dim and page size 16: Triton's smallest matrix product."""
    model = init_model(tiny_model_config(head_dim=16, cache_block=8), seed, std=0.3)
    kernel = "pallas_gpu" if jax.default_backend() == "gpu" else "pallas_gpu_interpret"
    engine = Engine(model, slots=4, page_size=16, steps_per_call=6, prefill_chunk=8, attention=kernel)
    assert_same(run_engine(engine, workload, SAMPLED, range(len(workload[0]))), reference(model, workload, SAMPLED, True))


@pytest.mark.slow  # two students compiled: about 20 s of CPU
def test_adapters_are_swapped_in_place_without_recompiling(model, workload):
    from ssb_jax.model.lora import LoraConfig, init_lora, with_adapters
    prompts, caps, ids = workload
    lora_config = LoraConfig(rank=2, alpha=4.0)
    first = init_lora(model.config, lora_config, jax.random.key(1))
    second = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), first)
    engine = Engine(with_adapters(model, first, lora_config), slots=4, page_size=8, prefill_chunk=16)
    engine.generate_ids(prompts, SAMPLED, n=N, ids=ids, caps=caps)
    compiled = engine.num_compilations
    engine.set_adapters(second)
    updated = engine.generate_ids(prompts, SAMPLED, n=N, ids=ids, caps=caps)
    assert engine.num_compilations == compiled
    fresh = Sampler(with_adapters(model, second, lora_config), batch_size=8, show_progress=False)
    assert_same(updated, fresh.generate_ids(prompts, SAMPLED, n=N, ids=ids, caps=caps))


def test_page_allocator_counts_references_and_reuses_freed_pages_at_once():
    pages = PageAllocator(6)
    shared = pages.take(2, refs=3)  # a prompt's pages, read by its three samples
    own = pages.take(3)
    assert NULL_PAGE not in shared + own and pages.available == 0
    with pytest.raises(MemoryError):
        pages.take(1)
    pages.release(own[:1])
    assert pages.take(1) == own[:1]  # freed and reused at once
    for _ in range(2):
        pages.release(shared)
    assert pages.available == 0  # the third sample still reads them
    pages.release(shared)
    assert sorted(pages.take(2)) == sorted(shared)
    with pytest.raises(RuntimeError):
        pages.release(own[1:2] * 2)


# ----------------------------------------------------------------------------- the sampling mesh

def on_mesh(model, shape):
    """The model's weights placed on a (data, fsdp, tensor) mesh of the first fake devices, as the sampling
    mesh places them (replicated, or split over `tensor`)."""
    from flax import nnx

    from ssb_jax.sharding import make_mesh, shard_state
    mesh = make_mesh({"fsdp": 1, **shape}, jax.devices()[:shape["data"] * shape.get("tensor", 1)])
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, shard_state(state, mesh)), mesh


@pytest.mark.multidevice
@pytest.mark.parametrize("shape", [{"data": 2}, {"data": 2, "tensor": 2}], ids=["data2", "data2_tensor2"])
def test_rows_split_over_the_data_axis_match_generate(model, workload, expected, rng, shape):
    """Each data-parallel shard decodes its own rows over its own pages; greedy (the scan layout) and sampled
    (the decode layout) tokens equal the single-device Sampler's, shuffled arrivals, a pool smaller than the
    rows could use (rows wait and are preempted)."""
    placed, mesh = on_mesh(model, shape)
    order = rng.permutation(len(workload[0])).tolist()
    scan = Engine(placed, slots=6, page_size=4, steps_per_call=4, prefill_chunk=8, unstack=False, num_pages=13,
                  mesh=mesh)
    scan_calls = record_decode_calls(scan)
    assert_same(run_engine(scan, workload, GREEDY, order), expected(GREEDY, unstack=False))
    unrolled = Engine(placed, slots=8, page_size=8, steps_per_call=6, prefill_chunk=16, mesh=mesh)
    unrolled_calls = record_decode_calls(unrolled)
    assert_same(run_engine(unrolled, workload, SAMPLED, order[::-1]), expected(SAMPLED))
    for engine, calls in ((scan, scan_calls), (unrolled, unrolled_calls)):
        args, kwargs = calls[0]
        hlo = engine._decode.lower(*args, **kwargs).compile().as_text()
        # no shard reads another's pages, no weight is gathered (replicated, or split as the products need) and
        # no row's logits leave its device (the model's vocabulary, 61, is not split over tensor)
        assert "all-gather" not in hlo
    for engine in (scan, unrolled):
        assert engine.shards == 2 and len(engine.allocators) == 2
        assert all(a.available == a.num_pages - 1 for a in engine.allocators)  # every page back in every shard
    assert scan.stats["preemptions"] > 0


@pytest.mark.multidevice
@pytest.mark.slow  # eight shards compiled: about 7 s of CPU, beyond what the two-shard tests add
def test_eight_shards_match_generate(model, workload, expected):
    placed, mesh = on_mesh(model, {"data": 8})
    engine = Engine(placed, slots=8, page_size=4, steps_per_call=5, prefill_chunk=8, mesh=mesh)
    assert_same(run_engine(engine, workload, SAMPLED, range(len(workload[0]))), expected(SAMPLED))


@pytest.mark.multidevice
def test_each_shard_has_its_own_pages(model, workload, expected):
    """The pool's leading axis is split over `data` (each device holds one shard's pages); a prompt on shard 0
    gives the single-device tokens while shard 1's pages hold NaN, and leaves them NaN: no page id of one
    shard reads or writes another's."""
    import jax.numpy as jnp

    from ssb_jax.engine.paged_cache import pool_shardings
    placed, mesh = on_mesh(model, {"data": 2})
    engine = Engine(placed, slots=2, page_size=4, prefill_chunk=8, mesh=mesh)
    prompts, caps, ids = workload
    call = dict(n=1, seed=11, ids=ids[-1:], caps=caps[-1:])
    engine.generate_ids(prompts[-1:], SAMPLED, **call)  # makes the pool
    for layer in engine.pool["k"]:
        assert layer.sharding.spec[0] == "data"
        assert all(shard.data.shape[0] == 1 for shard in layer.addressable_shards)
    poisoned = jax.tree.map(lambda x: x.at[1].set(jnp.nan), engine.pool)
    engine.pool = jax.device_put(poisoned, pool_shardings(poisoned, mesh))
    out = engine.generate_ids(prompts[-1:], SAMPLED, **call)
    assert_same(out, [expected(SAMPLED)[-1][:1]])  # sample 0's key does not depend on n
    for layer in engine.pool["k"] + engine.pool["v"]:
        values = np.asarray(layer)
        assert np.isnan(values[1][:, NULL_PAGE + 1:]).all()  # shard 1's pages untouched (its idle slot writes page 0)
        assert np.isfinite(values[0]).all() and np.abs(values[0]).sum() > 0
    assert engine.allocators[1].available == engine.allocators[1].num_pages - 1
