"""GRPO's rewards, one per `GRPOConfig.reward`:

  * "grader": 1 for a correct answer by `GRPOConfig.grader` (math_verify or string_match), plus
    `format_reward` for having a \\boxed answer at all.
  * "motif": the reward of MOTIF's GRPO baseline (Mitra & Ulukus 2025, arXiv 2507.02851; the four reward
    functions of vanilla_grpo.py in github.com/purbeshmitra/MOTIF, summed as TRL sums them): 2.0 when the
    string `\\boxed{gold}` appears anywhere in the completion, 0.5 for the strict XML layout, 0.5 for the
    loose one, and up to 0.5 for the tags counted one by one, less 0.001 per character after the closing
    answer tag. Its format rewards expect MOTIF's <reasoning>/<answer> system prompt
    (ssb_jax.prompts.MOTIF_XML_SYSTEM_PROMPT, `prompts.system_prompt`).

Each returns (reward, correct, has a \\boxed answer).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ssb_jax.evaluation.grading import grade_response, motif_grade

if TYPE_CHECKING:
    from ssb_jax.grpo.config import GRPOConfig

REWARDS = ("grader", "motif")

MOTIF_CORRECT = 2.0
MOTIF_LAYOUT = 0.5   # each of the strict and the loose layout
MOTIF_TAG = 0.125    # each of the four tags counted once
MOTIF_TRAILING_PENALTY = 0.001   # per character after the closing answer tag
# MOTIF's layouts, matched with re.match and no DOTALL, as its code matches them: `.` stops at a newline,
# so the strict layout needs one-line reasoning and answer, and the loose one a first line holding both
# tag pairs. Kept so on purpose: this reproduces the reward MOTIF trained with, quirks included.
STRICT_LAYOUT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$")
LOOSE_LAYOUT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>")


def motif_tag_reward(text: str) -> float:
    """MOTIF's per-tag reward: MOTIF_TAG for each of the four tags (with its newlines) present exactly
    once, less MOTIF_TRAILING_PENALTY per character after the closing answer tag (counted once after
    "\\n</answer>\\n", once after "\\n</answer>" less its newline)."""
    total = 0.0
    if text.count("<reasoning>\n") == 1:
        total += MOTIF_TAG
    if text.count("\n</reasoning>\n") == 1:
        total += MOTIF_TAG
    if text.count("\n<answer>\n") == 1:
        total += MOTIF_TAG - MOTIF_TRAILING_PENALTY * len(text.split("\n</answer>\n")[-1])
    if text.count("\n</answer>") == 1:
        total += MOTIF_TAG - MOTIF_TRAILING_PENALTY * (len(text.split("\n</answer>")[-1]) - 1)
    return total


def motif_reward(text: str, gold: str) -> tuple[float, bool, bool]:
    """MOTIF's summed reward of one completion (its decoded text) for the gold answer."""
    graded = motif_grade(text, gold, "boxed")
    layout = MOTIF_LAYOUT * (STRICT_LAYOUT.match(text) is not None) + MOTIF_LAYOUT * (LOOSE_LAYOUT.match(text) is not None)
    return MOTIF_CORRECT * graded.correct + layout + motif_tag_reward(text), graded.correct, graded.answer is not None


def grader_reward(text: str, gold: str, gc: GRPOConfig) -> tuple[float, bool, bool]:
    """1 for a correct answer by gc.grader, plus gc.format_reward for any \\boxed answer."""
    graded = grade_response(text, gold, grader=gc.grader)
    has_answer = graded.answer is not None
    return float(graded.correct) + gc.format_reward * has_answer, graded.correct, has_answer


def reward(text: str, gold: str, gc: GRPOConfig) -> tuple[float, bool, bool]:
    """(reward, correct, has a \\boxed answer) of one completion under gc.reward."""
    return motif_reward(text, gold) if gc.reward == "motif" else grader_reward(text, gold, gc)
