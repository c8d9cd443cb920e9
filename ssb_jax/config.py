"""The run configuration: one ml_collections ConfigDict, whose stage sections mirror the stage
dataclasses (CurationConfig, TrainConfig, EvalConfig) so their defaults live in one place.

Tuple fields appear as comma-separated strings ("q,k,v") so they are easy to override on the
command line; `section_to(cls, section)` turns a section back into its dataclass and names any key
that is not a field.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import ml_collections

from ssb_jax.curate import CurationConfig
from ssb_jax.curves import CurveConfig
from ssb_jax.distill.config import TrainConfig
from ssb_jax.evaluation.protocols import EvalConfig
from ssb_jax.grpo.config import GRPOConfig

STAGES = ("curate", "teacher_cache", "train", "sft", "grpo", "eval", "export", "report")
# comparisons (plain SFT on the same pairs, the GRPO baseline), run only when named in config.stages
BASELINE_STAGES = ("sft", "grpo")
# what runs unless config.stages says otherwise: SSB
DEFAULT_STAGES = tuple(s for s in STAGES if s not in BASELINE_STAGES)


def dataclass_section(cls) -> ml_collections.ConfigDict:
    values = {}
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(str(x) for x in default)
        values[f.name] = default
    return ml_collections.ConfigDict(values)


def section_to(cls, section: ml_collections.ConfigDict | dict, where: str):
    """The dataclass for a config section; an unknown key is an error naming it (and a near miss)."""
    values = dict(section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else ""
            raise ValueError(f"config key {where}.{key} is not a setting of {cls.__name__}{hint}")
    for name, f in fields.items():
        if isinstance(f.default, tuple) and isinstance(values.get(name), str):
            items = [x.strip() for x in values[name].split(",") if x.strip()]
            values[name] = tuple(int(x) for x in items) if "int" in str(f.type) else tuple(items)
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:  # the dataclass names the field; add where it is set
        raise ValueError(f"{where}: {error}") from None


def base_config() -> ml_collections.ConfigDict:
    """Every setting with its default; the files in configs/ start from this."""
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.stages = ",".join(DEFAULT_STAGES)
    c.overwrite = ""  # stages whose stale outputs may be deleted and redone (with every stage after them)
    c.num_rounds = 1
    c.log_level = "INFO"
    c.compile_cache_dir = "~/.cache/ssb_jax/xla"  # persistent XLA compilation cache ("" turns it off)

    c.model = ml_collections.ConfigDict(dict(
        path="Qwen/Qwen2.5-3B-Instruct",  # hub id or local HF directory
        tokenizer="",                     # empty: the model's own
        dtype="bfloat16",
        attention_impl="auto",
        remat="none",  # per-layer rematerialisation: none, full, dots, dots_no_batch
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = ml_collections.ConfigDict(dict(
        initialize="auto",  # "auto" (TPU VMs, SLURM, env vars), "yes" or "no"
        coordinator_address="", num_processes=0, process_id=-1,
    ))
    c.sampler = ml_collections.ConfigDict(dict(batch_size=64, max_prompt_tokens=2048, min_prompt_bucket=64,
                                               mesh="auto", memory_per_device_gib=0.0))
    c.prompts = ml_collections.ConfigDict(dict(system_prompt="", student_template="", hinted_template=""))
    c.data = ml_collections.ConfigDict(dict(
        train="gsm8k_train", question_field="", answer_field="", on_bad_line="error"))
    c.curate = dataclass_section(CurationConfig)
    c.train = dataclass_section(TrainConfig)
    c.eval = dataclass_section(EvalConfig)
    c.grpo = dataclass_section(GRPOConfig)
    c.curves = dataclass_section(CurveConfig)
    c.export = ml_collections.ConfigDict(dict(peft_adapter=True, merged_model=True, merged_dtype=""))
    c.world = ml_collections.ConfigDict(dict(enabled=False))  # configs/tiny.py fills this
    return c


def stage_list(config, key: str = "stages") -> list[str]:
    stages = [s.strip() for s in str(config[key]).split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            close = difflib.get_close_matches(s, STAGES, n=1)
            raise ValueError(f"unknown stage {s!r} in config.{key}; stages are {', '.join(STAGES)}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
    return stages


def check_values(config) -> None:
    """The settings outside the stage dataclasses (which check their own): refuse absurd values
    before any work."""
    for key in ("num_rounds", "sampler.batch_size", "sampler.max_prompt_tokens", "sampler.min_prompt_bucket"):
        section, _, name = key.rpartition(".")
        value = (config[section] if section else config)[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
    from ssb_jax.sharding import parse_mesh_setting
    parse_mesh_setting(config.sampler.mesh)
    memory = config.sampler.memory_per_device_gib
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not 0 <= memory < float("inf"):
        raise ValueError(f"config.sampler.memory_per_device_gib must be a number >= 0 (0: ask the device), got {memory!r}")
    if config.data.on_bad_line not in ("error", "skip"):
        raise ValueError(f"config.data.on_bad_line must be 'error' or 'skip', got {config.data.on_bad_line!r}")


def overwrite_stages(config) -> set[str]:
    """The stages --config.overwrite allows to redo: those named and every stage after the first of
    them, since their inputs change with it (grpo, which depends on none of them, only when named)."""
    named = stage_list(config, key="overwrite")
    if not named:
        return set()
    first = min(STAGES.index(s) for s in named)
    # grpo reads none of the SSB stages' outputs: only naming it redoes it
    independent = {"report"} | ({"grpo"} - set(named))
    return set(STAGES[first:]) - independent


def writable_directory(path: str, setting: str) -> Path:
    """Create `path` if needed and prove it writable, or raise one line naming the setting."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{setting}={path!r} is not a writable directory ({error.strerror or error})") from None
    return directory


