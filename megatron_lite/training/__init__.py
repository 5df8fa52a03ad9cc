"""The training loop and its outputs (console, metrics.jsonl, wandb, tensorboard)."""
