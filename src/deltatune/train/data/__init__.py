"""Training data: reading files (JSONL, JSON, CSV, Parquet, Arrow, text), recognising their formats,
tokenizing with the loss mask, packing, and the sample order."""
