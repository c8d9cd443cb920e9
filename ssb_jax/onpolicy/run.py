"""The on-policy trainer: per iteration, the current student samples, the teacher scores the samples under a
privileged context, the student takes one optimiser step on its plain question at its own tokens.

    result = run(oc, model_config, lora_config, model, sampler, questions, tokenizer, workdir, mesh=mesh)

It runs on the shared training loop, one loop step per iteration, like GRPO (ssb_jax.grpo.run): the batch
source (`SampleSource`) writes the state's adapters into the sampler (`set_adapters`; the pipeline's
`RunContext.sampler`, the rollout engine or the static Sampler), samples in one call iteration i's questions (grpo.run.questions_for: seeded shuffles, so the questions follow from i) with a seed
derived from i, grades the samples, gives each a privileged context (ssb_jax.onpolicy.contexts) and builds the
aligned teacher/student batch; the step (`OnPolicyStep`) scores and updates. The source's position (the
iteration and the tokens sampled so far) is checkpointed with the state, so a killed run resumes at the last
checkpoint and redoes the iterations after it from the same adapters and keys: every step is done once (an
iteration is the unit a checkpoint resumes, so its samples are not streamed to a record store).

workdir gets: checkpoints/, metrics.jsonl (one record per iteration, learning-curve points with "kind":
"curve"), tb/, <tag>.png (the dynamics: onpolicy.png, opsd.png, sdpo.png), onpolicy_config.json,
lora_config.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import types
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from ssb_jax.data.datasets import Problem
from ssb_jax.distill.batch import DistillBatch, build_batch
from ssb_jax.distill.step import base_state_for_training
from ssb_jax.evaluation.grading import grade_response
from ssb_jax.grpo.run import _data_parallel, _for_sampler, questions_for
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, as_lora_state
from ssb_jax.model.tokenizer import stop_token_ids
from ssb_jax.onpolicy.config import OnPolicyConfig
from ssb_jax.onpolicy.contexts import (PrivilegedContext, StudentInput, TeacherInput, has_ssb_context, peer_context,
                                       reference_context, ssb_context, student_prompt_ids, teacher_prompt_ids)
from ssb_jax.onpolicy.step import OnPolicyStep
from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
from ssb_jax.sampling.sampler import SamplingParams
from ssb_jax.training.loop import Hooks, TrainingLoop, host_numbers
from ssb_jax.training.metrics import plot_iterations

log = logging.getLogger(__name__)

# Plotted per iteration, one panel each (training.metrics.plot_iterations; with lambda < 1 the on-policy
# term's metrics carry the prefix onpolicy_). The clipped share only when clipping is on.
PLOTTED = (("loss", "loss"),
           (("divergence", "reverse_kl", "onpolicy_divergence", "onpolicy_reverse_kl"),
            "divergence to the teacher (per token)"),
           ("accuracy", "accuracy of the samples"), ("completion_len_mean", "mean completion length (tokens)"),
           (("clipped_share", "onpolicy_clipped_share"), "clipped share of tokens"),
           ("grad_norm", "gradient norm (before clipping)"))


def plot_metrics(workdir, out=None, *, tag: str = "onpolicy", clipped: bool = True) -> Path | None:
    """PNG of the on-policy metrics per iteration (PLOTTED; the clipped share only when `clipped`), plus
    sample accuracy against sampled tokens: workdir/<tag>.png."""
    panels = [p for p in PLOTTED if clipped or p[1] != "clipped share of tokens"]
    return plot_iterations(workdir, panels, ("accuracy", "accuracy of the samples"),
                           out or Path(workdir) / f"{tag}.png")


@dataclasses.dataclass(frozen=True)
class Question:
    """One question of the pool: what the student sees, the gold answer (for grading) and its fixed
    privileged context (None for the peer context, which is chosen per sample)."""
    student: StudentInput
    gold: str
    context: PrivilegedContext | None

    @property
    def id(self) -> str:
        return self.student.problem_id


def ssb_questions(records: Sequence[Mapping]) -> list[Question]:
    """The curation records with SSB's hint (mixed groups whose hinted prompt fit the sampler)."""
    out = [Question(StudentInput(problem_id=str(r["id"]), question=r["question"]), r["gold"], ssb_context(r))
           for r in records if has_ssb_context(r) and r.get("verdict") != "prompt_too_long"]
    if not out:
        raise ValueError("curation kept no mixed group with a correct and a wrong rollout: the context 'ssb' has "
                         "nothing to show")
    return out


def dataset_questions(problems: Sequence[Problem], context: str) -> list[Question]:
    """The training problems, with their reference solutions (context 'reference') or none ('peer')."""
    if context not in ("reference", "peer"):
        raise ValueError(f"dataset questions take the context 'reference' or 'peer', got {context!r}")
    return [Question(StudentInput.of(p), p.answer, reference_context(p) if context == "reference" else None)
            for p in problems]


