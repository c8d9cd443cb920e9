"""GRPO with LoRA: the RL baseline SSB is compared with, on the same questions, base and adapter shape.

config.py (GRPOConfig), batch.py (RolloutBatch: the samples as sequences), loss.py (group advantages, the
clipped-ratio objective, its normalisations), step.py (log-probs at completion positions, the jitted update),
reward.py (the grader's reward and MOTIF's), run.py (the stage: sample, grade, update).
"""
