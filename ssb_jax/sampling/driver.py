"""From chat prompts to text: template, sort by length, bucket, run `generate`, restore order.

Prompt lengths and batch sizes are padded up to buckets so that a run over thousands of prompts
compiles a handful of programs. A mesh, when given, shards each batch over its data axes (the
sampling mesh, sampling.mesh.sampling_mesh), batches padded with filler rows to a multiple of its size.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssb_jax.model.tokenizer import Chat, encode_chat
from ssb_jax.sampling.decode_layout import to_decode_layout, unstacked_layers
from ssb_jax.sampling.sampler import FINISH_STOP, SamplingParams, generate, row_keys_for
from ssb_jax.sharding import batch_sharding, data_parallel_size

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
    token_ids: list[int]          # the sampled tokens, the stop token included when there is one
    finish_reason: str            # "stop" or "length"
    text: str | None = None       # decoded without special tokens (None without a tokenizer)
    logprobs: list[float] | None = None  # per token, under the untempered model distribution


class PromptTooLongError(ValueError):
    pass


def stable_row_id(key) -> int:
    """A 31-bit id that depends only on the prompt's key, never on the run or the batch."""
    return zlib.crc32(str(key).encode()) & 0x7FFFFFFF


def power_of_two_buckets(minimum: int, maximum: int) -> list[int]:
    buckets, b = [], minimum
    while b < maximum:
        buckets.append(b)
        b *= 2
    return buckets + [maximum]