@dataclasses.dataclass
class Iteration:
    """One iteration's batch: the samples' statistics and the step's batches."""
    iteration: int
    batch: dict                # {"onpolicy": DistillBatch, "offline": DistillBatch (lambda < 1)}
    correct: list              # per sample
    lengths: list              # completion tokens per sample
    truncated: list            # per sample: cut at max_new_tokens
    with_context: int          # samples that got a teacher (peer context: a successful other sample)
    sampled_tokens: int        # so far, this iteration's included
    sample_time_s: float


def onpolicy_batch(rows: Sequence[Mapping], batch_size: int, min_bucket: int) -> DistillBatch:
    """The aligned teacher/student batch of samples ({"id", "student_prompt_ids", "teacher_prompt_ids",
    "solution_ids", "solution_finish_reason"}); with no sample, one row that trains on nothing."""
    if rows:
        return build_batch(rows, batch_size=batch_size, min_bucket=min_bucket)
    empty = build_batch([{"id": "none", "student_prompt_ids": [0], "teacher_prompt_ids": [0], "solution_ids": [0]}],
                        batch_size=batch_size, min_bucket=min_bucket)
    return empty.replace(answer_mask=np.zeros_like(empty.answer_mask), row_valid=np.zeros_like(empty.row_valid))


class SampleSource:
    """The on-policy batch source (see the module docstring); its position is the iteration count and the
    tokens sampled so far."""

    def __init__(self, sampler, questions: Sequence[Question], tokenizer, prompts: PromptSet,
                 sampling: SamplingParams, oc: OnPolicyConfig, rows: int, offline_records=None, offline_config=None):
        self.sampler, self.questions, self.tokenizer, self.prompts = sampler, list(questions), tokenizer, prompts
        self.sampling, self.oc, self.rows = sampling, oc, rows
        self.offline_records, self.offline_config = offline_records, offline_config
        self.student_ids = {q.id: student_prompt_ids(q.student, tokenizer, prompts) for q in self.questions}
        self._teacher_ids = {}  # fixed contexts, rendered once per question
        self.iteration, self.sampled_tokens = 0, 0

    def teacher_ids(self, question: Question, context: PrivilegedContext) -> list[int]:
        if question.context is None:
            return teacher_prompt_ids(TeacherInput(question.student, context), self.tokenizer, self.prompts)
        if question.id not in self._teacher_ids:
            self._teacher_ids[question.id] = teacher_prompt_ids(TeacherInput(question.student, context),
                                                                self.tokenizer, self.prompts)
        return self._teacher_ids[question.id]

    def next_batch(self, state) -> Iteration:
        oc = self.oc
        started = time.perf_counter()
        chosen = questions_for(self.iteration, self.questions, oc)
        self.sampler.set_adapters(_for_sampler(state["lora"]))
        seed = (oc.seed * 1_000_003 + self.iteration) % (1 << 31)  # the iteration's samples follow from its number
        groups = self.sampler.generate_ids([self.student_ids[q.id] for q in chosen], self.sampling,
                                           n=oc.samples_per_prompt, seed=seed, ids=[q.id for q in chosen])
        sample_time = time.perf_counter() - started
        rows, correct, lengths, truncated = [], [], [], []
        for q, group in zip(chosen, groups):
            right = [grade_response(c.text, q.gold, grader=oc.grader).correct for c in group]
            texts = [c.text for c in group]
            for i, c in enumerate(group):
                correct.append(right[i])
                lengths.append(len(c.token_ids))
                truncated.append(c.finish_reason == "length")
                context = q.context if q.context is not None else peer_context(texts, right, i)
                if context is None or not c.token_ids:
                    continue
                rows.append({"id": f"{q.id}#{i}", "student_prompt_ids": self.student_ids[q.id],
                             "teacher_prompt_ids": self.teacher_ids(q, context), "solution_ids": list(c.token_ids),
                             "solution_finish_reason": c.finish_reason})
        self.sampled_tokens += sum(lengths)
        batch = {"onpolicy": onpolicy_batch(rows, self.rows, oc.min_bucket)}
        if self.offline_config is not None:
            batch["offline"] = self.offline_batch()
        out = Iteration(self.iteration, batch, correct, lengths, truncated, len(rows), self.sampled_tokens,
                        sample_time)
        self.iteration += 1
        return out

    def offline_batch(self) -> DistillBatch:
        """SSB's batch of this iteration: consecutive slices of seeded shuffles of the kept pairs."""
        tc = self.offline_config
        picked = questions_for(self.iteration, self.offline_records,
                               types.SimpleNamespace(prompts_per_step=tc.batch_size, seed=tc.seed))
        return build_batch(picked, batch_size=tc.batch_size, buckets=tc.length_buckets, min_bucket=tc.min_bucket,
                           max_seq_len=tc.max_seq_len, student_format=tc.student_format,
                           stop_token_target=tc.stop_token_target)

    def get_state(self) -> dict:
        return {"iteration": self.iteration, "sampled_tokens": self.sampled_tokens}

    def set_state(self, position: dict) -> None:
        self.iteration, self.sampled_tokens = int(position["iteration"]), int(position["sampled_tokens"])


