"""Training: pre-training loop, optimizers, schedules, losses, checkpoints, distributed setup and recipes."""
