"""GRPO with LoRA: the RL baseline SSB is compared with, on the same questions, base and adapter shape.

config.py (GRPOConfig), loss.py (group advantages, the clipped-ratio objective, its normalisations),
step.py (log-probs at completion positions, the jitted update), run.py (the stage: sample, grade, update).
"""
