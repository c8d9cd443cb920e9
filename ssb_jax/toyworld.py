"""An offline toy world in which SSB can be seen working, built from a seed with no downloads.

Three pieces, written to one directory by `build`:

* Problems: multi-step arithmetic word problems ("Ana has 7 apples. She buys 3 bags with 4 apples
  each. ...") with a worked solution ending in `\\boxed{N}`; train/test JSONL with question/answer
  (plus solution / wrong_solution, used by `hinted_accuracy`).
* A byte-level BPE tokenizer (digits always single tokens, so arithmetic is learnable) with ChatML
  special tokens and template, as a transformers Qwen2Tokenizer (so stock tools load the same ids),
  saved as a Hugging Face tokenizer directory.
* A small Qwen2 model pre-trained here on plain prompts -> solution and hinted prompts -> solution.
  The plain-prompt solutions carry a systematic semantic slip on purpose: for "b groups of e" they
  write `b + e` instead of `b * e` with probability `slip_prob` (> 1/2, so greedy decoding slips),
  while hinted-prompt solutions, whose prompt holds a correct trace, are always right. So the plain
  student is middling, its rollouts mix right and wrong, the hinted teacher is better, and distilling
  the teacher into the plain student fixes the slip on held-out questions. Pre-training also sees
  short arithmetic drill texts, which make the arithmetic learnable in a few CPU minutes.

`measure` (and plain_accuracy / hinted_accuracy / mixed_fraction) reads these properties off a model
through the real sampler and grader.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet

if TYPE_CHECKING:
    from ssb_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

MARKER_FILE = "world.json"
# Bumped whenever a world built by older code would differ (2: the tokenizer became a Qwen2Tokenizer,
# so stock tools load the ids it was trained with); an older world is refused, not silently reused.
WORLD_FORMAT = 2
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5's ChatML template, less its tool-calling branches and default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ToyWorldConfig:
    seed: int = 0
    # problems
    num_train: int = 1000
    num_test: int = 200
    min_steps: int = 1
    max_steps: int = 3
    group_step_prob: float = 0.25   # chance that a step is "b groups of e" (where the slip lives)
    slip_prob: float = 0.65         # plain-prompt pretraining solutions write b + e for b * e
    max_value: int = 40             # every running total (right or slipped) stays in [0, max_value]
    max_amount: int = 9             # largest number found or given away in one step
    # tokenizer
    vocab_size: int = 768
    # model
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 24
    # pretraining
    pretrain_steps: int = 1000
    plain_batch: int = 8
    hinted_batch: int = 8
    pretrain_pool: int = 4000       # distinct generated examples of each kind to draw batches from
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    prompt_loss_weight: float = 1.0  # prompts are trained on too: their repeated numbers teach copying
    drill_batch: int = 8            # arithmetic drill texts per step (0: none)
    drill_facts: int = 12
    length_buckets: int = 3         # pretraining batches are padded per length bucket (one compile each)
    log_every: int = 100            # loss lines when stderr is no terminal (a terminal shows a progress bar)


# ----------------------------------------------------------------------------- problems

_NAMES = (("Ana", "She"), ("Ben", "He"), ("Cara", "She"), ("Dev", "He"), ("Eli", "He"), ("Fay", "She"),
          ("Gus", "He"), ("Hana", "She"), ("Ivan", "He"), ("Jo", "She"), ("Kofi", "He"), ("Lena", "She"))
_ITEMS = ("apples", "marbles", "stickers", "cookies", "pencils", "shells", "coins", "cards", "stamps", "beads")
_CONTAINERS = ("bags", "boxes", "packs", "jars")
OPS = ("add", "sub", "group_add", "group_sub")


@dataclasses.dataclass(frozen=True)
class Step:
    op: str            # one of OPS
    a: int             # the amount added/removed, or the group count for group_* steps
    b: int = 0         # group size for group_* steps
    container: str = ""


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    pronoun: str
    item: str
    start: int
    steps: tuple[Step, ...]

    def question(self) -> str:
        sentences = [f"{self.name} has {self.start} {self.item}."]
        for s in self.steps:
            if s.op == "add":
                sentences.append(f"{self.pronoun} finds {s.a} more {self.item}.")
            elif s.op == "sub":
                sentences.append(f"{self.pronoun} gives away {s.a} {self.item}.")
            elif s.op == "group_add":
                sentences.append(f"{self.pronoun} buys {s.a} {s.container} with {s.b} {self.item} each.")
            else:
                sentences.append(f"{self.pronoun} gives {s.a} friends {s.b} {self.item} each.")
        sentences.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(sentences)

    def totals(self, slips: Sequence[bool] = ()) -> list[int]:
        """Running totals after each step; slips[i] makes group step i use a + b instead of a * b."""
        totals, t = [], self.start
        for i, s in enumerate(self.steps):
            slipped = i < len(slips) and slips[i]
            amount = s.a if s.op in ("add", "sub") else (s.a + s.b if slipped else s.a * s.b)
            t = t + amount if s.op in ("add", "group_add") else t - amount
            totals.append(t)
        return totals

    def answer(self) -> int:
        return self.totals()[-1]

    def solution(self, slips: Sequence[bool] = ()) -> str:
        """The worked solution, one line per step; each slipped group step adds instead of multiplying."""
        lines, t = [f"{self.name} has {self.start}."], self.start
        for i, (s, new) in enumerate(zip(self.steps, self.totals(slips))):
            slipped = i < len(slips) and slips[i]
            if s.op == "add":
                lines.append(f"Finds {s.a}: {t} + {s.a} = {new}.")
            elif s.op == "sub":
                lines.append(f"Gives away {s.a}: {t} - {s.a} = {new}.")
            else:
                verb = f"Buys {s.a} {s.container}" if s.op == "group_add" else f"Gives {s.a} friends"
                op, part = ("+", s.a + s.b) if slipped else ("*", s.a * s.b)
                sign = "+" if s.op == "group_add" else "-"
                lines.append(f"{verb} of {s.b}: {s.a} {op} {s.b} = {part}. {t} {sign} {part} = {new}.")
            t = new
        lines.append(f"The answer is \\boxed{{{t}}}.")
        return "\n".join(lines)

    def group_steps(self) -> list[int]:
        return [i for i, s in enumerate(self.steps) if s.op.startswith("group")]

    def slip_patterns(self) -> list[tuple[bool, ...]]:
        """Every way the slip can hit the group steps (the all-False pattern first)."""
        groups = self.group_steps()
        return [tuple(i in groups and bool(mask >> groups.index(i) & 1) for i in range(len(self.steps)))
                for mask in range(2 ** len(groups))]

    def wrong_solution(self, rng: random.Random) -> str:
        """A plausible wrong trace: the slip on one group step, else one step off by one."""
        groups = self.group_steps()
        if groups:
            slips = [False] * len(self.steps)
            slips[rng.choice(groups)] = True
            return self.solution(slips)
        text = self.solution()
        # No group step: corrupt the last result by one (the boxed answer follows it).
        right = self.answer()
        wrong = right + 1 if right == 0 or rng.random() < 0.5 else right - 1
        head, _, _ = text.rpartition(f"= {right}.")
        return f"{head}= {wrong}.\nThe answer is \\boxed{{{wrong}}}."


def evaluate_solution(text: str) -> int | None:
    """Recompute a solution by checking every `x op y = z` it writes; the last z, or None if any is false.
    Used by tests to confirm that a generated solution's arithmetic (and so its answer) is right."""
    last = None
    for x, op, y, z in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", text):
        x, y, z = int(x), int(y), int(z)
        if {"+": x + y, "-": x - y, "*": x * y}[op] != z:
            return None
        last = z
    return last


