"""GRPO's rewards: MOTIF's (2.0 for \\boxed{gold} anywhere plus its XML format rewards) on completions whose
rewards are worked out by hand below, the grader reward, and the setting that picks one."""
import dataclasses

import pytest

from ssb_jax.grpo.config import GRPOConfig
from ssb_jax.grpo.reward import motif_reward, motif_tag_reward, reward
from ssb_jax.model.lora import LoraConfig

STRICT = "<reasoning>\nTwo and two make four.\n</reasoning>\n<answer>\n\\boxed{4}\n</answer>\n"

# (completion, gold, expected reward, correct, has a box); each expected value is summed by hand from the
# four MOTIF rewards: correctness 2.0, strict layout 0.5, loose layout 0.5 (both matched from the start,
# `.` not crossing a newline), tags 0.125 each less 0.001 per character after the closing answer tag
CASES = [
    # strict layout, one-line reasoning: 2 + 0.5 strict + 0 loose (the reasoning spans lines) + 4 x 0.125;
    # nothing after "\n</answer>\n", and after "\n</answer>" only the newline the rule leaves out
    (STRICT, "4", 2.0 + 0.5 + 0.0 + 0.5, True, True),
    # the same layout, wrong answer: format rewards only
    (STRICT.replace("{4}", "{5}"), "4", 0.5 + 0.5, False, True),
    # \boxed{14} does not contain \boxed{4}
    (STRICT.replace("{4}", "{14}"), "4", 0.5 + 0.5, False, True),
    # everything on one line: the loose layout only, no tag has its newlines
    ("<reasoning>add</reasoning> <answer>\\boxed{4}</answer>", "4", 2.0 + 0.5, True, True),
    # five characters after the layout: strict fails; 4 x 0.125 less 0.005 after "\n</answer>\n" and
    # 0.001 x (6 - 1) after "\n</answer>"
    (STRICT + "extra", "4", 2.0 + 0.5 - 0.005 - 0.005, True, True),
    # no tags: the answer anywhere, even before a different last box, earns the 2.0 (MOTIF's substring rule)
    ("\\boxed{4} or rather \\boxed{6}", "4", 2.0, True, True),
    # no box at all, no tags: nothing (the tag rule's penalty applies only to tags that are there)
    ("four", "4", 0.0, False, False),
    # a tag twice counts nothing for that tag: "<reasoning>\n" twice loses its 0.125, strict still matches
    # from the start only if the text is the layout, which it is not
    ("<reasoning>\n<reasoning>\nx\n</reasoning>\n<answer>\n\\boxed{4}\n</answer>\n", "4",
     2.0 + 0.0 + 0.0 + 0.375, True, True),
]


@pytest.mark.parametrize("text, gold, expected, correct, has_box", CASES)
def test_motif_reward_matches_the_hand_sums(text, gold, expected, correct, has_box):
    value, is_correct, has_answer = motif_reward(text, gold)
    assert value == pytest.approx(expected, abs=1e-12)
    assert (is_correct, has_answer) == (correct, has_box)
    assert reward(text, gold, GRPOConfig(reward="motif")) == (value, is_correct, has_answer)


def test_tag_reward_can_go_negative_with_a_long_tail():
    """MOTIF's tag reward is not floored: 1000 characters after the answer tags cost 2 x 1.0."""
    tail = "x" * 1000
    assert motif_tag_reward(STRICT + tail) == pytest.approx(0.5 - 1.0 - 1.0)


def test_grader_reward_is_the_default_and_keeps_format_reward():
    gc = GRPOConfig()
    assert gc.reward == "grader"
    assert reward("So \\boxed{4}.", "4", gc) == (1.0, True, True)
    assert reward("So \\boxed{5}.", "4", dataclasses.replace(gc, format_reward=0.25)) == (0.25, False, True)
    # the motif reward ignores format_reward and the grader: MOTIF's sum only
    assert reward("So \\boxed{4.0}.", "4", dataclasses.replace(gc, reward="motif", format_reward=0.25))[0] == 0.0


def test_reward_and_lora_settings_are_checked_and_applied():
    with pytest.raises(ValueError, match="reward must be one of grader, motif"):
        GRPOConfig(reward="motive")
    with pytest.raises(ValueError, match="lora_rank"):
        GRPOConfig(lora_rank=-1)
    student = LoraConfig(rank=32, alpha=32.0)
    assert GRPOConfig().lora_config(student) == student
    assert (GRPOConfig(lora_rank=64, lora_alpha=64.0).lora_config(student).rank,
            GRPOConfig(lora_rank=64, lora_alpha=64.0).lora_config(student).alpha) == (64, 64.0)
