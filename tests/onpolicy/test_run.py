"""The on-policy trainer on the shared loop, killed and resumed in process: every iteration done once."""
import jax
import jax.numpy as jnp
import pytest

from ssb_jax.distill.config import TrainConfig
from ssb_jax.onpolicy.config import SDPOConfig
from tests.grpo.test_grpo import HashTokenizer, ScriptedPolicy


@pytest.fixture(scope="module")
def tiny():
    from ssb_jax.distill.synthetic import tiny_model_config
    from ssb_jax.model.lora import LoraConfig
    from ssb_jax.model.qwen2 import init_model
    config = tiny_model_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    return config, init_model(config, 0, std=0.2), LoraConfig(rank=4, alpha=8.0)


@pytest.mark.e2e
@pytest.mark.slow  # three runs in process: uninterrupted, stopped, resumed
def test_run_killed_and_resumed_repeats_the_uninterrupted_run(tiny, tmp_path, rng):
    """SDPO-style (peer context, EMA teacher, JSD on top-k + tail) mixed half and half with SSB's offline loss:
    the resumed run's records, adapters and EMA teacher are the uninterrupted run's, and its checkpointed
    position is the iteration count and the tokens sampled."""
    from ssb_jax.data.datasets import Problem
    from ssb_jax.distill.synthetic import random_records
    from ssb_jax.onpolicy.run import dataset_questions, run
    from ssb_jax.training.checkpoint import Checkpoints, abstract
    from ssb_jax.training.metrics import read_metrics
    config, model, lora_config = tiny
    problems = [Problem(id=f"q{i}", question=f"What is {i} - {i - 1}?", answer="1", source="test") for i in range(5)]
    oc = SDPOConfig(steps=4, prompts_per_step=2, samples_per_prompt=3, max_new_tokens=8, topk=8, logits_chunk=4,
                    learning_rate=1e-2, checkpoint_every=2, grader="string_match", onpolicy_weight=0.5, ema_decay=0.5,
                    lora_rank=4, lora_alpha=8.0, min_bucket=16)
    tc = TrainConfig(batch_size=2, logits_chunk=4, lora_rank=4, lora_alpha=8.0)
    offline = random_records(rng, 5, 64, teacher_prompt=(4, 8), student_prompt=(2, 6), solution=(3, 6))  # one bucket

    def train(workdir, **kw):
        return run(oc, config, lora_config, model, ScriptedPolicy(), dataset_questions(problems, "peer"),
                   HashTokenizer(), workdir, offline_records=offline, offline_config=tc, progress=False,
                   tensorboard=False, **kw)

    def without_times(records):
        return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records]

    full = train(tmp_path / "full")
    assert not full["interrupted"] and [r["step"] for r in full["history"]] == [1, 2, 3, 4]
    part = train(tmp_path / "resumed", stop_after=3)  # killed after iteration 3; the last checkpoint is iteration 2
    assert part["interrupted"] and len(part["history"]) == 3
    rest = train(tmp_path / "resumed")
    assert rest["start"] == 2 and [r["step"] for r in rest["history"]] == [3, 4]
    assert without_times(read_metrics(tmp_path / "resumed")) == without_times(read_metrics(tmp_path / "full"))
    history = full["history"]
    assert [r["updates"] for r in history] == [1, 2, 3, 4]
    tokens = [r["sampled_tokens"] for r in history]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert any(0 < r["with_context_share"] for r in history)  # some samples had a successful peer
    assert all(r["offline_loss"] > 0 for r in history)
    for key in ("lora", "ema"):
        diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), full["state"][key],
                                       rest["state"][key])
        assert max(jax.tree_util.tree_leaves(diffs)) < 1e-6, key
    with Checkpoints(tmp_path / "resumed", oc.keep_checkpoints, json_items=("progress",)) as checkpoints:
        _, items = checkpoints.restore(4, abstract(full["state"]))
    assert items["progress"] == {"iteration": 4, "sampled_tokens": tokens[-1]}
    for name in ("onpolicy_config.json", "lora_config.json", "onpolicy.png"):  # the plot: the loop's plot hook
        assert (tmp_path / "resumed" / name).exists(), name
