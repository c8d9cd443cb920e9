"""teacher_cache: the frozen teacher's top-k log-probabilities on the kept pairs, stored before training
(only when train.teacher_mode is "cached")."""
from __future__ import annotations

from ssb_jax import fingerprint as fp
from ssb_jax.pipeline.stage import Stage
from ssb_jax.pipeline.stages.curate import kept_examples

# the train settings the cache is a function of (so train needs no digest of the cache)
TEACHER_CACHE_SETTINGS = ("topk", "temperature", "length_buckets", "min_bucket", "max_seq_len")


class TeacherCacheStage(Stage):
    name = "teacher_cache"
    depends_on = ("curate",)
    per_round = True
    summary = "the teacher's top-k log-probabilities on the kept pairs (train.teacher_mode=cached only)"

    def applies(self, ctx):
        return ctx.train_config.teacher_mode == "cached"

    def fingerprint(self, ctx, r):
        tc = ctx.train_config.to_dict()
        return {"base": ctx.base_identity(r), "examples": fp.digest({"pairs": kept_examples(ctx, r)}),
                "settings": {k: tc[k] for k in TEACHER_CACHE_SETTINGS}}

    def done(self, ctx, r):
        return (self.directory(ctx, r) / "index.json").exists()

    def run(self, ctx, r):
        from ssb_jax.distill.teacher_cache import build_teacher_cache_sharded
        tc = ctx.train_config
        build_teacher_cache_sharded(ctx.round_model, ctx.model_config, kept_examples(ctx, r), self.directory(ctx, r),
                                    k=tc.topk, temperature=tc.temperature, batch_size=tc.batch_size,
                                    chunk=tc.logits_chunk, buckets=tc.length_buckets, min_bucket=tc.min_bucket,
                                    max_seq_len=tc.max_seq_len)
        return None  # its index.json is the marker
