"""Fault-matrix rows: files and formats: loaders, writers, the untrusted-file checks."""

from __future__ import annotations

from tests.helpers.fault_matrix import Fault

ROWS: list[Fault] = [
]