def bucket_for(length: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if length <= b:
            return b
    return None


LAYERS_LAYOUTS = ("auto", "scan", "unrolled")


def unrolled_layers(layout: str = "auto", backend: str | None = None) -> bool:
    """Whether samplers run the decode layout (sampling.decode_layout: each layer's weights apart, an
    unrolled layer loop) rather than the stacked weights under `scan`, for `sampler.layers_layout`.

    auto: unrolled on CPU and GPU, scan on TPU. CPU: measured faster (docs/benchmarks.md, "CPU sampling:
    decode layout vs scan layout"). GPU: inside the scan each step slices its layer out of the stacked
    weights, and XLA:GPU does not fuse that dynamic slice into the products (its dynamic-slice fusion is
    off by default), so a decode step copies every weight before reading it: about 3x the weight traffic
    that bounds decoding, against once unrolled. benchmarks/device_check.sh times both on the GPU
    (benchmarks.sampling --layers-layout scan|unrolled); until a GPU has run it this default rests on
    that argument, not a measurement. TPU keeps the scan: not measured either, and the decode layout is a
    second copy of the weights while the training layout is alive, which small-HBM chips cannot spare.
    """
    if layout not in LAYERS_LAYOUTS:
        raise ValueError(f"sampler.layers_layout must be one of {', '.join(LAYERS_LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        return (backend or jax.default_backend()) in ("cpu", "gpu", "cuda", "rocm")
    return layout == "unrolled"


def decode_layout_by_default() -> bool:
    """Whether samplers use the decode layout unless told (`unrolled_layers("auto")`)."""
    return unrolled_layers("auto")


def split_for_sampling(model, unstack: bool | None, decode_copies: dict | None = None):
    """(the model in the layout samplers run, its graph definition, its state as a pure dict); unstack None:
    decode_layout_by_default(). Split once: the state travels as a plain dict of arrays and the graph
    definition is closed over (as a static argument it was hashed on every call; Variables cost more to
    flatten)."""
    if unstack is None:
        unstack = decode_layout_by_default()
    if unstack:
        model = to_decode_layout(model, decode_copies)
    graphdef, state = nnx.split(model)
    return model, graphdef, nnx.to_pure_dict(state)


class Sampler:
    """Holds the model, split once, and the compiled programs; generate() is the entry point."""

    def __init__(self, model, tokenizer=None, *, batch_size: int = 8,
                 max_prompt_tokens: int = 2048, prompt_buckets: Sequence[int] | None = None,
                 min_prompt_bucket: int = 16, mesh=None, show_progress: bool = True, unstack: bool | None = None,
                 decode_copies: dict | None = None):
        """model: a Qwen2ForCausalLM, with adapters for a student (ssb_jax.model.lora.with_adapters).
        unstack: sample with the decode layout of the weights (a copy: an unrolled layer loop and
        transposed matrices; see ssb_jax.sampling.decode_layout). Default: on CPU and GPU, not TPU
        (unrolled_layers: the `sampler.layers_layout` setting).
        decode_copies: shared by samplers of the same base, so they hold one decode-layout copy.
        mesh: the mesh the model's weights are on (the sampling mesh, sampling.mesh.sampling_mesh); each
        batch's rows are split over its data axes."""
        model, graphdef, self.state = split_for_sampling(model, unstack, decode_copies)
        self.config, self.tokenizer = model.config, tokenizer
        self.graphdef = graphdef  # the graph the program runs (the decode layout on CPU)
        self.mesh = mesh
        # Every batch is padded with filler rows to a multiple of the data-parallel size, so that each
        # device decodes its own rows (a batch the mesh does not divide would run on every device).
        data_parallel = 1 if mesh is None else data_parallel_size(mesh)
        self.batch_size = batch_size
        self.batch_buckets = power_of_two_buckets(data_parallel, math.ceil(batch_size / data_parallel) * data_parallel)
        self.prompt_buckets = sorted(prompt_buckets) if prompt_buckets else power_of_two_buckets(
            min(min_prompt_bucket, max_prompt_tokens), max_prompt_tokens)
        self.max_prompt_tokens = self.prompt_buckets[-1]
        self.show_progress = show_progress
        self.num_compilations = 0  # traces of the generate program: one per (batch, prompt) bucket and program
                                   # shape (SamplingParams.program), whatever the temperature or top-p
        self._generate = jax.jit(functools.partial(self._traced_generate, graphdef), static_argnames=("sampling", "n"))

    def set_adapters(self, lora_state) -> None:
        """Sample with these adapters from now on, in place of the model's own (same targets and ranks):
        each array is written into the state the compiled programs take, placed as the array it
        replaces, so nothing is rebuilt or recompiled (an RL loop updates its policy this way)."""
        pure = nnx.to_pure_dict(lora_state) if isinstance(lora_state, nnx.State) else lora_state
        if isinstance(self.state.get("layers"), dict) and 0 in self.state["layers"]:  # the decode layout
            pure = unstacked_layers(pure, self.config.num_layers)
        self.state = _with_replaced(self.state, pure, ())

    def _traced_generate(self, graphdef, state, tokens, mask, keys, knobs, caps=None, *, sampling, n):
        self.num_compilations += 1
        return generate(graphdef, state, tokens, mask, keys, sampling=sampling, n=n, mesh=self.mesh, knobs=knobs,
                        row_caps=caps)

    # ------------------------------------------------------------------ public

    def generate(self, chats: Sequence[Chat], sampling: SamplingParams, *, n: int = 1, seed: int = 0,
                 ids: Sequence | None = None, system_prompt: str | None = None,
                 on_finish=None) -> list[list[Completion]]:
        """Chat prompts (strings or message lists) -> n completions each, in input order.

        A string is one user turn, after `system_prompt` when given (else the chat template's default). To
        prompt a model as it was trained: `prompts = ssb_jax.export.load_prompts(export_or_run_dir)`, then
        `generate([prompts.student_messages(q) for q in questions], ...)`; an export's own tokenizer
        already defaults to its training system prompt (docs/api.md). on_finish: as for generate_ids."""
        if self.tokenizer is None:
            raise ValueError("Sampler.generate needs a tokenizer; use generate_ids for token ids")
        prompts = [encode_chat(self.tokenizer, chat, system_prompt=system_prompt) for chat in chats]
        return self.generate_ids(prompts, sampling, n=n, seed=seed, ids=ids, on_finish=on_finish)

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *, n: int = 1,
                     seed: int = 0, ids: Sequence | None = None,
                     caps: Sequence[int] | None = None, on_finish=None) -> list[list[Completion]]:
        """caps: each prompt's own limit on new tokens, or n of them, one per sample (None: max_new_tokens).
        on_finish(prompt index, sample index, completion): called for each row as its batch finishes (the
        rollout engine, ssb_jax.engine, calls it as each row finishes), before the next batch starts: the
        consumers (curation, evaluation) append each record from it, so they have one code path for both
        samplers and a kill loses at most the batch in flight."""
        ids = list(range(len(prompts))) if ids is None else list(ids)
        if len(ids) != len(prompts):
            raise ValueError(f"{len(ids)} ids for {len(prompts)} prompts")
        for key, prompt in zip(ids, prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {key!r} is empty")
            if len(prompt) > self.max_prompt_tokens:
                raise PromptTooLongError(f"prompt {key!r} has {len(prompt)} tokens, more than max_prompt_tokens="
                                         f"{self.max_prompt_tokens}")
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[Completion] | None] = [None] * len(prompts)
        progress = sampling_progress(len(prompts) * n, self.show_progress)
        generated, start = 0, time.perf_counter()
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin:begin + self.batch_size]
            out = self._run_batch([prompts[i] for i in chunk], [stable_row_id(ids[i]) for i in chunk],
                                  sampling, n, seed, None if caps is None else [caps[i] for i in chunk])
            for row, i in enumerate(chunk):
                results[i] = out[row * n:(row + 1) * n]
                for j, completion in enumerate(results[i] if on_finish is not None else ()):
                    on_finish(i, j, completion)
            generated += sum(len(c.token_ids) for c in out)
            if progress is not None:
                progress.update(begin * n + len(chunk) * n,
                                {"tok/s": f"{generated / (time.perf_counter() - start):.1f}"})
        if progress is not None:
            progress.close()
        return results

    # ------------------------------------------------------------------ internals

    def _run_batch(self, prompts, row_ids, sampling, n, seed, caps=None) -> list[Completion]:
        rows = bucket_for(len(prompts), self.batch_buckets)
        width = bucket_for(max(len(p) for p in prompts), self.prompt_buckets)
        tokens = np.full((rows, width), sampling.pad_id, np.int32)
        mask = np.zeros((rows, width), bool)
        for r, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
            tokens[r, width - len(prompt):] = prompt
            mask[r, width - len(prompt):] = True
        # filler rows reuse row id 0; their outputs are dropped
        keys = row_keys_for(seed, list(row_ids) + [0] * (rows - len(prompts)), n)
        tokens, mask, keys = self._place(tokens), self._place(mask), self._place(keys)
        if caps is not None:  # filler rows stop after one token
            caps = [[c] * n if np.ndim(c) == 0 else list(c) for c in caps] + [[1] * n] * (rows - len(prompts))
            caps = self._place(np.array(caps, np.int32).reshape(-1))
        # temperature and top-p travel as values: changing them reuses the compiled program
        out = jax.device_get(self._generate(self.state, tokens, mask, keys, jnp.asarray(sampling.knobs()), caps,
                                            sampling=sampling.program(), n=n))
        completions = []
        for r in range(len(prompts) * n):
            length = int(out["lengths"][r])
            token_ids = out["tokens"][r, :length].tolist()
            text = None if self.tokenizer is None else self.tokenizer.decode(token_ids, skip_special_tokens=True)
            completions.append(Completion(
                token_ids=token_ids,
                finish_reason="stop" if out["finish_reason"][r] == FINISH_STOP else "length",
                text=text, logprobs=out["logprobs"][r, :length].tolist()))
        return completions

    def _place(self, array):
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, batch_sharding(self.mesh, array.shape))


