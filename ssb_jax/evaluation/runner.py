"""The evaluation run: greedy pass@1 and sampled avg@n / maj@n of several models on several datasets
under several protocols (`run`).

Models come as a dict of named samplers ({"base": ..., "student": ...}), each anything with
`generate_ids(prompts, sampling, n=, seed=, ids=, on_finish=) -> [[Completion]]` that calls
on_finish(prompt index, sample index, completion) as each row finishes (the rollout engine, the static
Sampler per batch). Protocols that decode alike (e.g. greedy at the same token budget) share one generation.

A problem whose prompt is longer than the sampler's `max_prompt_tokens` is not generated: its record
says `"status": "prompt_too_long"` with its token count, the table counts it per row, and accuracy is
over all problems with it counted wrong.

Per-problem outputs go to outputs/<model>/<dataset>/<protocol>.jsonl (a RecordStore). A dataset's pending
problems go to the sampler in one call per decoding (`EvalConfig.problems_per_batch` splits them), and a
protocol's record of a problem is appended as soon as its rows have finished, so a killed run loses only
the problems in flight and resumes without redoing finished ones; at the end each file is put in problem
order (`data.records.order_records`). Beside each, <protocol>.settings.json
is its fingerprint (ssb_jax.fingerprint.check): what the outputs were made from (protocol, decoding,
prompts (the run's, or the evaluation-only ones of EvalConfig.prompts_for), the dataset's content digest,
the model's identity when the caller gives one, max_prompt_tokens); outputs made from anything else stop the run with `StaleOutputsError` before any
generation. Under several JAX processes each takes every process_count-th problem and appends to its
own shard file, folded in at the end. The results table (results.json, results.md) is always
recomputed from those files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import jax

from ssb_jax import distributed, fingerprint
from ssb_jax.data.datasets import OnBadLine, Problem
from ssb_jax.data.records import ShardedRecordStore, order_records, shard_paths, write_json_atomic
from ssb_jax.evaluation.datasets import SAFE_NAME, SAFE_NAME_RULE, dataset_inputs, load_datasets, parse_datasets
from ssb_jax.evaluation.metrics import ACCURACY_DENOMINATOR, format_markdown, metric_rows
from ssb_jax.evaluation.protocols import PROTOCOLS, EvalConfig, Protocol
from ssb_jax.evaluation.records import STATUS_PROMPT_TOO_LONG, problem_record, too_long_record
from ssb_jax.model.tokenizer import encode_chat, stop_token_ids
from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
from ssb_jax.sampling.sampler import SamplingParams

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
OUTPUTS_DIR = "outputs"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one protocol generates: greedy params, and sampled params (None when not sampled)."""
    protocol: Protocol
    greedy: SamplingParams
    sampled: SamplingParams | None
    n: int                     # samples per problem (0 when not sampled)

    def settings(self, seed: int, prompts: PromptSet) -> dict:
        """Everything the stored outputs depend on; a resumed run must match it."""
        return json.loads(json.dumps({
            "protocol": self.protocol.name, "grader": self.protocol.grader,
            "greedy": dataclasses.asdict(self.greedy),
            "sampled": dataclasses.asdict(self.sampled) if self.sampled else None,
            "n_samples": self.n, "seed": seed if self.sampled else None,
            "prompts": dataclasses.asdict(prompts)}))


def _plans(config: EvalConfig, stops: tuple[int, ...]) -> list[_Plan]:
    plans = []
    for name in config.protocols:
        protocol = PROTOCOLS[name]
        max_new = protocol.max_new_tokens or config.max_new_tokens
        greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_ids=stops)
        sampled = None
        if protocol.sampled and config.n_samples > 0:
            sampled = SamplingParams(max_new_tokens=max_new, temperature=config.temperature, top_k=config.top_k,
                                     top_p=config.top_p, stop_ids=stops)
        plans.append(_Plan(protocol, greedy, sampled, config.n_samples if sampled else 0))
    return plans


def _check_store(path: Path, settings: dict, unchecked: Sequence[str], write: bool) -> None:
    """Raise StaleOutputsError when the outputs at `path` (merged or in shards) were made from other
    settings or inputs; keys in `unchecked` are not compared. With `write`, record the settings of a
    store that has no outputs yet."""
    fingerprint.check(path.parent, "eval", settings, outputs=[path.name, *(p.name for p in shard_paths(path))],
                      write=write, file_name=f"{path.stem}.settings.json", unchecked=unchecked)


def _check_stores(settings: Mapping[Path, dict], unchecked: Mapping[Path, Sequence[str]]) -> None:
    """Check every store before any generation or any write (every process compares, so all stop
    alike); then the main process records the settings of stores without outputs."""
    for path in settings:
        _check_store(path, settings[path], unchecked[path], write=False)
    if distributed.is_main_process():
        for path in settings:
            _check_store(path, settings[path], unchecked[path], write=True)
    distributed.barrier("eval:settings")


def _prompt_limit(sampler) -> int | None:
    return getattr(sampler, "max_prompt_tokens", None)


