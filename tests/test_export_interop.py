"""Exports load with stock transformers / peft from any working directory and reproduce ssb_jax's ids.

A tiny random Qwen2 student (LoRA with non-zero B) is exported both ways; a subprocess that imports
only transformers, peft and torch, working in another directory and offline, loads each export and
decodes greedily. Its prompt ids must equal ssb_jax's encode_chat and its generated ids those of
ssb_jax's Sampler (the path curation and evaluation use). Once for the toy world's own tokenizer,
once for the real Qwen2.5 tokenizer.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssb_jax.export import base_model_reference, export_merged_model, export_peft_adapter
from ssb_jax.model.lora import LoraConfig, as_lora_state, student_split, with_adapters
from ssb_jax.model.tokenizer import encode_chat, load_tokenizer, stop_token_ids
from ssb_jax.model.weights import load_params
from ssb_jax.paths import shared_data_path
from ssb_jax.prompts import DEFAULT_PROMPTS
from tests.hf_models import make_hf_checkpoint

WORKER = Path(__file__).with_name("export_interop_worker.py")
MAX_NEW_TOKENS = 10
# Below this top-2 logit gap the greedy choice is a numerical tie between torch and XLA: ids are
# compared up to the first such step only.
TIE_GAP = 1e-4


def toy_tokenizer():
    from ssb_jax import toyworld
    config = toyworld.ToyWorldConfig()
    problems = toyworld.make_problems(config, 20, random.Random(5))
    return toyworld.train_tokenizer(toyworld.tokenizer_corpus(problems, random.Random(0), DEFAULT_PROMPTS), 300)


def chats(rng):
    """A plain and a hinted prompt on random numbers (the toy world's fixed texts included)."""
    a, b, c = (int(x) for x in rng.integers(2, 60, size=3))
    question = f"Ana has {a} apples. She buys {b} bags with {c} apples each. How many apples does Ana have now?"
    right, wrong = f"{b} * {c} = {b * c}. \\boxed{{{a + b * c}}}", f"{b} + {c} = {b + c}. \\boxed{{{a + b + c}}}"
    return [DEFAULT_PROMPTS.student_messages(question), DEFAULT_PROMPTS.hinted_messages(question, right, wrong)]


def random_lora(config, lora_config, rng):
    """Adapters with random A and non-zero random B, drawn in numpy (no XLA compiles)."""
    import jax
    from flax import nnx
    abstract = nnx.to_pure_dict(student_split(config, lora_config)[1])
    pure = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), abstract)
    return as_lora_state(pure, config, lora_config)


def ssb_greedy(model, tokenizer, prompts, stop_ids):
    from ssb_jax.sampling.driver import Sampler
    from ssb_jax.sampling.sampler import SamplingParams
    sampler = Sampler(model, tokenizer, batch_size=len(prompts), prompt_buckets=[512], show_progress=False)
    sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, stop_ids=tuple(stop_ids),
                              pad_id=stop_ids[0])
    return [c[0].token_ids for c in sampler.generate(prompts, sampling)]


def export_student(tokenizer, root: Path, rng, tie: bool) -> dict:
    """Base checkpoint (with its tokenizer, named relative to the cwd, as the pipeline has it), both
    exports, and ssb_jax's ids for two chats; root is the cwd."""
    vocab = max(len(tokenizer), 128)  # a real vocabulary may be padded past the tokenizer; the test one is not
    make_hf_checkpoint(root / "runs" / "base", tie=tie, seed=int(rng.integers(1000)), vocab_size=vocab)
    tokenizer.save_pretrained(str(root / "runs" / "base"))
    config, model = load_params("runs/base")
    lora_config = LoraConfig(targets=("q", "k", "v", "o", "gate", "up", "down"), rank=4, alpha=8.0)
    lora = random_lora(config, lora_config, rng)
    adapter = export_peft_adapter(lora, lora_config, "export/peft_adapter", "runs/base", tokenizer=tokenizer)
    merged = export_merged_model(model, lora, lora_config, config, "export/merged", tokenizer=tokenizer)
    prompts, stop_ids = chats(rng), stop_token_ids(tokenizer)
    return {"merged": str(root / merged), "adapter": str(root / adapter), "chats": prompts, "stop_ids": stop_ids,
            "max_new_tokens": MAX_NEW_TOKENS, "root": str(root),
            "prompt_ids": [encode_chat(tokenizer, chat) for chat in prompts],
            "greedy": ssb_greedy(with_adapters(model, lora, lora_config), tokenizer, prompts, stop_ids)}


