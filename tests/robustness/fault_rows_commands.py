"""Fault-matrix rows: command flags, processes and signals, outputs and overwrites."""

from __future__ import annotations

from tests.helpers.fault_matrix import Fault

ROWS: list[Fault] = [
]
