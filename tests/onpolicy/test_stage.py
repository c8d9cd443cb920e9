"""The opsd and sdpo stages in the pipeline on the shared reduced toy world: killed and resumed with every
iteration done once, exported, evaluated as rows named after them, and refusing to mix settings."""
import json
import subprocess

import numpy as np
import pytest

# Short runs (the stages only have to run): OPSD one sample per question, SDPO groups of four.
ONPOLICY_RUN = ["--config.sampler.batch_size=8",
                "--config.opsd.steps=4", "--config.opsd.prompts_per_step=4", "--config.opsd.max_new_tokens=48",
                "--config.opsd.checkpoint_every=1", "--config.opsd.learning_rate=1e-3",
                "--config.sdpo.steps=2", "--config.sdpo.prompts_per_step=2", "--config.sdpo.max_new_tokens=48",
                "--config.sdpo.learning_rate=1e-3", "--config.export.merged_model=False",
                "--config.eval.n_samples=0", "--config.eval.max_problems=4", "--config.eval.max_new_tokens=48"]


@pytest.mark.e2e
@pytest.mark.slow  # builds a toy world, then an opsd run killed and resumed, an sdpo run, evaluation and report
def test_opsd_and_sdpo_stages_resume_after_a_kill_and_are_evaluated(tmp_path, toy_world):
    from tests.pipeline_runs import check, copy_world, kill_after_steps, pipeline, pipeline_in_process
    from ssb_jax.training.metrics import read_metrics
    workdir = tmp_path / "run"
    copy_world(toy_world, workdir)
    metrics = workdir / "opsd" / "metrics.jsonl"
    proc = pipeline(workdir, *ONPOLICY_RUN, "--config.stages=opsd", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    kill_after_steps(proc, metrics, 2, 900, "opsd")
    assert not (workdir / "opsd" / "DONE.json").exists()

    log = check(pipeline(workdir, *ONPOLICY_RUN, "--config.stages=opsd,sdpo,eval,report"))
    assert "opsd: resumed from step" in log
    records = read_metrics(metrics.parent)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # none twice, none missing
    assert [r["updates"] for r in records] == [1, 2, 3, 4]
    for key in ("accuracy", "completion_len_mean", "divergence", "loss", "grad_norm", "clipped_share"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert all(r["with_context_share"] == 1.0 for r in records)  # every question has its reference solution
    sdpo = read_metrics(workdir / "sdpo")
    assert [r["step"] for r in sdpo] == [1, 2] and all(np.isfinite(r["loss"]) for r in sdpo)
    for stage in ("opsd", "sdpo"):
        for relative in ("DONE.json", "FINGERPRINT.json", "export/peft_adapter/adapter_model.safetensors"):
            assert (workdir / stage / relative).exists(), f"{stage}/{relative}"
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert {row["model"] for row in results["rows"]} == {"base", "opsd", "sdpo"}

    # a changed setting stops the stage rather than mixing runs
    stale = pipeline_in_process(workdir, *ONPOLICY_RUN, "--config.stages=opsd", "--config.opsd.clip=3.0")
    assert stale.returncode != 0 and "config.overwrite=opsd" in stale.stderr, stale.stderr[-2000:]
