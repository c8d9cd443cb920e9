"""The benchmarks' MFU / roofline arithmetic against hand counts, and benchmarks/device_check.sh:
shellcheck, --dry-run, and its CPU smoke mode end to end (tiny shapes, results checked for sanity)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import common
from benchmarks.device_report import summary_lines
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, student_split
from ssb_jax.model.qwen2 import abstract_model
from ssb_jax.plan.accelerators import ACCELERATORS
from tests.test_launch import _shellcheck

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def random_config(seed: int, dtype: str = "float32") -> ModelConfig:
    """Widths drawn at random; head_dim is not hidden / heads, so q_size and hidden_size differ."""
    rng = np.random.default_rng(seed)
    kv_heads = int(rng.integers(1, 4))
    return ModelConfig(vocab_size=int(rng.integers(50, 300)), hidden_size=int(rng.integers(8, 40)),
                       intermediate_size=int(rng.integers(8, 60)), num_layers=int(rng.integers(1, 4)),
                       num_heads=kv_heads * int(rng.integers(1, 4)), num_kv_heads=kv_heads,
                       head_dim=int(rng.integers(2, 12)), dtype=dtype)


def leaves(state) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(v.shape)
            for path, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}


def test_train_step_and_prefill_flops_match_a_count_over_the_model_arrays(seed, rng):
    """Hand count in float64 from the shapes of the model's own arrays (not the config's formulas):
    2 FLOPs per multiply-add; frozen kernels once forward and once backward, LoRA factors once forward
    and twice backward; attention QK^T and PV over all query-key pairs, twice in the backward pass."""
    config = random_config(seed)
    rank = int(rng.integers(1, 6))
    _, lora, base = student_split(config, LoraConfig(rank=rank, alpha=float(rank)))
    base_shapes, lora_shapes = leaves(base), leaves(lora)
    kernels = np.float64(sum(np.prod(s, dtype=np.float64) for k, s in base_shapes.items() if k.endswith("['kernel']")))
    adapters = np.float64(sum(np.prod(s, dtype=np.float64) for s in lora_shapes.values()))
    vocab, hidden = base_shapes["['embed']['embedding']"]
    q_width = base_shapes["['layers']['attn']['q_proj']['kernel']"][2]
    layers = base_shapes["['layers']['attn']['q_proj']['kernel']"][0]
    batch, answer = int(rng.integers(1, 5)), int(rng.integers(1, 30))
    student = answer + int(rng.integers(1, 30))
    teacher = student + int(rng.integers(0, 30))

    def attention(T):
        return np.float64(4.0) * layers * T * T * q_width

    logits = np.float64(2.0) * answer * hidden * vocab
    expected = {
        "teacher_forward": batch * (2 * kernels * teacher + attention(teacher) + logits),
        "student_forward": batch * ((2 * kernels + 2 * adapters) * student + attention(student) + logits),
        "student_backward": batch * ((2 * kernels + 4 * adapters) * student + 2 * attention(student) + logits),
    }
    expected["total"] = sum(expected.values())
    got = common.train_step_flops(config, batch, teacher, student, answer, rank)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
    prompt = int(rng.integers(1, 40))
    np.testing.assert_allclose(common.prefill_flops(config, batch, prompt),
                               batch * (2 * kernels * prompt + attention(prompt) + 2.0 * hidden * vocab), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_bytes_equal_the_bytes_of_the_model_weights_and_cache(dtype, seed, rng):
    config = random_config(seed, dtype)
    model = abstract_model(config)  # the shapes and dtypes of every weight, nothing allocated
    batch, context = int(rng.integers(1, 5)), int(rng.integers(1, 50))
    cache = model.init_cache(batch, context)
    weights = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert common.decode_bytes_per_step(config, batch, context) == weights + cache["k"].nbytes + cache["v"].nbytes


def test_peaks_come_from_the_table_or_the_environment(monkeypatch):
    assert common.accelerator_for("NVIDIA H200") == "H200"
    assert common.accelerator_for("NVIDIA H100 80GB HBM3") == "H100-80G"
    assert common.accelerator_for("NVIDIA A100-SXM4-40GB") == "A100-40G"
    assert common.accelerator_for("NVIDIA A100-SXM4-80GB") == "A100-80G"
    assert common.accelerator_for("TPU v5 lite") == "v5e-8" and common.accelerator_for("TPU v5") == "v5p-8"
    assert common.accelerator_for("cpu") is None
    assert (ACCELERATORS["H200"].bf16_tflops, ACCELERATORS["H200"].bandwidth_gbs) == (989, 4800)
    peaks = common.DevicePeaks("x", 500.0, 2000.0, "test")
    assert peaks.mfu(250e12, 2.0) == pytest.approx(0.25)
    assert peaks.roofline_fraction(1e9, 1e-3) == pytest.approx(0.5)
    assert common.DevicePeaks("x", None, None, "unknown").mfu(1.0, 1.0) is None
    monkeypatch.setenv(common.PEAK_TFLOPS_ENV, "123.5")
    monkeypatch.setenv(common.BANDWIDTH_ENV, "456")
    overridden = common.device_peaks()
    assert (overridden.bf16_tflops, overridden.bandwidth_gbs) == (123.5, 456.0) and "overridden" in overridden.source
    monkeypatch.delenv(common.PEAK_TFLOPS_ENV)
    monkeypatch.delenv(common.BANDWIDTH_ENV)
    measured = common.device_peaks(copy_megabytes=8)  # the tests run on the CPU: measured there
    assert measured.bf16_tflops > 0 and measured.bandwidth_gbs > 0 and "measured" in measured.source


@pytest.mark.parametrize("shape,name", [("0.5b", "Qwen2.5-0.5B-Instruct"), ("3b", "Qwen2.5-3B-Instruct")])
def test_shape_presets_are_the_real_configs(shape, name):
    from ssb_jax.paths import shared_data_dir
    path = shared_data_dir() / "qwen2.5_configs" / name / "config.json"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    real = ModelConfig.from_json(path)
    assert common.model_config(shape).param_count() == real.param_count()
    assert all(getattr(real, k) == v for k, v in common.SHAPES[shape].items())


def test_decode_split_never_reports_a_negative_speed():
    """Decode time is the whole run minus the one-token run; when noise makes that difference zero or
    negative the decode fields are None with the reason, and otherwise they follow the formula."""
    from benchmarks.sampling import _with_decode_split
    split = _with_decode_split(total_s=2.0, prefill_s=0.5, batch=4, new_tokens=31)
    assert split["decode_step_ms"] == pytest.approx(1e3 * 1.5 / 30)
    assert split["decode_tokens_per_s"] == pytest.approx(4 / (1.5 / 30))
    assert split["tokens_per_s"] == pytest.approx(4 * 31 / 2.0) and "decode_unresolved" not in split
    for total, one in ((0.010, 0.011), (0.010, 0.010)):
        noisy = _with_decode_split(total_s=total, prefill_s=one, batch=2, new_tokens=8)
        assert noisy["decode_step_ms"] is None and noisy["decode_tokens_per_s"] is None
        assert "no decode time" in noisy["decode_unresolved"] and noisy["tokens_per_s"] == pytest.approx(16 / total)


def test_interleaved_timing_alternates_the_two_runs_and_keeps_each_ones_best():
    from benchmarks.sampling import best_of_interleaved
    calls = []
    best_of_interleaved(lambda: calls.append("all"), lambda: calls.append("one"), repeats=3)
    assert calls == ["all", "one"] * 3


def test_device_check_script_is_shellcheck_clean():
    done = subprocess.run([_shellcheck(), "--shell=bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dry_run_prints_the_device_steps_and_runs_nothing(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    env.pop("SMOKE", None)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    steps = {line.split()[0]: line for line in done.stdout.splitlines()}
    # the numbers first, the tests last
    assert list(steps) == ["environment", "sampling_0.5b", "sampling_3b", "decode_layout_3b", "train_3b_b1",
                           "train_3b_b8", "rollout_3b", "parity_tests"]
    # the step timeouts fit the budget (450 s by default) with the summary's reserve: none is cut short by it,
    # and the whole run stays under 8 minutes on the device
    limits = [int(line.split()[1].rstrip("s")) for line in steps.values()]
    assert sum(limits) <= 450 - 15 < 480, limits
    assert "--expect-backend gpu" in steps["environment"]
    for shape in ("0.5b", "3b"):
        assert "--dtype bfloat16 --batches 1 64" in steps[f"sampling_{shape}"]
    layout = steps["decode_layout_3b"]
    assert "--shape 3b" in layout and "--layers-layout unrolled" in layout and "--batches 1 " in layout
    assert "-m benchmarks.rollout --shape 3b --dtype bfloat16 --out-dir" in steps["rollout_3b"]
    assert all(name in steps["parity_tests"] for name in
               ("tests/accelerators/test_gpu_attention.py", "decode_updates_the_cache_in_place", "cudnn_equals_reference"))
    for batch in (1, 8):
        assert all(flag in steps[f"train_3b_b{batch}"] for flag in
                   ("--dtype bfloat16", "--seq 1024", f"--batch {batch}", "--remat full", "--variants jax_chunked"))
    assert not (tmp_path / "out").exists()
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def _parity_selection() -> tuple[list[str], str]:
    """(the parity step's test files, its -k expression) as the script's --dry-run prints them."""
    import shlex
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env={k: v for k, v in os.environ.items() if k != "SMOKE"},
                          capture_output=True, text=True, timeout=60)
    words = shlex.split(next(line for line in done.stdout.splitlines() if line.startswith("parity_tests")))
    return [w for w in words if w.startswith("tests/")], words[words.index("-k") + 1]


def _matches(expression: str, test_id: str) -> bool:
    """pytest's -k matching on a test id: each name is a case-insensitive substring of the file, function
    or parameter names; and / or / not / parentheses as in Python."""
    words = [w for w in expression.replace("(", " ( ").replace(")", " ) ").split()]
    haystack = test_id.lower()
    code = " ".join(w if w in ("and", "or", "not", "(", ")") else repr(w.lower() in haystack) for w in words)
    return eval(code)  # noqa: S307 - built from True/False and operators only


@pytest.mark.slow  # collects the parity files in a subprocess (imports torch and transformers)
def test_every_parity_term_names_a_test_that_exists():
    """Each `or` term of the device check's PARITY_SELECT selects at least one collected test (a renamed test
    would otherwise drop out of the GPU run in silence)."""
    files, expression = _parity_selection()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    test_ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert test_ids, done.stdout[-2000:] + done.stderr[-2000:]
    terms, depth, current = [], 0, []
    for word in expression.replace("(", " ( ").replace(")", " ) ").split():  # split on the top-level `or`s
        depth += (word == "(") - (word == ")")
        if word == "or" and depth == 0:
            terms.append(" ".join(current))
            current = []
        else:
            current.append(word)
    terms.append(" ".join(current))
    assert len(terms) >= 10
    unmatched = [term for term in terms if not any(_matches(term, test_id) for test_id in test_ids)]
    assert not unmatched, f"PARITY_SELECT terms that select no test: {unmatched}"
    assert not _matches("remat_policies_and_dpa", "\n".join(test_ids))  # the stale name this test was written for


@pytest.mark.slow  # the device-check script's smoke run: three benchmark processes
def test_smoke_run_writes_sane_results(tmp_path):
    """SMOKE=1 on this CPU: environment, sampling and one train step at tiny shapes (the parity step is
    the test suite itself here). The peaks are set through the environment, so the ratios are checked
    against known ceilings; every ratio is recomputed from the timings in the JSON."""
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", OUT=str(out), PY=sys.executable, TOTAL_S="900",
               ONLY="environment,sampling_tiny,train_tiny_b2", SSB_PEAK_TFLOPS="2.0", SSB_HBM_GBS="200")
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    log = (out / "log.txt").read_text()[-4000:] if (out / "log.txt").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "sampling_tiny_float32.json", "summary.txt", "train_step_tiny_b2.json"], files
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())

    sampling = json.loads((out / "sampling_tiny_float32.json").read_text())
    assert sampling["peaks"]["bf16_tflops"] == 2.0 and sampling["peaks"]["bandwidth_gbs"] == 200.0
    config = common.model_config("tiny")
    for row in sampling["rows"]:
        ours, batch = row["ssb_jax"], row["batch"]
        assert ours["tokens_per_s"] > 0 and ours["decode_tokens_per_s"] > 0
        step_bytes = common.decode_bytes_per_step(config, batch, 8 + 32 / 2)
        assert row["decode_bytes_per_step"] == step_bytes
        fraction = step_bytes / (ours["decode_step_ms"] / 1e3) / 200e9
        assert row["decode_fraction_of_roofline"] == pytest.approx(fraction)
        assert 0 < fraction < 1.5
        mfu = common.prefill_flops(config, batch, 8) / ours["prefill_s"] / 2e12
        assert row["prefill_mfu"] == pytest.approx(mfu) and 0 < mfu <= 1

    train = json.loads((out / "train_step_tiny_b2.json").read_text())
    result = train["results"]["jax_chunked"]
    assert "error" not in result, result.get("error")
    assert result["backend"] == "cpu" and result["dtype"] == "float32" and np.isfinite(result["loss"])
    teacher, student, answer = 32, 28, 24  # --seq 32 --teacher-prompt 8 --student-prompt 4
    assert result["computed_shapes"] == {"teacher_tokens": [2, teacher], "student_tokens": [2, student],
                                         "answer_tokens": [2, answer]}
    flops = common.train_step_flops(config, 2, teacher, student, answer, 4)["total"]
    assert result["model_flops"]["total"] == flops
    assert result["mfu"] == pytest.approx(flops / result["step_s"] / 2e12) and 0 < result["mfu"] <= 1
    assert result["tokens_per_s"] == pytest.approx(2 * (teacher + student) / result["step_s"])
    assert result["xla_memory"]["temp_size_in_bytes"] > 0

    assert [line.split()[:2] for line in summary.splitlines() if line.startswith(("ok", "FAIL", "TIMEOUT", "SKIP"))] \
        == [["ok", "environment"], ["ok", "sampling_tiny"], ["ok", "train_tiny_b2"]], summary
    assert summary_lines(out)[0].startswith("sampling tiny float32") and "MFU" in summary
