"""A training stage's learning curve asks its held-out problems with the evaluation's prompts for that
dataset (eval.system_prompt), so its points are comparable with the eval stage's table."""
import json
import types

import ml_collections

from ssb_jax import curves
from ssb_jax.curves import CurveConfig
from ssb_jax.evaluation import EvalConfig
from ssb_jax.pipeline import learning_curve as learning_curve_module
from ssb_jax.prompts import DEFAULT_PROMPTS, MOTIF_BASE_SYSTEM_PROMPT


def test_the_curve_uses_the_evaluation_prompts(tmp_path, monkeypatch):
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(3)))
    made = {}
    monkeypatch.setattr(curves, "LearningCurve", lambda *args, **kwargs: made.update(kwargs) or "curve")
    for system_prompt, expected in (("motif_base", MOTIF_BASE_SYSTEM_PROMPT), ("", DEFAULT_PROMPTS.system_prompt)):
        eval_config = EvalConfig(datasets=f"held={data}", protocols=("string_match",), system_prompt=system_prompt)
        ctx = types.SimpleNamespace(
            curve_config=CurveConfig(eval_every=4, eval_size=2), eval_config=eval_config, tokenizer=None,
            prompts=DEFAULT_PROMPTS, sampler=None, place_for_sampling=lambda: None,
            config=ml_collections.ConfigDict({"eval": {"datasets": f"held={data}"},
                                              "data": {"on_bad_line": "error", "question_field": "",
                                                       "answer_field": ""}}))
        assert learning_curve_module.learning_curve(ctx, None, None, tmp_path / "m.jsonl", "x") == "curve"
        assert made["prompts"].system_prompt == expected
