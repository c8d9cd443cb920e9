"""`python -m ssb_jax.main --config configs/qwen3b.py [--config.key=value ...]`: the pipeline's command
line (ssb_jax.pipeline.cli)."""
from ssb_jax.pipeline.cli import main

if __name__ == "__main__":
    main()
