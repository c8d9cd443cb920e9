"""Where the shared, read-only data lives (GSM8K, MATH500, AIME, tokenizer, configs).

`SSB_DATA_DIR` overrides the default `<repo>/../shared/data`. Nothing in ssb_jax
ever writes there: CI mounts it read-only.
"""
import os
from pathlib import Path

DATA_DIR_ENV = "SSB_DATA_DIR"


def shared_data_dir() -> Path:
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_path(*parts: str) -> Path:
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"shared data file {path} not found; set {DATA_DIR_ENV} to the folder "
            "holding gsm8k/, math500/, aime24/, qwen2.5_tokenizer/ and qwen2.5_configs/")
    return path
