"""Pre-training the toy model: its data (plain, hinted and drill sequences), its loss, its batch source
and its optimiser, run by the shared training loop.

Plain-prompt solutions slip on "b groups of e" steps with probability `slip_prob` (> 1/2, so greedy
decoding slips), while hinted-prompt solutions, whose prompt holds a correct trace, are always
right; short arithmetic drill texts make the arithmetic learnable in a few CPU minutes. `pretrain`
runs on ssb_jax.training.loop with the optimiser of ssb_jax.training.optim.
"""
from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
from ssb_jax.toyworld.config import ToyWorldConfig
from ssb_jax.toyworld.problems import SLIP_KINDS, SWAPPED, Problem
from ssb_jax.training.loop import Hooks, TrainingLoop
from ssb_jax.training.optim import make_optimizer
from ssb_jax.training.settings import OptimizerSettings

if TYPE_CHECKING:
    from ssb_jax.model.config import ModelConfig


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
    kinds = SLIP_KINDS[config.problem_family]
    if len(kinds) > 1:
        return _several_slips_examples(problems, config, rng, prompts, kinds)
    plain, hinted = [], []
    for p in problems:
        slips = [rng.random() < config.slip_prob for _ in p.steps]
        plain.append((prompts.student_messages(p.question()), p.solution(slips)))
        right = p.solution()
        hinted.append((prompts.hinted_messages(p.question(), right, p.wrong_solution(rng)), right))
    return plain, hinted


def _several_slips_examples(problems: Sequence[Problem], config: ToyWorldConfig, rng: random.Random,
                            prompts: PromptSet, kinds: Sequence[str]):
    """The several_slips family's examples: a plain group step slips with probability slip_prob, one of
    `kinds` at random; a right group step (plain or hinted) is written `b * e` or `e * b` at random, so the
    hinted teacher learns both right orders. The privileged prompt is, at random, each of the three kinds
    the on-policy stages show a teacher (ssb_jax.onpolicy.contexts: SSB's correct and wrong traces, a
    reference solution, a successful peer), so the toy base can read each, as an instruct model reads
    all three; its shown trace is drawn independently of the solution it teaches."""
    from ssb_jax.onpolicy.contexts import KINDS, PrivilegedContext, StudentInput, TeacherInput, teacher_messages

    def right(p):
        return p.solution([SWAPPED if rng.random() < 0.5 else False for _ in p.steps])

    plain, hinted = [], []
    for index, p in enumerate(problems):
        slips = [rng.choice(kinds) if rng.random() < config.slip_prob else (SWAPPED if rng.random() < 0.5 else False)
                 for _ in p.steps]
        plain.append((prompts.student_messages(p.question()), p.solution(slips)))
        kind, shown = rng.choice(KINDS), right(p)
        context = (PrivilegedContext(kind, correct_trace=shown, wrong_trace=p.wrong_solution(rng, kinds))
                   if kind == "ssb" else PrivilegedContext(kind, text=shown))
        student = StudentInput(f"pretrain-{index}", p.question())
        hinted.append((teacher_messages(TeacherInput(student, context), prompts), right(p)))
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