def run_stock(cases: list, workdir: Path) -> list:
    """The worker, in `workdir`, offline, without this repository on its path."""
    (workdir / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(WORKER), "cases.json"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, seed):
    """{tokenizer name: (what ssb_jax exported and generated, what stock tools loaded and generated)}."""
    rng = np.random.default_rng(seed)
    tokenizers = {"toy": (toy_tokenizer(), False),
                  "qwen2.5": (load_tokenizer(shared_data_path("qwen2.5_tokenizer")), True)}
    cases = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, (tokenizer, tie) in tokenizers.items():
            root = tmp_path_factory.mktemp(name)
            mp.chdir(root)
            cases[name] = export_student(tokenizer, root, rng, tie)
    stock = run_stock(list(cases.values()), tmp_path_factory.mktemp("elsewhere"))
    return {name: (case, result, tokenizers[name][0]) for (name, case), result in zip(cases.items(), stock)}


def assert_same_greedy(ours, theirs, label):
    """Equal ids, up to the first step where the stock logits' top two are a numerical tie."""
    gaps = theirs["top2_gaps"]
    steps = next((i + 1 for i, g in enumerate(gaps) if g < TIE_GAP), len(theirs["generated"]))
    assert ours[:steps] == theirs["generated"][:steps], label
    if steps == len(theirs["generated"]):
        assert ours == theirs["generated"], label


@pytest.mark.e2e
@pytest.mark.slow  # `exported`: two exports, then stock transformers in a subprocess
@pytest.mark.parametrize("which", ["toy", "qwen2.5"])
def test_adapter_names_its_local_base_absolutely(exported, which):
    case, _, _ = exported[which]
    recorded = json.loads((Path(case["adapter"]) / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((Path(case["root"]) / "runs" / "base").resolve())


@pytest.mark.e2e
@pytest.mark.slow  # `exported`: two exports, then stock transformers in a subprocess
@pytest.mark.parametrize("which", ["toy", "qwen2.5"])
def test_stock_tokenizer_gives_ssb_jax_ids(exported, which):
    case, stock, tokenizer = exported[which]
    for form in ("merged", "peft"):
        assert stock[form]["tokenizer_class"] == type(tokenizer).__name__ == "Qwen2Tokenizer", form
        assert [r["prompt"] for r in stock[form]["results"]] == case["prompt_ids"], form


@pytest.mark.e2e
@pytest.mark.slow  # `exported`: two exports, then stock transformers in a subprocess
@pytest.mark.parametrize("which", ["toy", "qwen2.5"])
def test_stock_greedy_matches_ssb_jax_sampler(exported, which):
    case, stock, _ = exported[which]
    for form in ("merged", "peft"):
        for ours, theirs in zip(case["greedy"], stock[form]["results"]):
            assert_same_greedy(ours, theirs, form)
    # the adapters change the continuations, so matching them means something
    assert [r["generated"] for r in stock["peft_base"]["results"]] != case["greedy"]


def test_base_reference_is_absolute_for_local_directories_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "world").mkdir(parents=True)
    assert base_model_reference("runs/world") == str(tmp_path.resolve() / "runs" / "world")
    assert base_model_reference(Path("runs") / ".." / "runs" / "world") == str(tmp_path.resolve() / "runs" / "world")
    assert base_model_reference("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert base_model_reference("") == ""


def test_stale_generic_tokenizer_is_flagged(tmp_path, caplog):
    """A tokenizer that splits text otherwise than Qwen2Tokenizer (a toy world built before the fix)
    is flagged on load and on export: stock tools would give other ids. The real one is not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from ssb_jax.export import stock_tokenizer_mismatch
    from ssb_jax.toyworld import CHAT_TEMPLATE, SPECIAL_TOKENS
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # merges span words
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["You are a helpful math tutor. Ana has 17 apples."] * 50, trainer=trainer)
    generic = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      chat_template=CHAT_TEMPLATE)
    out = tmp_path / "stale"
    make_hf_checkpoint(out, vocab_size=len(generic))
    generic.save_pretrained(str(out))
    assert "Qwen2Tokenizer" in stock_tokenizer_mismatch(generic, out)
    with caplog.at_level("WARNING"):
        loaded = load_tokenizer(out)
    assert "tokenizer_config.json: tokenizer_class" in caplog.text
    text = "You are a helpful math tutor."
    assert loaded.encode(text) == generic.encode(text)  # ssb_jax keeps the ids the model was trained with

    qwen = load_tokenizer(shared_data_path("qwen2.5_tokenizer"))
    qwen.save_pretrained(str(tmp_path / "qwen"))
    assert stock_tokenizer_mismatch(qwen, tmp_path / "qwen") is None
