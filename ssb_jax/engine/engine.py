"""The rollout engine: continuous batching over a paged KV cache, with the Sampler's interface and tokens.

A fixed number of decode slots runs rows (one sample of one prompt each). The device runs up to
`steps_per_call` decode steps per host call (a `while_loop` that also returns as soon as a row stops
while others wait for a slot); between calls the host only schedules: it collects the rows that
stopped (their stop token or their own cap), frees their pages, prefills waiting prompts in chunks
of `prefill_chunk` tokens (at most `prefill_budget` tokens between two decode calls), puts prefilled
samples into the free slots and hands each running row the pages its next steps write.

Each prompt is prefilled once, all but its last token; its n samples share those pages read-only
(each takes its own copy of a partly filled last page) and each starts by feeding the prompt's last
token. Row r's token at step j is drawn by `sampler.choose_tokens` from the row's own key
(`sampler.row_keys_for`: seed, stable prompt id, sample index) folded with j, so what a row samples
does not depend on its slot, its neighbours, the arrival order or the page size: the tokens are
those of `sampler.generate` (tests/engine/).

When pages run out, rows wait for pages; if every running row waits, the youngest is preempted (its
pages freed, the row restarted later from its prompt: the same tokens again).

Two things keep the device from computing what no row uses: a prompt's last chunk is prefilled in the smallest
power of two that holds it (not a whole `prefill_chunk`), and once no prompt waits, a decode call runs
its rows in the first half or quarter of the slots when they fit there and have more than two calls'
steps to go (the rows' state is per call, their keys and values stay in their pages), so the last long
rows do not drag empty slots along.

On a sampling mesh the rows are data parallel: each of the mesh's data-parallel shards has its own
slots and its own pages (the pool's leading axis is placed over the data axes; page tables hold
shard-local page ids) and one allocator on the host; a prompt is prefilled on one shard and its samples
run there. Every device call (prefill, decode) is one program over all shards (paged_cache.shard_forward);
the weights are placed as the mesh places them (replicated, or tensor parallel with the pool's KV
heads split the same way). A row's tokens do not depend on its shard either.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ssb_jax.engine.paged_cache import (NULL_PAGE, PageAllocator, attention_kernel, flat_slots, init_pool, page_bytes,
                                        pages_for_memory, pool_shardings, shard_copy_pages, shard_forward)
from ssb_jax.model.tokenizer import Chat, encode_chat
from ssb_jax.sampling.decode_layout import DecodeLayoutModel
from ssb_jax.sampling.driver import (Completion, PromptTooLongError, Sampler, sampling_progress, split_for_sampling,
                                     stable_row_id)
from ssb_jax.sampling.sampler import SamplingParams, choose_tokens, row_keys_for
from ssb_jax.sharding import BATCH_AXES, batch_sharding, data_parallel_size

log = logging.getLogger(__name__)

# What a finished row is handed to: (prompt index, sample index, its Completion).
OnFinish = Callable[[int, int, Completion], None]


@dataclasses.dataclass
class _Prompt:
    index: int
    tokens: list[int]
    caps: list[int]                 # each sample's limit on new tokens
    samples: list[int]              # the sample indices still to run
    key_data: np.ndarray | None = None  # the samples' keys (row_keys_for), made when the prompt is admitted
    shard: int | None = None        # the data-parallel shard that holds its pages and runs its samples
    pages: list[int] | None = None  # the prefix's pages (all tokens but the last), shared by the samples
    prefilled: int = 0              # prefix tokens written so far

    @property
    def prefix(self) -> int:
        return len(self.tokens) - 1


@dataclasses.dataclass
class _Row:
    prompt: _Prompt
    sample: int
    shared: list[int]               # the prompt's full pages this row reads (one reference each)
    own: list[int]                  # pages this row writes (its copy of a partial page, then its own)
    order: int                      # when the row was placed: the oldest gets pages first
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)

    @property
    def cap(self) -> int:
        return self.prompt.caps[self.sample]

    @property
    def position(self) -> int:  # the position of the next token fed: the prompt's last one, then each new one
        return self.prompt.prefix + len(self.tokens)

    @property
    def pages(self) -> list[int]:
        return self.shared + self.own


def per_sample_caps(caps, prompts: int, n: int, max_new_tokens: int) -> list[list[int]]:
    """Each prompt's caps as n ints, at most max_new_tokens: from None, an int per prompt or n per prompt."""
    if caps is None:
        return [[max_new_tokens] * n for _ in range(prompts)]
    if len(caps) != prompts:
        raise ValueError(f"{len(caps)} caps for {prompts} prompts")
    out = []
    for cap in caps:
        cap = [int(cap)] * n if np.ndim(cap) == 0 else [int(c) for c in cap]
        if len(cap) != n:
            raise ValueError(f"{len(cap)} caps for a prompt of {n} samples")
        out.append([min(c, max_new_tokens) for c in cap])
    return out


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