def onpolicy_step(step: OnPolicyStep, base_state):
    """The loop's step: the update on an iteration's batch; its record: the samples' statistics, the
    update's metrics, sampled tokens and timings."""
    def run_step(state, it: Iteration):
        started = time.perf_counter()
        state, metrics = step.update(state, base_state, it.batch)
        metrics = host_numbers(metrics)
        update_time = time.perf_counter() - started
        return state, {"accuracy": float(np.mean(it.correct)), "completion_len_mean": float(np.mean(it.lengths)),
                       "truncated_share": float(np.mean(it.truncated)),
                       "with_context_share": it.with_context / max(len(it.correct), 1),
                       **{k: v for k, v in metrics.items() if not k.endswith("answer_tokens")},
                       "trained_tokens": int(metrics.get("answer_tokens", metrics.get("onpolicy_answer_tokens", 0))),
                       "updates": int(jax.device_get(state["step"])), "sampled_tokens": it.sampled_tokens,
                       "sample_time_s": it.sample_time_s, "update_time_s": update_time}
    return run_step


def run(oc: OnPolicyConfig, model_config: ModelConfig, lora_config: LoraConfig, model, sampler,
        questions: Sequence[Question], tokenizer, workdir, *, prompts: PromptSet = DEFAULT_PROMPTS, mesh=None,
        offline_records=None, offline_config=None, resume: bool = True, stop_after: int | None = None,
        progress: bool = True, tensorboard: bool = True, plot: bool = True, curve=None, tag: str = "onpolicy") -> dict:
    """Run (or resume) on-policy self-distillation; returns {"state", "lora", "history", "interrupted", "start"}.

    model: the frozen base on `mesh`. offline_records / offline_config: SSB's kept pairs and the train
    section's settings, read when oc.onpolicy_weight < 1. stop_after: stop after this many iterations of
    this call without a final checkpoint (simulates a kill). curve: a learning curve (curves.LearningCurve)."""
    limit = getattr(sampler, "max_prompt_tokens", None) or float("inf")
    usable = [q for q in questions if len(student_prompt_ids(q.student, tokenizer, prompts)) <= limit]
    if len(usable) < len(questions):
        log.warning("%s: %d of %d questions have prompts longer than %s tokens; left out", tag,
                    len(questions) - len(usable), len(questions), limit)
    if not usable:
        raise ValueError(f"{tag}: no question has a prompt short enough to sample")
    if oc.onpolicy_weight < 1 and not offline_records:
        raise ValueError(f"{tag}: onpolicy_weight < 1 mixes in SSB's offline loss, which needs curated pairs")
    sampling = SamplingParams(max_new_tokens=oc.max_new_tokens, temperature=oc.sample_temperature, top_k=oc.top_k,
                              top_p=oc.top_p, stop_ids=tuple(stop_token_ids(tokenizer)))
    step = OnPolicyStep(model_config, lora_config, oc, offline_config, mesh)
    dp = _data_parallel(mesh)
    unit = dp * oc.microbatches  # padded so that each microbatch splits over the data-parallel devices
    rows = -(-oc.rows_per_step // unit) * unit
    source = SampleSource(sampler, usable, tokenizer, prompts, sampling, oc, rows, offline_records, step.tc)
    hooks = Hooks(curve_point=None if curve is None else curve.loop_hook(lambda: source.sampled_tokens))
    loop = TrainingLoop(
        workdir, oc.steps, onpolicy_step(step, base_state_for_training(model, mesh)), checkpoints=oc, desc=tag,
        tag=tag, hooks=hooks, progress=progress, tensorboard=tensorboard,
        postfix=lambda r: {"acc": f"{r['accuracy']:.3f}", "loss": f"{r['loss']:.3g}"},
        config_files={"onpolicy_config.json": oc.to_json(),
                      "lora_config.json": json.dumps(lora_config.to_dict(), indent=2)},
        plot=functools.partial(plot_metrics, tag=tag, clipped=oc.clip > 0) if plot else None,
        position_item="progress")
    result = loop.run(step.init_state(jax.random.key(oc.seed)), source, resume=resume, stop_after=stop_after)
    return {"state": result.state, "lora": as_lora_state(result.state["lora"], model_config, lora_config),
            "history": result.history, "interrupted": result.interrupted, "start": result.start_step}
