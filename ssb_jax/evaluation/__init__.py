"""Evaluation: greedy pass@1 and sampled avg@n / maj@n of several models on several datasets, each
number computed under a named protocol (grader and decoding).

    from ssb_jax import evaluation
    results = evaluation.run({"base": sampler}, tokenizer, evaluation.EvalConfig(datasets="math500"), out_dir)

protocols.py (Protocol, PROTOCOLS, EvalConfig), datasets.py (dataset specs: known names, `label=path`,
local files), records.py (one problem's graded record, the majority vote), metrics.py (metric rows,
the markdown table), runner.py (`run`: generation, resumable outputs checked by fingerprint, results),
grading/ (answer extraction, normalization, graders, the math_verify worker).

The names below are loaded on first use, so importing this package (as ssb_jax.data does, for
grading) loads none of its modules.
"""
import importlib

_HOMES = {
    "run": "runner", "outputs_path": "runner", "RESULTS_JSON": "runner", "RESULTS_MD": "runner",
    "EvalConfig": "protocols", "Protocol": "protocols", "PROTOCOLS": "protocols", "MOTIF": "protocols",
    "DatasetSpec": "datasets", "dataset_specs": "datasets", "dataset_name": "datasets",
    "parse_datasets": "datasets", "load_datasets": "datasets",
    "majority_vote": "records", "same_answer": "records",
    "metric_rows": "metrics", "format_markdown": "metrics",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
