"""The on-policy settings: three sections of one dataclass with their methods' defaults, registered opt-in stages
of the same names, and refused values."""
import dataclasses

import pytest

from ssb_jax.onpolicy.config import SECTION_CONFIGS, OnPolicyConfig, OPSDConfig, SDPOConfig


def test_the_three_sections_share_keys_and_differ_in_defaults():
    names = [f.name for f in dataclasses.fields(OnPolicyConfig)]
    assert [f.name for f in dataclasses.fields(OPSDConfig)] == names == [f.name for f in dataclasses.fields(SDPOConfig)]
    defaults = {name: cls() for name, cls in SECTION_CONFIGS.items()}
    described = lambda c: (c.context, c.teacher, c.loss, c.topk, c.onpolicy_weight)  # noqa: E731
    assert described(defaults["onpolicy"]) == ("ssb", "base", "forward_kl", 64, 1.0)
    assert described(defaults["opsd"]) == ("reference", "base", "forward_kl", 0, 1.0) and defaults["opsd"].clip > 0
    assert described(defaults["sdpo"]) == ("peer", "ema", "jsd", 100, 1.0) and defaults["sdpo"].jsd_alpha == 0.5
    assert defaults["sdpo"].samples_per_prompt >= 2
    assert defaults["onpolicy"].temperature == 2.0  # SSB's T


def test_stages_and_sections_of_the_same_names():
    from ssb_jax import config as config_lib
    from ssb_jax.pipeline.registry import REGISTRY
    config = config_lib.base_config()
    for name, cls in SECTION_CONFIGS.items():
        stage = REGISTRY.get(name)
        assert stage.opt_in and "training" in stage.uses and name not in REGISTRY.default_names()
        assert config_lib.section_to(cls, config[name], f"config.{name}") == cls()
    assert not config_lib.undescribed_settings(config)


@pytest.mark.parametrize("changes,message", [
    ({"context": "hint"}, "context must be one of"),
    ({"loss": "kl"}, "loss must be one of"),
    ({"teacher": "frozen"}, "teacher must be one of"),
    ({"context": "peer", "samples_per_prompt": 1}, "samples_per_prompt >= 2"),
    ({"onpolicy_weight": 1.5}, r"onpolicy_weight must be in \[0, 1\]"),
    ({"loss": "jsd", "jsd_alpha": 1.0}, "strictly between 0 and 1"),
    ({"clip": -1.0}, "clip must be >= 0"),
])
def test_absurd_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        OnPolicyConfig(**changes)
