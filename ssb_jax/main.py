"""`python -m ssb_jax.main --config configs/qwen3b.py [--config.key=value ...]`

Runs the stages in order: (world, for the offline tiny config) curate -> teacher_cache -> train per
round, then (when named in config.stages) the GRPO baseline, then eval, export, report. Each stage is skipped when its outputs are complete, so rerunning
the same command after a crash continues where it stopped; `--config.stages=eval` runs a subset.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax

from ssb_jax import config as config_lib
from ssb_jax.data.records import RecordStore, write_json_atomic, write_text_atomic

log = logging.getLogger("ssb_jax")

DONE_FILE = "DONE.json"
WORLD_TEST = "world_test"  # in eval.datasets: the toy world's held-out split
# settings whose change extends a curation rather than invalidating it
CURATION_RESUMABLE = ("target_pairs", "max_questions", "questions_per_batch", "min_pairs")
# train settings that change how the run is kept or reported, not what it computes
TRAIN_OPERATIONAL = ("checkpoint_every", "keep_checkpoints", "log_every", "logits_chunk")
TEACHER_CACHE_SETTINGS = ("topk", "temperature", "length_buckets", "min_bucket", "max_seq_len")
# grpo settings that change how the run is kept or reported, not what it computes
GRPO_OPERATIONAL = ("checkpoint_every", "keep_checkpoints", "log_every", "logits_chunk")


def _done(directory: Path) -> bool:
    return (directory / DONE_FILE).exists()


def _mark_done(directory: Path, **info) -> None:
    """DONE.json: when the stage finished and `info` (its wall_s: seconds of the session that finished it,
    so a stage resumed after a kill reports its last session only)."""
    from ssb_jax.distributed import barrier, is_main_process
    if is_main_process():
        write_json_atomic(directory / DONE_FILE, {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **info})
    barrier(f"done:{directory}")  # no process reads the marker before it exists


def _prompts(config):
    from ssb_jax.prompts import DEFAULT_PROMPTS, PromptSet
    overrides = {k: v for k, v in config.prompts.items() if v}
    return PromptSet(**overrides) if overrides else DEFAULT_PROMPTS


class Pipeline:
    """Holds what the stages share (config, meshes, model, tokenizer); each stage is one method.

    The sampling stages (curate, teacher_cache, eval) run on a sampling mesh of each process's own
    devices (sharding.sampling_mesh: weights replicated and rows data parallel when they fit one
    device), each process over its share of the questions; training is one program over the global
    (training) mesh, config.mesh, with a second copy of the base placed there (with one process
    train.run places it from the sampling copy; under several, global_base loads it again).
    """

    def __init__(self, config):
        from ssb_jax.distributed import check_shared_directory, maybe_initialize
        self.config = config
        self.stages = config_lib.stage_list(config)
        self.overwrite = config_lib.overwrite_stages(config)
        config_lib.check_values(config)
        maybe_initialize(config.distributed)
        from ssb_jax.compile_options import enable_persistent_cache
        try:
            enable_persistent_cache(config.compile_cache_dir)
        except OSError as error:  # a cache is an optimisation: an unwritable place costs compile time only
            log.warning("config.compile_cache_dir=%r unusable (%s); compiling without a persistent cache",
                        config.compile_cache_dir, error)
        self.workdir = config_lib.writable_directory(config.workdir, "config.workdir")
        check_shared_directory(self.workdir)
        self.curation = config_lib.section_to(_curation_cls(), config.curate, "config.curate")
        self.train_config = config_lib.section_to(_train_cls(), config.train, "config.train")
        self.eval_config = config_lib.section_to(_eval_cls(), config.eval, "config.eval")
        self.grpo_config = config_lib.section_to(_grpo_cls(), config.grpo, "config.grpo")
        from ssb_jax.curves import CurveConfig
        self.curve_config = config_lib.section_to(CurveConfig, config.curves, "config.curves")
        self.prompts = _prompts(config)
        from ssb_jax.sharding import check_batch_divides, make_mesh, parse_mesh_setting
        self.mesh = make_mesh(dict(config.mesh))
        if "train" in self.stages:  # before any stage runs, not at the first training step
            check_batch_divides(self.train_config.batch_size, self.mesh, "config.train.batch_size")
        self.sample_mesh_setting = parse_mesh_setting(config.sampler.mesh)
        self.sample_mesh = None  # sharding.sampling_mesh, chosen in load_base once the model's size is known
        self._decode_copies = (None, {})  # (base model, its decode-layout arrays) shared by CPU samplers
        self._model_identity = None  # fingerprint.model_identity of model.path, read once per run

    # ------------------------------------------------------------------ shared pieces

    def world(self):
        """The offline toy world (configs/tiny.py): data, tokenizer and a pre-trained small model."""
        if not self.config.world.enabled:
            return
        from ssb_jax import toyworld
        from ssb_jax.distributed import barrier, is_main_process
        world_config = config_lib.section_to(toyworld.ToyWorldConfig,
                                             {k: v for k, v in self.config.world.items() if k != "enabled"},
                                             "config.world")
        from ssb_jax.evaluate import dataset_specs
        eval_specs = dataset_specs(self.config.eval.datasets) if "eval" in self.stages else []
        wanted = [key for key, empty in (("model.path", not self.config.model.path),
                                         ("data.train", not self.config.data.train),
                                         ("eval.datasets", WORLD_TEST in eval_specs)) if empty]
        if not wanted:
            log.info("toy world: not built (model.path, data.train and eval.datasets are all given)")
            return
        if is_main_process():
            toyworld.build(world_config, self.workdir / "world")
        barrier("world")
        paths = toyworld.world_paths(self.workdir / "world")
        with self.config.unlocked():
            if "model.path" in wanted:
                self.config.model.path = str(paths["checkpoint"])
            if "data.train" in wanted:
                self.config.data.train = str(paths["train"])
            if "eval.datasets" in wanted:
                self.config.eval.datasets = ",".join(f"{WORLD_TEST}={paths['test']}" if spec == WORLD_TEST else spec
                                                     for spec in eval_specs)
        log.info("toy world: supplies %s", ", ".join(wanted))
        self.eval_config = config_lib.section_to(_eval_cls(), self.config.eval, "config.eval")

    def load_base(self):
        import ssb_jax
        from ssb_jax.model.tokenizer import load_tokenizer
        from ssb_jax.model.config import ModelConfig
        from ssb_jax.model.weights import resolve_checkpoint
        from ssb_jax.sharding import sampling_mesh
        m, s = self.config.model, self.config.sampler
        model_config = ModelConfig.from_json(resolve_checkpoint(m.path) / "config.json").replace(dtype=m.dtype)
        try:
            self.sample_mesh = sampling_mesh(model_config, jax.local_devices(), shape=self.sample_mesh_setting,
                                             memory_per_device=s.memory_per_device_gib * 2**30 or None)
        except ValueError as error:  # an explicit shape this process's devices cannot fill
            raise ValueError(f"config.sampler.mesh={s.mesh!r}: {error}") from None
        self.model_config, self.base_model = ssb_jax.load_model(m.path, dtype=m.dtype, mesh=self.sample_mesh,
                                                                attention_impl=m.attention_impl, remat=m.remat)
        self.tokenizer = load_tokenizer(m.tokenizer or m.path)
        log.info("model %s: %.1fM parameters, %s, training mesh %s, sampling mesh %s", m.path,
                 self.model_config.param_count() / 1e6, self.model_config.dtype, dict(self.mesh.shape),
                 dict(self.sample_mesh.shape))

    def sampler(self, model, lora_state=None, lora_config=None):
        """A Sampler of `model`, or of its student with these adapters."""
        from ssb_jax.model.lora import with_adapters
        from ssb_jax.sampling.driver import Sampler
        s = self.config.sampler
        if self._decode_copies[0] is not model:  # samplers of the same base share one decode-layout copy
            self._decode_copies = (model, {})
        student = model if lora_state is None else with_adapters(model, lora_state, lora_config)
        return Sampler(student, self.tokenizer, batch_size=s.batch_size,
                       max_prompt_tokens=s.max_prompt_tokens, min_prompt_bucket=s.min_prompt_bucket,
                       mesh=self.sample_mesh if self.sample_mesh.size > 1 else None,
                       decode_copies=self._decode_copies[1])

    def global_base(self):
        """The base weights for training: the sampling copy itself with one process (train.run places
        it on the training mesh), loaded a second time onto the global mesh under several."""
        if jax.process_count() == 1:
            return self.base_model
        import ssb_jax
        m = self.config.model
        _, model = ssb_jax.load_model(m.path, dtype=m.dtype, mesh=self.mesh, attention_impl=m.attention_impl,
                                      remat=m.remat)
        return model

    def round_dir(self, r: int) -> Path:
        return self.workdir / f"round_{r}"

    # ------------------------------------------------------------------ stages

    def curate(self, r: int, model):
        from ssb_jax import curate
        from ssb_jax.data.datasets import load_problems
        out = self.round_dir(r) / "curate"
        config = self._round_curation(r)
        self._check_fingerprint(out, "curate", self.curate_fingerprint(r))
        summary_path = out / curate.SUMMARY_FILE
        if summary_path.exists() and curate.finished(json.loads(summary_path.read_text()), config):
            log.info("round %d curate: complete, skipped", r)
            return
        d = self.config.data
        problems = load_problems(d.train, question_field=d.question_field or None,
                                 answer_field=d.answer_field or None, on_bad_line=d.on_bad_line)
        log.info("round %d curate: %d questions from %s", r, len(problems), d.train)
        started = time.perf_counter()
        summary = curate.run(problems, self.sampler(model), self.tokenizer, config, out, prompts=self.prompts)
        _mark_done(out, wall_s=time.perf_counter() - started, sampled_tokens=summary["sampled_tokens"]["total"])

    def _round_curation(self, r: int):
        return dataclasses.replace(self.curation, seed=self.curation.seed + 1000 * (r - 1))  # fresh rollouts per round

    def _check_fingerprint(self, directory: Path, stage: str, fingerprint: dict) -> None:
        """Stop on outputs made from other settings or inputs (or delete them under --config.overwrite)."""
        from ssb_jax import fingerprint as fp
        from ssb_jax.distributed import barrier, is_main_process
        fp.check(directory, stage, fingerprint, overwrite=stage in self.overwrite, write=False)
        barrier(f"fingerprint-compared:{directory}")  # every process compared before the main one writes
        if is_main_process():
            fp.check(directory, stage, fingerprint, overwrite=stage in self.overwrite)
        barrier(f"fingerprint:{directory}")

    def base_identity(self, r: int) -> dict:
        """What round r's base model is: the loaded weights, then each earlier round's student."""
        from ssb_jax import fingerprint as fp
        m = self.config.model
        if self._model_identity is None:
            self._model_identity = fp.model_identity(m.path)
        identity = {"model": self._model_identity, "dtype": m.dtype, "attention_impl": m.attention_impl}
        if r > 1:
            identity["students"] = [self._student_digest(q) for q in range(1, r)]
        return identity

    def curate_fingerprint(self, r: int) -> dict:
        from ssb_jax import fingerprint as fp
        d = self.config.data
        settings = {k: v for k, v in dataclasses.asdict(self._round_curation(r)).items()
                    if k not in CURATION_RESUMABLE}
        return {"base": self.base_identity(r), "settings": settings, "prompts": dataclasses.asdict(self.prompts),
                "max_prompt_tokens": self.config.sampler.max_prompt_tokens,
                "data": {"train": fp.dataset_identity(d.train), "question_field": d.question_field,
                         "answer_field": d.answer_field, "on_bad_line": d.on_bad_line}}

    def trainer_fingerprint(self, r: int, stage: str, train_config=None) -> dict:
        """teacher_cache and train (or sft, with its train_config): the round's base, its training
        examples, the settings they read."""
        from ssb_jax import fingerprint as fp
        tc = (train_config or self.train_config).to_dict()
        keys = TEACHER_CACHE_SETTINGS if stage == "teacher_cache" else [k for k in tc if k not in TRAIN_OPERATIONAL]
        # the teacher cache is a function of exactly these (its settings are among train's), so train
        # needs no digest of it
        return {"base": self.base_identity(r), "examples": fp.digest({"pairs": self.examples(r)}),
                "settings": {k: tc[k] for k in keys}}

    def examples(self, r: int) -> list[dict]:
        from ssb_jax import curate
        records = RecordStore(self.round_dir(r) / "curate" / curate.RECORDS_FILE).read_all()
        pairs = curate.kept_pairs(records, self.curation.target_pairs)
        if not pairs:
            raise RunStopped(f"round {r}: curation kept no pairs (see {self.round_dir(r) / 'curate'}); "
                             "nothing to train on")
        return pairs

    def teacher_cache(self, r: int, model):
        if self.train_config.teacher_mode != "cached":
            return
        from ssb_jax.distill.teacher_cache import build_teacher_cache_sharded
        out = self.round_dir(r) / "teacher_cache"
        self._check_fingerprint(out, "teacher_cache", self.trainer_fingerprint(r, "teacher_cache"))
        if (out / "index.json").exists():
            log.info("round %d teacher_cache: complete, skipped", r)
            return
        tc = self.train_config
        build_teacher_cache_sharded(model, self.model_config, self.examples(r), out, k=tc.topk,
                                    temperature=tc.temperature, batch_size=tc.batch_size, chunk=tc.logits_chunk,
                                    buckets=tc.length_buckets, min_bucket=tc.min_bucket, max_seq_len=tc.max_seq_len)

    def train(self, r: int, base, model):
        """SSB. base: a function giving the round's base on the global mesh (loaded only when training
        runs); model: the round's base on the sampling mesh (for the learning curve)."""
        self._train_adapters(r, base, model, "train", self.train_config, label="ssb")

    def sft(self, r: int, base, model):
        """The plain SFT baseline: its own adapters, trained by cross-entropy on the same curated pairs
        (TrainConfig.as_sft), in round_r/sft with its own fingerprint; evaluated as "sft"."""
        self._train_adapters(r, base, model, "sft", self.train_config.as_sft(), label="sft")

    def _train_adapters(self, r: int, base, model, stage: str, tc, label: str):
        from ssb_jax import train
        out = self.round_dir(r) / stage
        self._check_fingerprint(out, stage, self.trainer_fingerprint(r, "train", tc))
        if _done(out):
            log.info("round %d %s: complete, skipped", r, stage)
            return
        started = time.perf_counter()
        curve = self.learning_curve(model, tc, out / train.METRICS_FILE, label)
        result = train.run(tc, self.model_config, base(), self.examples(r), out, mesh=self.mesh,
                           resume=True, teacher_cache_dir=self.round_dir(r) / "teacher_cache", curve=curve,
                           sampled_tokens=self.curation_tokens(r) if curve is not None else 0)
        if not result.get("interrupted"):
            last = result["history"][-1] if result["history"] else {}
            _mark_done(out, steps=result["total_steps"], final_metrics=last, wall_s=time.perf_counter() - started)

    def curation_tokens(self, r: int) -> int:
        """Tokens round r's curation sampled (rollouts and teacher solutions): SSB's and SFT's training cost
        in samples, the learning curves' x-axis."""
        from ssb_jax import curate
        return curate.sampled_tokens(RecordStore(self.round_dir(r) / "curate" / curate.RECORDS_FILE).read_all())["total"]

    def learning_curve(self, model, tc, metrics_path: Path, label: str):
        """A curves.LearningCurve of adapters on `model` (the round's base on the sampling mesh), or None
        when curves.eval_every is 0. Its problems: curves.dataset, else the first of eval.datasets."""
        cc = self.curve_config
        if not cc.enabled:
            return None
        from ssb_jax import curves, evaluate
        spec = evaluate.parse_datasets(cc.dataset or self.config.eval.datasets)[0]
        source = spec.source
        if source == WORLD_TEST:  # the world stage resolves it only for the eval stage
            from ssb_jax.toyworld import world_paths
            source = str(world_paths(self.workdir / "world")["test"])
        d = self.config.data
        problems = evaluate.load_datasets(
            evaluate.EvalConfig(datasets=f"{spec.label}={source}", max_problems=cc.eval_size),
            on_bad_line=d.on_bad_line, question_field=d.question_field or None,
            answer_field=d.answer_field or None)[spec.label]
        protocol = evaluate.PROTOCOLS[self.eval_config.protocols[0]]
        place = None
        if jax.process_count() > 1:  # trained on the global mesh, sampled on this process's devices
            from ssb_jax.distributed import to_host
            from ssb_jax.sharding import shard_state
            place = lambda lora: shard_state(to_host(lora), self.sample_mesh)  # noqa: E731
        log.info("learning curve %s: every %d steps on %d problems of %s", label, cc.eval_every, len(problems),
                 spec.label)
        return curves.LearningCurve(cc, problems, self.tokenizer, model, tc.lora_config(), metrics_path, label=label,
                                    make_sampler=self.sampler, prompts=self.prompts, grader=protocol.grader,
                                    max_new_tokens=protocol.max_new_tokens or self.eval_config.max_new_tokens,
                                    place=place)

    def student(self, r: int, stage: str = "train"):
        """Round r's trained student (stage "sft": the SFT baseline's): (adapters on the global mesh, the
        same adapters on the sampling mesh, its LoraConfig)."""
        from ssb_jax import train
        lora, lora_config = train.load_lora(self.round_dir(r) / stage, self.model_config, self.train_config,
                                            mesh=self.mesh if self.mesh.size > 1 else None)
        from ssb_jax.sharding import shard_state
        if jax.process_count() == 1:  # placed again on the sampling mesh (a device-to-device copy)
            return lora, shard_state(lora, self.sample_mesh), lora_config
        from ssb_jax.distributed import to_host
        return lora, shard_state(to_host(lora), self.sample_mesh), lora_config

    def evaluate(self, models: dict, identities: dict | None = None):
        """models: {name: sampler arguments}; identities: {name: what its weights are}, checked against
        stored outputs."""
        from ssb_jax import evaluate
        samplers = {name: self.sampler(*m) for name, m in models.items()}
        d = self.config.data  # read like curation's data: bad-line policy, field names for local files
        return evaluate.run(samplers, self.tokenizer, self.eval_config, self.workdir / "eval", prompts=self.prompts,
                            model_identities=identities, on_bad_line=d.on_bad_line,
                            question_field=d.question_field or None, answer_field=d.answer_field or None)

    def export(self, model, lora, lora_config):
        from ssb_jax.export import export_merged_model, export_peft_adapter
        out = self.workdir / "export"
        if _done(out):
            log.info("export: complete, skipped")
            return
        if jax.process_index() == 0:
            dtype = self.config.export.merged_dtype or None
            if self.config.export.peft_adapter:
                base = self.config.model.path
                if self.config.num_rounds > 1:  # the last adapters sit on the earlier rounds' merged students
                    base = export_merged_model(model, None, None, self.model_config, out / "peft_base",
                                               tokenizer=self.tokenizer, dtype=dtype)
                export_peft_adapter(lora, lora_config, out / "peft_adapter", base, tokenizer=self.tokenizer)
            if self.config.export.merged_model:
                export_merged_model(model, lora, lora_config, self.model_config, out / "merged",
                                    tokenizer=self.tokenizer, dtype=dtype)
        _mark_done(out)
        log.info("export: PEFT adapter and merged model in %s", out)

    def grpo_fingerprint(self) -> dict:
        """The GRPO baseline: the round-1 base, the training questions, the prompt, its settings and the
        adapters' shape (the train section's)."""
        from ssb_jax import fingerprint as fp
        d = self.config.data
        return {"base": self.base_identity(1), "prompts": dataclasses.asdict(self.prompts),
                "max_prompt_tokens": self.config.sampler.max_prompt_tokens,
                "lora": self.train_config.lora_config().to_dict(),
                "settings": {k: v for k, v in self.grpo_config.to_dict().items() if k not in GRPO_OPERATIONAL},
                "data": {"train": fp.dataset_identity(d.train), "question_field": d.question_field,
                         "answer_field": d.answer_field, "on_bad_line": d.on_bad_line}}

    def grpo(self, base):
        """The GRPO baseline on data.train from the round-1 base, with LoRA of the SSB student's shape;
        its adapters are exported to grpo/export (PEFT, and merged when export.merged_model).
        base: a function giving the base on the global mesh."""
        from ssb_jax.data.datasets import load_problems
        from ssb_jax.grpo import run as grpo_run
        out = self.workdir / "grpo"
        self._check_fingerprint(out, "grpo", self.grpo_fingerprint())
        if _done(out):
            log.info("grpo: complete, skipped")
            return
        started = time.perf_counter()
        d = self.config.data
        problems = load_problems(d.train, question_field=d.question_field or None,
                                 answer_field=d.answer_field or None, on_bad_line=d.on_bad_line)
        lora_config = self.train_config.lora_config()
        from ssb_jax.model.lora import init_lora
        # adapters placed as the trained ones will be: set_adapters keeps this placement
        placed = init_lora(self.model_config, lora_config, jax.random.key(0),
                           mesh=self.sample_mesh if self.sample_mesh.size > 1 else None)
        sampler = self.sampler(self.base_model, placed, lora_config)
        log.info("grpo: %d questions from %s, %d iterations of %d x %d samples", len(problems), d.train,
                 self.grpo_config.steps, self.grpo_config.prompts_per_step, self.grpo_config.group_size)
        result = grpo_run.run(self.grpo_config, self.model_config, lora_config, base(), sampler, problems,
                              self.tokenizer, out, prompts=self.prompts, mesh=self.mesh, curve=self._grpo_curve(out))
        if result["interrupted"]:
            return
        if jax.process_index() == 0:
            from ssb_jax.distributed import to_host
            from ssb_jax.export import export_merged_model, export_peft_adapter
            lora = result["lora"] if jax.process_count() == 1 else to_host(result["lora"])
            export_peft_adapter(lora, lora_config, out / "export" / "peft_adapter", self.config.model.path,
                                tokenizer=self.tokenizer)
            if self.config.export.merged_model:
                export_merged_model(self.base_model, lora, lora_config, self.model_config, out / "export" / "merged",
                                    tokenizer=self.tokenizer, dtype=self.config.export.merged_dtype or None)
        last = result["history"][-1] if result["history"] else {}
        _mark_done(out, iterations=result["iterations"], final_metrics=last, wall_s=time.perf_counter() - started)

    def _grpo_curve(self, out: Path):
        """The GRPO baseline's learning curve (held-out greedy accuracy and length; curves.eval_every counts
        iterations), or None when curves are off. Its adapters have the train section's LoRA shape."""
        return self.learning_curve(self.base_model, self.train_config, out / "metrics.jsonl", "grpo")

    def grpo_student(self):
        """The GRPO baseline's adapters on the sampling mesh (from its exported PEFT adapter) and their
        LoraConfig."""
        from safetensors.numpy import load_file
        from ssb_jax.export import ADAPTER_WEIGHTS
        from ssb_jax.model.lora import lora_from_peft
        lora_config = self.train_config.lora_config()
        tensors = load_file(str(self.workdir / "grpo" / "export" / "peft_adapter" / ADAPTER_WEIGHTS))
        lora = lora_from_peft(tensors, self.model_config, lora_config)
        if self.sample_mesh.size > 1:
            from ssb_jax.sharding import shard_state
            lora = shard_state(lora, self.sample_mesh)
        return lora, lora_config

    def report(self, warnings=()):
        from ssb_jax.report import write_report
        if jax.process_index() == 0:
            path = write_report(self.workdir, self.config.num_rounds, warnings=warnings)
            log.info("report: %s", path)

    # ------------------------------------------------------------------ the run

    def run(self):
        from ssb_jax.model.lora import merge_lora
        started = time.perf_counter()
        self.world()
        if jax.process_index() == 0:  # the values in use, the world's paths included
            write_text_atomic(self.workdir / "config.json", self.config.to_json_best_effort(indent=2, sort_keys=True))
        self.load_base()
        # model: the round's base and sample_lora its student's adapters, both on the sampling mesh
        model, sample_lora, lora_config = self.base_model, None, None
        last = self.config.num_rounds
        for r in range(1, last + 1):
            if r > 1:  # the previous round's student is this round's teacher and base
                model = merge_lora(model, sample_lora, lora_config)
                sample_lora = None  # merged: until this round trains, there is no student on top of it
            if "curate" in self.stages:
                self.curate(r, model)
            if "teacher_cache" in self.stages:
                self.teacher_cache(r, model)
            training_base = lambda: model if jax.process_count() == 1 else self._global_model_for_round(r)  # noqa: E731
            if "train" in self.stages:
                self.train(r, training_base, model)
            if "sft" in self.stages:
                self.sft(r, training_base, model)
            trained = _done(self.round_dir(r) / "train")
            if r < last and not trained:
                raise RunStopped(f"round {r} has no trained student, so round {r + 1} has no base; "
                                 "include the train stage")
            if trained and (r < last or {"eval", "export"} & set(self.stages)):
                _, sample_lora, lora_config = self.student(r)
        if "grpo" in self.stages:
            self.grpo(lambda: self.global_base())
        if "eval" in self.stages:
            from ssb_jax.fingerprint import digest
            models = {"base": (self.base_model,)}
            identities = {"base": digest(self.base_identity(1))}
            if sample_lora is not None:
                models["student"] = (model, sample_lora, lora_config)
                identities["student"] = digest({"base": self.base_identity(last), "student": self._student_digest(last)})
            if _done(self.workdir / "grpo"):  # the RL baseline, when its stage ran
                from ssb_jax.fingerprint import read
                models["grpo"] = (self.base_model, *self.grpo_student())
                identities["grpo"] = digest({"base": self.base_identity(1), "grpo": digest(read(self.workdir / "grpo"))})
            if _done(self.round_dir(last) / "sft"):  # the SFT baseline, on the same base as the last round's student
                _, sft_lora, sft_lora_config = self.student(last, "sft")
                models["sft"] = (model, sft_lora, sft_lora_config)
                identities["sft"] = digest({"base": self.base_identity(last), "sft": self._student_digest(last, "sft")})
            self._evaluate_or_overwrite(models, identities)
        if "export" in self.stages and sample_lora is not None:
            self._check_fingerprint(self.workdir / "export", "export", {
                "base": self.base_identity(last), "student": self._student_digest(last), "export": dict(self.config.export)})
            self.export(model, sample_lora, lora_config)
        shortfalls = [s for s in map(self.curation_shortfall, range(1, last + 1)) if s]
        for shortfall in shortfalls:
            log.warning("%s", shortfall)
        if "report" in self.stages:
            self.report(shortfalls)
        log.info("all stages done in %.0f s; outputs in %s", time.perf_counter() - started, self.workdir)
        if shortfalls:
            raise CurationShortfall(" ".join(shortfalls))

    def curation_shortfall(self, r: int) -> str:
        """A one-line warning when round r's curation kept fewer pairs than count as success."""
        from ssb_jax import curate
        path = self.round_dir(r) / "curate" / curate.SUMMARY_FILE
        short = curate.shortfall(json.loads(path.read_text()), self._round_curation(r)) if path.exists() else None
        return f"round {r} curation: {short}" if short else ""

    def _student_digest(self, r: int, stage: str = "train") -> str:
        from ssb_jax import fingerprint as fp
        return fp.digest(fp.read(self.round_dir(r) / stage) or {})

    def _evaluate_or_overwrite(self, models: dict, identities: dict):
        """Evaluate; outputs made from other inputs are deleted and redone only under --config.overwrite=eval."""
        import shutil
        from ssb_jax.fingerprint import StaleOutputsError
        try:
            return self.evaluate(models, identities)
        except StaleOutputsError:
            if "eval" not in self.overwrite:
                raise
            log.warning("eval: deleting %s (--config.overwrite=eval)", self.workdir / "eval")
            if jax.process_index() == 0:
                shutil.rmtree(self.workdir / "eval")
            from ssb_jax.distributed import barrier
            barrier("eval:overwrite")
            return self.evaluate(models, identities)

    def _global_model_for_round(self, r: int):
        """Round r's base on the global mesh: the base model merged with the students of rounds < r."""
        from ssb_jax.model.lora import merge_lora
        model = self.global_base()
        for previous in range(1, r):
            lora, _, lora_config = self.student(previous)
            model = merge_lora(model, lora, lora_config)
        return model


