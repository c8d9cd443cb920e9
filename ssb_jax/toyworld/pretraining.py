"""Pre-training the toy model: its data (plain, hinted and drill sequences), its loss, and its loop.

Plain-prompt solutions slip on "b groups of e" steps with probability `slip_prob` (> 1/2, so greedy
decoding slips), while hinted-prompt solutions, whose prompt holds a correct trace, are always
right; short arithmetic drill texts make the arithmetic learnable in a few CPU minutes.
`PretrainProgress` shows how far `pretrain` is.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
from ssb_jax.toyworld.config import ToyWorldConfig
from ssb_jax.toyworld.problems import Problem

if TYPE_CHECKING:
    from ssb_jax.model.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Batches:
    """Right-padded sequences of one kind: tokens [N, T]; target_mask [N, T] marks the solution tokens
    (and the closing <|im_end|>), prompt_mask [N, T] the real prompt tokens. No attention mask is
    needed: pads only follow real tokens, so causal attention never sees them."""
    tokens: np.ndarray
    target_mask: np.ndarray
    prompt_mask: np.ndarray

    def __len__(self):
        return len(self.tokens)


def encode_examples(tokenizer, examples: Sequence[tuple[list[dict], str]], pad_multiple: int = 16) -> Batches:
    """(prompt messages, solution) pairs -> prompt ids (as encode_chat renders them, so as at
    sampling time) + solution ids + <|im_end|>, right padded; only the solution and <|im_end|> are targets."""
    from ssb_jax.model.tokenizer import encode_chat
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [encode_chat(tokenizer, messages) for messages, _ in examples]
    solutions = tokenizer([s for _, s in examples], add_special_tokens=False)["input_ids"]
    rows = [(p, s + [end]) for p, s in zip(prompts, solutions)]
    length = -(-max(len(p) + len(s) for p, s in rows) // pad_multiple) * pad_multiple
    pad = tokenizer.pad_token_id
    tokens = np.full((len(rows), length), pad, np.int32)
    target_mask = np.zeros((len(rows), length), bool)
    prompt_mask = np.zeros((len(rows), length), bool)
    for i, (p, s) in enumerate(rows):
        tokens[i, :len(p) + len(s)] = p + s
        prompt_mask[i, :len(p)] = True
        target_mask[i, len(p):len(p) + len(s)] = True
    return Batches(tokens, target_mask, prompt_mask)


def arithmetic_drill(rng: random.Random, config: ToyWorldConfig, count: int) -> list[str]:
    """Plain-text lines of true facts (`13 + 9 = 22`, `4 * 5 = 20`), drill_facts per text: a dense
    arithmetic signal (most chat tokens are words and copied numbers) that makes pre-training short."""
    top = min(max(config.max_amount, 30), config.max_value)  # covers a total plus a product
    texts = []
    for _ in range(count):
        facts = []
        for _ in range(config.drill_facts):
            kind = rng.random()
            if kind < 0.2:
                a, b = rng.randint(2, 5), rng.randint(2, 6)
                facts.append(f"{a} * {b} = {a * b}")
            elif kind < 0.6:
                b = rng.randint(1, top)
                a = rng.randint(0, config.max_value - b)
                facts.append(f"{a} + {b} = {a + b}")
            else:
                b = rng.randint(1, top)
                a = rng.randint(b, config.max_value)
                facts.append(f"{a} - {b} = {a - b}")
        texts.append(".\n".join(facts) + ".")
    return texts


def encode_texts(tokenizer, texts: Sequence[str], pad_multiple: int = 16) -> Batches:
    """Raw texts (no chat), right padded; every token after the first is a target."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    length = -(-max(map(len, ids)) // pad_multiple) * pad_multiple
    tokens = np.full((len(ids), length), tokenizer.pad_token_id, np.int32)
    target_mask = np.zeros((len(ids), length), bool)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row
        target_mask[i, :len(row)] = True
    return Batches(tokens, target_mask, np.zeros_like(target_mask))


def pretraining_examples(problems: Sequence[Problem], config: ToyWorldConfig, rng: random.Random,
                         prompts: PromptSet = DEFAULT_PROMPTS):
    """(plain, hinted) lists of (messages, solution). Plain solutions slip on each group step with
    probability slip_prob; hinted ones (whose prompt shows a correct and a wrong trace) never do."""
    plain, hinted = [], []
    for p in problems:
        slips = [rng.random() < config.slip_prob for _ in p.steps]
        plain.append((prompts.student_messages(p.question()), p.solution(slips)))
        right = p.solution()
        hinted.append((prompts.hinted_messages(p.question(), right, p.wrong_solution(rng)), right))
    return plain, hinted


# ----------------------------------------------------------------------------- model and pre-training

def model_config(config: ToyWorldConfig, tokenizer) -> "ModelConfig":
    from ssb_jax.model.config import ModelConfig
    return ModelConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_layers, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, rope_theta=10000.0, tie_word_embeddings=True, dtype="float32",
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))