# A decode call runs on all of a shard's slots, half or a quarter of them (each a program per page-table
# width): below a quarter a step costs about the same on a CPU (reading the weights dominates), and each
# level more is programs more to compile.
SLOT_LEVELS = 3
# The smallest prefill chunk: a prompt's last tokens are prefilled in the smallest power of two from here
# up to prefill_chunk that holds them.
MIN_PREFILL_CHUNK = 8


def slot_levels(slots: int) -> list[int]:
    """The slot counts a decode call may run on, largest first."""
    return sorted({max(1, slots >> j) for j in range(SLOT_LEVELS)}, reverse=True)


def prefill_sizes(prefill_chunk: int) -> list[int]:
    """The chunk lengths a prefill call may have: powers of two from MIN_PREFILL_CHUNK, and prefill_chunk."""
    sizes, size = {prefill_chunk}, _next_power_of_two(prefill_chunk) // 2
    while size >= MIN_PREFILL_CHUNK:
        sizes.add(size)
        size //= 2
    return sorted(sizes)


@dataclasses.dataclass
class _Shard:
    """One data-parallel shard's part of a call: its slots, its allocator, its prompt being prefilled, its
    prefilled samples waiting for a slot and the page copies its next decode call makes."""
    index: int
    alloc: PageAllocator
    rows: list                      # a _Row or None per slot
    ready: collections.deque = dataclasses.field(default_factory=collections.deque)  # (prompt, sample)
    prefilling: _Prompt | None = None
    copies: list = dataclasses.field(default_factory=list)  # (source page, target page)

    @property
    def load(self) -> int:
        return len(self.ready) + sum(row is not None for row in self.rows)

    @property
    def idle(self) -> bool:
        return not self.ready and not any(self.rows) and self.prefilling is None


def _bytes_per_device(array) -> int:
    """What one device holds of an array (the whole of one that is not a placed jax.Array)."""
    sharding = getattr(array, "sharding", None)
    shape = array.shape if sharding is None else sharding.shard_shape(array.shape)
    return math.prod(shape) * np.dtype(array.dtype).itemsize


