"""train (SSB: T²·KL to the hinted teacher) and sft (the plain SFT baseline: cross-entropy on the same
pairs): LoRA adapters on the round's base, trained on the kept pairs."""
from __future__ import annotations

from ssb_jax import fingerprint as fp
from ssb_jax.pipeline.stage import Stage
from ssb_jax.pipeline.stages.curate import curation_tokens, kept_examples


class TrainStage(Stage):
    """SSB distillation; its adapters are the round's student (the next round's base)."""
    name = "train"
    depends_on = ("curate", "teacher_cache")
    per_round = True
    uses = ("training",)
    summary = "the student's LoRA adapters distilled from the hinted teacher on the kept pairs"
    label = "ssb"      # its learning curve's name
    candidate = "student"  # its name in evaluation

    def settings(self, ctx):
        return ctx.train_config

    def fingerprint(self, ctx, r):
        """The round's base, its training examples and the settings they read (the teacher cache is a
        function of exactly these, so no digest of it is needed)."""
        from ssb_jax.training.settings import OPERATIONAL_SETTINGS
        tc = self.settings(ctx).to_dict()
        return {"base": ctx.base_identity(r), "examples": fp.digest({"pairs": kept_examples(ctx, r)}),
                "settings": {k: v for k, v in tc.items() if k not in OPERATIONAL_SETTINGS}}

    def run(self, ctx, r):
        from ssb_jax.distill import train as distill_train
        from ssb_jax.pipeline.learning_curve import learning_curve
        tc = self.settings(ctx)
        out = self.directory(ctx, r)
        curve = learning_curve(ctx, ctx.round_model, tc.lora_config(), out / distill_train.METRICS_FILE, self.label)
        result = distill_train.run(tc, ctx.model_config, ctx.training_base(r), kept_examples(ctx, r), out,
                                   mesh=ctx.mesh, resume=True,
                                   teacher_cache_dir=ctx.registry.get("teacher_cache").directory(ctx, r), curve=curve,
                                   sampled_tokens=curation_tokens(ctx, r) if curve is not None else 0)
        if result["interrupted"]:
            return None
        last = result["history"][-1] if result["history"] else {}
        return {"steps": result["total_steps"], "final_metrics": last}

    def publish(self, ctx, r):
        from ssb_jax.pipeline.context import Candidate, RunStopped
        if not self.done(ctx, r):
            if r < ctx.config.num_rounds and self.candidate == "student":
                raise RunStopped(f"round {r} has no trained student, so round {r + 1} has no base; "
                                 "include the train stage")
            return
        if r < ctx.config.num_rounds and self.candidate != "student":
            return  # baselines are evaluated on the last round's base only
        ctx.candidates[self.candidate] = Candidate(
            ctx.round_model, fp.digest({"base": ctx.base_identity(r), self.candidate: ctx.stage_digest(r, self.name)}),
            load_adapters=lambda: ctx.student(r, self.name)[1:])


class SFTStage(TrainStage):
    """The plain SFT baseline on the same curated pairs (TrainConfig.as_sft: CE on the teacher's solution,
    no KL), in round_r/sft with its own adapters; evaluated as "sft"."""
    name = "sft"
    depends_on = ("curate",)
    opt_in = True
    summary = "the plain SFT baseline: cross-entropy on the same kept pairs, its own adapters"
    label = "sft"
    candidate = "sft"

    def settings(self, ctx):
        return ctx.train_config.as_sft()
