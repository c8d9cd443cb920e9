"""Files from the Hugging Face hub, found quickly or refused in one line.

huggingface_hub retries an unreachable hub for about 30 s and then raises a long chain of errors. Here the
local cache is asked first (`local_files_only`), then whether the hub answers at all (one TCP connect of a
few seconds, or HF_HUB_OFFLINE set); without it, `HubUnavailableError` says what to download and which
setting takes a local path instead.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


class HubUnavailableError(OSError):
    """A hub file that is neither in the local cache nor downloadable now; the message says what to do."""


def offline() -> bool:
    """Whether the hub cannot be reached: HF_HUB_OFFLINE set, or no TCP connection to its endpoint."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        return False
    except OSError:
        return False if _proxied() else True


def _proxied() -> bool:
    """Behind a proxy a direct connection may fail while downloads work: let huggingface_hub try."""
    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _refusal(repo_id: str, what: str, setting: str) -> HubUnavailableError:
    return HubUnavailableError(
        f"{repo_id}: {what} is not on this machine and the Hugging Face hub is unreachable; download it where "
        f"there is network (huggingface-cli download {repo_id}) and set {setting} to that directory")


def hub_file(repo_id: str, filename: str, setting: str = "config.model.path") -> str:
    """The local path of one file of a hub repository: from the cache, else downloaded when the hub answers."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return hf_hub_download(repo_id, filename, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if offline():
        raise _refusal(repo_id, filename, setting)
    return hf_hub_download(repo_id, filename)


def hub_snapshot(repo_id: str, allow_patterns: list[str], setting: str = "config.model.path") -> str:
    """The local directory of a hub repository's files matching `allow_patterns`, as hub_file finds one file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if offline():
        raise _refusal(repo_id, "the checkpoint", setting)
    return snapshot_download(repo_id, allow_patterns=allow_patterns)
