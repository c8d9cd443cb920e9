"""How programs are compiled: the persistent compilation cache, and per-program XLA options.

`enable_persistent_cache(directory)` keeps compiled programs on disk, so a resumed run, a later stage
or the next run with the same shapes loads them instead of compiling again.

Per-program XLA options: YNNPACK for matrix products only, on the CPU backend.

By default XLA:CPU (jaxlib 0.10) hands whole elementwise-and-reduce fusions to YNNPACK, which runs a
fused reduction that reads two arrays over vocabulary-wide rows, such as the KL term sum(p * (t - s)),
far slower than XLA's own loop emitter. The distillation step, which reduces over thousands of such rows
at once, is therefore compiled with YNNPACK kept for the matrix products alone. The teacher cache (no
faster with it) and the sampler (slower with it: its decode steps reduce a few rows each) keep the
default. The timings behind this are in docs/benchmarks.md ("XLA:CPU compile options").

The option is set per program (`jax.jit(..., compiler_options=...)`), never in XLA_FLAGS, so it
touches nothing else in the process; a user who sets the flag in XLA_FLAGS keeps their setting.

Results depend on the CPU: XLA:CPU generates code for the machine's vector units (`xla_cpu_max_isa`
defaults to the best the CPU has), YNNPACK picks its matrix kernels by the CPU's features whatever that
flag says, and dots and reductions are split over as many threads as there are cores. Each changes the
order of float32 additions, and a toy world pre-trained from scratch amplifies such differences into
other models and other accuracies (docs/benchmarks.md, "Same program, other CPU"). `machine()` names what
a result was computed on; the eval stage records it and the report prints it.
"""
from __future__ import annotations

import functools
import logging
import os
import platform

import jax
import numpy as np

log = logging.getLogger(__name__)

# the /proc/cpuinfo flags that decide which kernels XLA:CPU and YNNPACK run
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_DOTS_ONLY = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def enable_persistent_cache(directory: str, *, min_compile_seconds: float | None = None) -> str | None:
    """Cache compiled programs in `directory` (created; "~" expanded); "" leaves caching off.
    min_compile_seconds: cache only programs that took at least this long to compile (default: JAX's,
    1 s, so the many tiny helper programs are not written). Returns the directory in use."""
    if not directory:
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    if min_compile_seconds is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    log.debug("persistent compilation cache in %s", path)
    return path


@functools.cache
def vocab_program_options() -> dict[str, str]:
    """compiler_options for jitted programs that reduce over many vocabulary rows: {} off CPU, when XLA_FLAGS
    already sets the fusion flag, or when this jaxlib does not accept it."""
    if jax.default_backend() != "cpu" or YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    options = {YNN_FUSION_FLAG: YNN_DOTS_ONLY}
    try:  # older or newer jaxlib may not know the flag (or jit may lack compiler_options)
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.zeros(2, np.float32)).compile()
    except Exception as error:  # noqa: BLE001 - any refusal means: compile with the defaults
        log.info("XLA:CPU refused %s=%s (%s); using the default fusions", YNN_FUSION_FLAG, YNN_DOTS_ONLY,
                 str(error).splitlines()[0][:200])
        return {}
    return options


def machine() -> dict:
    """What a CPU result was computed on: the CPU's name, family and model numbers (a cloud's "AMD EPYC"
    names neither the generation nor the vector units), its vector flags, the cores, jax's version and
    backend, and XLA_FLAGS."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        first = open("/proc/cpuinfo").read().split("\n\n", 1)[0]
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    info["cpu"] = fields.get("model name", info["cpu"])
    info["family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    info["vector_flags"] = [f for f in VECTOR_FLAGS if f in fields.get("flags", "").split()]
    return info


def describe_machine(info: dict) -> str:
    """machine() in one line: "AMD EPYC (family/model 25/1; avx2, fma; 2 cores), jax 0.10.2 on cpu"."""
    detail = "; ".join(part for part in (f"family/model {info['family_model']}" if "family_model" in info else "",
                                          ", ".join(info.get("vector_flags", [])),
                                          f"{info.get('cores')} cores") if part)
    flags = f", XLA_FLAGS={info['xla_flags']}" if info.get("xla_flags") else ""
    return f"{info.get('cpu')} ({detail}), jax {info.get('jax')} on {info.get('backend')}{flags}"
