"""Every config file in configs/ loads, names known stages and passes every section's validation, as a
run would check it before any work (so a recipe cannot rot unnoticed)."""
from pathlib import Path

import pytest

from ssb_jax import config as config_lib
from ssb_jax.pipeline.registry import REGISTRY
from ssb_jax.prompts import DEFAULT_PROMPTS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def validated_sections(c) -> dict:
    """Each section of the config as its settings dataclass(es), checked as RunContext and the world stage do."""
    out = {}
    for name, classes in config_lib.SECTIONS.items():
        if not name or name not in c:
            continue
        if name in config_lib.PARTIAL_SECTIONS:  # the switch's fields, then (when a config adds them) the rest
            switch = set(classes[0].__dataclass_fields__)
            section = dict(c[name])
            out[name] = config_lib.section_to(classes[0], {k: v for k, v in section.items() if k in switch},
                                              f"config.{name}")
            rest = {k: v for k, v in section.items() if k not in switch}
            if rest:
                out[f"{name}:settings"] = config_lib.section_to(classes[-1], rest, f"config.{name}")
            continue
        for cls in classes:
            out[name] = config_lib.section_to(cls, c[name], f"config.{name}")
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_validates(path):
    c = config_lib.load_config_file(str(path))
    config_lib.check_values(c)
    assert REGISTRY.parse(c.stages)
    validated_sections(c)


def test_the_recipes_say_what_they_claim():
    load = lambda name: config_lib.load_config_file(str(CONFIGS[0].with_name(f"{name}.py")))  # noqa: E731
    grpo = validated_sections(load("qwen3b_grpo"))
    assert (grpo["grpo"].lora_config(grpo["train"].lora_config()).rank, grpo["train"].lora_rank) == (64, 32)
    motif = validated_sections(load("qwen3b_motif_eval"))["eval"]
    assert motif.protocols == ("motif",) and motif.prompts_for("math500", DEFAULT_PROMPTS).system_prompt.startswith(
        "You are a helpful assistant. In your response")
    assert (motif.motif_rule("aime24"), motif.motif_rule("math500")) == ("contains", "boxed")


def test_the_on_policy_recipes_hold_every_row():
    """qwen3b_sdpo.py loads qwen3b_opsd.py and qwen3b_grpo.py: its eval table can hold every row, and the
    papers' stated settings are the ones set."""
    from ssb_jax.onpolicy.config import SECTION_CONFIGS
    c = config_lib.load_config_file(str(CONFIGS[0].with_name("qwen3b_sdpo.py")))
    opsd, sdpo, onpolicy = (config_lib.section_to(SECTION_CONFIGS[n], c[n], n) for n in ("opsd", "sdpo", "onpolicy"))
    assert (opsd.context, opsd.teacher, opsd.lora_rank, opsd.lora_alpha, opsd.learning_rate, opsd.clip) == (
        "reference", "base", 64, 128.0, 2e-4, 0.05)
    assert (sdpo.context, sdpo.teacher, sdpo.loss, sdpo.jsd_alpha, sdpo.topk, sdpo.samples_per_prompt) == (
        "peer", "ema", "jsd", 0.5, 100, 8)
    assert onpolicy.context == "ssb" and onpolicy.steps == opsd.steps
    assert c.grpo.lora_rank == 64 and c.workdir == "runs/qwen3b"
