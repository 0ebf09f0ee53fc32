"""The CLI commands other than `train`: demo, eval, generate/chat and merge."""
