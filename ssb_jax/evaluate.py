"""Evaluation: greedy pass@1 and sampled avg@n / maj@n of several models on several datasets.

Datasets come as one comma-separated spec ("math500,amc23=/x/amc23/test.jsonl,/path/x.jsonl"): each
part is a known dataset name, `label=path` (or `label=known name`), or a bare local JSONL/Parquet path
labelled by the file's stem; the label names the outputs folder, so it must be a safe file name and
unique. Fields are detected as in curation (the caller's question/answer field names apply to local
files). Models come as a dict of named samplers ({"base": ..., "student": ...}), each anything with
`generate_ids(prompts, sampling, n=, seed=, ids=) -> [[Completion]]`.

A problem whose prompt is longer than the sampler's `max_prompt_tokens` is not generated: its record
says `"status": "prompt_too_long"` with its token count, the table counts it per row, and accuracy is
over all problems with it counted wrong.

Each protocol is a named preset (`PROTOCOLS`) that fixes the grader and the decoding:
  * "math_verify": our fairer protocol. Greedy pass@1 plus avg@n and maj@n over n samples, answers
    compared numerically, as normalized strings, then with math_verify.
  * "motif": the protocol of the MOTIF paper, whose base and GRPO rows the SSB paper reports, as the
    authors' code grades: greedy only, 1024 new tokens, a response is correct when it contains
    `\\boxed{gold}` (MATH500-style datasets) or the gold string anywhere (AIME-style datasets: those
    whose label matches a pattern in EvalConfig.motif_contains_gold, by default `aime*`).
  * "string_match": greedy only, 1024 new tokens, the last box compared with the gold answer by
    normalized string equality (ssb_jax's strict grader; not the MOTIF rule).
Every number in the results names the protocol (and grader) it was computed under; a motif row's
grader names its rule (`motif:boxed`, `motif:contains`).

Per-problem outputs go to outputs/<model>/<dataset>/<protocol>.jsonl (a RecordStore), appended batch
by batch, so a killed run resumes without redoing finished problems. Beside each, <protocol>.settings.json
records what the outputs were made from (protocol, decoding, prompts, the dataset's content digest,
the model's identity when the caller gives one, max_prompt_tokens); outputs made from anything else
stop the run with `StaleOutputsError` before any generation. Under several JAX processes each takes
every process_count-th problem and appends to its own shard file, folded in at the end. The results
table (results.json, results.md) is always recomputed from those files.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Mapping, Sequence

import jax

from ssb_jax import distributed, validate
from ssb_jax.data.datasets import KNOWN_DATASETS, OnBadLine, Problem, ProblemList, load_problems
from ssb_jax.data.records import ShardedRecordStore, shard_paths, write_json_atomic
from ssb_jax.fingerprint import StaleOutputsError, dataset_identity, differences
from ssb_jax.grading import (LABEL_CORRECT, LABEL_NO_ANSWER, RELATIVE_TOLERANCE, grade_response, motif_grade,
                             normalize_answer, parse_number)
from ssb_jax.model.tokenizer import encode_chat, stop_token_ids
from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
from ssb_jax.sampling.sampler import SamplingParams

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
OUTPUTS_DIR = "outputs"
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
STATUS_OK = "ok"
STATUS_PROMPT_TOO_LONG = "prompt_too_long"
ACCURACY_DENOMINATOR = ("all problems of the dataset (avg@n: n responses per problem); a problem whose prompt is "
                        "longer than the sampler's max_prompt_tokens gets no response and counts as wrong")


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    grader: str                # a name in ssb_jax.grading.GRADERS, or MOTIF (grading.motif_grade)
    sampled: bool              # also report avg@n and maj@n over EvalConfig.n_samples samples
    max_new_tokens: int        # 0: EvalConfig.max_new_tokens
    description: str


MOTIF = "motif"
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("math_verify", grader="math_verify", sampled=True, max_new_tokens=0,
             description="greedy pass@1 plus sampled avg@n / maj@n; answers compared numerically, "
                         "as normalized strings, then with math_verify"),
    Protocol(MOTIF, grader=MOTIF, sampled=False, max_new_tokens=1024,
             description="the MOTIF/SSB papers' protocol as their code grades: greedy decoding, 1024 new tokens, "
                         "correct when the response contains \\boxed{gold} (grader motif:boxed) or, on AIME-style "
                         "datasets, the gold string anywhere (motif:contains); nothing extracted or normalized"),
    Protocol("string_match", grader="string_match", sampled=False, max_new_tokens=1024,
             description="greedy decoding, 1024 new tokens, the last \\boxed{} answer equal to the gold answer "
                         "as normalized strings (ssb_jax's strict grader, not the MOTIF rule)"),
)}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    datasets: str = "math500,aime24"     # comma-separated: known names, label=path, or .jsonl/.parquet paths
    protocols: tuple[str, ...] = ("math_verify", MOTIF, "string_match")
    n_samples: int = 8                   # n of avg@n / maj@n (0: greedy pass@1 only)
    temperature: float = 0.6             # for the sampled responses; pass@1 is always greedy
    top_k: int = 0
    top_p: float = 0.95
    max_new_tokens: int = 1024           # for protocols without a fixed budget
    max_problems: int = 0                # the first this many problems of each dataset (0: all)
    seed: int = 0
    problems_per_batch: int = 64         # outputs are appended (and survive a crash) per batch
    # motif protocol: dataset labels (shell patterns, any case) graded by the bare gold string, as the
    # authors graded AIME; every other dataset by \boxed{gold}, as they graded MATH500
    motif_contains_gold: tuple[str, ...] = ("aime*",)

    def __post_init__(self):
        validate.non_negative(self, "temperature", "top_k")
        validate.probability(self, "top_p")
        validate.positive(self, "max_new_tokens")
        if isinstance(self.protocols, str):
            object.__setattr__(self, "protocols", tuple(p.strip() for p in self.protocols.split(",") if p.strip()))
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"protocols must be some of {sorted(PROTOCOLS)}, got {self.protocols!r}")
        if self.n_samples < 0 or self.problems_per_batch < 1 or self.max_problems < 0:
            raise ValueError("n_samples and max_problems must be >= 0 and problems_per_batch >= 1")
        if not parse_datasets(self.datasets):
            raise ValueError("datasets is empty")
        if isinstance(self.motif_contains_gold, str):
            object.__setattr__(self, "motif_contains_gold",
                               tuple(p.strip() for p in self.motif_contains_gold.split(",") if p.strip()))

    def motif_rule(self, dataset_label: str) -> str:
        """How the motif protocol grades this dataset: "contains" (AIME-style) or "boxed"."""
        label = dataset_label.lower()
        return "contains" if any(fnmatch.fnmatchcase(label, p.lower()) for p in self.motif_contains_gold) else "boxed"

    def grader_name(self, protocol: str, dataset_label: str) -> str:
        """The grader a protocol applies to a dataset, as the results name it."""
        grader = PROTOCOLS[protocol].grader
        return f"{MOTIF}:{self.motif_rule(dataset_label)}" if grader == MOTIF else grader


def dataset_specs(datasets: str) -> list[str]:
    return [s.strip() for s in str(datasets).split(",") if s.strip()]


def dataset_name(spec: str) -> str:
    """The known name, or the file's stem for a local path."""
    return spec if spec in KNOWN_DATASETS else Path(spec).stem


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One part of EvalConfig.datasets."""
    label: str    # names the outputs folder and the table's rows
    source: str   # a known dataset name or a local file path
    part: str     # as written, for messages

    @property
    def known(self) -> bool:
        return self.source in KNOWN_DATASETS


def parse_datasets(datasets: str) -> list[DatasetSpec]:
    """Each comma-separated part: `label=source`, a known name, or a bare path labelled by its stem.
    Labels must be safe file names and unique. (A path holding '=' needs a label: `x=/p/a=b.jsonl`.)"""
    specs: list[DatasetSpec] = []
    for part in dataset_specs(datasets):
        label, has_label, source = (x.strip() for x in part.partition("="))
        if not has_label:
            label, source = dataset_name(part), part
        if not source:
            raise ValueError(f"datasets: {part!r} names no dataset after '='")
        if not _SAFE_NAME.fullmatch(label):
            raise ValueError(f"datasets: the label {label!r} of {part!r} must be letters, digits, '.', '_' or '-' "
                             "(it names a folder); give one as label=path")
        clash = next((s for s in specs if s.label == label), None)
        if clash is not None:
            raise ValueError(f"datasets: {clash.part!r} and {part!r} are both labelled {label!r}; "
                             "give one another label as label=path")
        specs.append(DatasetSpec(label, source, part))
    return specs


def _dataset_inputs(spec: DatasetSpec, question_field: str | None, answer_field: str | None) -> dict:
    """What a dataset's stored outputs depend on: its content, and the field names read from it."""
    fields = (None, None) if spec.known else (question_field or None, answer_field or None)
    return {"content": dataset_identity(spec.source), "question_field": fields[0], "answer_field": fields[1]}