def _requests(plan: _Plan) -> list[tuple[SamplingParams, int]]:
    """The generations one protocol's record is made of: greedy, then n samples when it samples."""
    return [(plan.greedy, 1)] + ([(plan.sampled, plan.n)] if plan.sampled else [])


def _stream_records(sampler, problems: Sequence[Problem], prompt_ids: Mapping[str, list[int]],
                    stores: Mapping[str, ShardedRecordStore], plans: Sequence[_Plan], seed: int, grader) -> None:
    """Generate what `problems` (prompts that fit) still lack and append each protocol's record of a problem as
    soon as its rows have finished (its greedy completion and, when sampled, its n samples). One sampler call
    per distinct (decoding, n): protocols that decode alike (e.g. greedy at the same token budget) share
    one generation; greedy calls go first, so greedy-only protocols' records are written before sampling."""
    by_id = {p.id: p for p in problems}
    missing = {plan.protocol.name: [p.id for p in problems if p.id not in stores[plan.protocol.name]]
               for plan in plans}
    requests: dict[tuple[SamplingParams, int], list[str]] = {}
    ordered = [r for plan in plans for r in _requests(plan)]
    for request in sorted(dict.fromkeys(ordered), key=lambda r: not r[0].greedy):
        wanted = {i for plan in plans if request in _requests(plan) for i in missing[plan.protocol.name]}
        requests[request] = [p.id for p in problems if p.id in wanted]
    finished: dict[tuple[SamplingParams, int], dict[str, list]] = {request: {} for request in requests}

    def record_what_is_complete(problem_id: str) -> None:
        problem = by_id[problem_id]
        for plan in plans:
            parts = _requests(plan)
            store = stores[plan.protocol.name]
            if problem_id in store or not all(problem_id in finished[r] for r in parts):
                continue
            greedy = finished[parts[0]][problem_id][0]
            samples = finished[parts[1]][problem_id] if plan.sampled else None
            store.append([problem_record(problem, len(prompt_ids[problem_id]), greedy, samples,
                                         grader(plan.protocol.name))])
        for request, completions in finished.items():  # what every protocol has recorded is let go
            if all(problem_id in stores[plan.protocol.name] for plan in plans if request in _requests(plan)):
                completions.pop(problem_id, None)

    for (sampling, n), ids in requests.items():
        if not ids:
            continue
        rows, done = {i: [None] * n for i in ids}, finished[sampling, n]

        def row_finished(index: int, sample: int, completion, ids=ids, rows=rows, done=done) -> None:
            problem_id = ids[index]
            rows[problem_id][sample] = completion
            if all(c is not None for c in rows[problem_id]):
                done[problem_id] = rows.pop(problem_id)
                record_what_is_complete(problem_id)

        sampler.generate_ids([prompt_ids[i] for i in ids], sampling, n=n, seed=seed, ids=ids, on_finish=row_finished)


def _evaluate_one(sampler, tokenizer, problems: Sequence[Problem], stores: Mapping[str, ShardedRecordStore],
                  plans: Sequence[_Plan], config: EvalConfig, prompts: PromptSet, model: str, dataset: str) -> None:
    label = f"{model}/{dataset}"
    todo = [p for p in problems if any(p.id not in stores[plan.protocol.name] for plan in plans)]
    if len(todo) < len(problems):
        log.info("eval %s: %d of %d problems already done", label, len(problems) - len(todo), len(problems))
    limit = _prompt_limit(sampler) or math.inf
    size = config.problems_per_batch or max(len(todo), 1)
    for begin in range(0, len(todo), size):
        batch = todo[begin:begin + size]
        prompt_ids = {p.id: encode_chat(tokenizer, prompts.student_messages(p.question)) for p in batch}
        too_long = [p for p in batch if len(prompt_ids[p.id]) > limit]
        for p in too_long:  # recorded, counted wrong, and never fatal to the run
            log.warning("eval %s: problem %r has %d prompt tokens, more than max_prompt_tokens=%d; recorded "
                        "as %s", label, p.id, len(prompt_ids[p.id]), limit, STATUS_PROMPT_TOO_LONG)
        for plan in plans:
            store = stores[plan.protocol.name]
            store.append(too_long_record(p, len(prompt_ids[p.id])) for p in too_long if p.id not in store)
        _stream_records(sampler, [p for p in batch if len(prompt_ids[p.id]) <= limit], prompt_ids, stores, plans,
                        config.seed, lambda protocol: config.grader_name(protocol, dataset))
        log.info("eval %s: %d/%d problems", label, len(problems) - len(todo) + begin + len(batch), len(problems))


def outputs_path(out_dir: str | Path, model: str, dataset: str, protocol: str) -> Path:
    """Where one model's records for one dataset under one protocol are stored."""
    return Path(out_dir) / OUTPUTS_DIR / model / dataset / f"{protocol}.jsonl"


