"""The run configuration: one ml_collections ConfigDict whose every section mirrors a settings dataclass
(`SECTIONS`): the dataclass fields hold each setting's default and one-line help text, so both live in
one place and `--print_config` is generated from them.

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

from ssb_jax import validate
from ssb_jax.curate import CurationConfig
from ssb_jax.curves import CurveConfig
from ssb_jax.distill.config import TrainConfig
from ssb_jax.evaluation.protocols import EvalConfig
from ssb_jax.grpo.config import GRPOConfig
from ssb_jax.onpolicy.config import OnPolicyConfig, OPSDConfig, SDPOConfig
from ssb_jax.settings import help_texts, setting
from ssb_jax.toyworld import ToyWorldConfig


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The top-level settings."""
    workdir: str = setting("runs/default", "run directory: every stage's outputs, checkpoints and the report go here",
                           check=validate.non_empty)
    stages: str = setting("", "comma-separated stages to run, in pipeline order (python -m ssb_jax.main --help lists "
                              "them; the baselines sft and grpo run only when named)")
    overwrite: str = setting("", "stages whose outputs are deleted and redone, whatever made them (with every "
                                 "stage that reads them); every run naming them redoes them")
    num_rounds: int = setting(1, "SSB rounds; each round's student is the next round's teacher and base")
    log_level: str = setting("INFO", "Python logging level of the run: DEBUG, INFO, WARNING or ERROR",
                             check=validate.one_of("DEBUG", "INFO", "WARNING", "ERROR", ignore_case=True))
    compile_cache_dir: str = setting("~/.cache/ssb_jax/xla", "persistent XLA compilation cache shared by runs and "
                                     "stages, so a resumed run reuses compiled programs (empty: off)")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str = setting("Qwen/Qwen2.5-3B-Instruct", "Hugging Face hub id or local HF directory of the base model "
                        "(tiny config: set by the world)")
    tokenizer: str = setting("", "tokenizer hub id or directory; empty: the model's own")
    dtype: str = setting("bfloat16", "parameter and activation dtype: bfloat16 or float32",
                         check=validate.one_of("bfloat16", "float32", "float16"))
    attention_impl: str = setting("auto", "full-sequence attention kernel: auto (cudnn on GPU, splash on TPU, else "
                                  "chunked from 128 tokens, xla below), xla, chunked, cudnn or splash",
                                  check=validate.one_of("auto", "xla", "chunked", "cudnn", "splash"))
    remat: str = setting("none", "per-layer rematerialisation in training: none, full, dots or dots_no_batch",
                         check=validate.one_of("none", "full", "dots", "dots_no_batch"))
    check_weights: str = setting("sample", "NaN/infinity check of the weights at load: sample (4096 values a tensor, "
                                 "free), full (every value: one more pass over the weights) or off",
                                 check=validate.one_of("sample", "full", "off"))


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """The training mesh; axes left at 0 are chosen from the devices, the batch and the model's KV heads
    (sharding.auto_mesh_shape)."""
    data: int = setting(0, "devices on the data-parallel mesh axis (0: auto; -1: whatever the other axes leave)")
    fsdp: int = setting(0, "devices the weights are sharded over (fully sharded data parallel; 0: auto; -1: the rest)")
    tensor: int = setting(0, "devices each layer's heads and MLP are split over (tensor parallel; 0: auto, only as "
                          "far as the batch needs and the KV heads allow)")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    initialize: str = setting("auto", "jax.distributed.initialize: auto (TPU VMs, SLURM, env vars), yes or no",
                              check=validate.one_of("auto", "yes", "no"))
    coordinator_address: str = setting("", "host:port of process 0 (empty: detected from the environment)")
    num_processes: int = setting(0, "number of JAX processes (0: detected from the environment)")
    process_id: int = setting(-1, "this process's index (-1: detected from the environment)")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    batch_size: int = setting(64, "prompts decoded together per sampling step")
    max_prompt_tokens: int = setting(2048, "longest prompt accepted; a longer one is an error naming it")
    min_prompt_bucket: int = setting(64, "smallest padded prompt length (prompts are padded to power-of-two buckets)")
    mesh: str = setting("auto", "sampling mesh over each process's devices: auto (weights replicated and rows data "
                        "parallel when they fit one device, else tensor parallel over as few devices as hold them) or "
                        "sizes like data=4,tensor=2 (axes data, fsdp, tensor; one may be -1)")
    memory_per_device_gib: float = setting(0.0, "device memory the auto sampling mesh plans with (the weights may "
                                           "take half); 0: the backend's own figure (CPU: host memory / CPU devices)")
    layers_layout: str = setting("auto", "decode with each layer's weights apart in an unrolled loop, or the stacked "
                                 "weights under scan; auto: unrolled on CPU and GPU, scan on TPU "
                                 "(sampling.driver.unrolled_layers)", validate.one_of("auto", "scan", "unrolled"))
    engine: str = setting("continuous", "continuous: the rollout engine (ssb_jax.engine: continuous batching over a paged "
                          "KV cache, the same tokens; rows data parallel over the sampling mesh, a page pool per "
                          "shard); static: the bucketed static batches (sampling.driver.Sampler)",
                          validate.one_of("continuous", "static"))
    slots: int = setting(0, "rows the continuous engine decodes together (0: 4 x batch_size)", validate.at_least(0))
    page_size: int = setting(16, "KV cache slots per page of the continuous engine's page pool", validate.at_least(1))
    decode_attention: str = setting("auto", "the continuous engine's decode attention: auto (JAX's Pallas paged-attention "
                                    "kernel on TPU and GPU, the XLA gather elsewhere), xla, pallas_tpu or pallas_gpu",
                                    validate.one_of("auto", "xla", "pallas_tpu", "pallas_gpu"))


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    system_prompt: str = setting("", "system message of student and teacher prompts (empty: the built-in tutor "
                                 "prompt)")
    student_template: str = setting("", "student user message with {question} (empty: the built-in template)")
    hinted_template: str = setting("", "teacher user message with {question} and the correct and wrong traces "
                                   "(empty: the built-in template)")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train: str = setting("gsm8k_train", "curation questions: a known name (gsm8k_train, ...) or a local "
                         ".jsonl/.parquet path (tiny config: set by the world)")
    question_field: str = setting("", "record field holding the question (empty: detected from common names)")
    answer_field: str = setting("", "record field holding the reference answer (empty: detected from common names)")
    on_bad_line: str = setting("error", "malformed input record: error (stop, naming it) or skip (count it)",
                               check=validate.one_of("error", "skip"))


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    peft_adapter: bool = setting(True, "write the student's LoRA as a PEFT adapter directory")
    merged_model: bool = setting(True, "write a Hugging Face model with the LoRA merged into the weights")
    merged_dtype: str = setting("", "dtype of the merged model (empty: model.dtype)")


