"""The base model evaluated exactly as MOTIF evaluated it: the rows the SSB paper's table takes from MOTIF.

    python -m ssb_jax.main --config configs/qwen3b_motif_eval.py

What MOTIF did (Mitra & Ulukus 2025, arXiv 2507.02851; the evaluation at the end of vanilla_grpo.py in
github.com/purbeshmitra/MOTIF, read for this config): Qwen2.5-3B-Instruct through vLLM, the system prompt
"You are a helpful assistant. In your response, you enclose your final answer in the box: \\boxed{}." and the
problem alone as the user message (the chat template with the generation prompt), greedy decoding
(temperature 0, top-p 1), at most 1024 new tokens, on all 500 MATH500 problems and the 30 AIME 2024 problems;
a MATH500 response is correct when it contains the string `\\boxed{gold}`, an AIME response when it contains
the gold string anywhere. Here: the `motif` protocol (greedy, 1024 tokens, those two rules; aime24 is graded
by the gold string because it is the known AIME dataset, `eval.motif_contains_gold` for local files) with
`eval.system_prompt=motif_base` (ssb_jax.prompts.MOTIF_BASE_SYSTEM_PROMPT, the same text). The prompt is an
evaluation-only setting: curation and training keep the tutor prompt of configs/qwen3b.py.

Not the same: ssb_jax's sampler rather than vLLM (greedy decoding in bf16 can break near-ties differently);
the question is stripped of surrounding whitespace (MOTIF passes it as stored); the dataset copies are the
ones under /work/shared/data or the Hub (MOTIF loads HuggingFaceH4/MATH-500 and HuggingFaceH4/aime_2024).
MOTIF loaded the model in 4 bit for training; whether its base rows were generated from the 4-bit weights is
not stated (the script evaluates the model object it trained with, `load_in_4bit=True`), so this evaluates
the bf16 checkpoint.

MOTIF's GRPO row used other prompts: its XML training prompt on MATH500 (`motif_xml`) and no system message
(the chat template's default, `chat_default`) on AIME24. To evaluate a GRPO model of this project that way,
run the eval stage in its workdir (a fresh eval directory: other prompts are another evaluation) with
`--config.eval.protocols=motif --config.eval.system_prompt=motif_xml
--config.eval.dataset_system_prompts=aime24=chat_default`; the prompts then apply to every model of that
workdir, the base included.

A workdir of its own: the evaluation prompt is part of every outputs file's settings, so these outputs
cannot share runs/qwen3b/eval with the tutor-prompt evaluation.
"""
from pathlib import Path

from ssb_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("qwen3b.py")))  # the model, dtype, sampler settings
    c.workdir = "runs/qwen3b_motif_eval"
    c.stages = "eval,report"            # the base only: nothing is trained in this workdir
    c.eval.datasets = "math500,aime24"  # MOTIF: all 500 MATH500 problems, the 30 of AIME 2024
    c.eval.protocols = "motif"          # greedy, 1024 new tokens, \boxed{gold} (MATH500) / gold (AIME)
    c.eval.system_prompt = "motif_base"  # MOTIF's SYSTEM_PROMPT_base, the question alone as the user message
    c.eval.dataset_system_prompts = ""
    c.eval.max_problems = 0
    return c
