"""The persistent compilation cache: a second process loads what the first compiled."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Compiles one program with the cache in argv[1]; prints how many cache hits and misses JAX reported.
_WORKER = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    from ssb_jax.compile_options import enable_persistent_cache
    events = []
    jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
    enable_persistent_cache(sys.argv[1], min_compile_seconds=0)
    step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
    step(jnp.ones((32, 32))).block_until_ready()
    print("hits", sum(e.endswith("cache_hits") for e in events), "misses", sum(e.endswith("cache_misses") for e in events))
""")


def _run(cache_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _WORKER, str(cache_dir)], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    return int(words[words.index("hits") + 1]), int(words[words.index("misses") + 1])


def test_a_second_process_reuses_compiled_programs(tmp_path):
    cache = tmp_path / "xla"
    hits, misses = _run(cache)
    assert hits == 0 and misses >= 1
    assert any(cache.iterdir())
    hits, misses = _run(cache)
    assert hits >= 1 and misses == 0


def test_the_pipeline_turns_the_cache_on_where_configured(tmp_path):
    script = textwrap.dedent(f"""
        import jax
        from ssb_jax import config as config_lib
        from ssb_jax.pipeline import REGISTRY, RunContext
        c = config_lib.load_config_file("configs/tiny.py")
        c.workdir = {str(tmp_path / "run")!r}
        c.compile_cache_dir = {str(tmp_path / "cache")!r}
        RunContext(c, REGISTRY)
        print("cache", jax.config.jax_compilation_cache_dir)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"cache {tmp_path / 'cache'}" in result.stdout
    assert (tmp_path / "cache").is_dir()
