"""curate: K rollouts per question, trace selection, the hinted teacher's solution, kept pairs
(round_r/curate/records.jsonl and curation_summary.json)."""
from __future__ import annotations

import dataclasses
import json
import logging

from ssb_jax.data.records import RecordStore
from ssb_jax.pipeline.stage import Stage

log = logging.getLogger("ssb_jax")

# settings whose change extends a curation rather than invalidating it
CURATION_RESUMABLE = ("target_pairs", "max_questions", "questions_per_batch", "min_pairs")


class CurateStage(Stage):
    name = "curate"
    per_round = True
    uses = ("sampling",)
    summary = "K rollouts per question, a hinted teacher solution per mixed question, the kept pairs"

    def fingerprint(self, ctx, r):
        settings = {k: v for k, v in dataclasses.asdict(ctx.round_curation(r)).items() if k not in CURATION_RESUMABLE}
        return {"base": ctx.base_identity(r), "settings": settings, "prompts": dataclasses.asdict(ctx.prompts),
                "max_prompt_tokens": ctx.config.sampler.max_prompt_tokens, "data": ctx.data_identity()}

    def done(self, ctx, r):
        from ssb_jax import curate
        path = self.directory(ctx, r) / curate.SUMMARY_FILE
        return path.exists() and curate.finished(json.loads(path.read_text()), ctx.round_curation(r))

    def run(self, ctx, r):
        from ssb_jax import curate
        problems = ctx.load_training_problems()
        log.info("round %d curate: %d questions from %s", r, len(problems), ctx.config.data.train)
        summary = curate.run(problems, ctx.sampler(ctx.round_model), ctx.tokenizer, ctx.round_curation(r),
                             self.directory(ctx, r), prompts=ctx.prompts)
        return {"sampled_tokens": summary["sampled_tokens"]["total"]}

    def warnings(self, ctx):
        from ssb_jax import curate
        lines = []
        for r in range(1, ctx.config.num_rounds + 1):
            path = self.directory(ctx, r) / curate.SUMMARY_FILE
            short = curate.shortfall(json.loads(path.read_text()), ctx.round_curation(r)) if path.exists() else None
            if short:
                lines.append(f"round {r} curation: {short}")
        return lines


def kept_examples(ctx, r: int) -> list[dict]:
    """Round r's kept pairs: what the teacher cache, SSB and SFT train on."""
    from ssb_jax import curate
    from ssb_jax.pipeline.context import RunStopped
    directory = ctx.registry.get("curate").directory(ctx, r)
    pairs = curate.kept_pairs(RecordStore(directory / curate.RECORDS_FILE).read_all(), ctx.curation.target_pairs)
    if not pairs:
        raise RunStopped(f"round {r}: curation kept no pairs (see {directory}); nothing to train on")
    return pairs


def curation_tokens(ctx, r: int) -> int:
    """Tokens round r's curation sampled (rollouts and teacher solutions): SSB's and SFT's training cost in
    samples, the learning curves' x-axis."""
    from ssb_jax import curate
    directory = ctx.registry.get("curate").directory(ctx, r)
    return curate.sampled_tokens(RecordStore(directory / curate.RECORDS_FILE).read_all())["total"]
