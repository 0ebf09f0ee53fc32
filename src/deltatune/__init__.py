"""deltatune: parameter-efficient fine-tuning for PyTorch models, with adapters in the Hugging Face PEFT layout."""

from . import methods  # noqa: F401  (registers every method)
from .api import DeltaModel, get_peft_model
from .compose.extract import convert_to_lora, extract_lora, extract_lora_from_finetune
from .compose.fusion import AdapterFusionConfig, add_fusion, stack_adapters
from .compose.hotswap import hotswap_adapter, prepare_model_for_hotswap
from .compose.proxy import ProxyTuningLogitsProcessor, proxy_generate
from .core.config import DeltaConfig, DeltaConfigError, TaskType, registered_methods
from .core.layer import MergeError
from .io.adapter_files import AdapterFileError
from .io.adapterhub import load_adapterhub, save_adapterhub
from .io.diffusers_layout import load_diffusers_lora, save_diffusers_lora
from .io.kohya_format import load_kohya, save_kohya
from .methods.adalora import AdaLoraConfig
from .methods.bitfit import BitFitConfig
from .methods.boft import BOFTConfig
from .methods.bottleneck import BottleneckConfig
from .methods.child_tuning import ChildTuningConfig, estimate_fisher_mask
from .methods.ia3 import IA3Config
from .methods.llama_adapter import AdaptionPromptConfig
from .methods.ln_tuning import LNTuningConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoraConfig
from .methods.oft import OFTConfig
from .methods.prefix import PrefixTuningConfig
from .methods.prompt import PromptTuningConfig
from .methods.ptuning import PromptEncoderConfig
from .methods.relora import ReLoraConfig, relora_lr_multiplier, to_cumulative_lora
from .methods.ulora import ULoraConfig
from .methods.vera import VeraConfig
from .methods.xlora import XLoraConfig
from .quant import dequantize, quantize

PeftModel = DeltaModel  # so `PeftModel.from_pretrained(base, dir)` snippets run unchanged

__all__ = [
    "AdaLoraConfig",
    "AdapterFileError",
    "AdapterFusionConfig",
    "AdaptionPromptConfig",
    "BOFTConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "ChildTuningConfig",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaModel",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MergeError",
    "OFTConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "ProxyTuningLogitsProcessor",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "ReLoraConfig",
    "TaskType",
    "ULoraConfig",
    "VeraConfig",
    "XLoraConfig",
    "add_fusion",
    "convert_to_lora",
    "dequantize",
    "estimate_fisher_mask",
    "extract_lora",
    "extract_lora_from_finetune",
    "get_peft_model",
    "hotswap_adapter",
    "load_adapterhub",
    "load_kohya",
    "load_diffusers_lora",
    "prepare_model_for_hotswap",
    "proxy_generate",
    "quantize",
    "registered_methods",
    "relora_lr_multiplier",
    "save_adapterhub",
    "save_kohya",
    "save_diffusers_lora",
    "stack_adapters",
    "to_cumulative_lora",
]
__version__ = "0.1.0"

# Trainers that need TRL (a test dependency, not a default one): imported on first use, so that
# `import deltatune` never imports trl. Not in __all__, so `from deltatune import *` never needs trl.
_NEEDS_TRL = {name: "deltatune.train.preference" for name in ("DeltaDPOTrainer", "DeltaKTOTrainer")}


def __getattr__(name: str):
    if name in _NEEDS_TRL:
        import importlib

        return getattr(importlib.import_module(_NEEDS_TRL[name]), name)
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
