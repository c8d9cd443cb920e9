"""The GRPO stage: per iteration, sample a group of completions per question from the current policy
(base + LoRA), grade them, and update the adapters on the group-normalised advantages.

    result = run(gc, model_config, lora_config, model, sampler, problems, tokenizer, workdir, mesh=mesh)

It runs on the shared training loop (ssb_jax.training.loop), one loop step per iteration: the batch
source (`RolloutSource`) samples and grades an iteration's groups from the current adapters, the
step (`grpo_step`) turns rewards into advantages and updates the adapters on them.
`sampler` is a sampler of the student (the base with adapters of `lora_config`'s shape; the pipeline's
`RunContext.sampler`: the rollout engine or the static Sampler); each iteration writes the current adapters
into it (`set_adapters`), so its compiled programs are reused, and samples all its groups in one call.
Iteration i reads questions [i·P, (i+1)·P) of a sequence of seeded shuffles of `problems` (one per
pass) and samples with a seed derived from i, so the data position is the iteration count and a
resumed run redoes an interrupted iteration's rollouts from the same adapters and keys: an iteration is
the unit of work a checkpoint resumes, so its rollouts are not streamed to a record store.

workdir gets: checkpoints/ (orbax: adapters, optimiser state, update count; JSON: iteration and
sampled tokens so far), metrics.jsonl (one record per iteration), tb/ (TensorBoard), grpo.png,
grpo_config.json, lora_config.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from ssb_jax.data.datasets import Problem
from ssb_jax.distill.batch import quarter_power_of_two_buckets
from ssb_jax.distill.step import base_state_for_training
from ssb_jax.grpo.config import GRPOConfig
from ssb_jax.grpo.loss import group_advantages
from ssb_jax.grpo.reward import reward
from ssb_jax.grpo.batch import rollout_batch
from ssb_jax.grpo.step import GRPOStep
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.lora import LoraConfig, as_lora_state
from ssb_jax.model.tokenizer import encode_chat, stop_token_ids
from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
from ssb_jax.sampling.sampler import SamplingParams
from ssb_jax.training.loop import Hooks, TrainingLoop
from ssb_jax.training.metrics import plot_iterations

log = logging.getLogger(__name__)

PLOT_FILE = "grpo.png"
# Plotted, one panel each (a key missing from the records is skipped).
PLOTTED = (("reward_mean", "mean reward"), ("accuracy", "accuracy of the samples"),
           ("completion_len_mean", "mean completion length (tokens)"), ("truncated_share", "share cut at max_new_tokens"),
           ("kl", "KL to the base (k3, per token)"), ("clip_fraction", "clipped share of tokens"),
           ("loss", "loss"), ("grad_norm", "gradient norm (before clipping)"))


def questions_for(iteration: int, problems: Sequence[Problem], gc: GRPOConfig) -> list[Problem]:
    """The questions of an iteration: consecutive slices of seeded shuffles of `problems`, one shuffle
    per pass, so any iteration's questions follow from its number alone."""
    P, N = gc.prompts_per_step, len(problems)
    out = []
    for position in range(iteration * P, (iteration + 1) * P):
        epoch, index = divmod(position, N)
        order = list(range(N))
        random.Random(f"{gc.seed}:{epoch}").shuffle(order)
        out.append(problems[order[index]])
    return out


def _data_parallel(mesh) -> int:
    from ssb_jax.sharding import BATCH_AXES
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


@dataclasses.dataclass
class Rollouts:
    """One iteration's batch: group_size graded samples of each of its questions, question by question."""
    iteration: int
    prompts: list            # prompt ids of each sample (a question's, group_size times)
    completions: list        # sampling.driver.Completion of each sample
    graded: list             # reward(...) of each sample: (reward, correct, has an answer)
    sampled_tokens: int      # tokens sampled so far, this iteration's included
    sample_time_s: float

    @property
    def rewards(self) -> np.ndarray:
        return np.array([g[0] for g in self.graded])


