"""Training: the loop, the step, the training-pair pipeline (needs grain and optax)."""
