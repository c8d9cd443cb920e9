"""What every trainer shares: settings (optimiser, checkpointing, LoRA shape), the optimiser builder
(optim), checkpoints (checkpoint), metrics.jsonl, TensorBoard and progress (metrics), and the one
training loop (loop) that runs a method's step function over its batch source."""