class RunStopped(RuntimeError):
    """A stage cannot go on for a reason the user can fix (no pairs to train on, a missing round)."""


class CurationShortfall(RuntimeError):
    """Curation kept fewer pairs than count as success (curate.min_pairs); the run still finishes."""


def _curation_cls():
    from ssb_jax.curate import CurationConfig
    return CurationConfig


def _train_cls():
    from ssb_jax.distill.config import TrainConfig
    return TrainConfig


def _grpo_cls():
    from ssb_jax.grpo.config import GRPOConfig
    return GRPOConfig


def _eval_cls():
    from ssb_jax.evaluate import EvalConfig
    return EvalConfig


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
USAGE = """usage: python -m ssb_jax.main [--config=configs/FILE.py] [--config.section.key=value ...] [--print_config]

  --config        the run's settings (default configs/tiny.py: the offline toy world)
  --config.a.b=v  override one setting; --print_config lists them all
  --print_config  print every setting with its value (overrides applied) and what it does, then exit
  --verbose       a failing run shows its traceback, not just its one-line error (as log_level=DEBUG does)

Exit status: 0 done, 1 an error (one line on stderr), 3 done but curation kept fewer than curate.min_pairs.
"""


def _tpu_hardware() -> bool:
    """TPU chips show up as /dev/accel* (v2-v4) or VFIO groups /dev/vfio/N (v5e and later)."""
    return any(Path("/dev").glob("accel*")) or any(Path("/dev/vfio").glob("[0-9]*"))


