"""deltatune: parameter-efficient fine-tuning for PyTorch models, with adapters in the Hugging Face PEFT layout."""

from .core.config import DeltaConfig, DeltaConfigError, TaskType, registered_methods
from .core.layer import MergeError
from .core.model import DeltaModel, get_peft_model
from .io.adapter_files import AdapterFileError
from . import methods  # noqa: F401  (registers every method)
from .methods.lora import LoraConfig

PeftModel = DeltaModel  # so `PeftModel.from_pretrained(base, dir)` snippets run unchanged

__all__ = [
    "AdapterFileError",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaModel",
    "LoraConfig",
    "MergeError",
    "PeftModel",
    "TaskType",
    "get_peft_model",
    "registered_methods",
]
__version__ = "0.1.0"
