"""report: report.md from every stage's outputs (curation counts, training dynamics, learning curves, the
comparison and evaluation tables, and one row per registered stage)."""
from __future__ import annotations

import json
import logging

from ssb_jax.pipeline.stage import DONE_FILE, Stage

log = logging.getLogger("ssb_jax")


class ReportStage(Stage):
    name = "report"
    summary = "report.md: curation, training, learning curves, comparison and evaluation tables, stages run"

    def directory(self, ctx, r):
        return ctx.workdir

    def done(self, ctx, r):
        return False  # cheap, and always from the latest outputs

    def run(self, ctx, r):
        import jax

        from ssb_jax.report import write_report
        if jax.process_index() == 0:
            warnings = [line for stage in ctx.registry for line in stage.warnings(ctx)]
            path = write_report(ctx.workdir, ctx.config.num_rounds, warnings=warnings,
                                stages=stage_rows(ctx))
            log.info("report: %s", path)
        return None


def stage_rows(ctx) -> list[dict]:
    """One row per registered stage and round: whether it ran in this run's stages, finished, and its wall time."""
    rows = []
    for stage in ctx.registry:
        if stage.name == "report":
            continue
        rounds = range(1, ctx.config.num_rounds + 1) if stage.per_round else [None]
        for r in rounds:
            done_file = stage.directory(ctx, r) / DONE_FILE
            info = json.loads(done_file.read_text()) if done_file.exists() else {}
            rows.append({"stage": stage.name if r is None else f"{stage.name} (round {r})",
                         "selected": stage.name in ctx.stages, "finished": bool(info) or stage.done(ctx, r),
                         "wall_s": info.get("wall_s")})
    return rows