class PretrainingBatches:
    """The pre-training batch source: per step a bucket rank drawn at random, then plain and hinted rows
    of that rank's buckets (and drill rows, when drilling), all from one seeded generator. A batch is
    (plain tokens, plain weights, hinted tokens, hinted weights, drill tokens, drill weights); without
    drills the drill arrays are a [1, 2] placeholder."""

    def __init__(self, plain: Batches, hinted: Batches, drill: Batches | None, config: ToyWorldConfig,
                 rng: np.random.Generator):
        self.plain, self.hinted, self.drill, self.config, self.rng = plain, hinted, drill, config, rng
        self.plain_weights, self.hinted_weights = (
            b.target_mask + config.prompt_loss_weight * b.prompt_mask.astype(np.float32) for b in (plain, hinted))
        self.num_buckets = max(1, min(config.length_buckets, len(plain), len(hinted)))
        self.plain_buckets = length_buckets(plain, self.num_buckets)
        self.hinted_buckets = length_buckets(hinted, self.num_buckets)
        self.use_drill = drill is not None and config.drill_batch > 0

    def next_batch(self, state) -> tuple[np.ndarray, ...]:
        rng, config = self.rng, self.config
        b = int(rng.integers(0, self.num_buckets))
        (p_rows, p_width), (h_rows, h_width) = self.plain_buckets[b], self.hinted_buckets[b]
        pi = rng.choice(p_rows, config.plain_batch)
        hi = rng.choice(h_rows, config.hinted_batch)
        if self.use_drill:
            di = rng.integers(0, len(self.drill), config.drill_batch)
            drill_tokens, drill_weights = self.drill.tokens[di], self.drill.target_mask[di]
        else:
            drill_tokens, drill_weights = np.zeros((1, 2), np.int32), np.zeros((1, 2), bool)
        return (self.plain.tokens[pi, :p_width], self.plain_weights[pi, :p_width], self.hinted.tokens[hi, :h_width],
                self.hinted_weights[hi, :h_width], drill_tokens, drill_weights)


def pretraining_optimizer(config: ToyWorldConfig, steps: int):
    """(AdamW after a global-norm clip of 1, its schedule): linear warmup (at most half the steps), then
    cosine decay to 5% of the peak learning rate; beta2 0.98."""
    settings = OptimizerSettings(learning_rate=config.learning_rate, schedule="cosine",
                                 warmup_steps=min(config.warmup_steps, steps // 2), weight_decay=config.weight_decay,
                                 adam_b2=0.98, grad_clip=1.0)
    return make_optimizer(settings, steps, end_learning_rate=config.learning_rate * 0.05)


def pretrain(model, plain: Batches, hinted: Batches, config: ToyWorldConfig, *,
             drill: Batches | None = None, steps: int | None = None, seed: int | None = None, log_fn=None,
             on_step=None, progress: bool = False):
    """Next-token CE, on the solution (and, weighted, the prompt) tokens of a plain and a hinted batch
    per step, plus a batch of drill texts when given (PretrainingBatches: both kinds cut into
    `length_buckets` buckets by length, so padding stays small and the step compiles once per bucket);
    AdamW with warmup and cosine decay (pretraining_optimizer). Runs on the shared training loop, in
    memory (no checkpoints). log_fn(step, loss) is called every config.log_every steps, on_step(step,
    loss) after every step; progress: a bar on a terminal, else a loss line every config.log_every steps.
    Returns (model, losses)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    graphdef, params = nnx.split(model)
    steps = config.pretrain_steps if steps is None else steps
    rng = np.random.default_rng(config.seed if seed is None else seed)
    batches = PretrainingBatches(plain, hinted, drill, config, rng)
    optimizer, _ = pretraining_optimizer(config, steps)
    use_drill = batches.use_drill

    @jax.jit
    def update(params, opt_state, plain_tokens, plain_weights, hinted_tokens, hinted_weights, drill_tokens,
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

    def step(state, batch):
        params, opt_state, loss = update(*state, *batch)
        return (params, opt_state), {"loss": float(loss)}

    def after_step(record):
        i, loss = record["step"] - 1, record["loss"]
        if log_fn is not None and (i % config.log_every == 0 or i == steps - 1):
            log_fn(i, loss)
        if on_step is not None:
            on_step(i, loss)

    loop = TrainingLoop(None, steps, step, desc="pre-training the toy model", tag="pretrain",
                        hooks=Hooks(on_step=after_step), postfix=lambda r: {"loss": f"{r['loss']:.4f}"},
                        progress=progress, progress_every=config.log_every)
    result = loop.run((params, optimizer.init(params)), batches)
    params, _ = result.state
    return nnx.merge(graphdef, params), [r["loss"] for r in result.history]
