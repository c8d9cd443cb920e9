"""An offline toy world in which SSB can be seen working, built from a seed with no downloads.

Three pieces, written to one directory by `build` (world.py):

* Problems (problems.py): multi-step arithmetic word problems ("Ana has 7 apples. She buys 3 bags
  with 4 apples each. ...") with a worked solution ending in `\\boxed{N}`; train/test JSONL with
  question/answer (plus solution / wrong_solution, used by `hinted_accuracy`).
* A byte-level BPE tokenizer (tokenizer.py; digits always single tokens, so arithmetic is learnable)
  with ChatML special tokens and template, as a transformers Qwen2Tokenizer (so stock tools load the
  same ids), saved as a Hugging Face tokenizer directory.
* A small Qwen2 model pre-trained here (pretraining.py) on plain prompts -> solution and hinted
  prompts -> solution. The plain-prompt solutions carry a systematic semantic slip on purpose: for
  "b groups of e" they write `b + e` instead of `b * e` with probability `slip_prob` (> 1/2, so greedy
  decoding slips), while hinted-prompt solutions, whose prompt holds a correct trace, are always
  right. So the plain student is middling, its rollouts mix right and wrong, the hinted teacher is
  better, and distilling the teacher into the plain student fixes the slip on held-out questions.
  Pre-training also sees short arithmetic drill texts, which make the arithmetic learnable in a few
  CPU minutes.
  `problem_family=several_slips` (configs/tiny_compare.py) makes the group step go wrong three ways
  and be right two ways (`b * e`, `e * b`), and shows the privileged prompt in each kind the on-policy
  stages use (SSB's hint, a reference solution, a successful peer), so a soft target carries more than
  one solution and every privileged context is one the base can read.

`measure` (and plain_accuracy / hinted_accuracy / mixed_fraction; measurement.py) reads these
properties off a model through the real sampler and grader. ToyWorldConfig (config.py) holds every
setting.
"""
from ssb_jax.toyworld.config import ToyWorldConfig
from ssb_jax.toyworld.measurement import (hinted_accuracy, hinted_prompt_ids, make_sampler, measure, mixed_fraction,
                                          plain_accuracy, plain_prompt_ids)
from ssb_jax.toyworld.pretraining import Batches, pretrain
from ssb_jax.toyworld.problems import OPS, Problem, Step, evaluate_solution, make_problems, problem_record, random_problem
from ssb_jax.toyworld.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, save_tokenizer, tokenizer_corpus, train_tokenizer
from ssb_jax.toyworld.world import MARKER_FILE, WORLD_FORMAT, World, build, make_world, save_world, world_paths

__all__ = [
    "ToyWorldConfig",
    "OPS", "Problem", "Step", "evaluate_solution", "make_problems", "problem_record", "random_problem",
    "CHAT_TEMPLATE", "SPECIAL_TOKENS", "save_tokenizer", "tokenizer_corpus", "train_tokenizer",
    "Batches", "pretrain",
    "hinted_accuracy", "hinted_prompt_ids", "make_sampler", "measure", "mixed_fraction", "plain_accuracy",
    "plain_prompt_ids",
    "MARKER_FILE", "WORLD_FORMAT", "World", "build", "make_world", "save_world", "world_paths",
]
