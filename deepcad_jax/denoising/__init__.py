"""Denoising a movie with a trained model: tiling, the compiled step, memory budgets,
the engine, the Denoiser, its outputs and the files it writes."""
