"""The pipeline: a registry of stages (`registry.REGISTRY`), the context they share, the runner and the
command line.

    from ssb_jax.pipeline import run_pipeline
    ctx = run_pipeline(config)          # config: ssb_jax.config.load_config_file("configs/tiny.py")
"""
from ssb_jax.pipeline.context import Candidate, CurationShortfall, RunContext, RunStopped
from ssb_jax.pipeline.registry import REGISTRY
from ssb_jax.pipeline.run import execute, run_pipeline
from ssb_jax.pipeline.stage import DONE_FILE, Registry, Stage

__all__ = ["Candidate", "CurationShortfall", "DONE_FILE", "REGISTRY", "Registry", "RunContext", "RunStopped", "Stage",
           "execute", "run_pipeline"]