class Engine:
    """Continuous batching over a paged KV cache; the interface of ssb_jax.sampling.driver.Sampler."""

    def __init__(self, model, tokenizer=None, *, slots: int = 8, page_size: int = 16, num_pages: int | None = None,
                 max_prompt_tokens: int = 2048, prefill_chunk: int = 64, prefill_budget: int | None = None,
                 steps_per_call: int = 32, mesh=None, show_progress: bool = False, unstack: bool | None = None,
                 decode_copies: dict | None = None, memory_per_device: float | None = None,
                 attention: str = "auto", **_ignored):
        """model: a Qwen2ForCausalLM (with adapters for a student). slots: rows decoded together.
        page_size: slots per page. num_pages: each shard's pages (None: what fits a device's memory next
        to the weights, see pages_for_memory, capped at what the shard's slots can use at the longest row).
        mesh: the sampling mesh the model's weights are on (sampling.mesh.sampling_mesh): `slots` are
        split evenly over its data-parallel shards (rounded up), each with its own pages.
        prefill_chunk: prompt tokens per prefill call; prefill_budget: prompt tokens prefilled between
        two decode calls (default 4 chunks). steps_per_call: decode steps per device call.
        attention: the decode steps' attention (paged_cache.attention_kernel: auto is the platform's Pallas
        paged kernel on TPU and GPU, the XLA gather elsewhere; "xla" everywhere is the fallback).
        unstack, decode_copies: as Sampler (the CPU decode layout). Other Sampler keywords
        (batch_size, prompt buckets) are accepted and ignored: the engine needs no buckets."""
        model, graphdef, self.state = split_for_sampling(model, unstack, decode_copies)
        self.config, self.tokenizer, self.graphdef = model.config, tokenizer, graphdef
        self.per_layer = isinstance(model, DecodeLayoutModel)
        self.attention = attention_kernel(choice=attention)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.shards = 1 if self.mesh is None else data_parallel_size(self.mesh)
        self.slots, self.page_size = slots, page_size
        self.requested_pages, self.memory_per_device = num_pages, memory_per_device
        self.max_prompt_tokens = max_prompt_tokens
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or 4 * prefill_chunk
        self.steps_per_call = steps_per_call
        self.show_progress = show_progress
        self.pool, self.allocators = None, []
        self.num_compilations = 0
        self.stats = collections.Counter()  # decode_calls, decode_steps, slot_steps, busy_slot_steps, prefill_calls,
        # preemptions
        self._decode = jax.jit(functools.partial(self._traced_decode, graphdef),
                               static_argnames=("sampling", "steps"), donate_argnames=("pool",))
        self._prefill = jax.jit(functools.partial(self._traced_prefill, graphdef), donate_argnames=("pool",))

    # ------------------------------------------------------------------ device programs

    def _traced_prefill(self, graphdef, state, pool, tokens, positions, page_table, write_slots):
        """One chunk of one prompt per shard: tokens, positions, write_slots [shards, 1, C], page_table
        [shards, 1, P] (a shard with nothing to prefill writes its null page)."""
        self.num_compilations += 1
        model = nnx.merge(graphdef, state)
        return self._placed_pool(shard_forward(model, pool, tokens, positions, page_table, write_slots)[1])

    def _placed_pool(self, pool):
        """The pool pinned to its placement (each shard's pages on its own devices) inside a program."""
        return pool if self.mesh is None else jax.lax.with_sharding_constraint(pool, pool_shardings(pool, self.mesh))

    def _placed_rows(self, array: np.ndarray):
        """A per-slot host array onto the devices, its slots split over the shards (slot g on shard g // slots)."""
        return jnp.asarray(array) if self.mesh is None else jax.device_put(array, batch_sharding(self.mesh, array.shape))

    def _traced_decode(self, graphdef, state, pool, page_table, last, position, step, cap, live, limit, key_data,
                       copy_from, copy_to, knobs, return_early, *, sampling, steps):
        """Up to `steps` decode steps of every slot; stops early when every row is stopped or waits for pages,
        or (return_early) once a row has stopped. Row r at step j feeds its last token at position[r], writes it
        at that position (its pages in page_table[r], written below limit[r]) and draws token j.
        Slot arrays are [shards * slots per shard] (shard-major); page_table [shards * slots, P] holds
        shard-local page ids; copy_from, copy_to [shards, copies]."""
        self.num_compilations += 1
        model = nnx.merge(graphdef, state)
        pool = self._placed_pool(shard_copy_pages(pool, copy_from, copy_to))
        keys = jax.random.wrap_key_data(key_data)
        stop_ids = jnp.array(sampling.stop_ids or (-1,), jnp.int32)
        S = last.shape[0]
        D = copy_from.shape[0]
        per_shard = lambda x: x.reshape((D, S // D) + x.shape[1:])

        def choose(logits, key, row_step):  # one row as a batch of one: choose_tokens with the row's own step
            token, logprob = choose_tokens(logits[None], key[None], row_step, sampling, knobs)
            return token[0], logprob[0]

        choose_rows = jax.vmap(choose)
        if self.mesh is not None:
            # each device draws its own rows' tokens: the partitioner would gather every row's logits to all of
            # them around the top-k's platform-dependent branches
            rows = P(tuple(a for a in BATCH_AXES if self.mesh.shape[a] > 1))
            choose_rows = jax.shard_map(choose_rows, mesh=self.mesh, in_specs=(rows, rows, rows), out_specs=(rows, rows))

        def running(c):
            return c["live"] & (c["position"] < limit)

        def keep_going(c):
            return (c["i"] < steps) & jnp.any(running(c)) & ~(return_early & c["stopped_any"])

        def body(c):
            go = running(c)
            slots = flat_slots(page_table, c["position"][:, None], go[:, None], self.page_size)
            hidden, new_pool = shard_forward(model, c["pool"], per_shard(c["last"][:, None]),
                                             per_shard(c["position"][:, None]), per_shard(page_table), per_shard(slots),
                                             self.attention)
            hidden = hidden.reshape((S,) + hidden.shape[2:])
            if self.mesh is not None:
                hidden = jax.lax.with_sharding_constraint(hidden, batch_sharding(self.mesh, hidden.shape))
            token, logprob = choose_rows(model.logits(hidden[:, 0]), keys, c["step"])
            token = jnp.where(go, token, sampling.pad_id)
            new_step = c["step"] + go.astype(jnp.int32)
            stopped = go & (jnp.isin(token, stop_ids) | (new_step >= cap))
            return {"i": c["i"] + 1, "pool": self._placed_pool(new_pool),
                    "tokens": c["tokens"].at[:, c["i"]].set(token),
                    "logprobs": c["logprobs"].at[:, c["i"]].set(jnp.where(go, logprob, 0.0)),
                    "last": jnp.where(go, token, c["last"]), "position": c["position"] + go.astype(jnp.int32),
                    "step": new_step, "live": c["live"] & ~stopped, "stopped_any": c["stopped_any"] | jnp.any(stopped)}

        init = {"i": jnp.int32(0), "pool": pool, "tokens": jnp.zeros((S, steps), jnp.int32),
                "logprobs": jnp.zeros((S, steps), jnp.float32), "last": last, "position": position, "step": step,
                "live": live, "stopped_any": jnp.bool_(False)}
        out = jax.lax.while_loop(keep_going, body, init)
        return out["pool"], {k: out[k] for k in ("i", "tokens", "logprobs", "step", "live")}

    # ------------------------------------------------------------------ public

    # The Sampler's own: the adapters written into the state the compiled programs take, nothing recompiled.
    set_adapters = Sampler.set_adapters

    def generate(self, chats: Sequence[Chat], sampling: SamplingParams, *, n: int = 1, seed: int = 0,
                 ids: Sequence | None = None, system_prompt: str | None = None, caps: Sequence[int] | None = None,
                 on_finish: OnFinish | None = None) -> list[list[Completion]]:
        """Chat prompts -> n completions each, in input order (as Sampler.generate)."""
        if self.tokenizer is None:
            raise ValueError("Engine.generate needs a tokenizer; use generate_ids for token ids")
        prompts = [encode_chat(self.tokenizer, chat, system_prompt=system_prompt) for chat in chats]
        return self.generate_ids(prompts, sampling, n=n, seed=seed, ids=ids, caps=caps, on_finish=on_finish)

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *, n: int = 1, seed: int = 0,
                     ids: Sequence | None = None, caps: Sequence[int] | None = None,
                     on_finish: OnFinish | None = None) -> list[list[Completion]]:
        """Token-id prompts -> n completions each, in input order. caps: each prompt's own limit on new tokens
        (at most sampling.max_new_tokens). on_finish(prompt index, sample index, completion) is called as each
        row finishes, so a caller can record it before the others are done. A cap may also be a sequence of n,
        one per sample."""
        results = [[None] * n for _ in prompts]
        for i, j, completion in self.stream_ids(prompts, sampling, n=n, seed=seed, ids=ids, caps=caps):
            results[i][j] = completion
            if on_finish is not None:
                on_finish(i, j, completion)
        return results

    def stream_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *, n: int = 1, seed: int = 0,
                   ids: Sequence | None = None, caps: Sequence[int] | None = None
                   ) -> Iterator[tuple[int, int, Completion]]:
        """(prompt index, sample index, Completion) for each row, in the order rows finish."""
        ids = list(range(len(prompts))) if ids is None else list(ids)
        if len(ids) != len(prompts):
            raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
        caps = per_sample_caps(caps, len(prompts), n, sampling.max_new_tokens)
        for key, prompt, cap in zip(ids, prompts, caps):
            if len(prompt) == 0:
                raise ValueError(f"prompt {key!r} is empty")
            if len(prompt) > self.max_prompt_tokens:
                raise PromptTooLongError(f"prompt {key!r} has {len(prompt)} tokens, more than max_prompt_tokens="
                                         f"{self.max_prompt_tokens}")
            if min(cap) < 1:
                raise ValueError(f"prompt {key!r}: cap {cap} < 1")
        if not prompts:
            return
        yield from _Schedule(self, [list(map(int, p)) for p in prompts], sampling, n, seed, ids, caps).run()

    def compile_ahead(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *, n: int = 1) -> None:
        """Compile the decode program at every page-table width a call with these prompts can use (each width
        in a call where no row is live, which returns at once), so that none compiles while rows wait: a
        benchmark's warm-up; a run compiles each width when it first needs it."""
        if prompts:
            _Schedule(self, [list(map(int, p)) for p in prompts], sampling, n, 0, list(range(len(prompts))),
                      per_sample_caps(None, len(prompts), n, sampling.max_new_tokens)).compile_widths()

    # ------------------------------------------------------------------ pool

    @property
    def slots_per_shard(self) -> int:
        return math.ceil(self.slots / self.shards)

    @property
    def allocator(self) -> PageAllocator:
        """The first shard's allocator (the only one without a mesh)."""
        return self.allocators[0]

    def pool_pages(self, pages_per_row: int) -> int:
        """Each shard's pages for a call whose rows need at most `pages_per_row` pages.

        From fixed quantities only (the device's memory limit, not what is free at the moment; the
        weights' bytes per device; the settings), so every call and every process of a run on the same
        hardware sizes it alike: never from timing. The processes of a run need not agree on it (each
        samples its own prompts on its own devices, with no collective in between, and a row's tokens do
        not depend on the pool), but on equal hardware they do."""
        worst = self.slots_per_shard * pages_per_row + 2 * pages_per_row + 1  # slots full, a prompt ahead, null page
        if self.requested_pages:
            return self.requested_pages
        from ssb_jax.sampling.mesh import device_memory_bytes
        devices = jax.local_devices() if self.mesh is None else self.mesh.devices.flat
        memory = self.memory_per_device or device_memory_bytes(next(iter(devices)))
        if not memory:
            return worst
        weights = sum(_bytes_per_device(x) for x in jax.tree.leaves(self.state))
        logits = 2 * self.slots_per_shard * self.config.vocab_size * 4
        axes = self._device_axes()
        fits = pages_for_memory(self.config, self.page_size, memory, weights, logits, axes)
        if fits < worst:
            log.info("page pool: %d pages per shard fit a device's memory (%d for every slot at the longest row)",
                     fits, worst)
        return max(min(fits, worst), pages_per_row + 1)

    def _device_axes(self) -> dict | None:
        """The mesh shape one shard's pool is split over (the KV heads over `tensor`), for page_bytes."""
        return None if self.mesh is None else {**dict(self.mesh.shape), "data": 1, "fsdp": 1}

    def _ensure_pool(self, pages: int) -> None:
        if self.pool is not None and self.allocator.num_pages >= pages:
            return
        self.pool = None  # the old pool is freed before the new one is allocated
        self.pool = init_pool(self.config, pages, self.page_size, per_layer=self.per_layer, shards=self.shards,
                              mesh=self.mesh)
        self.allocators = [PageAllocator(pages) for _ in range(self.shards)]
        axes = self._device_axes()
        log.info("page pool: %d shard(s) of %d pages of %d slots (%.1f MiB per device)", self.shards, pages,
                 self.page_size, pages * page_bytes(self.config, self.page_size, axes) / 2**20)


