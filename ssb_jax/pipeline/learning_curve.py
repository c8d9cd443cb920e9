"""The learning curve a training stage records: greedy accuracy and length on a held-out subset, every
curves.eval_every steps, with adapters swapped into one sampler of the round's base."""
from __future__ import annotations

import logging
from pathlib import Path

from ssb_jax import curves
from ssb_jax.evaluation import PROTOCOLS, EvalConfig, load_datasets, parse_datasets
from ssb_jax.pipeline.world import WORLD_TEST, world_file

log = logging.getLogger("ssb_jax")


def learning_curve(ctx, model, lora_config, metrics_path: Path, label: str):
    """A curves.LearningCurve of adapters on `model` (the round's base on the sampling mesh), or None when
    curves.eval_every is 0. Its problems: curves.dataset, else the first of eval.datasets; its prompts: the
    evaluation's for that dataset (eval.system_prompt / dataset_system_prompts, else the run's)."""
    cc = ctx.curve_config
    if not cc.enabled:
        return None
    spec = parse_datasets(cc.dataset or ctx.config.eval.datasets)[0]
    source = world_file(ctx, "test") if spec.source == WORLD_TEST else spec.source
    d = ctx.config.data
    problems = load_datasets(EvalConfig(datasets=f"{spec.label}={source}", max_problems=cc.eval_size),
                             on_bad_line=d.on_bad_line, question_field=d.question_field or None,
                             answer_field=d.answer_field or None)[spec.label]
    protocol = PROTOCOLS[ctx.eval_config.protocols[0]]
    log.info("learning curve %s: every %d steps on %d problems of %s", label, cc.eval_every, len(problems),
             spec.label)
    return curves.LearningCurve(cc, problems, ctx.tokenizer, model, lora_config, metrics_path, label=label,
                                make_sampler=ctx.sampler, prompts=ctx.eval_config.prompts_for(spec.label, ctx.prompts),
                                grader=protocol.grader,
                                max_new_tokens=protocol.max_new_tokens or ctx.eval_config.max_new_tokens,
                                place=ctx.place_for_sampling())