class _NoLibtpuNotice(logging.Filter):
    """Drops jax's notice that libtpu.so is absent, printed by every run on a machine without a TPU;
    on a machine with TPU hardware, and for any other reason a TPU fails, the notice stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.levelno < logging.WARNING and "Unable to initialize backend 'tpu'" in message
                    and "libtpu.so" in message and not _tpu_hardware())


def configure_logging(level: str) -> None:
    """One log format for everything (ssb_jax, jax, absl and orbax all log through the root logger):
    absl's handler, with its own prefix, gives way to LOG_FORMAT unless the caller configured logging."""
    from absl import logging as absl_logging
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint step at INFO
    xla_bridge = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _NoLibtpuNotice) for f in xla_bridge.filters):
        xla_bridge.addFilter(_NoLibtpuNotice())


def run(config) -> Path:
    configure_logging(config.log_level)
    Pipeline(config).run()
    return Path(config.workdir)


def main(argv=None):
    """The command line; argv as sys.argv (the program name first)."""
    import sys
    args = list(sys.argv if argv is None else argv)[1:]
    if "--help" in args or "-h" in args:
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    try:
        config, rest = config_lib.parse_config_args(args, default_path="configs/tiny.py")
    except ValueError as e:
        sys.exit(f"error: {e}")
    print_config, verbose = "--print_config" in rest, "--verbose" in rest
    rest = [a for a in rest if a not in ("--print_config", "--verbose")]
    if rest:
        sys.exit(f"error: unexpected arguments {rest}; settings go in --config.key=value (see --help)")
    if print_config:
        print(config_lib.describe_config(config))
        return
    from ssb_jax.fingerprint import StaleOutputsError
    try:
        run(config)
    except CurationShortfall as shortfall:  # the run finished; its result is weak
        print(shortfall, file=sys.stderr)
        sys.exit(3)
    except (ValueError, OSError, StaleOutputsError, RunStopped) as error:  # what the user can fix: one line
        if verbose or str(config.log_level).upper() == "DEBUG":
            raise
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