def _all_in_range(values: Iterable[int], max_value: int) -> bool:
    return all(0 <= v <= max_value for v in values)


def random_problem(rng: random.Random, config: ToyWorldConfig) -> Problem:
    """A problem whose running totals, right and with any slip pattern, stay in [0, max_value]."""
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    num_steps = rng.randint(config.min_steps, config.max_steps)
    while True:
        start = rng.randint(2, min(30, config.max_value))
        steps = []
        for _ in range(num_steps):
            if rng.random() < config.group_step_prob:
                op = rng.choice(("group_add", "group_sub"))
                a, b = rng.randint(2, 5), rng.randint(2, 6)
                while a + b == a * b:  # 2 groups of 2: the slip would not change the answer
                    a, b = rng.randint(2, 5), rng.randint(2, 6)
                steps.append(Step(op, a, b, rng.choice(_CONTAINERS) if op == "group_add" else ""))
            else:
                steps.append(Step(rng.choice(("add", "sub")), rng.randint(1, config.max_amount)))
        problem = Problem(name, pronoun, item, start, tuple(steps))
        if all(_all_in_range(problem.totals(slips), config.max_value) for slips in problem.slip_patterns()):
            return problem


def make_problems(config: ToyWorldConfig, count: int, rng: random.Random, exclude: set[str] = frozenset()):
    """`count` problems with distinct questions, none of them in `exclude`."""
    problems, seen = [], set(exclude)
    while len(problems) < count:
        p = random_problem(rng, config)
        q = p.question()
        if q not in seen:
            seen.add(q)
            problems.append(p)
    return problems


