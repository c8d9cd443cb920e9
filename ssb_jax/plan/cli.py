"""The planner's command line: the plan for an accelerator, and optionally the compiler's figures beside it.

    python -m ssb_jax.plan --config configs/qwen3b.py --accelerator H100-80G [--devices 8] [--config.key=value]
    python -m ssb_jax.plan --config configs/qwen3b.py --devices 8 --check-compiled --config.model.dtype=float32

Memory per device of every stage (parameters, LoRA, optimizer state and KV cache exact; the working sets
modelled per program phase) and a time estimate from FLOPs and bandwidth (ssb_jax.plan.analytic).
`--check-compiled` lowers the real sampling and training programs with abstract inputs, compiles them
for this machine's backend (nothing allocated) and prints `memory_analysis()` beside the plan
(ssb_jax.plan.compiled).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ssb_jax.config import parse_config_args
from ssb_jax.plan.accelerators import ACCELERATORS
from ssb_jax.plan.analytic import GIB, plan
from ssb_jax.plan.compiled import check_against_compiler


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_check(results: dict) -> str:
    """check_against_compiler's results as text: planned and compiled bytes per stage."""
    backend = results["backend"]
    lines = [f"planned vs compiled per device; compiled = memory_analysis() of the real programs lowered with "
             f"abstract inputs, i.e. XLA:{backend.upper()}'s buffer assignment (argument + output + temp - alias)"
             + ("; XLA:CPU upcasts bfloat16 matmul operands to float32 copies that a GPU/TPU compiler does not "
                "make: check with --config.model.dtype=float32 there" if backend == "cpu" else "")]
    for stage, r in results.items():
        if stage == "backend":
            continue
        c = r["compiled"]
        lines.append(f"  {stage:16s} planned {_size(r['planned']):>11s}  compiled {_size(c['total']):>11s} "
                     f"({(r['planned'] - c['total']) / c['total']:+.1%}; argument {_size(c['argument'])}, "
                     f"output {_size(c['output'])}, temp {_size(c['temp'])}, alias {_size(c['alias'])})")
    return "\n".join(lines)


def format_plan(p: dict) -> str:
    """A plan as text: memory per device and the fit verdict per stage, each stage's terms, the time estimate."""
    m = p["memory_gib_per_device"]
    lines = [f"{p['accelerator']}: {p['devices']} devices, mesh {p['mesh']}, sampling mesh {p['sampling_mesh']}, "
             f"{p['model_parameters'] / 1e9:.2f}B parameters",
             "stages: " + ", ".join(f"{name} ({', '.join(uses) or 'host only'})" for name, uses in p["stages"].items()),
             "memory per device (GiB):"]
    for key in ("base_weights", "lora", "optimizer_state", "training_activations", "sampling_weights",
                "sampling_kv_cache", "sampling_copy_while_training"):
        lines.append(f"  {key:32s}{m[key]:10.3f}")
    for stage in ("sampling", "training", "eval"):
        if stage == "eval" and not m["eval_total"]:
            continue
        remedy = ("shard more (mesh.fsdp/tensor), lower the batch, or remat" if stage == "training" else
                  "more tensor/fsdp in config.sampler.mesh, or a lower sampler.batch_size")
        verdict = "fits" if p["fits"][stage] else f"DOES NOT FIT: {remedy}"
        held = f" + {m['sampling_copy_while_training']:.3f} sampling copy" if stage == "training" and \
            m["sampling_copy_while_training"] else ""
        lines.append(f"  {stage + ' total':32s}{m[stage + '_total']:10.3f}{held} of {m['capacity']} -> {verdict}")
    for name, method in p["methods"].items():  # GRPO and the on-policy stages config.stages selects
        for part in ("sampling", "update"):
            rows = ("more grpo.minibatches" if name == "grpo" else
                    f"fewer {name}.prompts_per_step x samples_per_prompt (one optimiser step takes them all)")
            remedy = (f"shard more (mesh.fsdp/tensor), {rows}, or remat" if part == "update"
                      else "more tensor/fsdp in config.sampler.mesh, or a lower sampler.batch_size")
            verdict = "fits" if p["fits"][f"{name} {part}"] else f"DOES NOT FIT: {remedy}"
            held = f" + {m['sampling_copy_while_training']:.3f} sampling copy" if part == "update" and \
                m["sampling_copy_while_training"] else ""
            lines.append(f"  {name + ' ' + part + ' total':32s}{m[f'{name} {part}_total']:10.3f}{held} of "
                         f"{m['capacity']} -> {verdict}")
    lines.append("terms per stage (GiB; the total is the peak of the program's phases, not the sum):")
    for stage, terms in p["terms_gib"].items():
        shape = p["shapes"][stage]
        described = ", ".join(f"{f.name}={getattr(shape, f.name)}" for f in dataclasses.fields(shape))
        lines.append(f"  {stage} ({described}): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in terms.items() if k != "total" and v))
    lines.append("activations and working sets are modelled per program phase and checked against XLA:CPU's buffer "
                 "assignment of the real programs (tests/plan/test_plan.py, --check-compiled); a GPU/TPU compiler "
                 "schedules differently")
    t = p["time_estimate_s"]
    methods = "".join(f", {name} {t[name] / 60:.1f} min ({method.iterations} iterations)"
                      for name, method in p["methods"].items())
    lines.append(f"time estimate: curate {t['curate'] / 60:.1f} min, train {t['train'] / 60:.1f} min{methods}, "
                 f"eval {t['eval'] / 60:.1f} min (assumptions: {p['assumptions']})")
    return "\n".join(lines)


def main(argv=None):
    """argv without the program name; --config.section.key=value overrides as in ssb_jax.main."""
    parser = argparse.ArgumentParser(prog="python -m ssb_jax.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="--config.section.key=value overrides a setting, as for ssb_jax.main")
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--accelerator", default="H100-80G", choices=sorted(ACCELERATORS))
    parser.add_argument("--devices", type=int, default=None, help="override the device count (e.g. a bigger slice)")
    parser.add_argument("--keep-rate", type=float, default=0.2, help="fraction of questions curation keeps")
    parser.add_argument("--check-compiled", action="store_true",
                        help="also compile the sampling and training programs on this machine (abstract inputs, "
                             "nothing allocated) and print their memory_analysis() beside the plan")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(["--help"])
    try:
        config, rest = parse_config_args(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest + ["--config", "(parsed above)"])
    try:
        result = plan(config, args.accelerator, args.devices, args.keep_rate)
    except ValueError as e:  # a setting that cannot work (a train batch the mesh does not divide): one line
        parser.error(str(e))
    except OSError as e:  # a model's config.json neither here nor downloadable (ssb_jax.hub): what to fetch
        sys.exit(f"error: {e}")
    print(format_plan(result))
    if args.check_compiled:
        print(format_check(check_against_compiler(config, result["devices"])))

