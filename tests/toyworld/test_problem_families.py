"""The toy world's problem families: several_slips goes wrong three ways at a group step and is right two
ways; one_slip (the default) is unchanged; the pre-training examples of several_slips teach each wrong mode
to the plain prompt and both right orders under each privileged context kind; older worlds still load."""
import collections
import dataclasses
import random
import re

import pytest

from ssb_jax import toyworld
from ssb_jax.onpolicy.contexts import KINDS
from ssb_jax.toyworld import world as world_module
from ssb_jax.toyworld.pretraining import pretraining_examples
from ssb_jax.toyworld.problems import SLIP_KINDS, SWAPPED, evaluate_solution, make_problems

SEVERAL = toyworld.ToyWorldConfig(problem_family="several_slips", group_step_prob=0.5)
GROUP_LINE = re.compile(r"(?:Buys|Gives) (\d+) (?:\w+ )?(?:friends )?of (\d+): (\d+) ([*+]) (\d+) = (\d+)\.")


def _group_value(kind, a, b):
    """What each way of writing the group step amounts to, by the world's description (independent of Problem)."""
    return {None: a * b, "add": a + b, "square": b * b, "one_more": a * (b + 1)}[kind]


def _problems_with_groups(config, count, seed):
    problems = make_problems(config, count, random.Random(seed))
    return [p for p in problems if p.group_steps()]


def test_every_slip_kind_is_consistent_arithmetic_with_its_own_wrong_answer(seed):
    problems = _problems_with_groups(SEVERAL, 60, seed)
    assert problems
    for p in problems:
        step = p.group_steps()[0]
        s = p.steps[step]
        assert s.a != s.b  # b * b would equal a * b
        answers = {}
        for kind in (None, *SLIP_KINDS["several_slips"]):
            slips = [False] * len(p.steps)
            slips[step] = kind if kind is not None else False
            text = p.solution(slips)
            # every written "x op y = z" holds, and the box is the last total
            assert evaluate_solution(text) == int(re.search(r"\\boxed\{(-?\d+)\}", text).group(1))
            line = GROUP_LINE.findall(text)[0]
            assert int(line[-1]) == _group_value(kind, s.a, s.b)
            answers[kind] = p.totals(slips)[-1]
        assert len(set(answers.values())) == 4, answers  # three wrong answers, each its own
        assert answers[None] == p.answer()
        # the right step written the other way round: the same answer, the factors swapped
        swapped = [False] * len(p.steps)
        swapped[step] = SWAPPED
        text = p.solution(swapped)
        assert f"{s.b} * {s.a} = {s.a * s.b}" in text and evaluate_solution(text) == p.answer()
        for slips in p.slip_patterns(SLIP_KINDS["several_slips"]):
            assert all(0 <= t <= SEVERAL.max_value for t in p.totals(slips))


def test_one_slip_world_keeps_its_one_way_wrong(seed):
    config = toyworld.ToyWorldConfig()
    for p in _problems_with_groups(config, 40, seed):
        assert all(set(pattern) <= {False, True} for pattern in p.slip_patterns())
        assert len(p.slip_patterns()) == 2 ** len(p.group_steps())
        wrong = p.wrong_solution(random.Random(seed))
        assert [line[3] for line in GROUP_LINE.findall(wrong)].count("+") == 1  # one group step added


def test_several_slips_examples_teach_every_mode_and_both_right_orders(seed):
    problems = _problems_with_groups(SEVERAL, 200, seed)
    config = dataclasses.replace(SEVERAL, slip_prob=0.65)
    plain, hinted = pretraining_examples(problems, config, random.Random(seed))
    modes = collections.Counter()
    for p, (_, text) in zip(problems, plain):
        for count, size, x, op, y, _ in GROUP_LINE.findall(text):
            a, b, x, y = int(count), int(size), int(x), int(y)
            modes[{(a, "*", b): "right", (b, "*", a): "swapped", (a, "+", b): "add", (b, "*", b): "square",
                   (a, "*", b + 1): "one_more"}[(x, op, y)]] += 1
    assert set(modes) == {"right", "swapped", "add", "square", "one_more"}, modes
    orders, kinds = collections.Counter(), collections.Counter()
    for p, (messages, target) in zip(problems, hinted):
        assert evaluate_solution(target) == p.answer()  # the privileged prompt's target is always right
        for count, size, x, op, y, _ in GROUP_LINE.findall(target):
            orders[(int(x), int(y)) == (int(count), int(size))] += 1
        user = messages[-1]["content"]
        kinds[next(k for k, marker in (("ssb", "<incorrect_response>"), ("reference", "<reference_solution>"),
                                       ("peer", "successful earlier attempt")) if marker in user)] += 1
    assert orders[True] > 0 and orders[False] > 0
    assert set(kinds) == set(KINDS), kinds


def test_the_family_is_checked_and_older_worlds_are_still_reused(tmp_path):
    with pytest.raises(ValueError, match="problem_family must be one of one_slip, several_slips"):
        toyworld.ToyWorldConfig(problem_family="many")
    # a world built before problem_family existed has no such key: the default family is that world
    older = {k: v for k, v in dataclasses.asdict(toyworld.ToyWorldConfig()).items() if k != "problem_family"}
    assert world_module._identity(older) == world_module._identity(dataclasses.asdict(toyworld.ToyWorldConfig()))
    assert world_module._identity(older) != world_module._identity(dataclasses.asdict(SEVERAL))


def test_a_logging_setting_is_not_part_of_the_world():
    # a world built with other log lines is the same world; one with other pre-training is not
    default = dataclasses.asdict(toyworld.ToyWorldConfig())
    quieter = dataclasses.asdict(toyworld.ToyWorldConfig(log_every=500))
    longer = dataclasses.asdict(toyworld.ToyWorldConfig(pretrain_steps=4000))
    assert world_module._identity(quieter) == world_module._identity(default)
    assert world_module._identity(longer) != world_module._identity(default)