class _Schedule:
    """One call's host-side scheduling: queue -> prefill (on a shard) -> that shard's slots -> collect."""

    def __init__(self, engine: Engine, prompts, sampling: SamplingParams, n: int, seed: int, ids, caps):
        self.e, self.sampling, self.n = engine, sampling, n
        ps = engine.page_size
        # the page table's width from max_new_tokens, not the caps: calls with the same settings share programs
        longest = max(len(p) for p in prompts) - 1 + sampling.max_new_tokens
        self.pages_per_row = _next_power_of_two(math.ceil(longest / ps))
        engine._ensure_pool(engine.pool_pages(self.pages_per_row))
        self.seed, self.row_ids = seed, [stable_row_id(k) for k in ids]
        self.queue = collections.deque(_Prompt(i, p, c, list(range(n))) for i, (p, c) in enumerate(zip(prompts, caps)))
        # a small call decodes on fewer slots (a power of two over all shards), so it does not compute empty
        # slots every step
        slots = min(engine.slots_per_shard, math.ceil(_next_power_of_two(len(prompts) * n) / engine.shards))
        self.shards = [_Shard(d, alloc, [None] * slots) for d, alloc in enumerate(engine.allocators)]
        self.placed = 0
        self.call_slots = None  # the slots per shard of the last decode call
        # the compiled program shapes on these only: temperature and top-p travel as knobs, caps per row
        self.program = dataclasses.replace(sampling.program(), max_new_tokens=1)
        self.knobs = jnp.asarray(sampling.knobs())
        self.stop_ids = set(sampling.stop_ids)

    # ------------------------------------------------------------------ steps

    def run(self) -> Iterator[tuple[int, int, Completion]]:
        e = self.e
        progress = sampling_progress(len(self.queue) * self.n, e.show_progress, desc="rollouts")
        finished_rows = 0
        while self.queue or not all(shard.idle for shard in self.shards):
            self._prefill()
            limits = []
            for shard in self.shards:
                self._place(shard)
                limits.append(self._reserve(shard))
            if not any(any(shard.rows) for shard in self.shards):
                if any(shard.prefilling for shard in self.shards):
                    continue  # a prompt longer than the prefill budget: go on prefilling it
                if self.queue or any(shard.ready for shard in self.shards):
                    raise MemoryError(f"the page pool ({self.shards[0].alloc.num_pages} pages of {e.page_size} per "
                                      "shard) cannot hold one prompt and its first pages; raise num_pages or lower "
                                      "the prompt length")
                break
            finished = self._decode(limits)
            for row, completion in finished:
                finished_rows += 1
                if progress is not None:
                    progress.update(finished_rows)
                yield row.prompt.index, row.sample, completion
        if progress is not None:
            progress.close()

    def _prefill(self) -> None:
        """Prefill waiting prompts, one per shard at a time and all shards in one call, each shard at most
        prefill_budget tokens, while its ready samples do not fill its free slots."""
        e = self.e
        budget = [e.prefill_budget] * len(self.shards)
        while True:
            chunks = []
            for shard in sorted(self.shards, key=lambda shard: (shard.load, shard.index)):
                if budget[shard.index] > 0 and (shard.prefilling or self._admit(shard)):
                    chunks.append(shard)
            if not chunks:
                return
            self._prefill_chunks(chunks)
            for shard in chunks:
                budget[shard.index] -= e.prefill_chunk
                prompt = shard.prefilling
                if prompt.prefilled >= prompt.prefix:
                    shard.prefilling = None
                    shard.ready.extend((prompt, j) for j in prompt.samples)

    def _admit(self, shard: _Shard) -> _Prompt | None:
        """The queue's next prompt onto this shard when the shard wants more samples and has its pages: its
        prefix's pages taken (a one-token prompt has none: its samples are ready at once). Returns the prompt
        left to prefill, if any."""
        ps = self.e.page_size
        while self.queue and len(shard.ready) < shard.rows.count(None) + len(shard.rows) // 2:
            prompt = self.queue[0]
            count = math.ceil(prompt.prefix / ps)
            # each sample's partial copy and first page; one sample's when nothing else runs on the shard
            reserve = 2 if shard.idle else 2 * len(prompt.samples)
            if shard.alloc.available < count + reserve:
                return None
            self.queue.popleft()
            prompt.shard = shard.index
            prompt.pages = shard.alloc.take(count, refs=len(prompt.samples))
            # one prompt at a time: the same small program whatever the call's size
            prompt.key_data = np.asarray(jax.random.key_data(row_keys_for(self.seed, [self.row_ids[prompt.index]],
                                                                          self.n)))
            if prompt.prefilled < prompt.prefix:
                shard.prefilling = prompt
                return prompt
            shard.ready.extend((prompt, j) for j in prompt.samples)
        return None

    def _prefill_chunks(self, chunks: list[_Shard]) -> None:
        """The next chunk of each of these shards' prompts, in one call over all shards (the others idle)."""
        e, ps = self.e, self.e.page_size
        D = len(self.shards)
        longest = max(min(e.prefill_chunk, shard.prefilling.prefix - shard.prefilling.prefilled) for shard in chunks)
        C = min(size for size in prefill_sizes(e.prefill_chunk) if size >= longest)
        tokens = np.zeros((D, 1, C), np.int32)
        positions = np.zeros((D, 1, C), np.int32)
        table = np.full((D, 1, self.pages_per_row), NULL_PAGE, np.int32)
        slots = np.full((D, 1, C), NULL_PAGE * ps, np.int32)
        for shard in chunks:
            prompt, d = shard.prefilling, shard.index
            start = prompt.prefilled
            count = min(C, prompt.prefix - start)
            positions[d, 0] = start + np.arange(C, dtype=np.int32)
            tokens[d, 0, :count] = prompt.tokens[start:start + count]
            table[d, 0] = self._table_row(prompt.pages)
            pages = table[d, 0][np.minimum(positions[d, 0] // ps, self.pages_per_row - 1)]
            slots[d, 0] = np.where(np.arange(C) < count, pages * ps + positions[d, 0] % ps, NULL_PAGE * ps)
            prompt.prefilled += count
        e.pool = e._prefill(e.state, e.pool, *(e._placed_rows(x) for x in (tokens, positions, table, slots)))
        e.stats["prefill_calls"] += 1

    def _table_row(self, pages: list[int]) -> np.ndarray:
        table = np.full(self.pages_per_row, NULL_PAGE, np.int32)
        table[:len(pages)] = pages
        return table

    def _place(self, shard: _Shard) -> None:
        """Put the shard's ready samples into its free slots: the prompt's full pages shared, a copy of a
        partly filled last page."""
        ps = self.e.page_size
        for slot, row in enumerate(shard.rows):
            if row is not None or not shard.ready:
                continue
            prompt, sample = shard.ready[0]
            full = prompt.prefix // ps
            partial = prompt.pages[full:]
            if shard.alloc.available < len(partial) + 1:
                return
            shard.ready.popleft()
            own = shard.alloc.take(len(partial))
            shard.copies += list(zip(partial, own))
            shard.rows[slot] = _Row(prompt, sample, shared=prompt.pages[:full], own=own, order=self.placed)
            self.placed += 1

    def _reserve(self, shard: _Shard) -> np.ndarray:
        """Pages for each of the shard's rows' next steps, oldest row first; returns the position each row
        may write up to (exclusive). When every row of the shard waits for a page, its youngest is preempted
        (its own pages freed, the row back at the head of the shard's ready queue, to restart from step 0):
        the oldest row always gets pages first, so it finishes, and no row is preempted forever."""
        ps, M = self.e.page_size, self.e.steps_per_call
        rows = shard.rows
        while True:
            limits = np.zeros(len(rows), np.int32)
            running = sorted((row.order, slot) for slot, row in enumerate(rows) if row is not None)
            for _, slot in running:
                row = rows[slot]
                end = row.prompt.prefix + row.cap  # the positions a row writes: prefix .. prefix + cap - 1
                want = math.ceil(min(row.position + M, end) / ps) - len(row.pages)
                if want > 0:
                    row.own += shard.alloc.take(min(want, shard.alloc.available))
                limits[slot] = len(row.pages) * ps
            if not running or any(limits[slot] > rows[slot].position for _, slot in running):
                return limits
            if len(running) == 1:
                raise MemoryError(f"the page pool ({shard.alloc.num_pages} pages of {ps} per shard) cannot hold "
                                  "one row")
            victim = running[-1][1]
            row = rows[victim]
            log.info("page pool full: preempting a row of prompt %d (it restarts from its prompt)", row.prompt.index)
            self.e.stats["preemptions"] += 1
            shard.copies = [(source, target) for source, target in shard.copies if target not in row.own]
            shard.alloc.release(row.own)
            rows[victim] = None
            shard.ready.appendleft((row.prompt, row.sample))  # it keeps its references to the prompt's pages

    def compile_widths(self) -> None:
        """Every decode program a call can use (each slot level, each page-table width), each run with no live
        row (it returns at once), and the prefill program at each chunk size, writing only the null page."""
        e, D = self.e, len(self.shards)
        keys = np.asarray(jax.random.key_data(row_keys_for(self.seed, [0], 1)))
        place = e._placed_rows
        for s in slot_levels(len(self.shards[0].rows)):
            S, width = D * s, 1
            zeros = np.zeros(S, np.int32)
            while True:
                e.pool, _ = e._decode(e.state, e.pool, place(np.full((S, width), NULL_PAGE, np.int32)), place(zeros),
                                      place(zeros), place(zeros), place(np.ones(S, np.int32)), place(np.zeros(S, bool)),
                                      place(zeros), place(np.zeros((S,) + keys.shape[1:], keys.dtype)),
                                      place(np.full((D, s), NULL_PAGE, np.int32)),
                                      place(np.full((D, s), NULL_PAGE, np.int32)),
                                      self.knobs, np.bool_(False), sampling=self.program, steps=e.steps_per_call)
                if width >= self.pages_per_row:
                    break
                width *= 2
        for C in prefill_sizes(e.prefill_chunk):
            zeros = np.zeros((D, 1, C), np.int32)
            e.pool = e._prefill(e.state, e.pool, place(zeros), place(zeros),
                                place(np.full((D, 1, self.pages_per_row), NULL_PAGE, np.int32)),
                                place(np.full((D, 1, C), NULL_PAGE * e.page_size, np.int32)))

    def _call_slots(self, rows: int) -> int:
        """The slots per shard a decode call runs on when its fullest shard runs `rows` rows: all of them while
        prompts wait for a slot, else the smallest slot level that holds the rows; but no smaller than the last
        call's when every running row is within two calls of its cap (a smaller program, compiled once per
        engine, pays for itself only over many steps)."""
        levels = slot_levels(len(self.shards[0].rows))
        if self.queue or any(shard.ready or shard.prefilling for shard in self.shards):
            return levels[0]
        fits = min(level for level in levels if level >= rows)
        left = max((row.cap - len(row.tokens) for shard in self.shards for row in shard.rows if row is not None),
                   default=0)
        if left < 2 * self.e.steps_per_call:
            return max(fits, self.call_slots or levels[0])
        return fits

    def _decode(self, limits: list[np.ndarray]) -> list[tuple[_Row, Completion]]:
        """One decode call over the running rows; limits: each shard's, per slot of shard.rows. A row runs in
        the call's slot shard * s + k, k its rank among its shard's running rows (the call's slots need not
        be the rows' slots in shard.rows: a row's state is handed over on each call)."""
        e, D = self.e, len(self.shards)
        running = [[i for i, row in enumerate(shard.rows) if row is not None] for shard in self.shards]
        rows = max(map(len, running))
        s = self.call_slots = self._call_slots(rows)
        S = D * s
        limit = np.zeros(S, np.int32)
        table = np.zeros((S, self.pages_per_row), np.int32)
        last = np.zeros(S, np.int32)
        position, step = np.zeros(S, np.int32), np.zeros(S, np.int32)
        cap, live = np.ones(S, np.int32), np.zeros(S, bool)
        key_data = None
        copy_from = np.full((D, s), NULL_PAGE, np.int32)
        copy_to = np.full((D, s), NULL_PAGE, np.int32)
        for shard in self.shards:
            assert len(shard.copies) <= s, "one copy per placement, at most one placement per slot"
            for k, (source, target) in enumerate(shard.copies):
                copy_from[shard.index, k], copy_to[shard.index, k] = source, target
            shard.copies = []
            for k, i in enumerate(running[shard.index]):
                row = shard.rows[i]
                slot = shard.index * s + k
                limit[slot] = limits[shard.index][i]
                table[slot] = self._table_row(row.pages)
                last[slot] = row.tokens[-1] if row.tokens else row.prompt.tokens[-1]
                position[slot], step[slot], cap[slot], live[slot] = row.position, len(row.tokens), row.cap, True
                if key_data is None:
                    key_data = np.zeros((S,) + row.prompt.key_data.shape[1:], row.prompt.key_data.dtype)
                key_data[slot] = row.prompt.key_data[row.sample]
        # attention reads as many pages as the longest running row holds (its writes this call included:
        # limits stop each row inside its pages), in powers of two: one program per width, not per row length
        held = max((len(row.pages) for shard in self.shards for row in shard.rows if row is not None), default=1)
        table = table[:, :min(_next_power_of_two(held), self.pages_per_row)]
        # back to the host when a row stops while others wait for its slot, or when one row fewer would fit a
        # smaller slot level
        return_early = bool(self.queue or any(shard.ready for shard in self.shards)) or (
            rows > 1 and self._call_slots(rows - 1) < s)
        place = e._placed_rows
        e.pool, out = e._decode(e.state, e.pool, place(table), place(last), place(position), place(step), place(cap),
                                place(live), place(limit), place(key_data), place(copy_from), place(copy_to),
                                self.knobs, np.bool_(return_early),
                                sampling=self.program, steps=e.steps_per_call)
        out = jax.device_get(out)
        ran = int(out["i"])
        e.stats.update(decode_calls=1, decode_steps=ran, slot_steps=ran * S)
        finished = []
        for shard in self.shards:
            for k, i in enumerate(running[shard.index]):
                row = shard.rows[i]
                slot = shard.index * s + k
                made = int(out["step"][slot]) - len(row.tokens)
                e.stats["busy_slot_steps"] += made
                row.tokens += out["tokens"][slot, :made].tolist()
                row.logprobs += out["logprobs"][slot, :made].tolist()
                if not out["live"][slot]:
                    finished.append((row, self._finish(shard, row)))
                    shard.rows[i] = None
        return finished

    def _finish(self, shard: _Shard, row: _Row) -> Completion:
        shard.alloc.release(row.own)
        shard.alloc.release(row.shared)
        if row.prompt.prefix % self.e.page_size:  # the partly filled last prompt page: one reference per sample
            shard.alloc.release(row.prompt.pages[row.prompt.prefix // self.e.page_size:])
        tokenizer = self.e.tokenizer
        stopped = bool(row.tokens) and row.tokens[-1] in self.stop_ids
        return Completion(token_ids=row.tokens, finish_reason="stop" if stopped else "length",
                          text=None if tokenizer is None else tokenizer.decode(row.tokens, skip_special_tokens=True),
                          logprobs=row.logprobs)
