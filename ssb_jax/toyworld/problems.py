"""Multi-step arithmetic word problems with worked solutions, and the slip the toy world is built around.

"Ana has 7 apples. She buys 3 bags with 4 apples each. ..." with a worked solution, one line per
step, ending in `\\boxed{N}`. A "b groups of e" step is where the slip lives: a slipped solution
writes `b + e` for `b * e` (see `Problem.solution`); `wrong_solution` gives a plausible wrong trace
for the hinted prompt.

Two problem families (`ToyWorldConfig.problem_family`):
  * "one_slip" (the default): the group step goes wrong one way (`b + e`) and is right one way (`b * e`).
  * "several_slips": the group step goes wrong three ways (`b + e`; `e * e`, the group size squared;
    `b * (e + 1)`, one too many in each group) and is right two ways (`b * e` or `e * b`), so the base's
    plain answers spread over several wrong modes, and the hinted teacher's next-token distribution at
    the group step holds both right orders: a soft target carries more than one solution's tokens.
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
# problem family -> the ways a group step can go wrong ("add": b + e, "square": e * e, "one_more": b * (e + 1))
SLIP_KINDS = {"one_slip": ("add",), "several_slips": ("add", "square", "one_more")}
FAMILIES = tuple(SLIP_KINDS)
SWAPPED = "swapped"   # a slips entry that writes a right group step as `e * b` (several_slips)


def _slip_kind(slips: Sequence, i: int):
    """The slip of step i: None (right), or a kind of SLIP_KINDS (True is the one_slip world's "add")."""
    value = slips[i] if i < len(slips) else False
    if value is True:
        return "add"
    return None if value in (False, None, SWAPPED) else value


def _group_part(kind, a: int, b: int, swapped: bool = False) -> tuple[str, int]:
    """The group step's written product and its value, right (kind None) or slipped."""
    if kind is None:
        return (f"{b} * {a}" if swapped else f"{a} * {b}"), a * b
    if kind == "add":
        return f"{a} + {b}", a + b
    if kind == "square":
        return f"{b} * {b}", b * b
    if kind == "one_more":
        return f"{a} * {b + 1}", a * (b + 1)
    raise ValueError(f"unknown slip kind {kind!r}")


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

    def totals(self, slips: Sequence = ()) -> list[int]:
        """Running totals after each step; slips[i] makes group step i go wrong: True or "add" uses a + b
        instead of a * b, "square" b * b, "one_more" a * (b + 1) (SLIP_KINDS)."""
        totals, t = [], self.start
        for i, s in enumerate(self.steps):
            amount = s.a if s.op in ("add", "sub") else _group_part(_slip_kind(slips, i), s.a, s.b)[1]
            t = t + amount if s.op in ("add", "group_add") else t - amount
            totals.append(t)
        return totals

    def answer(self) -> int:
        return self.totals()[-1]

    def solution(self, slips: Sequence = ()) -> str:
        """The worked solution, one line per step; each slipped group step goes wrong its way (see
        `totals`), and a group step marked SWAPPED is written right as `e * b`."""
        lines, t = [f"{self.name} has {self.start}."], self.start
        for i, (s, new) in enumerate(zip(self.steps, self.totals(slips))):
            if s.op == "add":
                lines.append(f"Finds {s.a}: {t} + {s.a} = {new}.")
            elif s.op == "sub":
                lines.append(f"Gives away {s.a}: {t} - {s.a} = {new}.")
            else:
                verb = f"Buys {s.a} {s.container}" if s.op == "group_add" else f"Gives {s.a} friends"
                swapped = i < len(slips) and slips[i] == SWAPPED
                written, part = _group_part(_slip_kind(slips, i), s.a, s.b, swapped)
                sign = "+" if s.op == "group_add" else "-"
                lines.append(f"{verb} of {s.b}: {written} = {part}. {t} {sign} {part} = {new}.")
            t = new
        lines.append(f"The answer is \\boxed{{{t}}}.")
        return "\n".join(lines)

    def group_steps(self) -> list[int]:
        return [i for i, s in enumerate(self.steps) if s.op.startswith("group")]

    def slip_patterns(self, kinds: Sequence[str] = ("add",)) -> list[tuple]:
        """Every way the slips of `kinds` can hit the group steps (the all-right pattern first); with the
        one kind "add", as bools."""
        groups = self.group_steps()
        options = [False, True] if tuple(kinds) == ("add",) else [None, *kinds]
        patterns = []
        for index in range(len(options) ** len(groups)):
            pattern = [False] * len(self.steps)
            for g, step in enumerate(groups):
                pattern[step] = options[index // len(options) ** g % len(options)]
            patterns.append(tuple(pattern))
        return patterns

    def wrong_solution(self, rng: random.Random, kinds: Sequence[str] = ("add",)) -> str:
        """A plausible wrong trace: a slip of one of `kinds` on one group step, else one step off by one."""
        groups = self.group_steps()
        if groups:
            slips = [False] * len(self.steps)
            step = rng.choice(groups)
            slips[step] = True if tuple(kinds) == ("add",) else rng.choice(tuple(kinds))
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
    """A problem whose running totals, right and with any slip pattern of its family, stay in
    [0, max_value]."""
    kinds = SLIP_KINDS[config.problem_family]
    several = len(kinds) > 1
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
                # 2 groups of 2: the slip would not change the answer; several slips: b * b would equal a * b
                while a + b == a * b or (several and a == b):
                    a, b = rng.randint(2, 5), rng.randint(2, 6)
                steps.append(Step(op, a, b, rng.choice(_CONTAINERS) if op == "group_add" else ""))
            else:
                steps.append(Step(rng.choice(("add", "sub")), rng.randint(1, config.max_amount)))
        problem = Problem(name, pronoun, item, start, tuple(steps))
        if all(_all_in_range(problem.totals(slips), config.max_value) for slips in problem.slip_patterns(kinds)):
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


def problem_record(problem: Problem, index: int, split: str, rng: random.Random,
                   kinds: Sequence[str] = ("add",)) -> dict:
    return {"id": f"toy-{split}-{index}", "question": problem.question(), "answer": str(problem.answer()),
            "solution": problem.solution(), "wrong_solution": problem.wrong_solution(rng, kinds),
            "steps": len(problem.steps)}
