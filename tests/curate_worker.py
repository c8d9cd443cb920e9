"""Run curation over 40 real GSM8K questions with a slow scripted sampler (killed by test_curate)."""
import sys

from ssb_jax.curate import CurationConfig, run
from ssb_jax.data.datasets import load_gsm8k
from ssb_jax.model.tokenizer import load_tokenizer
from ssb_jax.paths import shared_data_path
from tests.scripted_sampler import ScriptedSampler, hashed_answers

if __name__ == "__main__":
    out_dir, delay = sys.argv[1], float(sys.argv[2])
    problems = load_gsm8k("train")[:40]
    tokenizer = load_tokenizer(shared_data_path("qwen2.5_tokenizer"))
    sampler = ScriptedSampler(tokenizer, default=hashed_answers({p.id: p.answer for p in problems}), delay_s=delay)
    run(problems, sampler, tokenizer, CurationConfig(target_pairs=0, questions_per_batch=4, seed=7,
                                                     grader="string_match"), out_dir)
