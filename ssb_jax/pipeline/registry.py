"""The ordered stage registry of the pipeline: per-round stages run in this order within each SSB round,
then the others. A new stage is a module in stages/ and one line here."""
from __future__ import annotations

from ssb_jax.pipeline.stage import Registry
from ssb_jax.pipeline.stages.curate import CurateStage
from ssb_jax.pipeline.stages.evaluate import EvalStage
from ssb_jax.pipeline.stages.export import ExportStage
from ssb_jax.pipeline.stages.grpo import GRPOStage
from ssb_jax.pipeline.stages.onpolicy import OnPolicyStage
from ssb_jax.pipeline.stages.report import ReportStage
from ssb_jax.pipeline.stages.teacher_cache import TeacherCacheStage
from ssb_jax.pipeline.stages.train import SFTStage, TrainStage

REGISTRY = Registry([
    CurateStage(),
    TeacherCacheStage(),
    TrainStage(),
    SFTStage(),
    GRPOStage(),
    OnPolicyStage("onpolicy"),
    OnPolicyStage("opsd"),
    OnPolicyStage("sdpo"),
    EvalStage(),
    ExportStage(),
    ReportStage(),
])
