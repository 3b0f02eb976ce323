"""Trained models on disk: checkpoints, loading, the DeepCAD-RT .pth import, safe
unpickling, export (`export/`: .pth, ONNX, bioimage.io)."""