def problem_record(problem: Problem, index: int, split: str, rng: random.Random) -> dict:
    return {"id": f"toy-{split}-{index}", "question": problem.question(), "answer": str(problem.answer()),
            "solution": problem.solution(), "wrong_solution": problem.wrong_solution(rng),
            "steps": len(problem.steps)}


def write_jsonl(records: Iterable[dict], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int, prompts: PromptSet = DEFAULT_PROMPTS):
    """A Qwen2Tokenizer with its own BPE and phrases: byte-level (any text round-trips), every digit a token.

    It is transformers' Qwen2Tokenizer because that is what stock `AutoTokenizer` builds for any
    directory whose config.json says model_type "qwen2", whatever tokenizer.json holds (its own
    normalizer, and a pre-tokenizer that isolates each digit and never lets a merge cross a word): a
    tokenizer that split text otherwise would give other ids once exported. Sequences stay short
    enough to pre-train on a CPU in minutes through added tokens, which match before that split: the
    long fixed prompt texts (system prompt, hinted template) whole, and the world's frequent phrases
    (" more apples. She finds ", " = "), learnt by a BPE whose merges may cross words but never digits.
    Each BPE has at most vocab_size tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    qwen2 = Qwen2Tokenizer().backend_tokenizer  # the normalizer and pre-tokenizer stock tools will use

    def train_bpe(pre_tokenizer, pieces):
        bpe = Tokenizer(models.BPE())
        bpe.normalizer, bpe.pre_tokenizer = qwen2.normalizer, pre_tokenizer
        bpe.train_from_iterator(pieces, trainer=trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False, max_token_length=24,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return json.loads(bpe.to_str())["model"]

    def split_on(separators, strings):  # the pieces between separators, as added tokens leave them
        pattern = re.compile("|".join(map(re.escape, sorted(separators, key=len, reverse=True))))
        return [piece for text in strings for piece in pattern.split(text) if piece]

    fixed_texts = prompt_fixed_texts(prompts)
    pieces = split_on(SPECIAL_TOKENS + fixed_texts, texts)
    phrase_bpe = train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                           pieces)
    to_text = decoders.ByteLevel()
    phrases = [text for text in (to_text.decode([t]) for t in phrase_bpe["vocab"] if t not in SPECIAL_TOKENS)
               if len(qwen2.pre_tokenizer.pre_tokenize_str(text)) > 1]
    word_bpe = train_bpe(qwen2.pre_tokenizer, split_on(phrases, pieces))
    tokenizer = Qwen2Tokenizer(
        vocab=word_bpe["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                         for m in word_bpe["merges"]],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
        model_max_length=4096, clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in fixed_texts + tuple(phrases)])
    return tokenizer


def prompt_fixed_texts(prompts: PromptSet) -> tuple[str, ...]:
    """The system prompt and the hinted template's text between its fields, where more than one word."""
    hole = "\0"
    system, user = prompts.hinted_messages(hole, hole, hole)
    return tuple(dict.fromkeys(t for t in [system["content"], *user["content"].split(hole)] if len(t.split()) > 1))