def sequence_loss(graphdef, state, tokens, weights):
    """(weighted sum of next-token NLL, sum of weights); weights [B, T] weigh predicting token t."""
    import jax
    import jax.numpy as jnp
    from ssb_jax.model.qwen2 import apply
    inputs = tokens[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    logits, _ = apply(graphdef, state, inputs, positions, jnp.ones(inputs.shape, bool))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = weights[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def length_buckets(batches: Batches, num_buckets: int, multiple: int = 16) -> list[tuple[np.ndarray, int]]:
    """Rows sorted by length and cut into equal-count buckets: [(row indices, padded width)], shortest first."""
    lengths = (batches.prompt_mask | batches.target_mask).sum(axis=1)
    buckets = []
    for rows in np.array_split(np.argsort(lengths, kind="stable"), num_buckets):
        if len(rows):
            width = min(-(-int(lengths[rows].max()) // multiple) * multiple, batches.tokens.shape[1])
            buckets.append((rows, width))
    return buckets


def pretrain(model, plain: Batches, hinted: Batches, config: ToyWorldConfig, *,
             drill: Batches | None = None, steps: int | None = None, seed: int | None = None, log_fn=None,
             on_step=None):
    """Next-token CE, on the solution (and, weighted, the prompt) tokens of a plain and a hinted batch
    per step, plus a batch of drill texts when given; AdamW with warmup and cosine decay. Both kinds
    are cut into `length_buckets` buckets by length; a step draws both batches from the same bucket
    rank, so padding stays small and the step compiles once per bucket. log_fn(step, loss) is called
    every config.log_every steps, on_step(step, loss) after every step. Returns (model, losses)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    graphdef, params = nnx.split(model)
    steps = config.pretrain_steps if steps is None else steps
    rng = np.random.default_rng(config.seed if seed is None else seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, min(config.warmup_steps, steps // 2),
                                                  max(steps, 1), end_value=config.learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=0.98, weight_decay=config.weight_decay))
    opt_state = optimizer.init(params)
    plain_weights, hinted_weights = (
        b.target_mask + config.prompt_loss_weight * b.prompt_mask.astype(np.float32) for b in (plain, hinted))
    num_buckets = max(1, min(config.length_buckets, len(plain), len(hinted)))
    plain_buckets = length_buckets(plain, num_buckets)
    hinted_buckets = length_buckets(hinted, num_buckets)

    use_drill = drill is not None and config.drill_batch > 0

    @jax.jit
    def step(params, opt_state, plain_tokens, plain_weights, hinted_tokens, hinted_weights, drill_tokens,
             drill_weights):
        def loss_fn(p):
            s1, n1 = sequence_loss(graphdef, p, plain_tokens, plain_weights)
            s2, n2 = sequence_loss(graphdef, p, hinted_tokens, hinted_weights)
            if use_drill:
                s3, n3 = sequence_loss(graphdef, p, drill_tokens, drill_weights)
                s1, n1 = s1 + s3, n1 + n3
            return (s1 + s2) / jnp.maximum(n1 + n2, 1.0)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(steps):
        b = int(rng.integers(0, num_buckets))
        (p_rows, p_width), (h_rows, h_width) = plain_buckets[b], hinted_buckets[b]
        pi = rng.choice(p_rows, config.plain_batch)
        hi = rng.choice(h_rows, config.hinted_batch)
        di = rng.integers(0, len(drill), config.drill_batch) if use_drill else np.zeros(1, int)
        drill_tokens = drill.tokens[di] if use_drill else np.zeros((1, 2), np.int32)
        drill_weights = drill.target_mask[di] if use_drill else np.zeros((1, 2), bool)
        params, opt_state, loss = step(params, opt_state, plain.tokens[pi, :p_width], plain_weights[pi, :p_width],
                                       hinted.tokens[hi, :h_width], hinted_weights[hi, :h_width],
                                       drill_tokens, drill_weights)
        losses.append(float(loss))
        if log_fn is not None and (i % config.log_every == 0 or i == steps - 1):
            log_fn(i, losses[-1])
        if on_step is not None:
            on_step(i, losses[-1])
    return nnx.merge(graphdef, params), losses


# ----------------------------------------------------------------------------- progress

def format_duration(seconds: float) -> str:
    """45 s, 3 min 20 s, 1 h 05 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


class PretrainProgress:
    """on_step for `pretrain` that shows how far it is, on the main process only: a tqdm bar (with its
    ETA) when stderr is a terminal, else, since a bar's redraws would flood a log file, a line every
    `every` steps (and after the first, which includes compiling) with the elapsed time and an ETA."""

    def __init__(self, total: int, every: int, *, terminal: bool | None = None, main_process: bool | None = None):
        import sys
        if main_process is None:
            import jax
            main_process = jax.process_index() == 0
        self.total, self.every, self.enabled = total, max(1, every), main_process
        self.start = time.perf_counter()
        self.first_step_done = None  # time after the first step: later steps estimate the ETA (no compile)
        self.bar = None
        if self.enabled and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="pre-training the toy model", unit="step")

    def eta_seconds(self, done: int, now: float) -> float:
        """The remaining steps at the pace of those after the first (which includes compiling)."""
        return (now - self.first_step_done) / max(done - 1, 1) * (self.total - done)

    def __call__(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        done, now = step + 1, time.perf_counter()
        if done == 1:
            self.first_step_done = now
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
        elif done == 1:
            log.info("pretrain step 1/%d: loss %.4f (compiling included, it took %s)", self.total, loss,
                     format_duration(now - self.start))
        elif done % self.every == 0 or done == self.total:
            log.info("pretrain step %d/%d (%d%%): loss %.4f, %s elapsed, ETA %s", done, self.total,
                     100 * done // self.total, loss, format_duration(now - self.start),
                     format_duration(self.eta_seconds(done, now)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
