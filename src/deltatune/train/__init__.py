"""Training: data formats, the loop on accelerate, checkpoints, evaluation and the demo.

    from deltatune.train import load_config, train
    result = train(load_config("examples/own_data.yaml", ["training.lr=1e-3"]))
"""

from .config import RunConfig
from .config_file import load_config
from .finish import TrainResult
from .loop import train
from .run.divergence import DivergenceError

__all__ = ["DivergenceError", "RunConfig", "TrainResult", "load_config", "train"]
