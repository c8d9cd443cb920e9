"""The offline toy world: problems, tokenizer, pre-trained checkpoint, build idempotence, measurement."""
import dataclasses
import random
import re

import jax.numpy as jnp
import numpy as np
import pytest

from ssb_jax import toyworld
from ssb_jax.evaluation.grading import extract_boxed
from ssb_jax.prompts import DEFAULT_PROMPTS
from ssb_jax.sampling.driver import Completion
from ssb_jax.toyworld import world as world_module

# A pool of 24 problems the model can memorise quickly; one length bucket and no drill, so a single
# program compiles (compiling dominates here).
TINY = toyworld.ToyWorldConfig(
    seed=3, num_train=40, num_test=16, max_steps=2, pretrain_pool=24, vocab_size=400, hidden_size=48,
    intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, pretrain_steps=100, plain_batch=8,
    hinted_batch=4, drill_batch=0, length_buckets=1, learning_rate=1e-2, warmup_steps=5, prompt_loss_weight=0.0,
    log_every=1000)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build() on a tiny config, keeping the in-memory world it made."""
    captured = {}
    make_world = world_module.make_world

    def spy(*args, **kwargs):
        captured["world"] = make_world(*args, **kwargs)
        return captured["world"]

    out_dir = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(world_module, "make_world", spy)
        paths = toyworld.build(TINY, out_dir)
    return out_dir, paths, captured["world"]


# ----------------------------------------------------------------------------- problems

def _answer_from_question(question: str) -> int:
    """Recompute the answer from the question's sentences alone (independent of Problem)."""
    total = int(re.match(r"\w+ has (\d+) ", question).group(1))
    for sentence in re.split(r"(?<=\.) ", question)[1:]:
        if m := re.search(r"finds (\d+) more", sentence):
            total += int(m.group(1))
        elif m := re.search(r"gives away (\d+) ", sentence):
            total -= int(m.group(1))
        elif m := re.search(r"buys (\d+) \w+ with (\d+) \w+ each", sentence):
            total += int(m.group(1)) * int(m.group(2))
        elif m := re.search(r"gives (\d+) friends (\d+) \w+ each", sentence):
            total -= int(m.group(1)) * int(m.group(2))
        else:
            assert sentence.startswith("How many"), sentence
    return total


def test_problem_answers_are_right():
    config = toyworld.ToyWorldConfig()
    rng = random.Random(0)
    problems = [toyworld.random_problem(rng, config) for _ in range(400)]
    assert {s.op for p in problems for s in p.steps} == set(toyworld.OPS)
    for p in problems:
        answer = p.answer()
        assert _answer_from_question(p.question()) == answer
        solution = p.solution()
        assert toyworld.evaluate_solution(solution) == answer  # every written step is true
        assert extract_boxed(solution) == str(answer)
        assert config.min_steps <= len(p.steps) <= config.max_steps
        for slips in p.slip_patterns():
            assert all(0 <= t <= config.max_value for t in p.totals(slips))
        wrong = p.wrong_solution(rng)
        assert extract_boxed(wrong) != str(answer)
        if p.group_steps():  # the slip: b + e written for b * e, the rest computed right from there
            assert re.search(r"of \d+: (\d+) \+ (\d+) = ", wrong)
            assert toyworld.evaluate_solution(wrong) == int(extract_boxed(wrong))


@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_splits_are_disjoint_and_load(built):
    from ssb_jax.data.datasets import load_problems
    _, paths, _ = built
    train, test = load_problems(paths["train"]), load_problems(paths["test"])
    assert (len(train), len(test)) == (TINY.num_train, TINY.num_test)
    assert not {p.question for p in train} & {p.question for p in test}
    for p in list(train) + list(test):
        assert p.answer == str(_answer_from_question(p.question))
        assert toyworld.evaluate_solution(p.extra["solution"]) == int(p.answer)


def test_problems_and_tokenizer_are_deterministic():
    a = toyworld.make_problems(TINY, 20, random.Random(5))
    assert a == toyworld.make_problems(TINY, 20, random.Random(5))
    corpus = toyworld.tokenizer_corpus(a, random.Random(0), DEFAULT_PROMPTS)
    assert toyworld.train_tokenizer(corpus, 300).get_vocab() == toyworld.train_tokenizer(corpus, 300).get_vocab()


# ----------------------------------------------------------------------------- tokenizer

