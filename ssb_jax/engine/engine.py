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

When pages run out, rows wait for pages; if every running row waits, the one holding the most pages
is preempted (its pages freed, the row restarted later from its prompt: the same tokens again).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssb_jax.engine.paged_cache import (NULL_PAGE, PageAllocator, attention_kernel, copy_pages, flat_slots, init_pool, page_bytes,
                                        paged_forward, pages_for_memory)
from ssb_jax.model.tokenizer import Chat, encode_chat
from ssb_jax.sampling.decode_layout import DecodeLayoutModel
from ssb_jax.sampling.driver import (Completion, PromptTooLongError, Sampler, sampling_progress, split_for_sampling,
                                     stable_row_id)
from ssb_jax.sampling.sampler import SamplingParams, choose_tokens, row_keys_for

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


class Engine:
    """Continuous batching over a paged KV cache; the interface of ssb_jax.sampling.driver.Sampler."""

    def __init__(self, model, tokenizer=None, *, slots: int = 8, page_size: int = 16, num_pages: int | None = None,
                 max_prompt_tokens: int = 2048, prefill_chunk: int = 64, prefill_budget: int | None = None,
                 steps_per_call: int = 32, mesh=None, show_progress: bool = False, unstack: bool | None = None,
                 decode_copies: dict | None = None, memory_per_device: float | None = None, **_ignored):
        """model: a Qwen2ForCausalLM (with adapters for a student). slots: rows decoded together.
        page_size: slots per page. num_pages: the pool's pages (None: what fits the device's memory next
        to the weights, see pages_for_memory, capped at what `slots` rows of the longest call can use).
        prefill_chunk: prompt tokens per prefill call; prefill_budget: prompt tokens prefilled between
        two decode calls (default 4 chunks). steps_per_call: decode steps per device call.
        unstack, decode_copies: as Sampler (the CPU decode layout). Other Sampler keywords
        (batch_size, prompt buckets) are accepted and ignored: the engine needs no buckets."""
        model, graphdef, self.state = split_for_sampling(model, unstack, decode_copies)
        self.config, self.tokenizer, self.graphdef = model.config, tokenizer, graphdef
        self.per_layer = isinstance(model, DecodeLayoutModel)
        self.attention = attention_kernel()  # decode steps: the Pallas paged kernel on TPU, the XLA gather elsewhere
        self.mesh = mesh
        if mesh is not None and mesh.size > 1:
            log.warning("Engine: a %d-device mesh; the engine runs its rows on the weights' placement without "
                        "splitting them over the data axis (use the static sampler for data parallel rows)",
                        mesh.size)
        self.slots, self.page_size = slots, page_size
        self.requested_pages, self.memory_per_device = num_pages, memory_per_device
        self.max_prompt_tokens = max_prompt_tokens
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or 4 * prefill_chunk
        self.steps_per_call = steps_per_call
        self.show_progress = show_progress
        self.pool, self.allocator = None, None
        self.num_compilations = 0
        self.stats = collections.Counter()  # decode_calls, decode_steps, slot_steps, busy_slot_steps, prefill_calls,
        # preemptions
        self._decode = jax.jit(functools.partial(self._traced_decode, graphdef),
                               static_argnames=("sampling", "steps"), donate_argnames=("pool",))
        self._prefill = jax.jit(functools.partial(self._traced_prefill, graphdef), donate_argnames=("pool",))

    # ------------------------------------------------------------------ device programs

    def _traced_prefill(self, graphdef, state, pool, tokens, positions, page_table, write_slots):
        self.num_compilations += 1
        model = nnx.merge(graphdef, state)
        return paged_forward(model, pool, tokens, positions, page_table, write_slots)[1]

    def _traced_decode(self, graphdef, state, pool, page_table, last, position, step, cap, live, limit, key_data,
                       copy_from, copy_to, knobs, return_early, *, sampling, steps):
        """Up to `steps` decode steps of every slot; stops early when every row is stopped or waits for pages,
        or (return_early) once a row has stopped. Row r at step j feeds its last token at position[r], writes it
        at that position (its pages in page_table[r], written below limit[r]) and draws token j."""
        self.num_compilations += 1
        model = nnx.merge(graphdef, state)
        pool = copy_pages(pool, copy_from, copy_to)
        keys = jax.random.wrap_key_data(key_data)
        stop_ids = jnp.array(sampling.stop_ids or (-1,), jnp.int32)
        S = last.shape[0]

        def choose(logits, key, row_step):  # one row as a batch of one: choose_tokens with the row's own step
            token, logprob = choose_tokens(logits[None], key[None], row_step, sampling, knobs)
            return token[0], logprob[0]

        def running(c):
            return c["live"] & (c["position"] < limit)

        def keep_going(c):
            return (c["i"] < steps) & jnp.any(running(c)) & ~(return_early & c["stopped_any"])

        def body(c):
            go = running(c)
            slots = flat_slots(page_table, c["position"][:, None], go[:, None], self.page_size)
            hidden, new_pool = paged_forward(model, c["pool"], c["last"][:, None], c["position"][:, None], page_table,
                                             slots, self.attention)
            token, logprob = jax.vmap(choose)(model.logits(hidden[:, 0]), keys, c["step"])
            token = jnp.where(go, token, sampling.pad_id)
            new_step = c["step"] + go.astype(jnp.int32)
            stopped = go & (jnp.isin(token, stop_ids) | (new_step >= cap))
            return {"i": c["i"] + 1, "pool": new_pool,
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

    # ------------------------------------------------------------------ pool

    def pool_pages(self, pages_per_row: int) -> int:
        """The pool's size for a call whose rows need at most `pages_per_row` pages."""
        worst = self.slots * pages_per_row + 2 * pages_per_row + 1  # every slot full, one prompt ahead, null page
        if self.requested_pages:
            return self.requested_pages
        from ssb_jax.sampling.mesh import device_memory_bytes
        memory = self.memory_per_device or device_memory_bytes(jax.devices()[0])
        if not memory:
            return worst
        weights = sum(x.nbytes for x in jax.tree.leaves(self.state))
        logits = 2 * self.slots * self.config.vocab_size * 4
        fits = pages_for_memory(self.config, self.page_size, memory, weights, logits)
        if fits < worst:
            log.info("page pool: %d pages fit the device's memory (%d for every slot at the longest row)", fits, worst)
        return max(min(fits, worst), pages_per_row + 1)

    def _ensure_pool(self, pages: int) -> None:
        if self.pool is not None and self.allocator.num_pages >= pages:
            return
        self.pool = None  # the old pool is freed before the new one is allocated
        self.pool = init_pool(self.config, pages, self.page_size, per_layer=self.per_layer)
        self.allocator = PageAllocator(pages)
        log.info("page pool: %d pages of %d slots (%.1f MiB)", pages, self.page_size,
                 pages * page_bytes(self.config, self.page_size) / 2**20)


class _Schedule:
    """One call's host-side scheduling: queue -> prefill -> slots -> collect."""

    def __init__(self, engine: Engine, prompts, sampling: SamplingParams, n: int, seed: int, ids, caps):
        self.e, self.sampling, self.n = engine, sampling, n
        ps = engine.page_size
        # the page table's width from max_new_tokens, not the caps: calls with the same settings share programs
        longest = max(len(p) for p in prompts) - 1 + sampling.max_new_tokens
        self.pages_per_row = _next_power_of_two(math.ceil(longest / ps))
        engine._ensure_pool(engine.pool_pages(self.pages_per_row))
        self.alloc = engine.allocator
        self.seed, self.row_ids = seed, [stable_row_id(k) for k in ids]
        self.queue = collections.deque(_Prompt(i, p, c, list(range(n))) for i, (p, c) in enumerate(zip(prompts, caps)))
        self.ready: collections.deque = collections.deque()  # (prompt, sample) whose prompt is prefilled
        # a small call decodes on fewer slots (a power of two), so it does not compute empty slots every step
        self.rows: list[_Row | None] = [None] * min(engine.slots, _next_power_of_two(len(prompts) * n))
        self.copies: list[tuple[int, int]] = []
        self.placed = 0
        # the compiled program shapes on these only: temperature and top-p travel as knobs, caps per row
        self.program = dataclasses.replace(sampling.program(), max_new_tokens=1)
        self.knobs = jnp.asarray(sampling.knobs())
        self.stop_ids = set(sampling.stop_ids)

    # ------------------------------------------------------------------ steps

    def run(self) -> Iterator[tuple[int, int, Completion]]:
        e = self.e
        progress = sampling_progress(len(self.queue) * self.n, e.show_progress, desc="rollouts")
        finished_rows = 0
        while self.queue or self.ready or any(self.rows):
            self._prefill()
            self._place()
            limits = self._reserve()
            if not any(self.rows):
                if self.queue or self.ready:
                    raise MemoryError(f"the page pool ({self.alloc.num_pages} pages of {e.page_size}) cannot hold "
                                      "one prompt and its first pages; raise num_pages or lower the prompt length")
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
        """Prefill waiting prompts, at most prefill_budget tokens, while the samples ready do not fill the free slots."""
        e, ps = self.e, self.e.page_size
        budget = e.prefill_budget
        while self.queue and budget > 0 and len(self.ready) < self.rows.count(None) + len(self.rows) // 2:
            prompt = self.queue[0]
            if prompt.pages is None:
                count = math.ceil(prompt.prefix / ps)
                # each sample's partial copy and first page; one sample's when nothing else runs
                idle = not self.ready and not any(self.rows)
                reserve = 2 if idle else 2 * len(prompt.samples)
                if self.alloc.available < count + reserve:
                    return
                prompt.pages = self.alloc.take(count, refs=len(prompt.samples))
                # one prompt at a time: the same small program whatever the call's size
                prompt.key_data = np.asarray(jax.random.key_data(row_keys_for(self.seed, [self.row_ids[prompt.index]],
                                                                              self.n)))
            if prompt.prefilled < prompt.prefix:
                self._prefill_chunk(prompt)
                budget -= e.prefill_chunk
            if prompt.prefilled >= prompt.prefix:
                self.queue.popleft()
                self.ready.extend((prompt, j) for j in prompt.samples)

    def _prefill_chunk(self, prompt: _Prompt) -> None:
        e, ps, C = self.e, self.e.page_size, self.e.prefill_chunk
        start = prompt.prefilled
        count = min(C, prompt.prefix - start)
        positions = start + np.arange(C, dtype=np.int32)
        tokens = np.zeros(C, np.int32)
        tokens[:count] = prompt.tokens[start:start + count]
        table = self._table_row(prompt.pages)
        pages = table[np.minimum(positions // ps, len(table) - 1)]
        slots = np.where(np.arange(C) < count, pages * ps + positions % ps, NULL_PAGE * ps).astype(np.int32)
        e.pool = e._prefill(e.state, e.pool, tokens[None], positions[None], table[None], slots[None])
        e.stats["prefill_calls"] += 1
        prompt.prefilled += count

    def _table_row(self, pages: list[int]) -> np.ndarray:
        table = np.full(self.pages_per_row, NULL_PAGE, np.int32)
        table[:len(pages)] = pages
        return table

    def _place(self) -> None:
        """Put ready samples into free slots: the prompt's full pages shared, a copy of a partly filled last page."""
        ps = self.e.page_size
        for slot, row in enumerate(self.rows):
            if row is not None or not self.ready:
                continue
            prompt, sample = self.ready[0]
            full = prompt.prefix // ps
            partial = prompt.pages[full:]
            if self.alloc.available < len(partial) + 1:
                return
            self.ready.popleft()
            own = self.alloc.take(len(partial))
            self.copies += list(zip(partial, own))
            self.rows[slot] = _Row(prompt, sample, shared=prompt.pages[:full], own=own, order=self.placed)
            self.placed += 1

    def _reserve(self) -> np.ndarray:
        """Pages for each row's next steps, oldest row first; returns the position each row may write up to
        (exclusive). When every row waits for a page, the youngest is preempted (its own pages freed, the row
        back at the head of the ready queue, to restart from step 0): the oldest row always gets pages first,
        so it finishes, and no row is preempted forever."""
        ps, M = self.e.page_size, self.e.steps_per_call
        while True:
            limits = np.zeros(len(self.rows), np.int32)
            running = sorted((row.order, slot) for slot, row in enumerate(self.rows) if row is not None)
            for _, slot in running:
                row = self.rows[slot]
                end = row.prompt.prefix + row.cap  # the positions a row writes: prefix .. prefix + cap - 1
                want = math.ceil(min(row.position + M, end) / ps) - len(row.pages)
                if want > 0:
                    row.own += self.alloc.take(min(want, self.alloc.available))
                limits[slot] = len(row.pages) * ps
            if not running or any(limits[slot] > self.rows[slot].position for _, slot in running):
                return limits
            if len(running) == 1:
                raise MemoryError(f"the page pool ({self.alloc.num_pages} pages of {ps}) cannot hold one row")
            victim = running[-1][1]
            row = self.rows[victim]
            log.info("page pool full: preempting a row of prompt %d (it restarts from its prompt)", row.prompt.index)
            self.e.stats["preemptions"] += 1
            self.copies = [(source, target) for source, target in self.copies if target not in row.own]
            self.alloc.release(row.own)
            self.rows[victim] = None
            self.ready.appendleft((row.prompt, row.sample))  # it keeps its references to the prompt's pages

    def _decode(self, limits: np.ndarray) -> list[tuple[_Row, Completion]]:
        e, S = self.e, len(self.rows)
        table = np.zeros((S, self.pages_per_row), np.int32)
        last = np.zeros(S, np.int32)
        position, step = np.zeros(S, np.int32), np.zeros(S, np.int32)
        cap, live = np.ones(S, np.int32), np.zeros(S, bool)
        key_data = None
        for slot, row in enumerate(self.rows):
            if row is None:
                continue
            table[slot] = self._table_row(row.pages)
            last[slot] = row.tokens[-1] if row.tokens else row.prompt.tokens[-1]
            position[slot], step[slot], cap[slot], live[slot] = row.position, len(row.tokens), row.cap, True
            if key_data is None:
                key_data = np.zeros((S,) + row.prompt.key_data.shape[1:], row.prompt.key_data.dtype)
            key_data[slot] = row.prompt.key_data[row.sample]
        assert len(self.copies) <= S, "one copy per placement, at most one placement per slot"
        copy_from, copy_to = np.array(self.copies + [(NULL_PAGE, NULL_PAGE)] * (S - len(self.copies)), np.int32).T
        self.copies = []
        return_early = bool(self.queue or self.ready)
        e.pool, out = e._decode(e.state, e.pool, table, last, position, step, cap, live, limits, key_data,
                                copy_from, copy_to, self.knobs, np.bool_(return_early),
                                sampling=self.program, steps=e.steps_per_call)
        out = jax.device_get(out)
        ran = int(out["i"])
        e.stats.update(decode_calls=1, decode_steps=ran, slot_steps=ran * S)
        finished = []
        for slot, row in enumerate(self.rows):
            if row is None:
                continue
            made = int(out["step"][slot]) - len(row.tokens)
            e.stats["busy_slot_steps"] += made
            row.tokens += out["tokens"][slot, :made].tolist()
            row.logprobs += out["logprobs"][slot, :made].tolist()
            if not out["live"][slot]:
                finished.append((row, self._finish(row)))
                self.rows[slot] = None
        return finished

    def _finish(self, row: _Row) -> Completion:
        self.alloc.release(row.own)
        self.alloc.release(row.shared)
        if row.prompt.prefix % self.e.page_size:  # the partly filled last prompt page: one reference per sample
            self.alloc.release(row.prompt.pages[row.prompt.prefix // self.e.page_size:])
        tokenizer = self.e.tokenizer
        stopped = bool(row.tokens) and row.tokens[-1] in self.stop_ids
        return Completion(token_ids=row.tokens, finish_reason="stop" if stopped else "length",
                          text=None if tokenizer is None else tokenizer.decode(row.tokens, skip_special_tokens=True),
                          logprobs=row.logprobs)
