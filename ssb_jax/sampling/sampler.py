"""Pure, jitted sampling: one prefill, then a decode loop that runs on the device.

`generate` takes a left-padded prompt batch and per-row PRNG keys and returns the completions.
Each output row draws its randomness only from its own key (folded with the step number), so a
row's samples do not depend on what else shares its batch. With n > 1 the prompt is prefilled
once and its keys and values written n times (rows are prompt-major: prompt0 sample0..n-1, prompt1 ...).
The cache lives in the decode loop's carry and each step writes one slot per layer into it in place.
The decode loop runs in phases (kv_cache.decode_phases), one `while_loop` each, whose steps attend over
a static number of cache blocks: a step's cost follows the filled length (within 2x), and no loop
inside a step has a trip count that depends on data (on GPU, such a loop waits on the host each
iteration).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from ssb_jax.model.attention import kernel_mesh
from ssb_jax.model.kv_cache import cache_shardings, decode_phases
from ssb_jax.model.qwen2 import positions_from_mask

FINISH_LENGTH, FINISH_STOP = 0, 1
TOP_K_TIE_SLACK = 8  # extra candidates kept so logits tied with the k-th one stay in play
# Columns per chunk of the two-stage top-k (`top_k_in_chunks`). Above XLA's fast top-k (small k only)
# a GPU top-k sorts whole rows: one row of 151,936 logits per sequence. In chunks it sorts many short
# rows side by side, then one row of (chunks x k) candidates.
TOP_K_CHUNK = 2048
# The platforms that draw top-k candidates in two stages (`candidate_top_k`). Not the CPU: XLA:CPU's own
# top-k runtime takes 0.35 ms for k = 58 of 151,936 logits, the chunks 1.6 ms (batch 8: 2.4 vs 37 ms).
TOP_K_IN_CHUNKS_ON = ("cuda", "rocm", "tpu")
_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy. top_k 0 and top_p 1.0 mean off."""
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    # The stop ids cannot be sampled before this many new tokens (benchmarks suppress EOS this way).
    min_new_tokens: int = 0
    # Pad id written after a row has finished.
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def program(self) -> "SamplingParams":
        """These params with temperature and top-p reduced to what shapes the compiled program
        (greedy or not, nucleus on or off); their values travel as `knobs`, so changing them does
        not recompile."""
        if self.greedy:
            return dataclasses.replace(self, temperature=0.0, top_p=1.0)
        return dataclasses.replace(self, temperature=1.0, top_p=0.5 if self.top_p < 1.0 else 1.0)

    def knobs(self) -> np.ndarray:
        """The traced values that go with `program()`: [temperature, top_p] as float32."""
        return np.array([self.temperature or 1.0, self.top_p], np.float32)


# ----------------------------------------------------------------------------- token choice

