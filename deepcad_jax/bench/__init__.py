"""Benchmarks of training, denoising and streaming throughput."""
