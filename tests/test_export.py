"""PEFT adapter and merged-model exports load in peft/transformers with ssb_jax's logits."""
import jax
import numpy as np

import ssb_jax
from ssb_jax.export import export_merged_model, export_peft_adapter
from ssb_jax.model.lora import LoraConfig, init_lora, with_adapters
from ssb_jax.model.weights import load_params
from tests.hf_models import hf_logits


def random_trained_lora(config, lora_config, seed):
    """A LoRA with non-zero B (a fresh one is a no-op and would prove nothing)."""
    lora = init_lora(config, lora_config, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), lora)


def batch(config, rng):
    tokens = rng.integers(0, config.vocab_size, size=(2, 9))
    mask = np.ones(tokens.shape, bool)
    mask[1, :3] = False  # left padding in row 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return tokens, mask, positions


def ours_with_lora(model, config, lora, lora_config, tokens, mask, positions):
    return np.asarray(ssb_jax.compute_logits(with_adapters(model, lora, lora_config), config, tokens, mask, positions))


def test_peft_adapter_loads_with_same_logits(tiny_untied_checkpoint, tmp_path, rng):
    import torch
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM
    config, params = load_params(tiny_untied_checkpoint)
    lora_config = LoraConfig(targets=("q", "k", "v", "o", "gate", "up", "down"), rank=4, alpha=8.0)
    lora = random_trained_lora(config, lora_config, seed=0)
    export_peft_adapter(lora, lora_config, tmp_path / "adapter", str(tiny_untied_checkpoint))
    base = Qwen2ForCausalLM.from_pretrained(str(tiny_untied_checkpoint), attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tokens, mask, positions = batch(config, rng)
    theirs = hf_logits(model, tokens, mask, positions)
    ours = ours_with_lora(params, config, lora, lora_config, tokens, mask, positions)
    assert np.abs(ours - theirs)[mask].max() < 1e-4
    # and the adapter really changes the model
    plain = hf_logits(tiny_untied_checkpoint, tokens, mask, positions)
    assert np.abs(plain - theirs)[mask].max() > 1e-3
    del torch


def test_merged_model_loads_with_same_logits(tiny_checkpoint, tmp_path, rng):
    config, params = load_params(tiny_checkpoint)
    lora_config = LoraConfig(targets=("q", "v", "down"), rank=3, alpha=6.0, use_rslora=True)
    lora = random_trained_lora(config, lora_config, seed=2)
    out = export_merged_model(params, lora, lora_config, config, tmp_path / "merged")
    tokens, mask, positions = batch(config, rng)
    theirs = hf_logits(out, tokens, mask, positions)
    ours = ours_with_lora(params, config, lora, lora_config, tokens, mask, positions)
    assert np.abs(ours - theirs)[mask].max() < 1e-4


SYSTEM_PROMPT = "Tutor's rule: reason step by step; put the answer in \\boxed{}. {{ x }} café 🙂\nEnd."


def _info():
    from ssb_jax.export import ExportInfo, generation_settings
    from ssb_jax.prompts import PromptSet
    generation = generation_settings(0.7, 0.9, 0, 48, [3, 5], None)
    return ExportInfo(prompts=PromptSet(system_prompt=SYSTEM_PROMPT), generation=generation,
                      card={"Base model": "`tiny`", "Evaluation": "| model | acc |\n|---|---|\n| student | 71.5 |",
                            "Empty": ""})


def test_exports_carry_prompt_generation_config_card_and_are_world_readable(tiny_checkpoint, tmp_path):
    """Stock transformers on each export: a chat without a system message renders the training system
    prompt; generation_config.json has the sampling settings; a model card; files 0644, directories 0755;
    ssb_jax's load_prompts reads the prompts back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ssb_jax.export import load_prompts
    from ssb_jax.model.tokenizer import encode_chat, load_tokenizer
    from ssb_jax.paths import shared_data_path
    tokenizer = load_tokenizer(shared_data_path("qwen2.5_tokenizer"))
    template = tokenizer.chat_template
    config, params = load_params(tiny_checkpoint)
    lora_config = LoraConfig(targets=("q", "v"), rank=2, alpha=4.0)
    lora = random_trained_lora(config, lora_config, seed=3)
    merged = export_merged_model(params, lora, lora_config, config, tmp_path / "merged", tokenizer=tokenizer,
                                 info=_info())
    adapter = export_peft_adapter(lora, lora_config, tmp_path / "adapter", str(tiny_checkpoint),
                                  tokenizer=tokenizer, info=_info())
    assert tokenizer.chat_template == template  # the run's tokenizer is unchanged
    question = "Ana has 17 apples and buys 25 more. How many?"
    expected = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    for out in (merged, adapter):
        stock = AutoTokenizer.from_pretrained(str(out))
        bare = stock.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        assert bare == expected, out
        other = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
        assert stock.apply_chat_template(other, tokenize=False) == tokenizer.apply_chat_template(other, tokenize=False)
        # Sampler.generate encodes a bare question with the exported tokenizer: the trained prompt
        assert encode_chat(load_tokenizer(out), question) == encode_chat(tokenizer, question,
                                                                         system_prompt=SYSTEM_PROMPT)
        generation = GenerationConfig.from_pretrained(str(out))
        assert (generation.do_sample, generation.temperature, generation.top_p, generation.top_k,
                generation.max_new_tokens, generation.eos_token_id) == (True, 0.7, 0.9, 0, 48, [3, 5])
        card = (out / "README.md").read_text()
        assert "## Base model" in card and "71.5" in card and "## Empty" not in card
        assert load_prompts(out).system_prompt == SYSTEM_PROMPT
        assert (out.stat().st_mode & 0o777) == 0o755
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
        assert set(modes.values()) == {0o644}, modes
        assert {"model.safetensors", "adapter_model.safetensors"} & set(modes)
    assert "library_name: peft" in (adapter / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert model.generation_config.temperature == 0.7 and model.generation_config.top_k == 0


def test_load_prompts_from_a_run_directory(tmp_path):
    import json

    import pytest

    from ssb_jax.export import load_prompts
    from ssb_jax.prompts import DEFAULT_PROMPTS
    (tmp_path / "config.json").write_text(json.dumps({"prompts": {"system_prompt": "S", "student_template": "",
                                                                  "hinted_template": ""}}))
    prompts = load_prompts(tmp_path)
    assert prompts.system_prompt == "S" and prompts.student_template == DEFAULT_PROMPTS.student_template
    with pytest.raises(ValueError, match="neither an export"):
        load_prompts(tmp_path / "missing")


def test_export_stage_info_for_the_student_and_a_baseline(tmp_path):
    """What the export stage writes into each export: the run's prompts, the evaluation's sampling settings and
    a card naming the method (SSB, or the baseline stage that trained it) and the evaluation when there is one."""
    import json
    from types import SimpleNamespace

    import ml_collections

    from ssb_jax.distill.config import TrainConfig
    from ssb_jax.evaluation import EvalConfig
    from ssb_jax.model.tokenizer import load_tokenizer
    from ssb_jax.paths import shared_data_path
    from ssb_jax.pipeline.stages.export import export_info
    from ssb_jax.prompts import PromptSet
    (tmp_path / "round_1" / "train").mkdir(parents=True)
    (tmp_path / "round_1" / "train" / "DONE.json").write_text(json.dumps({"steps": 17}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.md").write_text("| model | accuracy |\n| student | 12.5 |\n")
    ctx = SimpleNamespace(
        config=ml_collections.ConfigDict({"model": {"path": "Qwen/Qwen2.5-0.5B-Instruct"}, "num_rounds": 1,
                                          "data": {"train": "gsm8k_train"}}),
        eval_config=EvalConfig(temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=300),
        train_config=TrainConfig(), prompts=PromptSet(system_prompt="Be a tutor."),
        tokenizer=load_tokenizer(shared_data_path("qwen2.5_tokenizer")), workdir=tmp_path,
        round_dir=lambda r: tmp_path / f"round_{r}")
    student, grpo = export_info(ctx, tmp_path / "export/merged"), export_info(ctx, tmp_path / "grpo/export", "grpo")
    for info in (student, grpo):
        assert info.prompts.system_prompt == "Be a tutor."
        assert (info.generation["temperature"], info.generation["top_p"], info.generation["max_new_tokens"]) == \
            (0.6, 0.95, 300)
        assert "12.5" in info.card["Evaluation"] and "Be a tutor." in info.card["Prompt"]
    assert "Semantic Soft Bootstrapping" in student.card["Method"] and "17 steps" in student.card["Method"]
    assert "grpo baseline" in grpo.card["Method"] and "Semantic" not in grpo.card["Method"]
    assert (student.model, grpo.model) == ("SSB student", "grpo baseline")
