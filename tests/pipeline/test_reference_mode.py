"""configs/qwen3b_reference.py: every reference-code switch is on, and each one reaches the fingerprint of
the stage that reads it, so outputs made without it are stale."""
import json
from pathlib import Path

import pytest

from ssb_jax import fingerprint as fp
from ssb_jax.config import apply_overrides, flat_settings, load_config_file, section_to
from ssb_jax.curate import CurationConfig
from ssb_jax.distill.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]

# setting -> (value in configs/qwen3b_reference.py, the stage whose fingerprint must see it)
REFERENCE_SWITCHES = {
    "curate.rollout_max_new_tokens": (8192, "curate"),
    "curate.solution_max_new_tokens": (8192, "curate"),
    "sampler.max_prompt_tokens": (17408, "curate"),
    "curate.shuffle": (False, "curate"),
    "curate.grader": ("exact", "curate"),
    "curate.no_answer_is_wrong": (False, "curate"),
    "curate.solution_must_stop": (False, "curate"),
    "train.student_format": ("plain", "train"),
    "train.stop_token_target": (False, "train"),
    "train.lora_dtype": ("bfloat16", "train"),
}


def settings(path):
    return dict(flat_settings(load_config_file(str(REPO / path))))


def test_reference_config_is_the_paper_config_with_every_switch_on():
    paper, reference = settings("configs/qwen3b.py"), settings("configs/qwen3b_reference.py")
    changed = {key: reference[key] for key in reference if reference[key] != paper[key]}
    # besides the switches, only where the run goes and how many rows are sampled at once (which no
    # output depends on)
    assert changed == {"workdir": "runs/qwen3b_reference", "sampler.batch_size": 16,
                       **{key: value for key, (value, _) in REFERENCE_SWITCHES.items()}}
    # and each switch is a real setting of its stage
    section_to(CurationConfig, load_config_file(str(REPO / "configs/qwen3b_reference.py")).curate, "config.curate")
    section_to(TrainConfig, load_config_file(str(REPO / "configs/qwen3b_reference.py")).train, "config.train")


def _fingerprints(train_file, overrides, monkeypatch):
    """(curate, teacher_cache, train) fingerprints of round 1 for configs/qwen3b.py with overrides, from a
    run context that loads nothing: the base model's identity and the kept pairs are given."""
    from ssb_jax.pipeline.context import RunContext
    from ssb_jax.pipeline.registry import REGISTRY
    from ssb_jax.pipeline.stages import teacher_cache, train
    from ssb_jax.prompts import prompts_from_config
    config = load_config_file(str(REPO / "configs/qwen3b.py"))
    apply_overrides(config, {"data.train": str(train_file), **overrides})
    ctx = RunContext.__new__(RunContext)
    ctx.config, ctx.registry = config, REGISTRY
    ctx.curation = section_to(CurationConfig, config.curate, "config.curate")
    ctx.train_config = section_to(TrainConfig, config.train, "config.train")
    ctx.prompts = prompts_from_config(config)
    ctx._model_identity = "model#fixed"
    for module in (teacher_cache, train):
        monkeypatch.setattr(module, "kept_examples", lambda ctx, r: [{"id": "pair-0", "solution_ids": [1, 2, 3]}])
    return tuple(REGISTRY.get(stage).fingerprint(ctx, 1) for stage in ("curate", "teacher_cache", "train"))


@pytest.mark.parametrize("setting", sorted(REFERENCE_SWITCHES))
def test_each_switch_makes_its_stage_stale_and_no_other(setting, tmp_path, monkeypatch):
    value, stage = REFERENCE_SWITCHES[setting]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    before = dict(zip(("curate", "teacher_cache", "train"), _fingerprints(train_file, {}, monkeypatch)))
    after = dict(zip(("curate", "teacher_cache", "train"), _fingerprints(train_file, {setting: value}, monkeypatch)))
    # the teacher cache does not depend on the student's input or targets (it always holds the stop token)
    assert {s for s in before if before[s] != after[s]} == {stage}
    fp.check(tmp_path / stage, stage, before[stage])
    (tmp_path / stage / "output.json").write_text("{}")
    with pytest.raises(fp.StaleOutputsError, match=setting.split(".")[1]):
        fp.check(tmp_path / stage, stage, after[stage])
