"""The plain SFT baseline: its loss is the cross-entropy alone (float64 NumPy reference, value and
gradient); the sft stage trains its own adapters on a reduced toy world beside SSB, with learning curves."""
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssb_jax.distill.config import TrainConfig
from ssb_jax.distill.loss import distill_objective


def numpy_cross_entropy(hidden, head, targets, mask):
    """(mean CE over the masked answer tokens, its gradient with respect to hidden), in float64."""
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    count = mask.sum()
    onehot = np.eye(head.shape[1])[targets]
    grad = ((np.exp(logp) - onehot) * (mask[..., None] / count)) @ head.T.astype(np.float64)
    return (nll * mask).sum() / count, grad


@pytest.mark.parametrize("chunk", [0, 4])
def test_sft_loss_is_cross_entropy_alone(chunk):
    seed = np.random.randint(1 << 30)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    B, A, D, V = 3, 11, 16, 37
    student = rng.standard_normal((B, A, D)).astype(np.float32)
    teacher = rng.standard_normal((B, A, D)).astype(np.float32)  # far from the student: a large KL
    head = rng.standard_normal((D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, A))
    mask = np.arange(A)[None] < rng.integers(1, A + 1, B)[:, None]
    tc = TrainConfig().as_sft()
    assert (tc.kl_weight, tc.ce_weight) == (0.0, 1.0)

    def loss(hidden):
        return distill_objective(hidden, jnp.asarray(teacher), jnp.asarray(targets), jnp.asarray(mask),
                                 jnp.asarray(head), temperature=tc.temperature, kl_weight=tc.kl_weight,
                                 ce_weight=tc.ce_weight, chunk=chunk)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(student))
    expected, expected_grad = numpy_cross_entropy(student, head, targets, mask)
    assert float(metrics["kl"]) > 0.1  # the KL is there to leave out
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="both 0"):
        TrainConfig(kl_weight=0.0, ce_weight=0.0)


def test_sft_stage_beside_ssb_with_learning_curves(tmp_path):
    from ssb_jax import curate
    from ssb_jax.curves import read_curve
    from ssb_jax.data.records import RecordStore
    from ssb_jax.model.config import ModelConfig
    from ssb_jax.train import load_lora, read_metrics
    from tests.test_main import _check, pipeline

    workdir = tmp_path / "run"
    run = pipeline(workdir, "--config.stages=curate,train,sft,eval,report", "--config.curves.eval_every=4",
                   "--config.curves.eval_size=6", "--config.eval.n_samples=0", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    stdout, stderr = run.communicate(timeout=3600)  # two trainings after the world: slow on a loaded machine
    log = _check(subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr))
    rdir = workdir / "round_1"
    assert (rdir / "sft" / "DONE.json").exists() and "learning curve sft" in log
    ssb_fp, sft_fp = (json.loads((rdir / d / "FINGERPRINT.json").read_text()) for d in ("train", "sft"))
    assert ssb_fp != sft_fp
    model_config = ModelConfig.from_json(workdir / "world" / "model" / "config.json")
    ssb_lora, _ = load_lora(rdir / "train", model_config)
    sft_lora, _ = load_lora(rdir / "sft", model_config)
    gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ssb_lora, sft_lora))
    assert max(gaps) > 1e-4
    for record in read_metrics(rdir / "sft"):  # SFT trains on the CE alone
        assert record["loss"] == pytest.approx(record["ce"], rel=1e-6)
    for record in read_metrics(rdir / "train"):
        assert record["loss"] == pytest.approx(4.0 * record["kl"], rel=1e-5)  # T = 2, no CE
    tokens = curate.sampled_tokens(RecordStore(rdir / "curate" / curate.RECORDS_FILE).read_all())["total"]
    total = len(read_metrics(rdir / "train"))
    curves = {d: read_curve(rdir / d / "metrics.jsonl") for d in ("train", "sft")}
    for d, points in curves.items():
        assert [p["step"] for p in points] == sorted({*range(0, total, 4), total}), d
        assert {p["sampled_tokens"] for p in points} == {tokens} and tokens > 0
        assert {p["problems"] for p in points} == {6}
    assert curves["train"][0]["method"] == "ssb" and curves["sft"][0]["method"] == "sft"
    # step 0: both are the base (fresh adapters have B = 0), on the same problems
    assert {k: curves["train"][0][k] for k in ("accuracy", "mean_tokens")} == \
        {k: curves["sft"][0][k] for k in ("accuracy", "mean_tokens")}
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert {row["model"] for row in results["rows"]} == {"base", "student", "sft"}
    report = (workdir / "report.md").read_text()
    assert "SFT baseline" in report and "Learning curves" in report
    assert (rdir / "learning_curves.png").exists() and (rdir / "train" / "curves.png").exists()