def load_datasets(config: EvalConfig, *, on_bad_line: OnBadLine = "error", question_field: str | None = None,
                  answer_field: str | None = None) -> dict[str, ProblemList]:
    """{label: problems}. The field names apply to local files only (known datasets have their own)."""
    datasets: dict[str, ProblemList] = {}
    for spec in parse_datasets(config.datasets):
        if spec.known:
            problems = load_problems(spec.source, on_bad_line=on_bad_line)
        else:
            problems = load_problems(spec.source, question_field=question_field or None,
                                     answer_field=answer_field or None, on_bad_line=on_bad_line, name=spec.label)
        if config.max_problems:
            problems = ProblemList(problems[:config.max_problems], problems.skipped_lines)
        datasets[spec.label] = problems
    return datasets


# ----------------------------------------------------------------------------- majority vote

def same_answer(a: str, b: str) -> bool:
    """Numeric equality (relative 1e-6) when both are numbers, else equal normalized strings."""
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-12)
    return normalize_answer(a) == normalize_answer(b)


def majority_vote(answers: Sequence[str | None]) -> tuple[int | None, int]:
    """(index of a response carrying the winning answer, its number of votes); (None, 0) if none answered.

    Missing answers do not vote. A tie goes to the answer that appeared first, so the vote depends
    only on the (seeded) samples.
    """
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        group = next((g for g in groups if same_answer(answers[g[0]], answer)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    if not groups:
        return None, 0
    winner = max(groups, key=len)  # max keeps the first of equals: the earliest answer wins ties
    return winner[0], len(winner)


# ----------------------------------------------------------------------------- generation and grading

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


def _settings_path(path: Path) -> Path:
    return path.with_name(path.stem + ".settings.json")


def _check_store(path: Path, settings: dict, unchecked: Sequence[str]) -> bool:
    """Raise StaleOutputsError when outputs at `path` (merged or in shards) were made from other
    settings or inputs; keys in `unchecked` are not compared. Returns whether to (re)write the settings."""
    settings_path = _settings_path(path)
    if not (path.exists() or shard_paths(path)):
        return True  # nothing made yet: (re)record what will be
    if not settings_path.exists():
        changes = [f"{settings_path.name} is missing (made by an older ssb_jax, or copied in)"]
    else:
        try:
            stored = json.loads(settings_path.read_text())
        except json.JSONDecodeError as error:
            stored = {"unreadable settings file": f"{error.msg} at line {error.lineno}"}
        changes = differences({k: v for k, v in stored.items() if k not in unchecked},
                              {k: v for k, v in settings.items() if k not in unchecked})
        if not changes:
            return False
    raise StaleOutputsError(
        f"eval: the outputs {path} were made from other settings or inputs ({'; '.join(changes)}). Use a new "
        "--config.workdir, or pass --config.overwrite=eval to delete them and redo the evaluation")


def _check_stores(settings: Mapping[Path, dict], unchecked: Mapping[Path, Sequence[str]]) -> None:
    """Check every store before any generation (every process compares, so all stop alike); the main
    process records the settings of stores without outputs."""
    to_write = [path for path in settings if _check_store(path, settings[path], unchecked[path])]
    if distributed.is_main_process():
        for path in to_write:
            write_json_atomic(_settings_path(path), settings[path])
    distributed.barrier("eval:settings")


def _response(completion, gold: str, grader: str) -> dict:
    """grader: a name from EvalConfig.grader_name."""
    if grader.startswith(f"{MOTIF}:"):
        graded = motif_grade(completion.text, gold, rule=grader.split(":", 1)[1])
    else:
        graded = grade_response(completion.text, gold, grader=grader)
    return {"text": completion.text, "answer": graded.answer, "label": graded.label,
            "num_tokens": len(completion.token_ids), "finish_reason": completion.finish_reason}


def _record(problem: Problem, prompt_tokens: int, greedy, samples, plan: _Plan, grader: str) -> dict:
    record = {"id": problem.id, "question": problem.question, "gold": problem.answer, "status": STATUS_OK,
              "prompt_tokens": prompt_tokens, "greedy": _response(greedy, problem.answer, grader)}
    if samples is not None:
        record["samples"] = [_response(c, problem.answer, grader) for c in samples]
        winner, votes = majority_vote([s["answer"] for s in record["samples"]])
        record["majority"] = {
            "answer": None if winner is None else record["samples"][winner]["answer"], "votes": votes,
            "label": LABEL_NO_ANSWER if winner is None else record["samples"][winner]["label"]}
    return record


def _too_long_record(problem: Problem, prompt_tokens: int) -> dict:
    return {"id": problem.id, "question": problem.question, "gold": problem.answer,
            "status": STATUS_PROMPT_TOO_LONG, "prompt_tokens": prompt_tokens}


def _prompt_limit(sampler) -> int | None:
    return getattr(sampler, "max_prompt_tokens", None)


class _Generations:
    """Completions of one batch, cached by (sampling params, n): protocols that decode alike
    (e.g. greedy at the same token budget) share one generation."""

    def __init__(self, sampler, prompt_ids: Mapping[str, list[int]], seed: int):
        self.sampler, self.prompt_ids, self.seed = sampler, prompt_ids, seed
        self.cache: dict[tuple[SamplingParams, int], dict[str, list]] = {}

    def get(self, ids: Sequence[str], sampling: SamplingParams, n: int) -> list[list]:
        done = self.cache.setdefault((sampling, n), {})
        missing = [i for i in ids if i not in done]
        if missing:
            out = self.sampler.generate_ids([self.prompt_ids[i] for i in missing], sampling, n=n, seed=self.seed,
                                            ids=missing)
            done.update(zip(missing, out))
        return [done[i] for i in ids]


def _evaluate_one(sampler, tokenizer, problems: Sequence[Problem], stores: Mapping[str, ShardedRecordStore],
                  plans: Sequence[_Plan], config: EvalConfig, prompts: PromptSet, model: str, dataset: str) -> None:
    label = f"{model}/{dataset}"
    todo = [p for p in problems if any(p.id not in stores[plan.protocol.name] for plan in plans)]
    if len(todo) < len(problems):
        log.info("eval %s: %d of %d problems already done", label, len(problems) - len(todo), len(problems))
    limit = _prompt_limit(sampler) or math.inf
    for begin in range(0, len(todo), config.problems_per_batch):
        batch = todo[begin:begin + config.problems_per_batch]
        prompt_ids = {p.id: encode_chat(tokenizer, prompts.student_messages(p.question)) for p in batch}
        for p in batch:  # recorded, counted wrong, and never fatal to the run
            if len(prompt_ids[p.id]) > limit:
                log.warning("eval %s: problem %r has %d prompt tokens, more than max_prompt_tokens=%d; recorded "
                            "as %s", label, p.id, len(prompt_ids[p.id]), limit, STATUS_PROMPT_TOO_LONG)
        generations = _Generations(sampler, prompt_ids, config.seed)
        for plan in plans:
            store = stores[plan.protocol.name]
            need = [p for p in batch if p.id not in store]
            fits = [p.id for p in need if len(prompt_ids[p.id]) <= limit]
            greedy = dict(zip(fits, (c[0] for c in generations.get(fits, plan.greedy, 1)))) if fits else {}
            sampled = dict(zip(fits, generations.get(fits, plan.sampled, plan.n))) if fits and plan.sampled else {}
            grader = config.grader_name(plan.protocol.name, dataset)
            store.append(_record(p, len(prompt_ids[p.id]), greedy[p.id], sampled.get(p.id), plan, grader)
                         if p.id in greedy
                         else _too_long_record(p, len(prompt_ids[p.id])) for p in need)
        log.info("eval %s: %d/%d problems", label, len(problems) - len(todo) + begin + len(batch), len(problems))


# ----------------------------------------------------------------------------- metrics

def _ratio(count: float, total: int) -> float | None:
    return count / total if total else None


def _response_stats(responses: Sequence[dict]) -> dict:
    return {"truncated_rate": _ratio(sum(r["finish_reason"] == "length" for r in responses), len(responses)),
            "mean_tokens": _ratio(sum(r["num_tokens"] for r in responses), len(responses))}


def _binomial_row(metric: str, labels: Sequence[str], responses: Sequence[dict], too_long: int) -> dict:
    """One 0/1 outcome per problem (labels: the generated ones; `too_long` more count as wrong);
    SE sqrt(p(1-p)/N) over all N problems."""
    n, correct = len(labels) + too_long, sum(label == LABEL_CORRECT for label in labels)
    p = _ratio(correct, n)
    return {"metric": metric, "problems": n, "prompt_too_long": too_long, "correct": correct, "out_of": n,
            "graded": len(labels), "accuracy": p, "se": None if p is None else math.sqrt(p * (1 - p) / n),
            "no_answer_rate": _ratio(sum(label == LABEL_NO_ANSWER for label in labels), len(labels)),
            **_response_stats(responses)}


def metric_rows(records: Sequence[dict], n_samples: int) -> list[dict]:
    """pass@1, and avg@n / maj@n when n_samples > 0; counts, accuracy, SE, rates, length.

    Accuracy and SE are over all records, a prompt_too_long one counting as wrong; the rates and mean
    tokens are over the responses generated."""
    generated = [r for r in records if r.get("status", STATUS_OK) != STATUS_PROMPT_TOO_LONG]
    too_long = len(records) - len(generated)
    rows = [_binomial_row("pass@1", [r["greedy"]["label"] for r in generated], [r["greedy"] for r in generated],
                          too_long)]
    if n_samples > 0:
        samples = [s for r in generated for s in r["samples"]]
        means = [statistics.fmean(s["label"] == LABEL_CORRECT for s in r["samples"]) for r in generated]
        means += [0.0] * too_long
        # SE of the mean over problems of per-problem accuracy (population SD, so avg@1 matches pass@1's SE)
        rows.append({"metric": f"avg@{n_samples}", "problems": len(records), "prompt_too_long": too_long,
                     "correct": sum(s["label"] == LABEL_CORRECT for s in samples), "out_of": n_samples * len(records),
                     "graded": len(samples), "accuracy": statistics.fmean(means) if means else None,
                     "se": statistics.pstdev(means) / math.sqrt(len(means)) if means else None,
                     "no_answer_rate": _ratio(sum(s["label"] == LABEL_NO_ANSWER for s in samples), len(samples)),
                     **_response_stats(samples)})
        rows.append(_binomial_row(f"maj@{n_samples}", [r["majority"]["label"] for r in generated], samples,
                                  too_long))
    return rows


# ----------------------------------------------------------------------------- the stage

def outputs_path(out_dir: str | Path, model: str, dataset: str, protocol: str) -> Path:
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
        if not _SAFE_NAME.fullmatch(model):
            raise ValueError(f"model name {model!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    model_identities = dict(model_identities or {})
    if set(model_identities) - set(samplers):
        raise ValueError(f"model_identities names {sorted(set(model_identities) - set(samplers))}, which are not "
                         f"among the models {sorted(samplers)}")
    out_dir = Path(out_dir)
    datasets = load_datasets(config, on_bad_line=on_bad_line, question_field=question_field,
                             answer_field=answer_field)
    inputs = {spec.label: _dataset_inputs(spec, question_field, answer_field) for spec in parse_datasets(config.datasets)}
    plans = _plans(config, tuple(stop_token_ids(tokenizer)))
    settings, unchecked = {}, {}
    for model, sampler in samplers.items():
        for dataset in datasets:
            for plan in plans:
                path = outputs_path(out_dir, model, dataset, plan.protocol.name)
                settings[path] = {**plan.settings(config.seed, prompts),
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
                          config, prompts, model, dataset)
    distributed.fold_process_shards(list(orders), "eval:end", orders)

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


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def format_markdown(results: dict) -> str:
    """The results table plus a legend naming each protocol's grader and decoding."""
    lines = ["| dataset | protocol | metric | model | correct / all | accuracy % ± SE | prompt too long "
             "| no answer % | truncated % | mean tokens |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        tokens = "–" if r["mean_tokens"] is None else f"{r['mean_tokens']:.1f}"
        lines.append(f"| {r['dataset']} | {r['protocol']} | {r['metric']} | {r['model']} | "
                     f"{r['correct']}/{r['out_of']} | {_percent(r['accuracy'])} ± {_percent(r['se'])} | "
                     f"{r['prompt_too_long']} | {_percent(r['no_answer_rate'])} | {_percent(r['truncated_rate'])} "
                     f"| {tokens} |")
    s = results["sampling"]
    lines += ["", "Protocols:"]
    for name, p in results["protocols"].items():
        lines.append(f"- **{name}** (grader `{p['grader']}`, up to {p['max_new_tokens']} new tokens): "
                     f"{p['description']}.")
    lines += ["", "pass@1: greedy decoding, one response per problem. "
              f"avg@n: mean accuracy of n responses sampled at temperature {s['temperature']}, top-k {s['top_k']}, "
              f"top-p {s['top_p']} (seed {s['seed']}); `correct` counts responses and the SE is across problems of "
              "the per-problem mean. maj@n: majority vote over the n extracted answers (numeric equality, else "
              "normalized strings; ties to the earliest answer). SE for pass@1 and maj@n: sqrt(p(1-p)/N). "
              "No answer: no \\boxed{} answer (for maj@n: none of the n responses had one; for motif: and not "
              "correct). "
              "Truncated: stopped at the token budget. Mean tokens: generated tokens, stop token included.",
              "", "Accuracy, SE and `correct / all` are over all problems of the dataset (avg@n: n responses per "
              "problem); a problem whose prompt is longer than the sampler's max_prompt_tokens gets no response "
              "and counts as wrong (`prompt too long`: how many). No answer, truncated and mean tokens are over "
              "the responses generated."]
    if not results.get("complete", True):
        lines += ["", "**Incomplete**: some problems have no outputs yet; rerun to finish."]
    return "\n".join(lines) + "\n"
