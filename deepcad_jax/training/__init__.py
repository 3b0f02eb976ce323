"""Training: the loop, one step and the training-pair pipeline (needs grain and
optax)."""
