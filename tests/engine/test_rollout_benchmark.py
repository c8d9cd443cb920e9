"""`python -m benchmarks.rollout` end to end at the tiny shape: every side runs, the engine's tokens equal the
static sampler's at the same KV memory, the JSON holds what the docs quote, and the last line is the ratio."""
import json

import pytest

from benchmarks import rollout


@pytest.mark.slow  # three programs compiled and transformers imported: about 30 s of CPU
def test_rollout_benchmark_smoke(tmp_path, capsys):
    rollout.main(["--shape", "tiny", "--prompts", "3", "--k", "2", "--batch-size", "1", "--length-scale", "0.05",
                  "--cap", "400", "--equal-prompts", "1", "--out-dir", str(tmp_path), "--name", "smoke"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("engine/static useful tokens/s: ") and lines[-1].endswith("x")
    results = json.loads((tmp_path / "smoke.json").read_text())
    long_tailed = results["long_tailed"]
    assert long_tailed["identical_rows"] == long_tailed["rows"] == 6 and long_tailed["differing_rows"] == []
    # the engine's KV memory at most the static sampler's; its slots, the rows of mean length that memory holds
    assert long_tailed["engine"]["kv_bytes"] <= long_tailed["static"]["kv_bytes"]
    assert long_tailed["engine"]["slots"] >= long_tailed["static"]["rows_at_a_time"]
    lengths = results["workload"]["output_lengths"]
    assert long_tailed["engine"]["useful_tokens"] == long_tailed["static"]["useful_tokens"] == sum(map(sum, lengths))
    assert 0 <= long_tailed["engine"]["padding_share"] < 1 and 0 <= long_tailed["static"]["padding_share"] < 1
    first_batch = sorted(range(3), key=lambda i: -results["workload"]["prompt_lengths"][i])[0]  # the longest prompt
    assert long_tailed["transformers"]["useful_tokens"] == sum(lengths[first_batch])
    assert float(lines[-1].split(": ")[1][:-1]) == round(long_tailed["ratio"], 2)
    assert results["equal_lengths"]["engine"]["useful_tokens"] == results["equal_lengths"]["static"]["useful_tokens"]