def load_config_file(path: str) -> ml_collections.ConfigDict:
    import importlib.util
    if not path.endswith(".py"):
        raise ValueError(f"--config must name a configs/*.py file, got {path!r}")
    if not Path(path).is_file():
        raise ValueError(f"--config={path}: no such file (the configs are in configs/*.py)")
    spec = importlib.util.spec_from_file_location("ssb_run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """Every --config.a.b=value must name an existing key; a typo is an error with a suggestion."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, "config"
        for part in dotted.split("."):
            keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean {walked}.{close[0]}?" if close else f"; {walked} has {', '.join(sorted(keys))}"
                raise ValueError(f"{arg}: {walked} has no key {part!r}{hint}")
            node, walked = node[part], f"{walked}.{part}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted keys ("train.learning_rate": 1e-4) as --config.train.learning_rate=1e-4 would."""
    check_overrides(config, [f"--config.{key}=" for key in overrides])
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


# ----------------------------------------------------------------------------- settings on the command line

# One line per setting: --print_config shows it, and tests/test_cli.py fails on a setting without one.
SETTING_HELP: dict[str, str] = {
    "workdir": "run directory: every stage's outputs, checkpoints and the report go here",
    "stages": "comma-separated stages to run, in pipeline order: curate, teacher_cache, train, sft (the plain SFT "
              "baseline on the same curated pairs), grpo (the RL baseline), eval, export, report (sft and grpo "
              "run only when named)",
    "overwrite": "stages whose outputs from other settings may be deleted and redone (with every stage after them)",
    "num_rounds": "SSB rounds; each round's student is the next round's teacher and base",
    "log_level": "Python logging level of the run: DEBUG, INFO, WARNING or ERROR",
    "compile_cache_dir": "persistent XLA compilation cache shared by runs and stages, so a resumed run reuses "
                         "compiled programs (empty: off)",
    # model
    "model.path": "Hugging Face hub id or local HF directory of the base model (tiny config: set by the world)",
    "model.tokenizer": "tokenizer hub id or directory; empty: the model's own",
    "model.dtype": "parameter and activation dtype: bfloat16 or float32",
    "model.attention_impl": "full-sequence attention kernel: auto (cudnn on GPU, splash on TPU, else chunked from "
                            "128 tokens, xla below), xla, chunked, cudnn or splash",
    "model.remat": "per-layer rematerialisation in training: none, full, dots or dots_no_batch",
    # mesh
    "mesh.data": "devices on the data-parallel mesh axis (-1: whatever the other axes leave)",
    "mesh.fsdp": "devices the weights are sharded over (fully sharded data parallel; -1: the rest)",
    "mesh.tensor": "devices each layer's heads and MLP are split over (tensor parallel)",
    # distributed
    "distributed.initialize": "jax.distributed.initialize: auto (TPU VMs, SLURM, env vars), yes or no",
    "distributed.coordinator_address": "host:port of process 0 (empty: detected from the environment)",
    "distributed.num_processes": "number of JAX processes (0: detected from the environment)",
    "distributed.process_id": "this process's index (-1: detected from the environment)",
    # sampler
    "sampler.batch_size": "prompts decoded together per sampling step",
    "sampler.max_prompt_tokens": "longest prompt accepted; a longer one is an error naming it",
    "sampler.min_prompt_bucket": "smallest padded prompt length (prompts are padded to power-of-two buckets)",
    "sampler.mesh": "sampling mesh over each process's devices: auto (weights replicated and rows data parallel "
                    "when they fit one device, else tensor parallel over as few devices as hold them) or sizes "
                    "like data=4,tensor=2 (axes data, fsdp, tensor; one may be -1)",
    "sampler.memory_per_device_gib": "device memory the auto sampling mesh plans with (the weights may take half); "
                                     "0: the backend's own figure (CPU: host memory / CPU devices)",
    # prompts
    "prompts.system_prompt": "system message of student and teacher prompts (empty: the built-in tutor prompt)",
    "prompts.student_template": "student user message with {question} (empty: the built-in template)",
    "prompts.hinted_template": "teacher user message with {question} and the correct and wrong traces "
                               "(empty: the built-in template)",
    # data
    "data.train": "curation questions: a known name (gsm8k_train, ...) or a local .jsonl/.parquet path "
                  "(tiny config: set by the world)",
    "data.question_field": "record field holding the question (empty: detected from common names)",
    "data.answer_field": "record field holding the reference answer (empty: detected from common names)",
    "data.on_bad_line": "malformed input record: error (stop, naming it) or skip (count it)",
    # curate (CurationConfig)
    "curate.num_rollouts": "plain-prompt rollouts per question (>= 2, to see both a right and a wrong answer)",
    "curate.rollout_temperature": "sampling temperature of the rollouts",
    "curate.rollout_top_k": "top-k of the rollouts (0: off)",
    "curate.rollout_top_p": "top-p of the rollouts (1.0: off)",
    "curate.rollout_max_new_tokens": "token budget of each rollout",
    "curate.solution_temperature": "sampling temperature of the hinted teacher's solution",
    "curate.solution_top_k": "top-k of the teacher's solution (0: off)",
    "curate.solution_top_p": "top-p of the teacher's solution (1.0: off)",
    "curate.solution_max_new_tokens": "token budget of the teacher's solution",
    "curate.target_pairs": "stop once this many pairs are kept (0: process all questions)",
    "curate.min_pairs": "fewer kept pairs is a failed curation (warned, reported, exit 3); 0: half the target",
    "curate.max_questions": "look at no more than this many questions (0: all)",
    "curate.shuffle": "visit the questions in a seeded random order",
    "curate.seed": "seed of the question order and the rollouts",
    "curate.correct_choice": "which correct rollout becomes the hint: first, shortest or random",
    "curate.no_answer_is_wrong": "a rollout without a \\boxed answer counts as wrong for mixing (and may be the "
                                 "wrong hint when no wrong rollout has an answer); False: such groups are skipped, "
                                 "as in the reference code",
    "curate.solution_must_stop": "keep a teacher solution only if it ended with a stop token (False: a truncated "
                                 "solution with the right last box is kept, as in the reference code)",
    "curate.questions_per_batch": "records are appended (and survive a crash) per this many questions",
    "curate.grader": "answer grader: math_verify (lenient), string_match (strict: normalized string equality) or "
                     "exact (the reference code's: the last \\boxed{} verbatim equal to the gold string)",
    # train (TrainConfig)
    "train.learning_rate": "peak learning rate of AdamW",
    "train.schedule": "learning-rate decay after warmup: linear (to 0), cosine (to 0) or constant",
    "train.warmup_steps": "linear warmup steps",
    "train.warmup_ratio": "warmup as a fraction of all steps, used when warmup_steps is 0",
    "train.weight_decay": "AdamW weight decay",
    "train.adam_b1": "AdamW beta1",
    "train.adam_b2": "AdamW beta2",
    "train.adam_eps": "AdamW epsilon",
    "train.grad_clip": "global-norm gradient clip (<= 0: off)",
    "train.batch_size": "global batch: sequences per step",
    "train.epochs": "passes over the curated pairs",
    "train.max_steps": "> 0: stop after this many steps",
    "train.seed": "seed of the LoRA initialisation and the data order",
    "train.temperature": "softmax temperature of teacher and student in the KL term",
    "train.kl_weight": "weight of the T²·KL term (the sft stage trains with 0 and ce_weight 1)",
    "train.ce_weight": "weight of the cross-entropy term on the teacher's solution (0: KL only)",
    "train.per_sequence_mean": "average KL/CE per sequence first, then over sequences",
    "train.logits_chunk": "answer positions per sequence projected to the vocabulary at once (0: all)",
    "train.teacher_mode": "teacher logits: online (computed each step) or cached (top-k stored before training)",
    "train.topk": "cached teacher mode: log-probabilities kept per answer token",
    "train.lora_rank": "LoRA rank",
    "train.lora_alpha": "LoRA alpha (the update is scaled by alpha / rank)",
    "train.lora_targets": "comma-separated projections that get LoRA adapters",
    "train.use_rslora": "rank-stabilised LoRA: scale by alpha / sqrt(rank)",
    "train.lora_dtype": "dtype of the LoRA weights and their optimizer state",
    "train.length_buckets": "comma-separated padded sequence lengths (empty: powers of two >= min_bucket)",
    "train.min_bucket": "smallest padded sequence length",
    "train.max_seq_len": "> 0: solutions are truncated so both sequences fit in this many tokens",
    "train.student_format": "student input: chat (the chat-rendered question) or plain (system prompt and question "
                            "joined as plain text with the solution right after, as the reference code trains)",
    "train.stop_token_target": "the solution's final stop token is a training target (False: left out, as in the "
                               "reference code)",
    "train.checkpoint_every": "steps between checkpoints (a killed run resumes from the last)",
    "train.keep_checkpoints": "checkpoints kept on disk",
    "train.log_every": "steps between TensorBoard scalar writes",
    # eval (EvalConfig)
    "eval.datasets": "comma-separated known names (math500, aime24, gsm8k_test) and/or local .jsonl/.parquet "
                     "paths; world_test: the toy world's held-out split",
    "eval.protocols": "comma-separated: math_verify (greedy pass@1 + sampled avg@n/maj@n), motif (the MOTIF/SSB "
                      "papers' rule: greedy, 1024 tokens, response contains \\boxed{gold}, or gold on AIME-style "
                      "datasets) and/or string_match (greedy, 1024 tokens, last box equal to gold after normalization)",
    "eval.motif_contains_gold": "comma-separated dataset-label patterns (shell style, any case) that the motif "
                                "protocol grades by the bare gold string, as the authors graded AIME; other datasets: "
                                "by \\boxed{gold}",
    "eval.n_samples": "n of avg@n / maj@n (0: greedy pass@1 only)",
    "eval.temperature": "temperature of the sampled responses (pass@1 is always greedy)",
    "eval.top_k": "top-k of the sampled responses (0: off)",
    "eval.top_p": "top-p of the sampled responses (1.0: off)",
    "eval.max_new_tokens": "token budget for protocols without a fixed one",
    "eval.max_problems": "evaluate the first this many problems of each dataset (0: all)",
    "eval.seed": "seed of the sampled responses",
    "eval.problems_per_batch": "outputs are appended (and survive a crash) per this many problems",
    # grpo (GRPOConfig): the RL baseline, LoRA of the train section's shape on the round-1 base
    "grpo.steps": "GRPO iterations: sample groups for prompts_per_step questions, then update on them",
    "grpo.prompts_per_step": "questions per iteration (from data.train, seeded shuffles, one per pass)",
    "grpo.group_size": "samples per question (G >= 2); advantages compare a question's samples",
    "grpo.max_new_tokens": "token budget of each sample (also Dr. GRPO's constant normaliser)",
    "grpo.temperature": "sampling temperature of the policy's samples (> 0)",
    "grpo.top_k": "top-k of the samples (0: off)",
    "grpo.top_p": "top-p of the samples (1.0: off)",
    "grpo.format_reward": "reward added for having a \\boxed answer at all (a correct answer earns 1)",
    "grpo.grader": "answer grader of the reward: math_verify (lenient) or string_match (strict)",
    "grpo.clip_epsilon": "PPO clip: ratios outside [1-eps, 1+eps] stop pushing",
    "grpo.kl_beta": "weight of the k3 KL estimate to the base (LoRA off) in the loss (0: none)",
    "grpo.loss_normalization": "token_mean (all tokens of the batch, as DAPO), sequence_mean (per sample, then "
                               "over samples: original GRPO) or dr_grpo (sum / (samples * max_new_tokens))",
    "grpo.scale_by_std": "divide advantages by the group's reward std (False: Dr. GRPO, mean-centred only)",
    "grpo.advantage_eps": "added to the group std before dividing",
    "grpo.updates_per_batch": "passes over each iteration's samples",
    "grpo.minibatches": "optimiser steps per pass (must divide prompts_per_step * group_size)",
    "grpo.logits_chunk": "completion positions per sequence projected to the vocabulary at once (0: all)",
    "grpo.learning_rate": "peak learning rate of AdamW on the adapters",
    "grpo.schedule": "learning-rate decay after warmup: linear (to 0), cosine (to 0) or constant",
    "grpo.warmup_steps": "linear warmup in optimiser steps",
    "grpo.warmup_ratio": "warmup as a fraction of all optimiser steps, used when warmup_steps is 0",
    "grpo.weight_decay": "AdamW weight decay",
    "grpo.adam_b1": "AdamW beta1",
    "grpo.adam_b2": "AdamW beta2",
    "grpo.adam_eps": "AdamW epsilon",
    "grpo.grad_clip": "global-norm gradient clip (<= 0: off)",
    "grpo.seed": "seed of the LoRA initialisation, the question order, the samples and the minibatch order",
    "grpo.checkpoint_every": "iterations between checkpoints (a killed run resumes from the last)",
    "grpo.keep_checkpoints": "checkpoints kept on disk",
    "grpo.log_every": "iterations between TensorBoard scalar writes",
    # curves (CurveConfig)
    "curves.eval_every": "optimiser steps between learning-curve points (greedy accuracy and length on a "
                         "held-out subset; also at step 0 and the end); 0: off",
    "curves.eval_size": "held-out problems per learning-curve point (the first ones of curves.dataset)",
    "curves.max_new_tokens": "token budget of each learning-curve answer (0: eval.max_new_tokens)",
    "curves.dataset": "learning-curve problems: one eval dataset spec (empty: the first of eval.datasets)",
    # export
    "export.peft_adapter": "write the student's LoRA as a PEFT adapter directory",
    "export.merged_model": "write a Hugging Face model with the LoRA merged into the weights",
    "export.merged_dtype": "dtype of the merged model (empty: model.dtype)",
    # world (ToyWorldConfig; configs/tiny.py)
    "world.enabled": "build the offline toy world and run on it (configs/tiny.py)",
    "world.seed": "seed of the whole world: problems, tokenizer, model initialisation and pre-training",
    "world.num_train": "curation (train split) problems",
    "world.num_test": "held-out (test split) problems",
    "world.min_steps": "fewest steps in a problem",
    "world.max_steps": "most steps in a problem",
    "world.group_step_prob": "chance that a step is 'b groups of e' (where the slip lives)",
    "world.slip_prob": "chance that a plain-prompt pre-training solution writes b + e for b * e",
    "world.max_value": "every running total (right or slipped) stays in [0, max_value]",
    "world.max_amount": "largest number found or given away in one step",
    "world.vocab_size": "BPE tokenizer vocabulary size",
    "world.hidden_size": "model hidden size",
    "world.intermediate_size": "model MLP size",
    "world.num_layers": "model layers",
    "world.num_heads": "attention heads",
    "world.num_kv_heads": "key/value heads (grouped-query attention)",
    "world.head_dim": "size of each attention head",
    "world.pretrain_steps": "pre-training steps",
    "world.plain_batch": "plain-prompt examples per pre-training step",
    "world.hinted_batch": "hinted-prompt examples per pre-training step",
    "world.pretrain_pool": "distinct generated examples of each kind that batches are drawn from",
    "world.learning_rate": "peak pre-training learning rate (warmup, then cosine decay)",
    "world.warmup_steps": "pre-training warmup steps",
    "world.weight_decay": "pre-training AdamW weight decay",
    "world.prompt_loss_weight": "loss weight of prompt tokens (their repeated numbers teach copying)",
    "world.drill_batch": "arithmetic drill texts per pre-training step (0: none)",
    "world.drill_facts": "arithmetic facts per drill text",
    "world.length_buckets": "length buckets pre-training batches are padded to (one compile each)",
    "world.log_every": "pre-training steps between loss lines when stderr is not a terminal "
                       "(a terminal shows a progress bar)",
}


def flat_settings(config: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted key, value) of every leaf setting, sections in place."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def undescribed_settings(config: ml_collections.ConfigDict) -> list[str]:
    return [key for key, _ in flat_settings(config) if key not in SETTING_HELP]


def describe_config(config: ml_collections.ConfigDict) -> str:
    """Every setting as `key = value  # description`, one a line, values as Python literals."""
    rows = [(f"{key} = {value!r}", SETTING_HELP.get(key, "(no description)")) for key, value in flat_settings(config)]
    width = min(max(len(setting) for setting, _ in rows), 56)  # a long prompt value does not push every line
    return "\n".join(f"{setting:{width}}  # {text}" for setting, text in rows)


def parse_config_args(argv: list[str], default_path: str | None = None):
    """(config, the other arguments) from a command line: --config=FILE (or --config FILE, else
    default_path) with each --config.key=value applied, parsed to the key's type as ml_collections'
    config flags do. A key that does not exist is a ValueError naming it and a near miss; a value of
    the wrong type one naming the setting."""
    from absl import flags
    from ml_collections import config_flags
    argv = list(argv)
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    path = path or default_path
    if path is None:
        raise ValueError("--config is required: a configs/*.py file")
    check_overrides(load_config_file(path), argv)
    # A private flag registry: absl's global one would refuse a second parse in the same process.
    command_line = ["prog", *argv]
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file("config", path, "a configs/*.py file", flag_values=registry,
                                    lock_config=True, sys_argv=command_line)
    try:
        rest = registry(command_line, known_only=True)[1:]
    except flags.Error as error:
        raise ValueError(str(error)) from None
    return registry.config, rest
