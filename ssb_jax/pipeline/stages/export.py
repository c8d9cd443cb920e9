"""export: the last round's student as a PEFT adapter and a merged Hugging Face model."""
from __future__ import annotations

import logging

import jax

from ssb_jax.export import export_merged_model, export_peft_adapter
from ssb_jax.pipeline.stage import Stage

log = logging.getLogger("ssb_jax")


class ExportStage(Stage):
    name = "export"
    depends_on = ("train",)
    summary = "the student as a PEFT adapter and a merged Hugging Face model"

    def applies(self, ctx):
        return "student" in ctx.candidates

    def fingerprint(self, ctx, r):
        last = ctx.config.num_rounds
        return {"base": ctx.base_identity(last), "student": ctx.stage_digest(last, "train"),
                "export": dict(ctx.config.export)}

    def run(self, ctx, r):
        out = self.directory(ctx, r)
        lora, lora_config = ctx.candidates["student"].adapters()
        model = ctx.round_model
        if jax.process_index() == 0:
            dtype = ctx.config.export.merged_dtype or None
            if ctx.config.export.peft_adapter:
                base = ctx.config.model.path
                if ctx.config.num_rounds > 1:  # the last adapters sit on the earlier rounds' merged students
                    base = export_merged_model(model, None, None, ctx.model_config, out / "peft_base",
                                               tokenizer=ctx.tokenizer, dtype=dtype)
                export_peft_adapter(lora, lora_config, out / "peft_adapter", base, tokenizer=ctx.tokenizer)
            if ctx.config.export.merged_model:
                export_merged_model(model, lora, lora_config, ctx.model_config, out / "merged",
                                    tokenizer=ctx.tokenizer, dtype=dtype)
        log.info("export: PEFT adapter and merged model in %s", out)
        return {}
