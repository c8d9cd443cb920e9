"""Evaluation results reach TensorBoard: one run per model under eval/tb, read back from the event files."""
import struct

from ssb_jax.training.metrics import write_eval_tensorboard


def scalars(directory) -> dict:
    """{tag: value} of every scalar in a directory's event files (length-prefixed records)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (size,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + size])
            out.update({v.tag: v.simple_value for v in event.summary.value})
            at += 16 + size
    return out


def test_eval_rows_become_scalars_per_model(tmp_path, rng):
    rows = [{"model": model, "dataset": "world_test", "protocol": "math_verify", "metric": metric,
             "accuracy": float(rng.uniform()), "mean_tokens": float(rng.uniform(10, 90))}
            for model in ("base", "student") for metric in ("pass@1", "maj@4")]
    root = write_eval_tensorboard(tmp_path, rows)
    write_eval_tensorboard(tmp_path, rows)  # rewritten, not appended
    assert sorted(p.name for p in root.iterdir()) == ["base", "student"]
    for model in ("base", "student"):
        assert len(list((root / model).glob("events.out.tfevents.*"))) == 1
        logged = scalars(root / model)
        for row in (r for r in rows if r["model"] == model):
            tag = f"eval/world_test/math_verify/{row['metric'].replace('@', '_at_')}"
            assert abs(logged[f"{tag}/accuracy_pct"] - 100 * row["accuracy"]) < 1e-4
            assert abs(logged[f"{tag}/mean_tokens"] - row["mean_tokens"]) < 1e-4
