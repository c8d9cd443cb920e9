"""grpo: the RL baseline on data.train from the round-1 base, with LoRA of the student's shape (or of
grpo.lora_rank / lora_alpha); its adapters are exported to grpo/export (PEFT, and merged when
export.merged_model)."""
from __future__ import annotations

import dataclasses
import logging

from ssb_jax import fingerprint as fp
from ssb_jax.pipeline.stage import Stage

log = logging.getLogger("ssb_jax")


class GRPOStage(Stage):
    name = "grpo"
    opt_in = True
    uses = ("sampling", "training")
    summary = "the GRPO baseline: groups sampled per question, rewarded by the grader, LoRA of the student's shape"

    def fingerprint(self, ctx, r):
        """The round-1 base, the training questions, the prompt, its settings and the adapters' shape (the
        train section's, or its own lora_rank / lora_alpha)."""
        from ssb_jax.training.settings import OPERATIONAL_SETTINGS
        return {"base": ctx.base_identity(1), "prompts": dataclasses.asdict(ctx.prompts),
                "max_prompt_tokens": ctx.config.sampler.max_prompt_tokens,
                "lora": ctx.grpo_config.lora_config(ctx.train_config.lora_config()).to_dict(),
                "settings": {k: v for k, v in ctx.grpo_config.to_dict().items() if k not in OPERATIONAL_SETTINGS},
                "data": ctx.data_identity()}

    def run(self, ctx, r):
        import jax

        from ssb_jax.distributed import to_host
        from ssb_jax.export import export_merged_model, export_peft_adapter
        from ssb_jax.grpo import run as grpo_run
        from ssb_jax.model.lora import init_lora
        from ssb_jax.pipeline.learning_curve import learning_curve
        from ssb_jax.pipeline.stages.export import export_info
        out = self.directory(ctx, r)
        problems = ctx.load_training_problems()
        lora_config = ctx.grpo_config.lora_config(ctx.train_config.lora_config())
        # adapters placed as the trained ones will be: set_adapters keeps this placement
        placed = init_lora(ctx.model_config, lora_config, jax.random.key(0),
                           mesh=ctx.sample_mesh if ctx.sample_mesh.size > 1 else None)
        sampler = ctx.sampler(ctx.base_model, placed, lora_config)
        gc = ctx.grpo_config
        log.info("grpo: %d questions from %s, %d iterations of %d x %d samples", len(problems), ctx.config.data.train,
                 gc.steps, gc.prompts_per_step, gc.group_size)
        curve = learning_curve(ctx, ctx.base_model, lora_config, out / "metrics.jsonl", "grpo")
        result = grpo_run.run(gc, ctx.model_config, lora_config, ctx.global_base(), sampler, problems, ctx.tokenizer,
                              out, prompts=ctx.prompts, mesh=ctx.mesh, curve=curve)
        if result["interrupted"]:
            return None
        if jax.process_index() == 0:
            lora = result["lora"] if jax.process_count() == 1 else to_host(result["lora"])
            export_peft_adapter(lora, lora_config, out / "export" / "peft_adapter", ctx.config.model.path,
                                tokenizer=ctx.tokenizer, info=export_info(ctx, out / "export" / "peft_adapter", "grpo"))
            if ctx.config.export.merged_model:
                export_merged_model(ctx.base_model, lora, lora_config, ctx.model_config, out / "export" / "merged",
                                    tokenizer=ctx.tokenizer, dtype=ctx.config.export.merged_dtype or None,
                                    info=export_info(ctx, out / "export" / "merged", "grpo"))
        last = result["history"][-1] if result["history"] else {}
        return {"iterations": result["iterations"], "final_metrics": last}

    def publish(self, ctx, r):
        from ssb_jax.pipeline.context import Candidate
        if not self.done(ctx, r):
            return
        identity = fp.digest({"base": ctx.base_identity(1), "grpo": ctx.stage_digest(None, self.name)})
        ctx.candidates["grpo"] = Candidate(ctx.base_model, identity, load_adapters=lambda: self.adapters(ctx))

    def adapters(self, ctx):
        """The baseline's adapters on the sampling mesh (from its exported PEFT adapter) and their LoraConfig."""
        from safetensors.numpy import load_file

        from ssb_jax.export import ADAPTER_WEIGHTS
        from ssb_jax.model.lora import lora_from_peft
        from ssb_jax.sharding import shard_state
        lora_config = ctx.grpo_config.lora_config(ctx.train_config.lora_config())
        tensors = load_file(str(self.directory(ctx, None) / "export" / "peft_adapter" / ADAPTER_WEIGHTS))
        lora = lora_from_peft(tensors, ctx.model_config, lora_config)
        if ctx.sample_mesh.size > 1:
            lora = shard_state(lora, ctx.sample_mesh)
        return lora, lora_config
