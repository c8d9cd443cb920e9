"""onpolicy, opsd, sdpo: on-policy self-distillation from the round-1 base (opt-in, one stage class, three
settings sections; ssb_jax.onpolicy). Each iteration the student samples, the teacher scores the samples under
a privileged context (SSB's hint, the reference solution, a successful peer), the student is updated on its
plain question; the adapters are exported to <name>/export and evaluated as a row named after the stage."""
from __future__ import annotations

import dataclasses
import logging

from ssb_jax import fingerprint as fp
from ssb_jax.onpolicy.config import SECTION_CONFIGS
from ssb_jax.pipeline.stage import Stage
from ssb_jax.training.settings import OPERATIONAL_SETTINGS

log = logging.getLogger("ssb_jax")

SUMMARIES = {
    "onpolicy": "on-policy self-distillation with SSB's context (a correct and the most common wrong rollout)",
    "opsd": "OPSD-style on-policy self-distillation: the reference solution as context, clipped forward KL",
    "sdpo": "SDPO-style on-policy self-distillation: a successful peer as context, JSD, an EMA teacher",
}


class OnPolicyStage(Stage):
    """One of the on-policy stages; `name` is also its config section and its evaluation row."""
    depends_on = ("curate",)  # SSB's context and the offline (lambda < 1) pairs come from round 1's curation
    opt_in = True
    uses = ("sampling", "training")

    def __init__(self, name: str):
        if name not in SECTION_CONFIGS:
            raise ValueError(f"on-policy stages are {', '.join(SECTION_CONFIGS)}, got {name!r}")
        self.name = name
        self.summary = SUMMARIES[name]

    def settings(self, ctx):
        from ssb_jax import config as config_lib
        return config_lib.section_to(SECTION_CONFIGS[self.name], ctx.config[self.name], f"config.{self.name}")

    def fingerprint(self, ctx, r):
        """The round-1 base, the questions, the prompts, the settings; curation's records when they are read,
        and SSB's loss settings when its offline loss is mixed in."""
        oc = self.settings(ctx)
        out = {"base": ctx.base_identity(1), "prompts": dataclasses.asdict(ctx.prompts),
               "max_prompt_tokens": ctx.config.sampler.max_prompt_tokens,
               "settings": {k: v for k, v in oc.to_dict().items() if k not in OPERATIONAL_SETTINGS},
               "data": ctx.data_identity()}
        if oc.needs_curation:
            out["curate"] = ctx.stage_digest(1, "curate")
        if oc.onpolicy_weight < 1:
            out["offline"] = {k: v for k, v in ctx.train_config.to_dict().items() if k not in OPERATIONAL_SETTINGS}
        return out

    def questions(self, ctx, oc):
        """The question pool and, for the fixed contexts, each question's context."""
        from ssb_jax.onpolicy import run as onpolicy_run
        if oc.context == "ssb":
            return onpolicy_run.ssb_questions(self._curation_records(ctx))
        return onpolicy_run.dataset_questions(ctx.load_training_problems(), oc.context)

    def _curation_records(self, ctx):
        from ssb_jax import curate
        from ssb_jax.data.records import RecordStore
        from ssb_jax.pipeline.context import RunStopped
        path = ctx.registry.get("curate").directory(ctx, 1) / curate.RECORDS_FILE
        if not path.exists():
            raise RunStopped(f"{self.name}: {path} does not exist; run the curate stage first "
                             f"(context 'ssb' and onpolicy_weight < 1 read round 1's curation)")
        return RecordStore(path).read_all()

    def run(self, ctx, r):
        import jax

        from ssb_jax.distributed import to_host
        from ssb_jax.export import export_merged_model, export_peft_adapter
        from ssb_jax.model.lora import init_lora
        from ssb_jax.onpolicy import run as onpolicy_run
        from ssb_jax.pipeline.learning_curve import learning_curve
        from ssb_jax.pipeline.stages.curate import kept_examples
        from ssb_jax.pipeline.stages.export import export_info
        oc = self.settings(ctx)
        out = self.directory(ctx, r)
        lora_config = oc.lora_config()
        questions = self.questions(ctx, oc)
        # adapters placed as the trained ones will be: set_adapters keeps this placement
        placed = init_lora(ctx.model_config, lora_config, jax.random.key(0),
                           mesh=ctx.sample_mesh if ctx.sample_mesh.size > 1 else None)
        sampler = ctx.sampler(ctx.base_model, placed, lora_config)
        log.info("%s: %d questions, context %s, teacher %s, loss %s, %d iterations of %d x %d samples", self.name,
                 len(questions), oc.context, oc.teacher, oc.loss, oc.steps, oc.prompts_per_step, oc.samples_per_prompt)
        curve = learning_curve(ctx, ctx.base_model, lora_config, out / "metrics.jsonl", self.name)
        offline = kept_examples(ctx, 1) if oc.onpolicy_weight < 1 else None
        result = onpolicy_run.run(oc, ctx.model_config, lora_config, ctx.global_base(), sampler, questions,
                                  ctx.tokenizer, out, prompts=ctx.prompts, mesh=ctx.mesh, curve=curve,
                                  offline_records=offline, offline_config=ctx.train_config, tag=self.name)
        if result["interrupted"]:
            return None
        if jax.process_index() == 0:
            lora = result["lora"] if jax.process_count() == 1 else to_host(result["lora"])
            export_peft_adapter(lora, lora_config, out / "export" / "peft_adapter", ctx.config.model.path,
                                tokenizer=ctx.tokenizer,
                                info=export_info(ctx, out / "export" / "peft_adapter", self.name))
            if ctx.config.export.merged_model:
                export_merged_model(ctx.base_model, lora, lora_config, ctx.model_config, out / "export" / "merged",
                                    tokenizer=ctx.tokenizer, dtype=ctx.config.export.merged_dtype or None,
                                    info=export_info(ctx, out / "export" / "merged", self.name))
        last = result["history"][-1] if result["history"] else {}
        return {"iterations": oc.steps, "final_metrics": last}

    def publish(self, ctx, r):
        from ssb_jax.pipeline.context import Candidate
        if not self.done(ctx, r):
            return
        identity = fp.digest({"base": ctx.base_identity(1), self.name: ctx.stage_digest(None, self.name)})
        ctx.candidates[self.name] = Candidate(ctx.base_model, identity, load_adapters=lambda: self.adapters(ctx))

    def adapters(self, ctx):
        """The stage's adapters on the sampling mesh (from its exported PEFT adapter) and their LoraConfig."""
        from safetensors.numpy import load_file

        from ssb_jax.export import ADAPTER_WEIGHTS
        from ssb_jax.model.lora import lora_from_peft
        from ssb_jax.sharding import shard_state
        lora_config = self.settings(ctx).lora_config()
        tensors = load_file(str(self.directory(ctx, None) / "export" / "peft_adapter" / ADAPTER_WEIGHTS))
        lora = lora_from_peft(tensors, ctx.model_config, lora_config)
        if ctx.sample_mesh.size > 1:
            lora = shard_state(lora, ctx.sample_mesh)
        return lora, lora_config
