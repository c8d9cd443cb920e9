"""The pipeline: a registry of stages (`registry.REGISTRY`), the context they share, the runner and the
command line.

    from ssb_jax.pipeline import run_pipeline
    ctx = run_pipeline(config)          # config: ssb_jax.config.load_config_file("configs/tiny.py")

Names are imported on first use, so the command line's --help reads the registry without importing jax.
"""
from ssb_jax.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("Candidate", "CurationShortfall", "RunContext", "RunStopped"), "ssb_jax.pipeline.context"),
    "REGISTRY": "ssb_jax.pipeline.registry",
    **dict.fromkeys(("execute", "run_pipeline"), "ssb_jax.pipeline.run"),
    **dict.fromkeys(("DONE_FILE", "Registry", "Stage"), "ssb_jax.pipeline.stage"),
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("ssb_jax.pipeline", _EXPORTS, globals())
