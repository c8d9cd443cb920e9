"""Random curation-style records and tiny configs, for tests and benchmarks (no data needed)."""
from __future__ import annotations

import numpy as np

from ssb_jax.model.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, rope_theta=10000.0)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_records(rng: np.random.Generator, n: int, vocab: int, *, teacher_prompt=(4, 14), student_prompt=(2, 9),
                   solution=(3, 20), hint_shared: bool = True) -> list[dict]:
    """Records whose teacher prompt is a (random) hint followed by the student prompt, as in SSB,
    when hint_shared; otherwise independent random prompts. Ranges are [low, high)."""
    records = []
    for i in range(n):
        student = rng.integers(0, vocab, rng.integers(*student_prompt)).tolist()
        if hint_shared:
            hint = rng.integers(0, vocab, max(int(rng.integers(*teacher_prompt)) - len(student), 1)).tolist()
            teacher = hint + student
        else:
            teacher = rng.integers(0, vocab, rng.integers(*teacher_prompt)).tolist()
        records.append({"id": f"ex{i}", "teacher_prompt_ids": teacher, "student_prompt_ids": student,
                        "solution_ids": rng.integers(0, vocab, rng.integers(*solution)).tolist()})
    return records
