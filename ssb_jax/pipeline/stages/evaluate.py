"""eval: every published model (base, the student, and the baselines whose stages finished) on the eval
datasets under each protocol; outputs are checked per file against the models' identities."""
from __future__ import annotations

import json
import logging
import shutil

from ssb_jax.fingerprint import StaleOutputsError
from ssb_jax.pipeline.stage import Stage

log = logging.getLogger("ssb_jax")

# the order models are evaluated and tabled in
CANDIDATE_ORDER = ("base", "student", "grpo", "sft", "onpolicy", "opsd", "sdpo")


class EvalStage(Stage):
    name = "eval"
    depends_on = ("train", "sft", "grpo", "onpolicy", "opsd", "sdpo")
    uses = ("sampling",)
    summary = "the base, the student and the finished baselines on the eval datasets, per protocol"

    def done(self, ctx, r):
        return False  # each outputs file resumes (or is reused) on its own

    def run(self, ctx, r):
        """Evaluate; outputs made from other inputs are deleted and redone only under --config.overwrite=eval."""
        import jax

        from ssb_jax.distributed import barrier
        try:
            self._evaluate(ctx)
        except StaleOutputsError:
            if self.name not in ctx.overwrite:
                raise
            log.warning("eval: deleting %s (--config.overwrite=eval)", self.directory(ctx, r))
            if jax.process_index() == 0:
                shutil.rmtree(self.directory(ctx, r))
            barrier("eval:overwrite")
            self._evaluate(ctx)
        from ssb_jax.evaluation import RESULTS_JSON
        results = self.directory(ctx, r) / RESULTS_JSON
        if jax.process_index() == 0 and results.exists():
            from ssb_jax.training.metrics import write_eval_tensorboard
            write_eval_tensorboard(self.directory(ctx, r), json.loads(results.read_text())["rows"])
        from ssb_jax.compile_options import machine
        # DONE.json: its wall time and the machine (results differ by CPU); done() still rechecks every file
        return {"machine": machine()}

    def _evaluate(self, ctx):
        from ssb_jax import evaluation
        labels = sorted(ctx.candidates, key=lambda k: (CANDIDATE_ORDER + (k,)).index(k))
        samplers = {label: ctx.sampler(*ctx.candidates[label].sampler_args()) for label in labels}
        identities = {label: ctx.candidates[label].identity for label in labels}
        d = ctx.config.data  # read like curation's data: bad-line policy, field names for local files
        return evaluation.run(samplers, ctx.tokenizer, ctx.eval_config, self.directory(ctx, None), prompts=ctx.prompts,
                              model_identities=identities, on_bad_line=d.on_bad_line,
                              question_field=d.question_field or None, answer_field=d.answer_field or None)
