"""Research tools: pruning a trained model and the ladder of model sizes."""
