"""Calibrated uncertainty from the recording alone: the equivariant bootstrap
(`bootstrap`), its held-out check (`heldout`) and its files (`files`)."""
