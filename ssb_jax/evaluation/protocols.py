"""Evaluation protocols and settings.

Each protocol is a named preset (`PROTOCOLS`) that fixes the grader and the decoding:
  * "math_verify": our fairer protocol. Greedy pass@1 plus avg@n and maj@n over n samples, answers
    compared numerically, as normalized strings, then with math_verify.
  * "motif": the protocol of the MOTIF paper, whose base and GRPO rows the SSB paper reports, as the
    authors' code grades: greedy only, 1024 new tokens, a response is correct when it contains
    `\\boxed{gold}` (MATH500-style datasets) or the gold string anywhere (AIME-style datasets: the known
    aime24, and local datasets whose labels EvalConfig.motif_contains_gold lists: `motif_rule`).
  * "string_match": greedy only, 1024 new tokens, the last box compared with the gold answer by
    normalized string equality (ssb_jax's strict grader; not the MOTIF rule).
Every number in the results names the protocol (and grader) it was computed under; a motif row's
grader names its rule (`motif:boxed`, `motif:contains`: `EvalConfig.grader_name`).

The prompts are the run's (config.prompts) unless `EvalConfig.system_prompt` / `dataset_system_prompts`
name others (`EvalConfig.prompts_for`): evaluation only, so curation and training are untouched, and the
prompts are part of every outputs file's settings. configs/qwen3b_motif_eval.py evaluates the base with
MOTIF's own prompt.
"""
from __future__ import annotations

import dataclasses

from ssb_jax import validate
from ssb_jax.evaluation.datasets import MOTIF_CONTAINS_GOLD_SOURCES, parse_datasets
from ssb_jax.prompts import EVAL_SYSTEM_PROMPTS, PromptSet, eval_prompt_set
from ssb_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    grader: str                # a name in grading.GRADERS, or MOTIF (grading.motif_grade)
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
    datasets: str = setting(
        "math500,aime24",
        "comma-separated known names (math500, aime24, gsm8k_test) and/or local .jsonl/.parquet "
        "paths; world_test: the toy world's held-out split")
    protocols: tuple[str, ...] = setting(
        ("math_verify", MOTIF, "string_match"),
        "comma-separated: math_verify (greedy pass@1 + sampled avg@n/maj@n), motif (the MOTIF/SSB "
        "papers' rule: greedy, 1024 tokens, response contains \\boxed{gold}, or gold on AIME-style "
        "datasets) and/or string_match (greedy, 1024 tokens, last box equal to gold after "
        "normalization)")
    n_samples: int = setting(8, "n of avg@n / maj@n (0: greedy pass@1 only)")
    temperature: float = setting(0.6, "temperature of the sampled responses (pass@1 is always greedy)")
    top_k: int = setting(0, "top-k of the sampled responses (0: off)")
    top_p: float = setting(0.95, "top-p of the sampled responses (1.0: off)")
    max_new_tokens: int = setting(1024, "token budget for protocols without a fixed one")
    max_problems: int = setting(0, "evaluate the first this many problems of each dataset (0: all)")
    seed: int = setting(0, "seed of the sampled responses")
    problems_per_batch: int = setting(0, "problems handed to the sampler per call (0: all of a dataset's pending "
                                         "problems); outputs are appended as each problem finishes either way")
    # motif protocol: which datasets are graded by the bare gold string, as the authors graded AIME
    motif_contains_gold: tuple[str, ...] = setting(
        (),
        "comma-separated labels of local datasets that the motif protocol grades by the bare gold string, as "
        "the authors graded AIME (the known aime24 always is; every other dataset: by \\boxed{gold})")
    # evaluation-only prompts (curation and training keep config.prompts)
    system_prompt: str = setting(
        "",
        "system message of the evaluation prompts only: empty: the run's (config.prompts); motif_base (MOTIF's "
        "base rows), motif_xml (MOTIF's GRPO row on MATH500) or chat_default (no system message: the chat "
        "template's, as MOTIF's GRPO row on AIME24), each with the bare question as the user message; any "
        "other text: that system message")
    dataset_system_prompts: tuple[str, ...] = setting(
        (),
        "comma-separated label=value pairs overriding system_prompt for one dataset (value: a preset name "
        "or empty for the run's prompts)")

    def __post_init__(self):
        validate.check_declared(self)  # finite numbers and each field's declared check
        validate.non_negative(self, "temperature", "top_k")
        validate.probability(self, "top_p")
        validate.positive(self, "max_new_tokens")
        if isinstance(self.protocols, str):
            object.__setattr__(self, "protocols", tuple(p.strip() for p in self.protocols.split(",") if p.strip()))
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"protocols must be some of {sorted(PROTOCOLS)}, got {self.protocols!r}")
        if self.n_samples < 0 or self.problems_per_batch < 0 or self.max_problems < 0:
            raise ValueError("n_samples, max_problems and problems_per_batch must be >= 0")
        if not parse_datasets(self.datasets):
            raise ValueError("datasets is empty")
        labels = [spec.label for spec in parse_datasets(self.datasets)]
        for name in ("motif_contains_gold", "dataset_system_prompts"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, tuple(p.strip() for p in getattr(self, name).split(",") if p.strip()))
        stray = [label for label in self.motif_contains_gold if label not in labels]
        if stray:
            raise ValueError(f"motif_contains_gold names {stray}, which are not dataset labels of {self.datasets!r} "
                             f"(labels: {labels})")
        for pair in self.dataset_system_prompts:
            label, has_value, value = (x.strip() for x in pair.partition("="))
            if not has_value or label not in labels or (value and value not in EVAL_SYSTEM_PROMPTS):
                raise ValueError(f"dataset_system_prompts: {pair!r} must be label=preset with a label of "
                                 f"{labels} and a preset of {sorted(EVAL_SYSTEM_PROMPTS)} (or empty)")

    def motif_rule(self, dataset_label: str) -> str:
        """How the motif protocol grades this dataset: "contains" (AIME-style: a known dataset whose authors
        graded it so, or a label listed in motif_contains_gold) or "boxed". Chosen by the dataset's source
        and this setting, never by how its label is spelt."""
        spec = next((s for s in parse_datasets(self.datasets) if s.label == dataset_label), None)
        known = spec is not None and spec.source in MOTIF_CONTAINS_GOLD_SOURCES
        return "contains" if known or dataset_label in self.motif_contains_gold else "boxed"

    def system_prompt_for(self, dataset_label: str) -> str:
        """The system_prompt value that applies to a dataset (its dataset_system_prompts entry, if any)."""
        for pair in self.dataset_system_prompts:
            label, _, value = (x.strip() for x in pair.partition("="))
            if label == dataset_label:
                return value
        return self.system_prompt

    def prompts_for(self, dataset_label: str, prompts: PromptSet) -> PromptSet:
        """The prompts a dataset is evaluated with, given the run's."""
        return eval_prompt_set(prompts, self.system_prompt_for(dataset_label))

    def grader_name(self, protocol: str, dataset_label: str) -> str:
        """The grader a protocol applies to a dataset, as the results name it."""
        grader = PROTOCOLS[protocol].grader
        return f"{MOTIF}:{self.motif_rule(dataset_label)}" if grader == MOTIF else grader