class RolloutSource:
    """GRPO's batch source: iteration i's questions (questions_for), sampled from the current policy (the
    state's adapters written into the sampler) with a seed derived from i, and graded. Its position, kept
    in the checkpoint, is the iteration count and the tokens sampled so far."""

    def __init__(self, sampler, problems: Sequence[Problem], prompt_ids: dict, sampling: SamplingParams,
                 gc: GRPOConfig):
        self.sampler, self.problems, self.prompt_ids, self.sampling = sampler, problems, prompt_ids, sampling
        self.gc = gc
        self.iteration, self.sampled_tokens = 0, 0

    def next_batch(self, state) -> Rollouts:
        gc = self.gc
        started = time.perf_counter()
        chosen = questions_for(self.iteration, self.problems, gc)
        self.sampler.set_adapters(_for_sampler(state["lora"]))
        groups = self.sampler.generate_ids([self.prompt_ids[p.id] for p in chosen], self.sampling, n=gc.group_size,
                                           seed=(gc.seed * 1_000_003 + self.iteration) % (1 << 31),
                                           ids=[p.id for p in chosen])
        sample_time = time.perf_counter() - started
        completions = [c for group in groups for c in group]
        graded = [reward(c.text, p.answer, gc) for p, group in zip(chosen, groups) for c in group]
        self.sampled_tokens += sum(len(c.token_ids) for c in completions)
        rollouts = Rollouts(self.iteration, [self.prompt_ids[p.id] for p in chosen for _ in range(gc.group_size)],
                            completions, graded, self.sampled_tokens, sample_time)
        self.iteration += 1
        return rollouts

    def get_state(self) -> dict:
        return {"iteration": self.iteration, "sampled_tokens": self.sampled_tokens}

    def set_state(self, position: dict) -> None:
        self.iteration, self.sampled_tokens = int(position["iteration"]), int(position["sampled_tokens"])


def grpo_step(step: GRPOStep, base_state, gc: GRPOConfig, length_buckets, rows_multiple: int):
    """The loop's step: group-normalised advantages of an iteration's rewards, then the updates on them;
    its record: the samples' statistics, the updates' metrics, sampled tokens and timings."""
    def run_step(state, rollouts: Rollouts):
        rewards = rollouts.rewards
        advantages = group_advantages(rewards, gc.group_size, scale_by_std=gc.scale_by_std, eps=gc.advantage_eps)
        started = time.perf_counter()
        state, update_metrics = _update(step, state, base_state, rollouts.prompts,
                                        [c.token_ids for c in rollouts.completions], advantages, gc, length_buckets,
                                        rows_multiple, rollouts.iteration)
        update_time = time.perf_counter() - started
        lengths = np.array([len(c.token_ids) for c in rollouts.completions])
        return state, {"reward_mean": float(rewards.mean()),
                       "accuracy": float(np.mean([g[1] for g in rollouts.graded])),
                       "answer_rate": float(np.mean([g[2] for g in rollouts.graded])),
                       "groups_with_signal": float(np.mean(rewards.reshape(-1, gc.group_size).std(1) > 0)),
                       "completion_len_mean": float(lengths.mean()),
                       "truncated_share": float(np.mean([c.finish_reason == "length" for c in rollouts.completions])),
                       **update_metrics, "sampled_tokens": rollouts.sampled_tokens,
                       "sample_time_s": rollouts.sample_time_s, "update_time_s": update_time}
    return run_step


