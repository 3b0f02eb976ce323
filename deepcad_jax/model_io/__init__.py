"""Trained models on disk: the model format (checkpoints, `Model`, `RunMeta`), loading a
model from a path, and the DeepCAD-RT .pth import."""