@dataclasses.dataclass(frozen=True)
class WorldSwitch:
    """config.world holds this switch; configs/tiny.py adds the ToyWorldConfig fields."""
    enabled: bool = setting(False, "build the offline toy world and run on it (configs/tiny.py)")


# section name ("" the top level) -> the dataclasses whose fields are its settings, with their help text
SECTIONS: dict[str, tuple[type, ...]] = {
    "": (RunSettings,), "model": (ModelSettings,), "mesh": (MeshSettings,), "distributed": (DistributedSettings,),
    "sampler": (SamplerSettings,), "prompts": (PromptSettings,), "data": (DataSettings,),
    "curate": (CurationConfig,), "train": (TrainConfig,), "eval": (EvalConfig,), "grpo": (GRPOConfig,),
    "onpolicy": (OnPolicyConfig,), "opsd": (OPSDConfig,), "sdpo": (SDPOConfig,),
    "curves": (CurveConfig,), "export": (ExportSettings,), "world": (WorldSwitch, ToyWorldConfig),
}
# sections whose base_config holds only the first dataclass's fields (the rest are added by a config file)
PARTIAL_SECTIONS = ("world",)


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
            values[name] = list_setting(f, values[name], f"{where}.{name}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:  # the dataclass names the field; add where it is set
        raise ValueError(f"{where}: {error}") from None


def list_setting(field: dataclasses.Field, text: str, key: str) -> tuple:
    """A tuple setting from its comma-separated form ("128,256" -> (128, 256) for a tuple of ints); a
    value that is not a list of such items is an error naming `key`."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if "int" not in str(field.type):
        return tuple(items)
    try:
        return tuple(int(x) for x in items)
    except ValueError:
        raise ValueError(f"{key} must be comma-separated integers, got {text!r}") from None


def base_config() -> ml_collections.ConfigDict:
    """Every setting with its default; the files in configs/ start from this."""
    from ssb_jax.pipeline.registry import REGISTRY  # the registry's stages read this module's sections
    c = dataclass_section(RunSettings)
    c.stages = ",".join(REGISTRY.default_names())
    for name, classes in SECTIONS.items():
        if name:
            c[name] = dataclass_section(classes[0])
    return c


def check_values(config) -> None:
    """Refuse absurd values before any work (a run, --print_config): every setting of every section
    against its declaration (finite numbers, the `check` of its `setting(...)`, lists that parse), then
    the checks that span settings."""
    for section, classes in SECTIONS.items():
        node = config if not section else config.get(section)
        if node is None:
            continue
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.name not in node or isinstance(node[f.name], ml_collections.ConfigDict):
                    continue
                key, value = f"config.{section}.{f.name}" if section else f"config.{f.name}", node[f.name]
                if isinstance(f.default, tuple) and isinstance(value, str):
                    list_setting(f, value, key)
                else:
                    validate.check_setting(f, value, key)
    # what the run builds from them: the stage lists, and each section's dataclass (its __post_init__ checks)
    from ssb_jax.pipeline.registry import REGISTRY
    REGISTRY.parse(config.stages)
    REGISTRY.parse(config.overwrite, "config.overwrite")
    for section, classes in SECTIONS.items():
        node = config.get(section) if section else None
        cls = classes[-1]
        if node is None or not hasattr(cls, "__post_init__"):
            continue
        names = {f.name for f in dataclasses.fields(cls)}
        if section in PARTIAL_SECTIONS:  # its dataclass only when a config file added its fields
            if not names & set(node.keys()):
                continue
            node = {k: v for k, v in node.items() if k in names}
        section_to(cls, node, f"config.{section}")
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

def setting_help() -> dict[str, str]:
    """Every setting's one-line description, from the settings dataclasses' field metadata (`--print_config`
    shows it; tests/pipeline/test_cli.py fails on a setting without one)."""
    texts = {}
    for name, classes in SECTIONS.items():
        for cls in classes:
            texts.update({f"{name}.{key}" if name else key: text for key, text in help_texts(cls).items()})
    return texts


def flat_settings(config: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted key, value) of every leaf setting, sections in place."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def undescribed_settings(config: ml_collections.ConfigDict) -> list[str]:
    described = setting_help()
    return [key for key, _ in flat_settings(config) if key not in described]


def describe_config(config: ml_collections.ConfigDict) -> str:
    """Every setting as `key = value  # description`, one a line, values as Python literals."""
    described = setting_help()
    rows = [(f"{key} = {value!r}", described.get(key, "(no description)")) for key, value in flat_settings(config)]
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
    check_values(registry.config)  # as a run would, so --print_config and the planner refuse what it refuses
    return registry.config, rest