def tokenizer_corpus(problems: Sequence[Problem], rng: random.Random, prompts: PromptSet) -> list[str]:
    """Rendered ChatML conversations (plain and hinted), so merges learn their words."""
    texts = []
    for p in problems:
        solution = p.solution()
        for messages in (prompts.student_messages(p.question()),
                         prompts.hinted_messages(p.question(), solution, p.wrong_solution(rng))):
            texts.append(render_chatml(messages + [{"role": "assistant", "content": solution}]))
    return texts


def render_chatml(messages: Sequence[dict]) -> str:
    """CHAT_TEMPLATE in Python (for building the tokenizer's corpus before the tokenizer exists)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def save_tokenizer(tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))


# ----------------------------------------------------------------------------- pre-training data

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


# ----------------------------------------------------------------------------- measurement

def _problem_fields(problem) -> dict:
    """question/answer/solution/wrong_solution from a JSONL record dict or a datasets.Problem."""
    if isinstance(problem, dict):
        return problem
    return {"question": problem.question, "answer": problem.answer, **dict(problem.extra)}


def make_sampler(model, tokenizer, *, batch_size: int = 64, max_prompt_tokens: int = 512):
    from ssb_jax.sampling.driver import Sampler
    return Sampler(model, tokenizer, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                   show_progress=False)


def _graded(sampler, prompt_ids, golds, *, temperature: float, n: int, max_new_tokens: int, seed: int,
            top_k: int = 0) -> list[list[bool]]:
    from ssb_jax.grading import grade_response
    from ssb_jax.model.tokenizer import stop_token_ids
    from ssb_jax.sampling.sampler import SamplingParams
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              stop_ids=tuple(stop_token_ids(sampler.tokenizer)),
                              pad_id=sampler.tokenizer.pad_token_id)
    outputs = sampler.generate_ids(prompt_ids, sampling, n=n, seed=seed)
    return [[grade_response(c.text, gold, grader="string_match").correct for c in completions]
            for completions, gold in zip(outputs, golds)]


def plain_prompt_ids(tokenizer, problems, prompts: PromptSet = DEFAULT_PROMPTS) -> list[list[int]]:
    from ssb_jax.model.tokenizer import encode_chat
    return [encode_chat(tokenizer, prompts.student_messages(_problem_fields(p)["question"])) for p in problems]


def hinted_prompt_ids(tokenizer, problems, prompts: PromptSet = DEFAULT_PROMPTS) -> list[list[int]]:
    """The hinted prompt with the reference solution as the correct trace and a reference wrong trace."""
    from ssb_jax.model.tokenizer import encode_chat
    ids = []
    for p in problems:
        f = _problem_fields(p)
        ids.append(encode_chat(tokenizer, prompts.hinted_messages(f["question"], f["solution"], f["wrong_solution"])))
    return ids


def plain_accuracy(sampler, problems, *, temperature: float = 0.0, n: int = 1, max_new_tokens: int = 128,
                   seed: int = 0, prompts: PromptSet = DEFAULT_PROMPTS) -> float:
    """Mean accuracy of the student (plain prompt) over problems x n samples."""
    graded = _graded(sampler, plain_prompt_ids(sampler.tokenizer, problems, prompts),
                     [_problem_fields(p)["answer"] for p in problems], temperature=temperature, n=n,
                     max_new_tokens=max_new_tokens, seed=seed)
    return float(np.mean(graded))


def hinted_accuracy(sampler, problems, *, temperature: float = 0.0, n: int = 1, max_new_tokens: int = 128,
                    seed: int = 0, prompts: PromptSet = DEFAULT_PROMPTS) -> float:
    """Mean accuracy of the teacher (hinted prompt with reference correct and wrong traces)."""
    graded = _graded(sampler, hinted_prompt_ids(sampler.tokenizer, problems, prompts),
                     [_problem_fields(p)["answer"] for p in problems], temperature=temperature, n=n,
                     max_new_tokens=max_new_tokens, seed=seed)
    return float(np.mean(graded))


def mixed_fraction(sampler, problems, *, k: int = 4, temperature: float = 0.8, top_k: int = 50,
                   max_new_tokens: int = 128, seed: int = 0, prompts: PromptSet = DEFAULT_PROMPTS) -> float:
    """Fraction of questions whose k plain rollouts hold both a right and a wrong answer (curation keeps these)."""
    graded = _graded(sampler, plain_prompt_ids(sampler.tokenizer, problems, prompts),
                     [_problem_fields(p)["answer"] for p in problems], temperature=temperature, n=k,
                     max_new_tokens=max_new_tokens, seed=seed, top_k=top_k)
    return float(np.mean([any(g) and not all(g) for g in graded]))


def measure(sampler, problems, *, k: int = 4, temperature: float = 0.8, max_new_tokens: int = 128,
            seed: int = 0) -> dict:
    """The world's headline numbers on `problems`: plain greedy and sampled accuracy, hinted greedy
    accuracy, and the fraction of questions whose k sampled rollouts are mixed."""
    common = dict(max_new_tokens=max_new_tokens, seed=seed)
    return {
        "plain_greedy": plain_accuracy(sampler, problems, **common),
        "plain_sampled": plain_accuracy(sampler, problems, temperature=temperature, **common),
        "hinted_greedy": hinted_accuracy(sampler, problems, **common),
        "mixed_fraction": mixed_fraction(sampler, problems, k=k, temperature=temperature, **common),
        "num_problems": len(problems),
    }


# ----------------------------------------------------------------------------- building

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


@dataclasses.dataclass
class World:
    config: ToyWorldConfig
    train: list[dict]
    test: list[dict]
    tokenizer: Any
    model_config: Any
    model: Any                    # the pre-trained Qwen2ForCausalLM
    losses: list[float]
    seconds: dict


def _rng(config: ToyWorldConfig, purpose: str) -> random.Random:
    """One independent stream per purpose, so changing one size leaves the other draws alone."""
    return random.Random(f"toyworld:{config.seed}:{purpose}")


def make_world(config: ToyWorldConfig, *, log_fn=None, progress: bool = False) -> World:
    """Problems, tokenizer and pre-trained model, in memory. log_fn: see `pretrain`; progress: show
    pre-training's progress (PretrainProgress)."""
    from ssb_jax.model.qwen2 import init_model
    timer = time.perf_counter()
    seconds = {}
    rng = _rng(config, "problems")
    test = make_problems(config, config.num_test, rng)
    train = make_problems(config, config.num_train, rng, exclude={p.question() for p in test})
    # Pre-training never sees a train or test question: curation and evaluation run on unseen ones.
    pool = make_problems(config, config.pretrain_pool, rng,
                         exclude={p.question() for p in train} | {p.question() for p in test})
    records_rng = _rng(config, "records")
    train_records = [problem_record(p, i, "train", records_rng) for i, p in enumerate(train)]
    test_records = [problem_record(p, i, "test", records_rng) for i, p in enumerate(test)]

    tokenizer = train_tokenizer(tokenizer_corpus(pool[:2000], _rng(config, "tokenizer"), DEFAULT_PROMPTS),
                                config.vocab_size)
    examples_rng = _rng(config, "pretraining")
    plain, hinted = pretraining_examples(pool, config, examples_rng)
    plain, hinted = encode_examples(tokenizer, plain), encode_examples(tokenizer, hinted)
    drill = encode_texts(tokenizer, arithmetic_drill(examples_rng, config, config.pretrain_pool)) \
        if config.drill_batch > 0 else None
    seconds["data"] = time.perf_counter() - timer

    model_cfg = model_config(config, tokenizer)
    log.info("toy world data in %.0f s: %d train / %d test problems, a %d-token tokenizer, %d plain + %d hinted "
             "pre-training examples; pre-training a %.2fM-parameter model for %d steps", seconds["data"],
             len(train_records), len(test_records), len(tokenizer), len(plain), len(hinted),
             model_cfg.param_count() / 1e6, config.pretrain_steps)
    model = init_model(model_cfg, config.seed)
    timer = time.perf_counter()
    on_step = PretrainProgress(config.pretrain_steps, config.log_every) if progress else None
    try:
        model, losses = pretrain(model, plain, hinted, config, drill=drill, log_fn=log_fn, on_step=on_step)
    finally:
        if on_step is not None:
            on_step.close()
    seconds["pretrain"] = time.perf_counter() - timer
    return World(config, train_records, test_records, tokenizer, model_cfg, model, losses, seconds)


