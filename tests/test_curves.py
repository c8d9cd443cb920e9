"""Learning curves: adapters swapped into one Sampler sample like a fresh one (no recompilation), the
points' statistics, and a killed training run that neither loses nor repeats a point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssb_jax.curves import CurveConfig, LearningCurve, plot_curves, read_curve
from ssb_jax.data.datasets import Problem
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.synthetic import random_records, tiny_model_config
from ssb_jax.distill.train import run
from ssb_jax.model.lora import LoraConfig, init_lora, with_adapters
from ssb_jax.model.qwen2 import init_model
from ssb_jax.model.tokenizer import encode_chat, load_tokenizer, stop_token_ids
from ssb_jax.paths import shared_data_path
from ssb_jax.prompts import DEFAULT_PROMPTS
from ssb_jax.sampling.driver import Completion, Sampler
from ssb_jax.sampling.sampler import SamplingParams
from ssb_jax.training.metrics import read_metrics

VOCAB = 151936  # the real tokenizer's ids, so prompts are chat-rendered as in the pipeline


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(shared_data_path("qwen2.5_tokenizer"))


@pytest.fixture(scope="module")
def base(seed):
    config = tiny_model_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
    return init_model(config, seed, std=0.3)


def problems(n):
    return [Problem(id=f"p{i}", question=f"Tom has {i} apples and finds {i + 2} more. How many now?",
                    answer=str(2 * i + 2), source="test") for i in range(n)]


def random_adapters(model, lora_config, key):
    """Adapters with both factors random (fresh ones have B = 0, so they would not change the model)."""
    lora = init_lora(model.config, lora_config, key)
    return jax.tree.map(lambda x: 0.5 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape, x.dtype), lora)


@pytest.mark.slow  # sampling compiles over the real 151,936-token vocabulary
def test_swapped_adapters_sample_as_a_fresh_sampler_without_recompiling(base, tokenizer, seed):
    lora_config = LoraConfig(rank=4, alpha=8.0)
    loras = [random_adapters(base, lora_config, jax.random.key(seed + 1 + i)) for i in range(2)]
    curve = LearningCurve(CurveConfig(eval_every=1, eval_size=5, max_new_tokens=12), problems(7), tokenizer, base,
                          lora_config, "unused.jsonl", label="test",
                          make_sampler=lambda m, lora, c: Sampler(with_adapters(m, lora, c), tokenizer, batch_size=8,
                                                                  show_progress=False))
    prompts = [encode_chat(tokenizer, DEFAULT_PROMPTS.student_messages(p.question)) for p in problems(5)]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, stop_ids=tuple(stop_token_ids(tokenizer)))
    outputs, compilations = [], []
    for lora in loras:
        point = curve.evaluate(nnx.to_pure_dict(lora))  # as a train state holds them
        compilations.append(curve.sampler.num_compilations)
        swapped = curve.sampler.generate_ids(prompts, greedy, ids=[f"p{i}" for i in range(5)])
        fresh = Sampler(with_adapters(base, lora, lora_config), tokenizer, batch_size=8,
                        show_progress=False).generate_ids(prompts, greedy, ids=[f"p{i}" for i in range(5)])
        assert [c[0].token_ids for c in swapped] == [c[0].token_ids for c in fresh]
        lengths = [len(c[0].token_ids) for c in fresh]
        assert point["problems"] == 5 and point["mean_tokens"] == pytest.approx(np.mean(lengths))
        assert point["truncated_rate"] == pytest.approx(np.mean([c[0].finish_reason == "length" for c in fresh]))
        outputs.append([c[0].token_ids for c in fresh])
    assert compilations[0] >= 1 and compilations == [compilations[0]] * 2, compilations
    assert outputs[0] != outputs[1]  # the adapters change the answers, so the swap is tested


@pytest.mark.slow  # sampling compiles over the real 151,936-token vocabulary, for both samplers
def test_points_are_the_same_from_the_rollout_engine_with_adapters_swapped(base, tokenizer, seed):
    """The pipeline's curves sample through RunContext.sampler, the rollout engine by default: its points, with
    adapters swapped in place between them, are the static Sampler's."""
    from ssb_jax.engine.engine import Engine
    lora_config = LoraConfig(rank=4, alpha=8.0)
    loras = [nnx.to_pure_dict(random_adapters(base, lora_config, jax.random.key(seed + 1 + i))) for i in range(2)]
    makers = {"engine": lambda m, lora, c: Engine(with_adapters(m, lora, c), tokenizer, slots=4, page_size=16),
              "static": lambda m, lora, c: Sampler(with_adapters(m, lora, c), tokenizer, batch_size=8,
                                                   show_progress=False)}
    prompts = [encode_chat(tokenizer, DEFAULT_PROMPTS.student_messages(p.question)) for p in problems(5)]
    points, tokens = {kind: [] for kind in makers}, {kind: [] for kind in makers}
    for kind, make in makers.items():
        curve = LearningCurve(CurveConfig(eval_every=1, eval_size=5, max_new_tokens=12), problems(7), tokenizer,
                              base, lora_config, "unused.jsonl", label="test", make_sampler=make)
        for lora in loras:
            points[kind].append({k: v for k, v in curve.evaluate(lora).items() if k != "eval_time_s"})
            answers = curve.sampler.generate_ids(prompts, curve.sampling, ids=[p.id for p in problems(5)])
            tokens[kind].append([c[0].token_ids for c in answers])
    assert points["engine"] == points["static"] and tokens["engine"] == tokens["static"]
    assert tokens["static"][0] != tokens["static"][1]  # the adapters change the answers, so the swap is tested


