"""What the stages of one run share: settings as dataclasses, the run directory, the meshes, the base
model and tokenizer, a sampler factory, the models finished stages publish for evaluation, and the
identities fingerprints are made of.

The sampling stages (curate, teacher_cache, eval) run on a sampling mesh of each process's own devices
(sharding.sampling_mesh: weights replicated and rows data parallel when they fit one device), each process
over its share of the questions; training is one program over the global (training) mesh, config.mesh,
with a second copy of the base placed there (with one process the training code places it from the
sampling copy; under several, `global_base` loads it again).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import jax

from ssb_jax import config as config_lib
from ssb_jax import fingerprint as fp
from ssb_jax.compile_options import enable_persistent_cache
from ssb_jax.curate import CurationConfig
from ssb_jax.curves import CurveConfig
from ssb_jax.data.records import write_json_atomic
from ssb_jax.distill.config import TrainConfig
from ssb_jax.distributed import barrier, check_shared_directory, is_main_process, maybe_initialize, to_host
from ssb_jax.evaluation.protocols import EvalConfig
from ssb_jax.grpo.config import GRPOConfig
from ssb_jax.pipeline.stage import DONE_FILE, Registry
from ssb_jax.prompts import prompts_from_config
from ssb_jax.sampling.mesh import sampling_mesh
from ssb_jax.sharding import auto_mesh_shape, check_batch_divides, make_mesh, parse_mesh_setting, shard_state

log = logging.getLogger("ssb_jax")


class RunStopped(RuntimeError):
    """A stage cannot go on for a reason the user can fix (no pairs to train on, a missing round)."""


class CurationShortfall(RuntimeError):
    """Curation kept fewer pairs than count as success (curate.min_pairs); the run still finishes."""


@dataclasses.dataclass
class Candidate:
    """A model a finished stage offers for evaluation and export: adapters (loaded on first use) on a
    base, and what its weights are (a digest the evaluation's outputs are checked against)."""
    base: object                      # a Qwen2ForCausalLM on the sampling mesh
    identity: str
    load_adapters: Callable[[], tuple] | None = None  # () -> (LoRA state on the sampling mesh, LoraConfig)
    _adapters: tuple | None = None

    def adapters(self) -> tuple:
        """(LoRA state, LoraConfig), or (None, None) for the base itself."""
        if self.load_adapters is None:
            return None, None
        if self._adapters is None:
            self._adapters = self.load_adapters()
        return self._adapters

    def sampler_args(self) -> tuple:
        lora, lora_config = self.adapters()
        return (self.base,) if lora is None else (self.base, lora, lora_config)


def mark_done(directory: Path, **info) -> None:
    """DONE.json: when the stage finished and `info` (its wall_s: seconds of the session that finished it,
    so a stage resumed after a kill reports its last session only)."""
    if is_main_process():
        write_json_atomic(directory / DONE_FILE, {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **info})
    barrier(f"done:{directory}")  # no process reads the marker before it exists


def kv_heads_hint(config) -> int | None:
    """The model's KV heads as its config.json says, for the automatic training mesh; None when it cannot
    be read yet (the toy world builds its model later)."""
    if not config.model.path:
        return None
    from ssb_jax.plan.analytic import model_config_of
    try:
        return model_config_of(config).num_kv_heads
    except Exception as error:  # noqa: BLE001 (a hint: unreadable means no limit from the heads)
        log.info("the training mesh is chosen without the model's KV heads (%s)", error)
        return None


class RunContext:
    """The run's shared pieces; stages read and publish through it."""

    def __init__(self, config, registry: Registry):
        self.config = config
        self.registry = registry
        self.stages = registry.parse(config.stages)
        self.overwrite = registry.downstream(registry.parse(config.overwrite, "config.overwrite"))
        config_lib.check_values(config)
        maybe_initialize(config.distributed)
        try:
            enable_persistent_cache(config.compile_cache_dir)
        except OSError as error:  # a cache is an optimisation: an unwritable place costs compile time only
            log.warning("config.compile_cache_dir=%r unusable (%s); compiling without a persistent cache",
                        config.compile_cache_dir, error)
        self.curation = config_lib.section_to(CurationConfig, config.curate, "config.curate")
        self.train_config = config_lib.section_to(TrainConfig, config.train, "config.train")
        self.eval_config = config_lib.section_to(EvalConfig, config.eval, "config.eval")
        self.grpo_config = config_lib.section_to(GRPOConfig, config.grpo, "config.grpo")
        self.curve_config = config_lib.section_to(CurveConfig, config.curves, "config.curves")
        self.prompts = prompts_from_config(config)
        self.mesh = make_mesh(auto_mesh_shape(dict(config.mesh), jax.device_count(), self.train_config.batch_size,
                                              kv_heads_hint(config), jax.process_count()))
        if any("training" in registry.get(name).uses for name in self.stages):  # before any stage runs
            check_batch_divides(self.train_config.batch_size, self.mesh, "config.train.batch_size")
        # after every settings check: a refused run makes no run directory
        self.workdir = config_lib.writable_directory(config.workdir, "config.workdir")
        check_shared_directory(self.workdir)
        self.sample_mesh_setting = parse_mesh_setting(config.sampler.mesh)
        self.sample_mesh = None  # chosen in load_base once the model's size is known
        self.model_config = self.base_model = self.tokenizer = None
        self.round = 0
        self.round_model = None  # the current round's base on the sampling mesh
        self.candidates: dict[str, Candidate] = {}  # label -> a model to evaluate ("base", "student", ...)
        self._decode_copies = (None, {})  # (base model, its decode-layout arrays) shared by CPU samplers
        self._model_identity = None  # fingerprint.model_identity of model.path, read once per run

    # ------------------------------------------------------------------ models

    def load_base(self) -> None:
        import ssb_jax
        from ssb_jax.model.config import ModelConfig
        from ssb_jax.model.tokenizer import load_tokenizer
        from ssb_jax.model.weights import check_vocabulary, resolve_checkpoint
        m, s = self.config.model, self.config.sampler
        model_config = ModelConfig.from_json(resolve_checkpoint(m.path) / "config.json").replace(dtype=m.dtype)
        self.tokenizer = load_tokenizer(m.tokenizer or m.path)  # before the weights: its checks are cheaper
        check_vocabulary(self.tokenizer, model_config, m.path, m.tokenizer or m.path)
        try:
            self.sample_mesh = sampling_mesh(model_config, jax.local_devices(), shape=self.sample_mesh_setting,
                                             memory_per_device=s.memory_per_device_gib * 2**30 or None)
        except ValueError as error:  # an explicit shape this process's devices cannot fill
            raise ValueError(f"config.sampler.mesh={s.mesh!r}: {error}") from None
        self.model_config, self.base_model = ssb_jax.load_model(m.path, dtype=m.dtype, mesh=self.sample_mesh,
                                                                attention_impl=m.attention_impl, remat=m.remat,
                                                                finite_check=m.check_weights)
        self.round_model = self.base_model
        self.candidates["base"] = Candidate(self.base_model, fp.digest(self.base_identity(1)))
        log.info("model %s: %.1fM parameters, %s, training mesh %s, sampling mesh %s", m.path,
                 self.model_config.param_count() / 1e6, self.model_config.dtype, dict(self.mesh.shape),
                 dict(self.sample_mesh.shape))

    def sampler(self, model, lora_state=None, lora_config=None):
        """A sampler of `model`, or of its student with these adapters: the rollout engine
        (config.sampler.engine=continuous: rows data parallel over this process's sampling mesh, a page pool per
        shard) or the static Sampler; both have generate, generate_ids and set_adapters and return the same
        Completions (the same tokens)."""
        from ssb_jax.model.lora import with_adapters
        from ssb_jax.sampling.driver import Sampler, unrolled_layers
        s = self.config.sampler
        if self._decode_copies[0] is not model:  # samplers of the same base share one decode-layout copy
            self._decode_copies = (model, {})
        student = model if lora_state is None else with_adapters(model, lora_state, lora_config)
        if s.engine == "continuous":
            from ssb_jax.engine.engine import Engine
            return Engine(student, self.tokenizer, slots=s.slots or 4 * s.batch_size, page_size=s.page_size,
                          max_prompt_tokens=s.max_prompt_tokens, unstack=unrolled_layers(s.layers_layout),
                          decode_copies=self._decode_copies[1], mesh=self.sample_mesh,
                          memory_per_device=s.memory_per_device_gib * 2**30 or None, attention=s.decode_attention)
        return Sampler(student, self.tokenizer, batch_size=s.batch_size,
                       max_prompt_tokens=s.max_prompt_tokens, min_prompt_bucket=s.min_prompt_bucket,
                       mesh=self.sample_mesh if self.sample_mesh.size > 1 else None,
                       unstack=unrolled_layers(s.layers_layout), decode_copies=self._decode_copies[1])

    def global_base(self):
        """The base weights for training: the sampling copy itself with one process (the trainer places
        it on the training mesh), loaded a second time onto the global mesh under several."""
        if jax.process_count() == 1:
            return self.base_model
        import ssb_jax
        m = self.config.model
        _, model = ssb_jax.load_model(m.path, dtype=m.dtype, mesh=self.mesh, attention_impl=m.attention_impl,
                                      remat=m.remat, finite_check="off")  # checked when loaded for sampling
        return model

    def training_base(self, r: int):
        """Round r's base on the global mesh: the base merged with the students of rounds < r."""
        if jax.process_count() == 1:
            return self.round_model
        from ssb_jax.model.lora import merge_lora
        model = self.global_base()
        for previous in range(1, r):
            lora, _, lora_config = self.student(previous)
            model = merge_lora(model, lora, lora_config)
        return model

    def start_round(self, r: int) -> None:
        """Round r > 1 starts from round r - 1's student, merged into its base."""
        if r > 1:
            from ssb_jax.model.lora import merge_lora
            student = self.candidates.pop("student", None)
            if student is None:
                raise RunStopped(f"round {r - 1} has no trained student, so round {r} has no base; "
                                 "include the train stage")
            lora, lora_config = student.adapters()
            self.round_model = merge_lora(self.round_model, lora, lora_config)
        self.round = r

    def student(self, r: int, stage: str = "train"):
        """Round r's trained adapters of a training stage: (on the global mesh, on the sampling mesh,
        their LoraConfig)."""
        from ssb_jax.distill.train import load_lora
        lora, lora_config = load_lora(self.round_dir(r) / stage, self.model_config, self.train_config,
                                      mesh=self.mesh if self.mesh.size > 1 else None)
        local = lora if jax.process_count() == 1 else to_host(lora)
        return lora, shard_state(local, self.sample_mesh), lora_config

    def place_for_sampling(self):
        """A function placing adapters trained on the global mesh onto this process's sampling mesh
        (None with one process: the sampler places them)."""
        if jax.process_count() == 1:
            return None
        return lambda lora: shard_state(to_host(lora), self.sample_mesh)

    # ------------------------------------------------------------------ directories and identities

    def round_dir(self, r: int) -> Path:
        return self.workdir / f"round_{r}"

    def round_curation(self, r: int) -> CurationConfig:
        return dataclasses.replace(self.curation, seed=self.curation.seed + 1000 * (r - 1))  # fresh rollouts per round

    def check_fingerprint(self, directory: Path, stage: str, fingerprint: dict) -> None:
        """Stop on outputs made from other settings or inputs (or delete them under --config.overwrite)."""
        fp.check(directory, stage, fingerprint, overwrite=stage in self.overwrite, write=False)
        barrier(f"fingerprint-compared:{directory}")  # every process compared before the main one writes
        if is_main_process():
            fp.check(directory, stage, fingerprint, overwrite=stage in self.overwrite)
        barrier(f"fingerprint:{directory}")

    def base_identity(self, r: int) -> dict:
        """What round r's base model is: everything that changes what it sees or says (weights, config,
        tokenizer files, chat template, generation config: fingerprint.model_identity of the model's
        directory, and of model.tokenizer's when that is set), then each earlier round's student."""
        m = self.config.model
        if self._model_identity is None:
            from ssb_jax.model.weights import resolve_checkpoint
            local = Path(m.path).expanduser().is_dir()
            model = m.path if local else str(resolve_checkpoint(m.path))  # a hub id: its downloaded snapshot
            self._model_identity = fp.model_identity(model)
            if m.tokenizer:
                self._model_identity = {"checkpoint": self._model_identity, "tokenizer": fp.model_identity(m.tokenizer)}
        identity = {"model": self._model_identity, "dtype": m.dtype, "attention_impl": m.attention_impl}
        if r > 1:
            identity["students"] = [self.stage_digest(q, "train") for q in range(1, r)]
        return identity

    def stage_digest(self, r: int | None, stage: str) -> str:
        """A digest of a stage's stored fingerprint (what a downstream stage depends on)."""
        return fp.digest(fp.read(self.registry.get(stage).directory(self, r)) or {})

    def data_identity(self) -> dict:
        d = self.config.data
        return {"train": fp.dataset_identity(d.train), "question_field": d.question_field,
                "answer_field": d.answer_field, "on_bad_line": d.on_bad_line}

    def load_training_problems(self):
        from ssb_jax.data.datasets import load_problems
        d = self.config.data
        return load_problems(d.train, question_field=d.question_field or None, answer_field=d.answer_field or None,
                             on_bad_line=d.on_bad_line)
