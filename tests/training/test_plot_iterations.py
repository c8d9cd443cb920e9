"""The one drawing of an on-policy trainer's records (training.metrics.plot_iterations): GRPO's grpo.png and
the on-policy stages' <stage>.png, from hand-written metrics.jsonl files."""
import json

import pytest

from ssb_jax.grpo import run as grpo_run
from ssb_jax.onpolicy import run as onpolicy_run
from ssb_jax.training import metrics


def _records(workdir, rng, keys, n):
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [{"step": i + 1, **{k: float(rng.uniform()) for k in keys}, "sampled_tokens": 100 * (i + 1)}
            for i in range(n)]
    curve = {"kind": "curve", "step": 0, "accuracy": 0.5}  # learning-curve points share the file: not drawn
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [curve] + rows))
    return rows


@pytest.fixture
def drawn(monkeypatch):
    """The panels of each figure saved: [(title, x label, x values, y values)] per figure, and the path."""
    figures = []
    save = metrics.save_plot

    def capture(fig, out, rect=None):
        figures.append(([(ax.get_title(), ax.get_xlabel(), list(ax.lines[0].get_xdata()),
                          list(ax.lines[0].get_ydata())) for ax in fig.axes if ax.lines], out))
        return save(fig, out, rect)
    monkeypatch.setattr(metrics, "save_plot", capture)
    return figures


@pytest.mark.parametrize("loss_key, clip", [("divergence", True), ("reverse_kl", False),
                                            ("onpolicy_divergence", True)])
def test_onpolicy_plot_draws_its_metrics_per_iteration_and_accuracy_against_sampled_tokens(tmp_path, rng, drawn,
                                                                                           loss_key, clip):
    keys = ["loss", loss_key, "accuracy", "completion_len_mean", "clipped_share", "grad_norm", "lr"]
    rows = _records(tmp_path / "opsd", rng, keys, int(rng.integers(2, 6)))
    out = onpolicy_run.plot_metrics(tmp_path / "opsd", tag="opsd", clipped=clip)
    assert out == tmp_path / "opsd" / "opsd.png" and out.stat().st_size > 0
    (panels, _), = drawn
    plotted = [key for key in ("loss", loss_key, "accuracy", "completion_len_mean", "clipped_share", "grad_norm")
               if clip or key != "clipped_share"]
    assert len(panels) == len(plotted) + 1
    for (title, xlabel, xs, ys), key in zip(panels, plotted):
        assert xlabel == "iteration" and xs == [r["step"] for r in rows] and ys == [r[key] for r in rows], title
    title, xlabel, xs, ys = panels[-1]
    assert (title, xlabel) == ("accuracy of the samples vs sampled tokens", "sampled tokens")
    assert xs == [r["sampled_tokens"] for r in rows] and ys == [r["accuracy"] for r in rows]


def test_grpo_plot_is_drawn_by_the_same_helper_into_grpo_png(tmp_path, rng, drawn):
    keys = [k for k, _ in grpo_run.PLOTTED if k != "kl"] + ["reward_mean"]  # a key the records lack is left out
    rows = _records(tmp_path, rng, keys, 3)
    assert grpo_run.plot_metrics(tmp_path) == tmp_path / "grpo.png"
    (panels, _), = drawn
    assert [p[0] for p in panels] == [title for k, title in grpo_run.PLOTTED if k != "kl"] + \
        ["mean reward vs sampled tokens"]
    assert panels[-1][3] == [r["reward_mean"] for r in rows]
    assert metrics.plot_iterations(tmp_path / "empty", grpo_run.PLOTTED, ("reward_mean", "r"), tmp_path / "x.png") \
        is None