def run(samplers: Mapping[str, object], tokenizer, config: EvalConfig, out_dir: str | Path, *,
        prompts: PromptSet = DEFAULT_PROMPTS, model_identities: Mapping[str, str] | None = None,
        on_bad_line: OnBadLine = "error", question_field: str | None = None,
        answer_field: str | None = None) -> dict:
    """Evaluate every model on every dataset under every protocol; resumable. Returns the results
    (also written to out_dir/results.json and out_dir/results.md).

    model_identities: {model name: what its weights are} (e.g. a checkpoint's identity, a training
    fingerprint's digest), checked against the stored outputs; a model without one is not checked.
    on_bad_line, question_field, answer_field: as for curation's data (ssb_jax.data.datasets); the
    field names apply to local files. Raises StaleOutputsError, before generating anything, when
    stored outputs were made from other settings, another dataset content or another model."""
    for model in samplers:
        if not SAFE_NAME.fullmatch(model):
            raise ValueError(f"model name {model!r} must be {SAFE_NAME_RULE} (it names a folder)")
    model_identities = dict(model_identities or {})
    if set(model_identities) - set(samplers):
        raise ValueError(f"model_identities names {sorted(set(model_identities) - set(samplers))}, which are not "
                         f"among the models {sorted(samplers)}")
    out_dir = Path(out_dir)
    datasets = load_datasets(config, on_bad_line=on_bad_line, question_field=question_field,
                             answer_field=answer_field)
    inputs = {spec.label: dataset_inputs(spec, question_field, answer_field) for spec in parse_datasets(config.datasets)}
    plans = _plans(config, tuple(stop_token_ids(tokenizer)))
    settings, unchecked = {}, {}
    for model, sampler in samplers.items():
        for dataset in datasets:
            for plan in plans:
                path = outputs_path(out_dir, model, dataset, plan.protocol.name)
                settings[path] = {**plan.settings(config.seed, config.prompts_for(dataset, prompts)),
                                  "grader": config.grader_name(plan.protocol.name, dataset), "dataset": inputs[dataset],
                                  "model": model_identities.get(model), "max_prompt_tokens": _prompt_limit(sampler)}
                unchecked[path] = () if model in model_identities else ("model",)
    _check_stores(settings, unchecked)
    # several processes: each takes every process_count-th problem into its own shard (folded below)
    orders = {outputs_path(out_dir, model, dataset, plan.protocol.name): {p.id: i for i, p in enumerate(problems)}
              for model in samplers for dataset, problems in datasets.items() for plan in plans}
    distributed.fold_process_shards(list(orders), "eval:start", orders)
    stores = {(model, dataset): {plan.protocol.name: ShardedRecordStore(
                  outputs_path(out_dir, model, dataset, plan.protocol.name), jax.process_index(), jax.process_count())
              for plan in plans} for model in samplers for dataset in datasets}
    for model, sampler in samplers.items():
        for dataset, problems in datasets.items():
            _evaluate_one(sampler, tokenizer, distributed.process_shard(problems), stores[model, dataset], plans,
                          config, config.prompts_for(dataset, prompts), model, dataset)
    distributed.fold_process_shards(list(orders), "eval:end", orders)
    if distributed.is_main_process():  # one process: the records are in the order they finished
        for path, order in orders.items():
            order_records(path, order)

    rows, complete = [], True
    for dataset, problems in datasets.items():  # ordered so each model's number sits beside the others'
        for plan in plans:
            per_model = {}
            for model in samplers:
                stored = {r["id"]: r for r in stores[model, dataset][plan.protocol.name].read_all()}
                records = [stored[p.id] for p in problems if p.id in stored]
                complete &= len(records) == len(problems)
                per_model[model] = metric_rows(records, plan.n)
            for i in range(len(per_model[next(iter(samplers))])):
                for model in samplers:
                    rows.append({"model": model, "dataset": dataset, "protocol": plan.protocol.name,
                                 "grader": config.grader_name(plan.protocol.name, dataset), **per_model[model][i],
                                 "outputs": str(outputs_path("", model, dataset, plan.protocol.name))})
    results = {
        "protocols": {plan.protocol.name: {"grader": plan.protocol.grader, "description": plan.protocol.description,
                                           "max_new_tokens": plan.greedy.max_new_tokens,
                                           "n_samples": plan.n}
                      for plan in plans},
        "sampling": {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
                     "seed": config.seed},
        "datasets": {name: len(problems) for name, problems in datasets.items()},
        "system_prompts": {name: config.prompts_for(name, prompts).system_prompt for name in datasets},
        "dataset_inputs": {name: {**inputs[name], "skipped_records": problems.skipped}
                           for name, problems in datasets.items()},
        "models": list(samplers),
        "accuracy_denominator": ACCURACY_DENOMINATOR,
        "rows": rows,
        "complete": complete,
        "config": dataclasses.asdict(config),
    }
    if distributed.is_main_process():
        write_json_atomic(out_dir / RESULTS_JSON, results)
        (out_dir / RESULTS_MD).write_text(format_markdown(results))
    log.info("eval results in %s\n%s", out_dir / RESULTS_MD, format_markdown(results))
    return results