def run(gc: GRPOConfig, model_config: ModelConfig, lora_config: LoraConfig, model, sampler, problems: Sequence[Problem],
        tokenizer, workdir, *, prompts: PromptSet = DEFAULT_PROMPTS, mesh=None, resume: bool = True,
        stop_after: int | None = None, progress: bool = True, tensorboard: bool = True, plot: bool = True,
        curve=None) -> dict:
    """Run (or resume) GRPO; returns {"state", "lora", "history", "iterations", "interrupted", "start"}.

    model: the frozen base on `mesh` (the training mesh). stop_after: stop after this many iterations
    of this call without a final checkpoint (simulates a kill). curve: a learning curve of held-out
    greedy accuracy (the curves branch's `LearningCurve`, or anything with its `loop_hook`), called with
    the iteration as the step, before the first iteration and after each one, before that iteration's
    checkpoint; its points go to metrics.jsonl with "kind": "curve".
    """
    workdir = Path(workdir)
    limit = getattr(sampler, "max_prompt_tokens", None) or float("inf")
    encoded = [(p, encode_chat(tokenizer, prompts.student_messages(p.question))) for p in problems]
    usable = [(p, ids) for p, ids in encoded if len(ids) <= limit]
    if len(usable) < len(encoded):
        log.warning("grpo: %d of %d questions have prompts longer than %s tokens; left out",
                    len(encoded) - len(usable), len(encoded), limit)
    if not usable:
        raise ValueError("grpo: no question has a prompt short enough to sample")
    prompt_ids = {p.id: ids for p, ids in usable}
    problems = [p for p, _ in usable]
    sampling = SamplingParams(max_new_tokens=gc.max_new_tokens, temperature=gc.temperature, top_k=gc.top_k,
                              top_p=gc.top_p, stop_ids=tuple(stop_token_ids(tokenizer)))
    longest_prompt = max(len(ids) for ids in prompt_ids.values())
    length_buckets = quarter_power_of_two_buckets(16, longest_prompt + gc.max_new_tokens)  # padding < 25%

    step = GRPOStep(model_config, lora_config, gc, mesh)
    base_state = base_state_for_training(model, mesh)
    source = RolloutSource(sampler, problems, prompt_ids, sampling, gc)
    hooks = Hooks(curve_point=None if curve is None else curve.loop_hook(lambda: source.sampled_tokens))
    loop = TrainingLoop(
        workdir, gc.steps, grpo_step(step, base_state, gc, length_buckets, _data_parallel(mesh)),
        checkpoints=gc, desc="grpo", tag="grpo", hooks=hooks, progress=progress, tensorboard=tensorboard,
        postfix=lambda r: {"reward": f"{r['reward_mean']:.3f}", "kl": f"{r['kl']:.3g}"},
        config_files={"grpo_config.json": gc.to_json(),
                      "lora_config.json": json.dumps(lora_config.to_dict(), indent=2)},
        plot=plot_metrics if plot else None, position_item="progress")
    result = loop.run(step.init_state(jax.random.key(gc.seed)), source, resume=resume, stop_after=stop_after)
    return {"state": result.state, "lora": as_lora_state(result.state["lora"], model_config, lora_config),
            "history": result.history, "iterations": gc.steps, "interrupted": result.interrupted,
            "start": result.start_step}


def _for_sampler(lora):
    """The adapters as the sampler (on this process's devices) can take them: a copy, since the
    update donates the training state's arrays."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda x: x.copy(), lora)
    from ssb_jax.distributed import to_host
    return to_host(lora)


def _update(step: GRPOStep, state, base_state, prompts, completions, advantages, gc: GRPOConfig, length_buckets,
            rows_multiple: int, iteration: int):
    """Old (and reference) log-probs in fixed minibatches, then updates_per_batch shuffled passes of
    `minibatches` optimiser steps; returns (state, metrics averaged over the steps)."""
    N = len(completions)
    # one padding row at index N; every minibatch is padded with it to a multiple of the data-parallel size
    full = rollout_batch(list(prompts) + [[0]], list(completions) + [[]], max_len=gc.max_new_tokens,
                         length_buckets=length_buckets)
    size = N // gc.minibatches
    padded = -(-size // rows_multiple) * rows_multiple

    def rows(index):
        return full.take(np.concatenate([index, np.full(padded - len(index), N)]))

    old = np.zeros((N + 1, gc.max_new_tokens), np.float32)
    ref = np.zeros_like(old)
    for begin in range(0, N, size):
        index = np.arange(begin, begin + size)
        minibatch = rows(index)
        old[index] = step.logprobs(state["lora"], base_state, minibatch)[:size]
        ref[index] = step.logprobs(None, base_state, minibatch)[:size]
    full = full.replace(old_logprobs=old, ref_logprobs=ref, advantages=np.append(advantages, 0.0).astype(np.float32))
    mask = full.completion_mask[:N]
    k3 = np.exp(ref[:N] - old[:N]) - (ref[:N] - old[:N]) - 1
    totals, count = {}, 0
    order_rng = np.random.default_rng([gc.seed, iteration])
    for _ in range(gc.updates_per_batch):
        permutation = order_rng.permutation(N)
        for begin in range(0, N, size):
            state, metrics = step.update(state, base_state, rows(permutation[begin:begin + size]))
            for k, v in jax.device_get(metrics).items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += 1
    out = {k: v / count for k, v in totals.items() if k != "completion_tokens"}
    # the sampling policy's KL to the base, whether or not the loss holds a KL term
    out["kl"] = float((k3 * mask).sum() / max(mask.sum(), 1))
    out["updates"] = int(jax.device_get(state["step"]))
    return state, out


def plot_metrics(workdir, out=None) -> Path | None:
    """PNG of the GRPO metrics per iteration, plus reward against sampled tokens."""
    return plot_iterations(workdir, PLOTTED, ("reward_mean", "mean reward"), out or Path(workdir) / PLOT_FILE)