@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_tokenizer_loads_and_renders_chatml(built):
    from transformers import AutoTokenizer
    from ssb_jax.model.tokenizer import encode_chat, load_tokenizer, render_chat, stop_token_ids
    _, paths, _ = built
    tok = AutoTokenizer.from_pretrained(str(paths["checkpoint"]))
    assert load_tokenizer(paths["checkpoint"]).get_vocab() == tok.get_vocab()
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    messages = DEFAULT_PROMPTS.student_messages("Ana has 7 apples.")
    assert render_chat(tok, messages) == (
        f"<|im_start|>system\n{DEFAULT_PROMPTS.system_prompt}<|im_end|>\n"
        "<|im_start|>user\nAna has 7 apples.<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(tok, messages, add_generation_prompt=False).endswith("apples.<|im_end|>\n")
    ids = encode_chat(tok, messages)
    reference = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(reference, "keys"):
        reference = reference["input_ids"]
    assert ids == list(reference)
    im_start, im_end, eot = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    assert ids[0] == im_start and ids.count(im_end) == 2
    assert stop_token_ids(tok) == sorted({im_end, eot})


@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_tokenizer_round_trips_and_splits_digits(built):
    from ssb_jax.model.tokenizer import load_tokenizer
    _, paths, world = built
    tok = load_tokenizer(paths["checkpoint"])
    texts = [world.test[0]["question"], world.test[0]["solution"], "Unseen words: café, naïve, 🙂 {x^2} \\boxed{}",
             "  two  spaces\n\nand a tab\t."]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    pieces = tok.convert_ids_to_tokens(tok.encode("12 + 3405 = 3417", add_special_tokens=False))
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("1234053417")


# ----------------------------------------------------------------------------- model

@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_checkpoint_logits_match_memory(built):
    import ssb_jax
    from ssb_jax.model.tokenizer import load_tokenizer
    _, paths, world = built
    config, params = ssb_jax.load_model(paths["checkpoint"])
    assert config == world.model_config
    tok = load_tokenizer(paths["checkpoint"])
    assert config.vocab_size == len(tok)
    prompts = toyworld.plain_prompt_ids(tok, world.test[:3])
    width = max(map(len, prompts))
    tokens = np.full((3, width), tok.pad_token_id, np.int32)
    mask = np.zeros((3, width), bool)
    for i, p in enumerate(prompts):  # left padded, as the sampler feeds them
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, True
    loaded = ssb_jax.compute_logits(params, config, tokens, mask)
    memory = ssb_jax.compute_logits(world.model, world.model_config, tokens, mask)
    np.testing.assert_allclose(np.asarray(loaded), np.asarray(memory), rtol=0, atol=1e-6)
    assert jnp.isfinite(loaded).all()


@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_pretraining_reduces_loss(built):
    _, _, world = built
    losses = world.losses
    assert len(losses) == TINY.pretrain_steps
    assert np.mean(losses[:3]) > 4.0  # about log(vocab) at the start
    # per token, so it depends on the tokenizer: its phrase tokens leave mostly the digits to predict
    assert np.mean(losses[:3]) / np.mean(losses[-5:]) > 3.0, (losses[:3], losses[-5:])


@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_build_is_idempotent(built, monkeypatch):
    out_dir, paths, _ = built
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(world_module, "make_world", lambda *a, **k: pytest.fail("build ran again"))
    assert toyworld.build(TINY, out_dir) == paths
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()} == before
    for key in ("train", "test", "checkpoint"):
        assert paths[key].exists()
    assert (paths["checkpoint"] / "model.safetensors").exists()
    assert (paths["checkpoint"] / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="another config"):
        toyworld.build(dataclasses.replace(TINY, seed=4), out_dir)


@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_a_world_of_an_older_format_is_refused(built, tmp_path):
    import json
    import shutil
    out_dir, _, _ = built
    old = tmp_path / "old_world"
    shutil.copytree(out_dir, old)
    marker = json.loads((old / toyworld.MARKER_FILE).read_text())
    del marker["format"]  # as written before formats were recorded
    (old / toyworld.MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=r"built by an older ssb_jax \(format 1, now 2"):
        toyworld.build(TINY, old)


# ----------------------------------------------------------------------------- measurement

class _ScriptedSampler:
    """Answers each prompt with a fixed list of texts (prompts are matched by their token ids)."""

    def __init__(self, tokenizer, answers_by_prompt):
        self.tokenizer = tokenizer
        self.answers = answers_by_prompt

    def generate_ids(self, prompts, sampling, n=1, seed=0):
        return [[Completion(token_ids=[], finish_reason="stop", text=t) for t in self.answers[tuple(p)][:n]]
                for p in prompts]


@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_measurement_counts(built):
    _, _, world = built
    tok, problems = world.tokenizer, world.test[:4]
    plain = toyworld.plain_prompt_ids(tok, problems)
    hinted = toyworld.hinted_prompt_ids(tok, problems)
    answers = {}
    for i, (p, q, h) in enumerate(zip(problems, plain, hinted)):
        right, wrong = p["solution"], p["wrong_solution"]
        # problems 0-1: k rollouts mixed; 2: all right; 3: all wrong. Hinted: right on all but problem 3.
        answers[tuple(q)] = [right, wrong, right, right] if i < 2 else [right] * 4 if i == 2 else [wrong] * 4
        answers[tuple(h)] = [right] if i < 3 else ["no box here"]
    sampler = _ScriptedSampler(tok, answers)
    assert toyworld.plain_accuracy(sampler, problems) == 0.75
    assert toyworld.plain_accuracy(sampler, problems, n=4) == pytest.approx(10 / 16)
    assert toyworld.hinted_accuracy(sampler, problems) == 0.75
    assert toyworld.mixed_fraction(sampler, problems, k=4) == 0.5


@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_measure_keys(built):
    _, _, world = built
    problems = world.test[:2]
    tok = world.tokenizer
    answers = {tuple(ids): [p["solution"]] * 4 for p, ids in zip(problems, toyworld.plain_prompt_ids(tok, problems))}
    answers.update({tuple(ids): [p["wrong_solution"]] for p, ids in
                    zip(problems, toyworld.hinted_prompt_ids(tok, problems))})
    assert toyworld.measure(_ScriptedSampler(tok, answers), problems) == {
        "plain_greedy": 1.0, "plain_sampled": 1.0, "hinted_greedy": 0.0, "mixed_fraction": 0.0, "num_problems": 2}


@pytest.mark.e2e  # the `built` world: toyworld.build end to end
def test_accuracy_with_real_sampler(built):
    _, _, world = built
    sampler = toyworld.make_sampler(world.model, world.tokenizer, batch_size=8)
    accuracy = toyworld.plain_accuracy(sampler, world.test[:4], temperature=0.8, n=2, max_new_tokens=8)
    assert 0.0 <= accuracy <= 1.0
