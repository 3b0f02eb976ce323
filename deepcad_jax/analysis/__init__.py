"""Measuring results: metrics, held-out scores, calibration, events, traces, simulated
movies."""
