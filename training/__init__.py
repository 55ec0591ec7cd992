"""Datasets, training loops, metrics and distributed launch (needs the `train` extra)."""
