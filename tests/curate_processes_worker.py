"""One of two JAX processes curating 24 scripted questions (tests/test_streaming_records.py).

    python tests/curate_processes_worker.py OUT_DIR PORT PROCESS_ID
"""
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssb_jax.curate import run  # noqa: E402
from ssb_jax.model.tokenizer import load_tokenizer  # noqa: E402
from ssb_jax.paths import shared_data_path  # noqa: E402
from tests.scripted_sampler import ScriptedSampler, hashed_answers  # noqa: E402
from tests.test_streaming_records import TWO_PROCESS_CONFIG, two_process_problems  # noqa: E402

if __name__ == "__main__":
    out_dir, port, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    problems = two_process_problems()
    tokenizer = load_tokenizer(shared_data_path("qwen2.5_tokenizer"))
    sampler = ScriptedSampler(tokenizer, default=hashed_answers({p.id: p.answer for p in problems}))
    summary = run(problems, sampler, tokenizer, TWO_PROCESS_CONFIG, out_dir)
    print(f"process {process_id}: {summary['questions']} questions, {summary['verdicts']['kept']} kept", flush=True)
