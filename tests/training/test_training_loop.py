"""The shared training loop on a tiny JAX state (a linear model fitted by SGD-like steps on seeded
batches): a run killed by stop_after and resumed gives the uninterrupted run's history and state,
metrics.jsonl is truncated to the checkpoint on resume, hooks run in their documented order, a run
without a workdir keeps nothing on disk; and the settings, optimiser builder and checkpoint module."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssb_jax.training.checkpoint import Checkpoints, abstract
from ssb_jax.training.loop import Hooks, TrainingLoop, host_numbers, iterator_batches
from ssb_jax.training.metrics import METRICS_FILE, Progress, read_metrics, read_records, resume_metrics
from ssb_jax.training.optim import make_optimizer, make_schedule
from ssb_jax.training.settings import CheckpointSettings, LoraSettings, OptimizerSettings

DIM = 3


class SeededBatches:
    """Batch i is drawn from a generator seeded by (seed, i): its position is the batch count."""

    def __init__(self, seed: int, rows: int = 4):
        self.seed, self.rows, self.position = seed, rows, 0
        self.true_w = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)

    def next_batch(self, state):
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        x = rng.normal(size=(self.rows, DIM)).astype(np.float32)
        return x, x @ self.true_w + 0.01 * rng.normal(size=self.rows).astype(np.float32)

    def get_state(self):
        return {"position": self.position}

    def set_state(self, position):
        self.position = position["position"]


@jax.jit
def _sgd(state, x, y):
    loss, grad = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(state["w"])
    return {"w": state["w"] - 0.1 * grad, "step": state["step"] + 1}, {"loss": loss, "grad_norm": jnp.linalg.norm(grad)}


def sgd_step(state, batch):
    state, metrics = _sgd(state, *batch)
    return state, host_numbers(metrics)


def initial_state():
    return {"w": jnp.zeros(DIM, jnp.float32), "step": jnp.zeros((), jnp.int32)}


def make_loop(workdir, total=7, every=3, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("tensorboard", False)
    kw.setdefault("checkpoints", CheckpointSettings(checkpoint_every=every))
    return TrainingLoop(workdir, total, sgd_step, **kw)


def test_a_killed_and_resumed_run_repeats_the_uninterrupted_one(tmp_path, seed):
    full = make_loop(tmp_path / "full").run(initial_state(), SeededBatches(seed))
    assert not full.interrupted and full.start_step == 0 and [r["step"] for r in full.history] == list(range(1, 8))

    part = make_loop(tmp_path / "resumed").run(initial_state(), SeededBatches(seed), stop_after=5)
    assert part.interrupted and len(part.history) == 5  # killed after step 5; the last checkpoint is step 3
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    rest = make_loop(tmp_path / "resumed").run(initial_state(), SeededBatches(seed))
    assert rest.start_step == 3 and [r["step"] for r in rest.history] == [4, 5, 6, 7]
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "full")  # none twice, none missing
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in full.history[3:]]
    np.testing.assert_array_equal(np.asarray(rest.state["w"]), np.asarray(full.state["w"]))
    assert int(rest.state["step"]) == 7
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["3", "6", "7"]

    again = make_loop(tmp_path / "full").run(initial_state(), SeededBatches(seed))  # finished: nothing to do
    assert again.history == [] and again.start_step == 7


def test_metrics_are_truncated_to_the_checkpoint_and_a_fresh_run_starts_them_anew(tmp_path):
    path = tmp_path / METRICS_FILE
    lines = [{"step": 1, "loss": 1.0}, {"kind": "curve", "step": 2}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25},
             {"kind": "curve", "step": 4}, {"step": 4, "loss": 0.125}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert resume_metrics(tmp_path, 2) == path
    assert read_records(path) == lines[:3]  # curve points of later steps go too
    assert read_metrics(tmp_path) == [lines[0], lines[2]]
    resume_metrics(tmp_path, 0)
    assert not path.exists()


def test_hooks_run_in_order(tmp_path, seed):
    calls = []
    hooks = Hooks(on_step=lambda record: calls.append(("step", record["step"])),
                  curve_point=lambda step, total, state, writer: calls.append(("curve", step, total, int(state["step"]))),
                  before_checkpoint=lambda step, state: calls.append(("before_checkpoint", step, int(state["step"]))),
                  on_checkpoint=lambda step: calls.append(("checkpoint", step)))
    make_loop(tmp_path, total=4, every=2, hooks=hooks).run(initial_state(), SeededBatches(seed))
    assert calls == [("curve", 0, 4, 0),
                     ("step", 1), ("curve", 1, 4, 1),
                     ("step", 2), ("curve", 2, 4, 2), ("before_checkpoint", 2, 2), ("checkpoint", 2),
                     ("step", 3), ("curve", 3, 4, 3),
                     ("step", 4), ("curve", 4, 4, 4), ("before_checkpoint", 4, 4), ("checkpoint", 4)]
    calls.clear()
    make_loop(tmp_path / "killed", total=4, every=2, hooks=hooks).run(initial_state(), SeededBatches(seed),
                                                                      stop_after=1)
    assert calls == [("curve", 0, 4, 0), ("step", 1)]  # killed: no point, no checkpoint after the last step


def test_records_config_files_tensorboard_and_plot(tmp_path, seed):
    plotted = []
    make_loop(tmp_path, total=3, tensorboard=True, tag="fit", config_files={"fit_config.json": "{}"},
              plot=plotted.append, checkpoints=CheckpointSettings(log_every=2)).run(initial_state(), SeededBatches(seed))
    assert plotted == [tmp_path] and (tmp_path / "fit_config.json").read_text() == "{}"
    records = read_metrics(tmp_path)
    assert [sorted(r) for r in records] == [["grad_norm", "loss", "step"]] * 3
    assert all(isinstance(v, float) for r in records for k, v in r.items() if k != "step")
    assert scalar_steps(tmp_path / "tb", "fit/loss") == [2]  # every log_every steps


def scalar_steps(directory, tag: str) -> list[int]:
    """The steps of a TensorBoard scalar, read from the event files (length-prefixed records)."""
    import struct
    from tensorboardX.proto import event_pb2
    steps = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (size,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + size])  # after the length and its checksum
            steps += [event.step for value in event.summary.value if value.tag == tag]
            at += 16 + size
    return steps


def test_in_memory_run_over_an_iterator(tmp_path, seed):
    source = SeededBatches(seed)
    listed = [source.next_batch(None) for _ in range(5)]
    batches = iterator_batches(iter(listed))
    assert not hasattr(batches, "get_state")  # a plain iterator has no position to checkpoint
    result = make_loop(None, total=5).run(initial_state(), batches)
    state, records = initial_state(), []
    for batch in listed:  # the same steps by hand
        state, record = sgd_step(state, batch)
        records.append(record)
    assert [{k: v for k, v in r.items() if k != "step"} for r in result.history] == records
    np.testing.assert_array_equal(np.asarray(result.state["w"]), np.asarray(state["w"]))
    assert not list(tmp_path.iterdir())


def test_progress_lines_off_a_terminal(caplog):
    import logging
    caplog.set_level(logging.INFO, logger="ssb_jax.training.metrics")
    progress = Progress(10, 4, desc="fitting", label="fit", initial=2, terminal=False, main_process=True)
    for done in range(3, 11):
        progress.update(done, {"loss": f"{1 / done:.3f}"})
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("fit step 3/10: loss 0.333 (compiling included, it took ")
    assert [line.split(" ")[2] for line in lines[1:]] == ["4/10", "8/10", "10/10"]
    assert lines[-1].startswith("fit step 10/10 (100%): loss 0.100, ")


# ----------------------------------------------------------------------------- settings, optimiser, checkpoints

def test_shared_settings_check_their_fields_and_carry_help():
    import dataclasses
    from ssb_jax.distill.config import TrainConfig
    from ssb_jax.grpo.config import GRPOConfig
    from ssb_jax.settings import help_texts
    with pytest.raises(ValueError, match="learning_rate must be > 0, got 0.0"):
        OptimizerSettings(learning_rate=0.0)
    with pytest.raises(ValueError, match="schedule must be 'linear', 'cosine' or 'constant', got 'step'"):
        GRPOConfig(schedule="step")
    with pytest.raises(ValueError, match="keep_checkpoints must be > 0"):
        TrainConfig(keep_checkpoints=0)
    with pytest.raises(ValueError, match="lora_rank must be a positive integer"):
        LoraSettings(lora_rank=0)
    for cls in (OptimizerSettings, CheckpointSettings, LoraSettings, TrainConfig, GRPOConfig):
        fields = [f.name for f in dataclasses.fields(cls)]
        assert sorted(help_texts(cls)) == sorted(fields), cls
    gc = GRPOConfig()  # GRPO's own defaults for shared settings; the help of an unchanged one is shared
    assert (gc.learning_rate, gc.schedule, gc.checkpoint_every, gc.keep_checkpoints) == (1e-5, "constant", 10, 2)
    assert help_texts(GRPOConfig)["keep_checkpoints"] == help_texts(TrainConfig)["keep_checkpoints"]
    # GRPO trains the student's adapter shape unless its own lora_rank / lora_alpha (0: the student's) say otherwise
    assert not issubclass(GRPOConfig, LoraSettings)
    assert {f.name for f in dataclasses.fields(LoraSettings)} & {f.name for f in dataclasses.fields(GRPOConfig)} == \
        {"lora_rank", "lora_alpha"}
    assert (gc.lora_rank, gc.lora_alpha) == (0, 0.0)
    tc = TrainConfig(lora_rank={"q": 4, "v": 8})
    assert TrainConfig.from_dict(json.loads(tc.to_json())) == tc and hash(tc) == hash(tc.replace())


def test_cosine_schedule_with_an_end_value_is_optax_warmup_cosine():
    settings = OptimizerSettings(learning_rate=3e-3, schedule="cosine", warmup_steps=7, adam_b2=0.98,
                                 weight_decay=0.01)
    ours = make_schedule(settings, 50, end_learning_rate=3e-3 * 0.05)
    reference = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 7, 50, end_value=3e-3 * 0.05)
    for step in (0, 3, 7, 20, 49, 50, 60):
        assert float(ours(step)) == float(reference(step)), step
        assert float(jax.jit(ours)(step)) == float(jax.jit(reference)(step)), step
    optimizer, _ = make_optimizer(settings, 50, end_learning_rate=3e-3 * 0.05)
    assert optimizer.init({"w": jnp.zeros(2)})  # clip + adamw


def test_checkpoints_keep_the_newest_and_restore_json_items(tmp_path):
    state = {"w": jnp.arange(4.0), "step": jnp.ones((), jnp.int32)}
    with Checkpoints(tmp_path, keep=2, json_items=("data",)) as checkpoints:
        assert checkpoints.latest_step() is None
        for step in (1, 2, 3):
            checkpoints.save(step, jax.tree.map(lambda x: x * step, state), data={"position": step})
        with pytest.raises(ValueError, match="JSON items"):
            checkpoints.save(4, state)
    with Checkpoints(tmp_path, keep=2, json_items=("data",)) as checkpoints:
        assert checkpoints.latest_step() == 3
        restored, items = checkpoints.restore(3, abstract(state))
        assert items == {"data": {"position": 3}}
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0) * 3)
        alone, none = checkpoints.restore(2, abstract(state), json_items=False)
        assert none == {} and int(alone["step"]) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
