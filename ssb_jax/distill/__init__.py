"""Distillation stage: aligned batches (batch), loss (loss), teacher top-k cache (teacher_cache),
grain pipeline (data), sharded train step (step), config (config), the stage on the shared training loop
(train)."""
