"""launch/tpu_pod.sh with no arguments (or too few) prints its usage, the comment block at its top."""
import subprocess
from pathlib import Path

import pytest

TPU_POD = Path(__file__).resolve().parents[1] / "launch" / "tpu_pod.sh"


@pytest.mark.parametrize("args, status", [([], 2), (["--help"], 0), (["--dry-run"], 2), (["name", "zone"], 2)])
def test_tpu_pod_prints_its_usage(args, status):
    done = subprocess.run(["bash", str(TPU_POD), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    text = done.stdout + done.stderr
    assert "launch/tpu_pod.sh [--dry-run] NAME ZONE ACCELERATOR_TYPE" in text and "#" not in text.splitlines()[0]
    assert "unbound variable" not in text and "line " not in text.split("\n")[0]
