"""A scripted stand-in for the Sampler, for curation tests: texts by question id, real token ids; a wrapper of
any sampler that rewrites rows as they finish and can be killed after a number of rows."""
import time
import zlib

from ssb_jax.sampling.driver import Completion


class ScriptedSampler:
    """rollouts[id] -> list of K texts; solutions[id] -> text. Unscripted ids get `default(id, i)`.

    Rollout and solution calls are told apart by temperature (0.8 vs 0.4 in the curation config).
    """

    def __init__(self, tokenizer, rollouts=None, solutions=None, default=None, delay_s=0.0,
                 solution_temperature=0.4):
        self.tokenizer = tokenizer
        self.rollouts, self.solutions = dict(rollouts or {}), dict(solutions or {})
        self.default = default or (lambda key, i: "I do not know.")
        self.delay_s = delay_s
        self.solution_temperature = solution_temperature
        self.calls = []
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _completion(self, text, finish="stop"):
        ids = self.tokenizer.encode(text, add_special_tokens=False) + ([self.end] if finish == "stop" else [])
        return Completion(token_ids=ids, finish_reason=finish, text=text)

    def generate_ids(self, prompts, sampling, *, n=1, seed=0, ids=None, on_finish=None):
        time.sleep(self.delay_s)
        solution = sampling.temperature == self.solution_temperature
        self.calls.append(("solution" if solution else "rollout", list(ids), n))
        out = []
        for key in ids:
            if solution:
                text = self.solutions.get(key, self.default(key, -1))
                finish = "length" if text.endswith("<truncated>") else "stop"
                out.append([self._completion(text, finish)])
            else:
                texts = self.rollouts.get(key) or [self.default(key, i) for i in range(n)]
                assert len(texts) == n
                out.append([self._completion(t) for t in texts])
        finish_rows(out, ids, on_finish)
        return out


def finish_rows(out, ids, on_finish):
    """Hand every row to on_finish as the rollout engine would, in an order that is not the input order
    (a hash of the row's id and sample index), so consumers are tested on rows finishing out of order."""
    if on_finish is None:
        return
    rows = [(i, j) for i, group in enumerate(out) for j in range(len(group))]
    for i, j in sorted(rows, key=lambda row: zlib.crc32(f"{ids[row[0]]}:{row[1]}".encode())):
        on_finish(i, j, out[i][j])


def hashed_answers(gold_by_id):
    """A deterministic default: a mix of right, wrong and missing answers that depends only on (id, i)."""
    def default(key, i):
        h = zlib.crc32(f"{key}:{i}".encode()) % 5
        gold = gold_by_id[key]
        if i == -1:  # solution: usually right
            return f"Careful work. \\boxed{{{gold}}}" if h != 0 else "Oops \\boxed{-1}"
        if h in (0, 1):
            return f"So the answer is \\boxed{{{gold}}}."
        if h in (2, 3):
            return f"So the answer is \\boxed{{{int(gold) + h}}}."
        return "No idea."
    return default


class Killed(RuntimeError):
    """A simulated kill (KilledAfterRows)."""


class KilledAfterRows:
    """Wraps a sampler (the engine, the static Sampler, a fake): each finished row is first rewritten by
    `rewrite(id, sample index, sampling, completion)` when given (to steer a random model's texts), then handed
    to the consumer and logged in `finished` as (id, sample index, sampling); once `rows` rows have been
    handed over (None: never) it raises Killed from inside the call, as a kill with rows still in flight."""

    def __init__(self, sampler, rows=None, rewrite=None):
        self.sampler, self.rows, self.rewrite, self.finished = sampler, rows, rewrite, []

    def __getattr__(self, name):  # max_prompt_tokens, set_adapters, ...
        return getattr(self.sampler, name)

    def generate_ids(self, prompts, sampling, *, n=1, seed=0, ids=None, on_finish=None):
        def finish(i, j, completion):
            if self.rewrite is not None:
                self.rewrite(ids[i], j, sampling, completion)
            on_finish(i, j, completion)
            self.finished.append((ids[i], j, sampling))
            if self.rows is not None and len(self.finished) >= self.rows:
                raise Killed(f"killed after {self.rows} rows")
        return self.sampler.generate_ids(prompts, sampling, n=n, seed=seed, ids=ids, on_finish=finish)