def top_k_in_chunks(x: jax.Array, k: int, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x, k)` (values and indices along the last axis, ties in index order) in two stages:
    the top k of each chunk of `chunk` columns (default TOP_K_CHUNK), then the top k of those candidates.

    The same values and indices as lax.top_k: an element among the k largest (by value, then lower
    index) has fewer than k elements ahead of it in its own chunk, so it is among its chunk's
    candidates; candidates are laid out chunk by chunk, each chunk's in index order among equals, so
    the merge breaks ties by index as lax.top_k does. The last chunk is padded with the lowest value,
    at indices past every real one, so padding never displaces a real element (x has >= k columns)."""
    chunk = TOP_K_CHUNK if chunk is None else chunk
    V = x.shape[-1]
    if k >= chunk or V <= 2 * chunk:
        return jax.lax.top_k(x, k)
    n = -(-V // chunk)
    lowest = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * chunk - V)], constant_values=lowest)
    values, ids = jax.lax.top_k(padded.reshape(x.shape[:-1] + (n, chunk)), k)
    ids = ids + (chunk * jnp.arange(n, dtype=ids.dtype))[:, None]
    values, where = jax.lax.top_k(values.reshape(x.shape[:-1] + (n * k,)), k)
    return values, jnp.take_along_axis(ids.reshape(x.shape[:-1] + (n * k,)), where, axis=-1)


def candidate_top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k(logits, k), lowered per platform: in two stages (top_k_in_chunks) on TOP_K_IN_CHUNKS_ON,
    in one elsewhere. The same values and indices either way."""
    in_chunks = lambda x: tuple(top_k_in_chunks(x, k))  # noqa: E731
    return jax.lax.platform_dependent(logits, default=lambda x: tuple(jax.lax.top_k(x, k)),
                                      **{platform: in_chunks for platform in TOP_K_IN_CHUNKS_ON})


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """True for tokens whose logit is at least the k-th largest (ties at the boundary are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return logits >= kth


def top_p_mask(logits: jax.Array, p: float, candidates: int = 0) -> jax.Array:
    """Nucleus: keep a token iff the probability mass of tokens strictly more likely is below p.

    Tied tokens are kept or dropped together. `candidates` > 0 says only the top `candidates`
    tokens can survive (top-k already applied), so only those need sorting.
    """
    if isinstance(p, (int, float)) and p >= 1.0:  # a traced p: the caller decided nucleus is on
        return jnp.ones(logits.shape, bool)
    probs = jax.nn.softmax(logits, axis=-1)
    width = candidates if 0 < candidates < logits.shape[-1] else logits.shape[-1]
    sorted_probs = jax.lax.top_k(probs, width)[0]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = mass_before < p
    # the smallest kept probability; every token at least that likely is in the nucleus
    threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return probs >= threshold


def filter_logits(logits: jax.Array, sampling: SamplingParams, knobs: jax.Array | None = None) -> jax.Array:
    """Temperature, then top-k, then top-p (the order HF generate applies them); dropped -> -inf.
    knobs: traced [temperature, top_p] replacing sampling's (see SamplingParams.program)."""
    temperature, top_p = (sampling.temperature, sampling.top_p) if knobs is None else (knobs[0], knobs[1])
    scaled = logits / temperature
    keep = top_k_mask(scaled, sampling.top_k)
    scaled = jnp.where(keep, scaled, _NEG_INF)
    if sampling.top_p < 1.0:
        scaled = jnp.where(top_p_mask(scaled, top_p, sampling.top_k), scaled, _NEG_INF)
    return scaled


def choose_tokens(logits: jax.Array, row_keys: jax.Array, step, sampling: SamplingParams, knobs=None):
    """Pick one token per row from float32 logits [R, V]; returns (tokens [R], log-probs [R]).

    The log-prob is under the model's own distribution (temperature 1, no filtering).
    """
    if sampling.stop_ids and sampling.min_new_tokens > 0:
        stop = jnp.zeros(logits.shape[-1], bool).at[jnp.array(sampling.stop_ids)].set(True)
        logits = jnp.where(stop & (step < sampling.min_new_tokens), _NEG_INF, logits)
    if sampling.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        width = sampling.top_k + TOP_K_TIE_SLACK
        if 0 < sampling.top_k and width < logits.shape[-1]:
            # Draw among the top-k candidates only: the same distribution (unless more than
            # TOP_K_TIE_SLACK tokens tie at the k-th logit), without full-vocabulary noise per step.
            values, ids = candidate_top_k(logits, width)
            choice = jax.vmap(jax.random.categorical)(step_keys, filter_logits(values, sampling, knobs))
            tokens = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
        else:
            tokens = jax.vmap(jax.random.categorical)(step_keys, filter_logits(logits, sampling, knobs))
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprobs


# ----------------------------------------------------------------------------- generation

def generate(graphdef: nnx.GraphDef, state, prompt_tokens: jax.Array, prompt_mask: jax.Array,
             row_keys: jax.Array, *, sampling: SamplingParams, n: int = 1, mesh=None, knobs=None, row_caps=None):
    """Sample completions for left-padded prompts from the model `nnx.merge(graphdef, state)` (any
    Qwen2ForCausalLM: with or without adapters, in the training or the decode layout; `state` an
    nnx.State or its pure dict).

    prompt_tokens, prompt_mask [B, P]; row_keys [B * n] PRNG keys (one per output row); knobs: traced
    [temperature, top_p] for `sampling.program()` (None: sampling's own values, compiled in); row_caps:
    [B*n] int32, each row's own limit on new tokens (None: max_new_tokens for every row), a traced value.
    Returns a dict: tokens [B*n, M] int32 (pad after the end), lengths [B*n] (the stop token counts),
    finish_reason [B*n] (FINISH_STOP or FINISH_LENGTH), logprobs [B*n, M] float32.
    """
    B, P = prompt_tokens.shape
    M = sampling.max_new_tokens
    R = B * n
    prompt_mask = prompt_mask.astype(bool)
    positions = positions_from_mask(prompt_mask)
    model = nnx.merge(graphdef, state)
    # One prefill of the B prompts, among themselves only, written n times into the R-row cache.
    cache = model.init_cache(R, P + M)
    with kernel_mesh(mesh):  # a fused attention kernel (splash, cuDNN) runs under shard_map on the sampling mesh
        hidden, cache = model(prompt_tokens, positions, prompt_mask, cache, return_hidden=True, cache_is_empty=True)
    last_logits = jnp.repeat(model.logits(hidden[:, -1]), n, axis=0)
    next_position = jnp.repeat(jnp.sum(prompt_mask, axis=-1).astype(jnp.int32), n, axis=0)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
    stop_ids = jnp.array(sampling.stop_ids or (-1,), jnp.int32)

    first, first_lp = choose_tokens(last_logits, row_keys, 0, sampling, knobs)

    def stopped(token, lengths):  # a stop token, or (with row caps) the row's cap reached
        done = jnp.isin(token, stop_ids)
        return done if row_caps is None else done | (lengths >= row_caps)

    state = {
        "step": jnp.int32(1),
        "tokens": jnp.full((R, M), sampling.pad_id, jnp.int32).at[:, 0].set(first),
        "logprobs": jnp.zeros((R, M), jnp.float32).at[:, 0].set(first_lp),
        "done": stopped(first, 1),
        "lengths": jnp.ones((R,), jnp.int32),
        "last": first,
        "cache": cache,
    }

    def keep_going(s):
        return (s["step"] < M) & ~jnp.all(s["done"])

    def decode_step(s, attend_slots):
        step = s["step"]
        pos = (next_position + step - 1)[:, None]  # the fed token is the (step-1)-th new one
        logits, cache = model(s["last"][:, None], pos, jnp.ones((R, 1), bool), s["cache"], attend_slots=attend_slots)
        token, lp = choose_tokens(logits[:, 0], row_keys, step, sampling, knobs)
        token = jnp.where(s["done"], sampling.pad_id, token)
        lp = jnp.where(s["done"], 0.0, lp)
        return {
            "step": step + 1,
            "tokens": jax.lax.dynamic_update_slice_in_dim(s["tokens"], token[:, None], step, axis=1),
            "logprobs": jax.lax.dynamic_update_slice_in_dim(s["logprobs"], lp[:, None], step, axis=1),
            "done": s["done"] | stopped(token, s["lengths"] + 1),
            "lengths": s["lengths"] + (~s["done"]).astype(jnp.int32),
            "last": token,
            "cache": cache,
        }

    # Step s attends over P + s slots; each phase runs the steps its bound covers (P + s <= bound).
    for bound in decode_phases(P, M, model.config.cache_block):
        state = jax.lax.while_loop(lambda s, last=bound - P: keep_going(s) & (s["step"] <= last),
                                   lambda s, bound=bound: decode_step(s, bound), state)
    stop_token = jnp.isin(jnp.take_along_axis(state["tokens"], state["lengths"][:, None] - 1, axis=1)[:, 0], stop_ids)
    finished = jnp.where(state["done"] & stop_token, FINISH_STOP, FINISH_LENGTH)
    return {"tokens": state["tokens"], "lengths": state["lengths"], "finish_reason": finished,
            "logprobs": state["logprobs"]}


def row_keys_for(seed: int, row_ids: Sequence[int], n: int) -> jax.Array:
    """Keys for n samples of each row: key(seed) folded with the row id, then the sample index.
    Row ids are stable per prompt (see driver.stable_row_id), so a prompt samples the same tokens
    whatever batch it lands in and however often a run is resumed."""
    ids = jnp.repeat(jnp.asarray([int(r) & 0x7FFFFFFF for r in row_ids], jnp.uint32), n)
    samples = jnp.tile(jnp.arange(n, dtype=jnp.uint32), len(row_ids))
    base = jax.random.key(seed)
    return jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))(ids, samples)
