"""The two Python pieces of benchmarks/device_check.sh: what the machine offers, and the results table.

    python -m benchmarks.device_report environment [--expect-backend gpu]   # versions, devices, missing modules
    python -m benchmarks.device_report summary DIR                          # table of DIR's results JSON

`environment` imports only the standard library at the top, so it reports a missing jax instead of
failing on it; its exit status is 3 when JAX is missing or runs on another backend than expected.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

# What each piece of the device check needs (module names); jax, flax, optax and numpy are needed by all.
NEEDED = {"benchmarks": ("jax", "flax", "optax", "numpy"),
          "parity_tests": ("pytest", "torch", "transformers", "peft", "scipy", "safetensors")}
DISTRIBUTIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "numpy", "torch",
                 "transformers", "peft", "pytest")


def missing_modules(piece: str) -> list[str]:
    """Modules of NEEDED[piece] that are not installed (found, not imported: importing torch and
    transformers takes longer than the check is worth)."""
    return [name for name in NEEDED[piece] if importlib.util.find_spec(name) is None]


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def environment(expect_backend: str | None) -> int:
    print("python", sys.version.split()[0], sys.executable)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True)
        print("nvidia-smi:", (smi.stdout or smi.stderr).strip())
    for piece in NEEDED:
        missing = missing_modules(piece)
        print(f"{piece}: " + ("all modules present" if not missing else "MISSING " + ", ".join(missing)))
    print("versions: " + ", ".join(f"{name} {version(name)}" for name in DISTRIBUTIONS))
    try:
        import jax
        backend, devices = jax.default_backend(), jax.devices()
    except Exception as error:  # noqa: BLE001 - no jax, or no backend it can start
        print(f"JAX unusable: {type(error).__name__}: {error}")
        return 3
    print(f"jax backend {backend}: {len(devices)} device(s), kind {devices[0].device_kind!r}")
    if expect_backend and backend != expect_backend:
        print(f"JAX runs on {backend!r}, not {expect_backend!r}: every number would be a {backend} number")
        return 3
    return 0


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def summary_lines(directory: Path) -> list[str]:
    """One line per sampling row and per train-step variant found in directory/*.json."""
    lines = []
    for path in sorted(directory.glob("sampling_*.json")):
        data = json.loads(path.read_text())
        if "peaks" not in data:
            lines.append(f"{path.name}: written before the device-aware benchmarks (no peaks); left out")
            continue
        config, peaks = data["config"], data["peaks"]
        lines.append(f"sampling {config['shape']} {config['dtype']} prompt {config['prompt']} + {config['new_tokens']}"
                     f" new, layers {data.get('layers_layout', '?')} ({data['backend']}, {peaks['device_kind']}; ceilings: {_fmt(peaks['bandwidth_gbs'], '.0f')}"
                     f" GB/s, {_fmt(peaks['bf16_tflops'], '.1f')} TFLOP/s)")
        for row in data["rows"]:
            ours = row["ssb_jax"]
            memory = row.get("device_memory_after") or {}
            lines.append(f"  batch {row['batch']:3d} {row['mode']:8s} tok/s {ours['tokens_per_s']:9.1f}"
                         f"  decode tok/s {_fmt(ours['decode_tokens_per_s'], '9.1f')}  step {_fmt(ours['decode_step_ms'], '7.2f')} ms"
                         f"  roofline {_fmt(row.get('decode_fraction_of_roofline'), '5.2f')}"
                         f"  prefill {1e3 * ours['prefill_s']:7.1f} ms MFU {_fmt(row.get('prefill_mfu'), '5.3f')}"
                         f"  peak {_gib(memory.get('peak_bytes_in_use'))} GiB")
    for path in sorted(directory.glob("train_step_*.json")):
        data = json.loads(path.read_text())
        shape = data["shape"]
        if "preset" not in shape:
            lines.append(f"{path.name}: written before the device-aware benchmarks (no shape preset); left out")
            continue
        lines.append(f"train step {shape['preset']} {shape['dtype']} batch {shape['batch']} teacher {shape['teacher_seq']}"
                     f" / student {shape['student_seq']} tokens, remat {shape['remat']} ({data['backend']})")
        for name, r in data["results"].items():
            if "step_s" not in r:
                reason = r.get("skipped") or f"error (rc {r.get('returncode')}): " + r.get("error", "")[-300:]
                lines.append(f"  {name}: {reason}")
                continue
            xla = r.get("xla_memory") or {}
            lines.append(f"  {name:13s} step {r['step_s']:8.3f} s  tok/s {_fmt(r.get('tokens_per_s'), '9.0f')}"
                         f"  MFU {_fmt(r.get('mfu'), '5.3f')}  peak {_gib(r.get('device_peak_bytes'))} GiB"
                         f"  xla temp {_gib(xla.get('temp_size_in_bytes'))} GiB  compile {_fmt(r.get('compile_s'), '.1f')} s")
    for path in sorted(directory.glob("rollout*.json")):  # benchmarks/rollout.py's own fields, the numbers only
        data = json.loads(path.read_text())
        numbers = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines.append(f"rollout {path.stem}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
                     + ("" if numbers else "(see the JSON)"))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("environment")
    env.add_argument("--expect-backend", default=None)
    env.add_argument("--need", choices=sorted(NEEDED), help="only check this piece's modules; status 4 if any is missing")
    table = sub.add_parser("summary")
    table.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "summary":
        print("\n".join(summary_lines(args.directory)))
        return 0
    if args.need:
        missing = missing_modules(args.need)
        print(", ".join(missing))
        return 4 if missing else 0
    return environment(args.expect_backend)


if __name__ == "__main__":
    sys.exit(main())
