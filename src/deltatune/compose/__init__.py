"""Combining adapters: weighted merges, fusion and stacking, proxy-tuning (one module per technique)."""
