"""The rollout engine against the static sampler (the reference): the same tokens whatever the slot count,
page size, arrival order or pool size, logprobs within 1e-5; the page allocator's books; adapters in place."""
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


def assert_same(ours, theirs):
    for mine, ref in zip(ours, theirs):
        assert [c.token_ids for c in mine] == [c.token_ids for c in ref]
        assert [c.finish_reason for c in mine] == [c.finish_reason for c in ref]
        for a, b in zip(mine, ref):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def run_engine(engine, workload, sampling, order):
    """The engine on the prompts in `order` (the arrival order); results put back in the original order."""
    prompts, caps, ids = workload
    out = engine.generate_ids([prompts[i] for i in order], sampling, n=N, seed=11, ids=[ids[i] for i in order],
                              caps=[caps[i] for i in order])
    results = [None] * len(prompts)
    for position, i in enumerate(order):
        results[i] = out[position]
    return results


def test_greedy_matches_generate_in_the_scan_layout_with_rows_preempted(model, workload):
    """A pool of 13 pages of 4 slots: the last prompt's 7 shared pages and its 3 samples, which need 5 pages
    each, cannot all fit, so rows wait and the youngest is preempted (it restarts: the same tokens again)."""
    engine = Engine(model, slots=3, page_size=4, steps_per_call=4, prefill_chunk=8, unstack=False, num_pages=13)
    assert_same(run_engine(engine, workload, GREEDY, range(len(workload[0]))),
                reference(model, workload, GREEDY, unstack=False))
    assert engine.stats["preemptions"] > 0
    assert engine.allocator.available == engine.allocator.num_pages - 1  # every page back but the null page


def test_sampled_matches_generate_whatever_the_slots_pages_order_and_pool(model, workload, rng):
    """temperature, top-k and top-p with stop ids; two slot counts and page sizes, shuffled arrivals, and a
    pool of fewer pages than the rows could use."""
    expected = reference(model, workload, SAMPLED, unstack=True)
    order = rng.permutation(len(workload[0])).tolist()
    wide = Engine(model, slots=7, page_size=8, steps_per_call=6, prefill_chunk=16)
    assert_same(run_engine(wide, workload, SAMPLED, order), expected)
    narrow = Engine(model, slots=4, page_size=4, steps_per_call=5, prefill_chunk=8, num_pages=16)
    assert_same(run_engine(narrow, workload, SAMPLED, order[::-1]), expected)


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