class ScriptedSampler:
    """Answers from a table; counts weight swaps."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.swaps, self.max_prompt_tokens = tokenizer, texts, 0, 10_000

    def set_adapters(self, lora):
        self.swaps += 1

    def generate_ids(self, prompts, sampling, *, n=1, seed=0, ids=None):
        out = []
        for key in ids:
            text, finish = self.texts[key]
            out.append([Completion(token_ids=self.tokenizer.encode(text), finish_reason=finish, text=text)])
        return out


def small_model(seed):
    return init_model(tiny_model_config(vocab_size=64, hidden_size=32, intermediate_size=64), seed, std=0.2)


def test_points_statistics_resume_and_plot(tokenizer, tmp_path, seed, rng):
    base = small_model(seed)  # answers are scripted; the model only gives the adapters' shapes
    chosen = problems(9)
    texts, correct, lengths, cut = {}, [], [], []
    for p in chosen:
        kind = rng.integers(3)
        text = {0: f"so \\boxed{{{p.answer}}}", 1: "so \\boxed{1000}", 2: "no answer " * rng.integers(1, 5)}[kind]
        finish = "length" if kind == 2 and rng.random() < 0.7 else "stop"
        texts[p.id] = (text, finish)
        correct.append(kind == 0)
        lengths.append(len(tokenizer.encode(text)))
        cut.append(finish == "length")
    metrics = tmp_path / "metrics.jsonl"
    lora_config = LoraConfig(rank=2, alpha=2.0)
    lora = init_lora(base.config, lora_config, jax.random.key(0))
    scripted = ScriptedSampler(tokenizer, texts)

    def curve():
        return LearningCurve(CurveConfig(eval_every=3, eval_size=9), chosen + problems(12)[9:], tokenizer, base,
                             lora_config, metrics, label="ssb", make_sampler=lambda *_: scripted)

    first = curve()
    assert [s for s in range(11) if first.due(s, 10)] == [0, 3, 6, 9, 10]
    assert first.maybe_record(1, 10, lora, 77) is None
    point = first.maybe_record(0, 10, lora, 77)
    n = len(chosen)
    assert point["problems"] == n and point["correct"] == sum(correct) and point["sampled_tokens"] == 77
    assert point["accuracy"] == pytest.approx(np.mean(correct))
    assert point["se"] == pytest.approx(np.sqrt(np.mean(correct) * (1 - np.mean(correct)) / n))
    assert point["mean_tokens"] == pytest.approx(np.mean(lengths))
    assert point["truncated_rate"] == pytest.approx(np.mean(cut))
    first.maybe_record(3, 10, lora, 77)
    assert first.maybe_record(3, 10, lora, 77) is None  # recorded once
    again = curve()  # a resumed run: what is in the file is not redone
    assert again.maybe_record(3, 10, lora, 77) is None and again.maybe_record(6, 10, lora, 77) is not None
    assert [p["step"] for p in read_curve(metrics)] == [0, 3, 6]
    assert scripted.swaps == 1  # each curve builds its sampler once (make_sampler), then swaps weights in
    assert read_metrics(tmp_path) == []  # curve points are not training records
    out = plot_curves({"ssb": read_curve(metrics), "grpo": [{**p, "sampled_tokens": 10 * p["step"], "method": "grpo"}
                                                           for p in read_curve(metrics)]}, tmp_path / "c.png")
    assert out.exists() and out.stat().st_size > 1000


@pytest.mark.e2e
@pytest.mark.slow  # two training runs (one stopped, one resumed) with learning curves
def test_killed_training_neither_loses_nor_repeats_points(tokenizer, tmp_path, seed, rng):
    """The bookkeeping of points around a kill (the sampling itself is tested above, so answers are scripted)."""
    small = small_model(seed)
    config = small.config
    records = random_records(rng, 10, config.vocab_size)
    tc = TrainConfig(lora_rank=4, lora_alpha=8.0, learning_rate=5e-2, batch_size=4, epochs=3, min_bucket=8,
                     length_buckets=(32,), max_seq_len=32, checkpoint_every=3, seed=3,
                     logits_chunk=0)  # 8 steps of one shape (one compile), checkpoints at 3, 6, 8
    scripted = ScriptedSampler(tokenizer, {p.id: (f"\\boxed{{{p.answer}}}", "stop") for p in problems(3)})
    built = []

    def train(**kw):
        curve = LearningCurve(CurveConfig(eval_every=2, eval_size=3), problems(3), tokenizer, small, tc.lora_config(),
                              tmp_path / "metrics.jsonl", label="ssb",
                              make_sampler=lambda *_: built.append(1) or scripted)
        return run(tc, config, small, records, tmp_path, progress=False, curve=curve, sampled_tokens=1234, **kw)

    train(stop_after=5)  # "killed" after step 5; the last checkpoint is step 3
    assert [p["step"] for p in read_curve(tmp_path / "metrics.jsonl")] == [0, 2, 4]
    train()
    points = read_curve(tmp_path / "metrics.jsonl")
    assert [p["step"] for p in points] == [0, 2, 4, 6, 8]  # 4 was dropped with the steps after the checkpoint
    assert {p["sampled_tokens"] for p in points} == {1234} and {p["accuracy"] for p in points} == {1.0}
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))
    assert built == [1, 1] and scripted.swaps == 4  # built once per run, then swapped (2, 4; then 6, 8)
    assert (tmp_path / "training.png").exists()  # the curve's figure is the report's learning_curves.png only
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("key,value,message", [("eval_every", -1, ">= 0"), ("eval_size", 0, "> 0"),
                                               ("max_new_tokens", -5, ">= 0")])
def test_curve_settings_are_range_checked(key, value, message):
    from ssb_jax.config import base_config, section_to
    section = base_config().curves
    assert CurveConfig(**section).enabled is False  # off unless a config turns it on
    section[key] = value
    with pytest.raises(ValueError, match=f"config.curves: {key} must be {message}"):
        section_to(CurveConfig, section, "config.curves")


def test_widen_gives_each_axis_a_minimum_span(rng):
    from ssb_jax.curves import MIN_SPAN, widen
    mean = float(rng.uniform(20, 300))
    low, high = widen(mean, mean + 0.06, "mean_tokens")  # the 0.06-token axis of a flat length curve
    assert high - low >= max(MIN_SPAN["mean_tokens"][0], MIN_SPAN["mean_tokens"][1] * mean) - 1e-9
    assert low <= mean and high >= mean + 0.06
    assert widen(0.0, 0.0, "truncated_rate") == (0.0, MIN_SPAN["truncated_rate"][0])  # shifted, not below 0
    assert widen(0.99, 1.0, "accuracy") == (1.0 - MIN_SPAN["accuracy"][0], 1.0)
    assert widen(0.2, 0.7, "accuracy") == (0.2, 0.7)  # wide enough already


def test_upfront_sampling_is_drawn_as_an_offset_and_said(monkeypatch, tmp_path, rng):
    """SSB's points (all sampled before step 0) stand at x = its cost, reached by a dashed segment from 0; the
    legend and caption say so; GRPO's points follow its own count; every y-axis spans its minimum."""
    from ssb_jax import curves as curves_module
    figures = []
    monkeypatch.setattr(curves_module, "save_plot", lambda fig, out, rect=None: figures.append(fig) or out)
    cost = int(rng.integers(1000, 90000))
    ssb = [{"step": s, "sampled_tokens": cost, "accuracy": 0.5 + 0.01 * s, "mean_tokens": 30 + 0.01 * s,
            "truncated_rate": 0.0} for s in (0, 4, 8)]
    grpo = [{"step": s, "sampled_tokens": 500 * s, "accuracy": 0.4, "mean_tokens": 40.0, "truncated_rate": 0.1}
            for s in (0, 5, 10)]
    plot_curves({"ssb": ssb, "grpo": grpo}, tmp_path / "c.png")
    (fig,) = figures
    tokens_axes = fig.axes[1::2]  # row by row: (steps, tokens)
    for ax, (key, _) in zip(tokens_axes, curves_module.PLOTTED):
        lines = ax.get_lines()
        dashed = [line for line in lines if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [0, cost]
        ssb_points = next(line for line in lines if "before step 0" in line.get_label())
        assert set(ssb_points.get_xdata()) == {cost} and f"{cost:,}" in ssb_points.get_label()
        grpo_points = next(line for line in lines if line.get_label() == "grpo")
        assert list(grpo_points.get_xdata()) == [0, 2500, 5000]
        low, high = ax.get_ylim()
        assert high - low >= curves_module.MIN_SPAN[key][0]
    assert any("before step 0" in text.get_text() for text in fig.texts)