def _with_replaced(state: dict, new: dict, path: tuple) -> dict:
    """state with the leaves of `new` (a subtree of the same keys) put in place, each moved to the
    placement of the leaf it replaces; a key, shape or dtype that does not match is an error."""
    out = dict(state)
    for key, value in new.items():
        where = path + (key,)
        if key not in state:
            raise KeyError(f"the sampled model has no parameter {'/'.join(map(str, where))}")
        if isinstance(value, dict):
            out[key] = _with_replaced(state[key], value, where)
            continue
        old = state[key]
        if tuple(value.shape) != tuple(old.shape) or value.dtype != old.dtype:
            raise ValueError(f"{'/'.join(map(str, where))}: new {value.dtype}{list(value.shape)}, "
                             f"sampled model has {old.dtype}{list(old.shape)}")
        out[key] = jax.device_put(value, old.sharding)
    return out


# off a terminal, a log line at most this often (a sampler runs many short calls; each logged would flood the log)
PROGRESS_LOG_INTERVAL_S = 30.0


def sampling_progress(total: int, enabled: bool, desc: str = "sampling"):
    """The progress of `total` sequences for both samplers (this static one and ssb_jax.engine): a bar on a
    terminal, else a log line every PROGRESS_LOG_INTERVAL_S (training.metrics.Progress); None when disabled."""
    if not enabled:
        return None
    from ssb_jax.training.metrics import Progress
    return Progress(total, 1, desc=desc, unit="seq", interval_s=PROGRESS_LOG_INTERVAL_S)
