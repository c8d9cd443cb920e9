"""Multi-step arithmetic word problems with worked solutions, and the slip the toy world is built around.

"Ana has 7 apples. She buys 3 bags with 4 apples each. ..." with a worked solution, one line per
step, ending in `\\boxed{N}`. A "b groups of e" step is where the slip lives: a slipped solution
writes `b + e` for `b * e` (see `Problem.solution`); `wrong_solution` gives a plausible wrong trace
for the hinted prompt.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Iterable, Sequence

from ssb_jax.toyworld.config import ToyWorldConfig

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
