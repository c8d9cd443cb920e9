"""Hub files without network: the cache, else one line saying what to download (no 30 s of retries)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ssb_jax.model import hub

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: a connect is refused at once


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty hub cache and an endpoint that refuses connections; a networked download fails the test."""
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for key in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    real_file, real_snapshot = huggingface_hub.hf_hub_download, huggingface_hub.snapshot_download

    def cache_only(real):
        def call(*args, **kwargs):
            assert kwargs.get("local_files_only"), "reached for the network"
            kwargs["cache_dir"] = str(tmp_path / "cache")
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only(real_file))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only(real_snapshot))


def test_offline_detection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert hub.offline()
    with socket.socket() as listening:  # an endpoint that accepts: online
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert not hub.offline()


def test_missing_hub_files_are_one_line_refusals(no_hub):
    with pytest.raises(hub.HubUnavailableError, match=r"huggingface-cli download Qwen/Qwen2.5-3B-Instruct\)"):
        hub.hub_file("Qwen/Qwen2.5-3B-Instruct", "config.json")
    with pytest.raises(hub.HubUnavailableError, match="config.model.path"):
        hub.hub_snapshot("Qwen/Qwen2.5-3B-Instruct", ["*.json"])


def test_planner_offline_says_what_to_download(tmp_path):
    """python -m ssb_jax.plan on configs/qwen3b.py with no shared configs, no cache and no hub: one line."""
    env = {k: v for k, v in os.environ.items() if k not in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(SSB_DATA_DIR=str(tmp_path / "no_data"), HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run([sys.executable, "-m", "ssb_jax.plan", "--config", "configs/qwen3b.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "huggingface-cli download Qwen/Qwen2.5-3B-Instruct" in lines[0], done.stderr[-2000:]