def world_paths(out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl", "checkpoint": out_dir / "model",
            "marker": out_dir / MARKER_FILE}


def save_world(world: World, out_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Write the JSONL splits and the HF checkpoint (weights + tokenizer); the marker goes last."""
    from ssb_jax.model.weights import save_params
    paths = world_paths(out_dir)
    paths["checkpoint"].mkdir(parents=True, exist_ok=True)
    write_jsonl(world.train, paths["train"])
    write_jsonl(world.test, paths["test"])
    save_params(world.model, world.model_config, paths["checkpoint"])
    save_tokenizer(world.tokenizer, paths["checkpoint"])
    losses = world.losses
    head = losses[:min(10, len(losses))]
    tail = losses[-min(10, len(losses)):]
    summary = {
        "format": WORLD_FORMAT,
        "config": dataclasses.asdict(world.config),
        "num_parameters": world.model_config.param_count(),
        "vocab_size": world.model_config.vocab_size,
        "first_loss": float(np.mean(head)) if head else None,
        "final_loss": float(np.mean(tail)) if tail else None,
        "seconds": world.seconds,
        **(extra or {}),
    }
    tmp = paths["marker"].with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(paths["marker"])
    return paths


def build(config: ToyWorldConfig, out_dir: str | Path, *, measure_problems: int = 0) -> dict[str, Path]:
    """Build the world into out_dir (train.jsonl, test.jsonl, model/ with weights and tokenizer) and
    return their paths. Does nothing when out_dir already holds a finished world of this config; a
    finished world of another config is an error (pick another directory)."""
    paths = world_paths(out_dir)
    if paths["marker"].exists():
        marker = json.loads(paths["marker"].read_text())
        built = marker.get("config")
        if marker.get("format", 1) != WORLD_FORMAT:
            raise ValueError(f"{out_dir} holds a toy world built by an older ssb_jax (format {marker.get('format', 1)}, "
                             f"now {WORLD_FORMAT}: its tokenizer loads differently in stock tools); use a fresh "
                             "--config.workdir, or delete that directory to rebuild it")
        if built != dataclasses.asdict(config):
            raise ValueError(f"{out_dir} holds a toy world built with another config ({built}); "
                             f"use a fresh directory for {dataclasses.asdict(config)}")
        log.info("toy world in %s is complete; skipping", out_dir)
        return paths
    log.info("building the toy world in %s", out_dir)
    start = time.perf_counter()
    world = make_world(config, progress=True)
    log.info("toy model pre-trained in %s: loss %.4f at the first step, %.4f at the last",
             format_duration(world.seconds["pretrain"]), world.losses[0] if world.losses else float("nan"),
             world.losses[-1] if world.losses else float("nan"))
    extra = {}
    if measure_problems:
        timer = time.perf_counter()
        sampler = make_sampler(world.model, world.tokenizer)
        extra["test_metrics"] = measure(sampler, world.test[:measure_problems])
        world.seconds["measure"] = time.perf_counter() - timer
        log.info("toy world test metrics: %s", extra["test_metrics"])
    world.seconds["total"] = time.perf_counter() - start
    return save_world(world, out_dir, extra)
