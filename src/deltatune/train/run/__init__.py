"""What the loop (train/loop.py) uses around its body: optimizer and schedule, the accelerate runtime,
checkpoints and resume checks, divergence and early stopping, NEFTune, metrics, trackers, the loss plot and
the output folder."""
