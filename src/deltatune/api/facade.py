"""The `peft`-style DeltaModel users hold: core's DeltaModel plus the methods that reach files and other
adapters (save_pretrained, load_adapter, from_pretrained, add_weighted_adapter).

It sits above io/ and compose/, so core stays the foundation that imports neither (issue 16). Every
DeltaModel built anywhere is this class (core/model.py `set_class_to_build`, installed by api/__init__.py),
so io's and compose's loaders return it too; `deltatune.core.model.DeltaModel` stays the class isinstance
checks use (this one subclasses it).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..compose.weighted import add_weighted_adapter
from ..core import model as core
from ..core.config import DeltaConfig
from ..io.adapter_files import load_adapter, read_adapter, read_referenced, save_adapters, weights_fill


class DeltaModel(core.DeltaModel):
    """A model with PEFT adapters. Create with `get_peft_model` or `DeltaModel.from_pretrained`."""

    def __init__(self, model: nn.Module, config: DeltaConfig, adapter_name: str = "default",
                 weights: dict[str, torch.Tensor] | None = None, source: str = "weights", *,
                 fill: core.Fill | None = None) -> None:
        """Wrap `model` with adapter `adapter_name`; `weights` (disk keys, read from `source`) fill it. The saved
        adapters a config is built from (X-LoRA's experts) are read first (io/adapter_files.read_referenced)."""
        if weights is not None:
            fill = weights_fill(weights, source)
        elif fill is None:
            read_referenced(config)
        super().__init__(model, config, adapter_name, fill=fill)

    def add_adapter(self, adapter_name: str, config: DeltaConfig) -> None:
        """Inject a new (inactive unless it is the first) adapter named `adapter_name`, after reading the saved
        adapters its config is built from (X-LoRA's experts)."""
        self.inject(adapter_name, read_referenced(config))

    # ------------------------------------------------------------------ files (io/ owns the format)
    @core.exclusive
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        **kwargs) -> None:
        """Write each adapter in the Hugging Face PEFT layout ("default" at the top, others in subfolders).

        Raises:
            ValueError: no adapter is left to save (every adapter was deleted); nothing is written.
        """
        if not self.peft_config:
            raise ValueError(f"no adapter left to save in {save_directory}: every adapter was deleted")
        save_adapters(self, save_directory, selected_adapters, **kwargs)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
                     allow_pickle: bool = False, **kwargs) -> None:
        """Add the adapter saved in directory `model_id` under `adapter_name`."""
        load_adapter(self, model_id, adapter_name, is_trainable=is_trainable, allow_pickle=allow_pickle, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, allow_pickle: bool = False, **kwargs) -> DeltaModel:
        """Wrap `model` with the adapter saved in directory `model_id` (ours or one written by `peft`)."""
        config, weights = read_adapter(model_id, allow_pickle=allow_pickle, **kwargs)
        config.inference_mode = not is_trainable
        wrapped = cls(model, config, adapter_name, weights=weights, source=str(model_id))
        return wrapped if is_trainable else wrapped.eval()

    # ------------------------------------------------------------------ combining adapters (compose/)
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             density: float | None = None, majority_sign_method: str = "total") -> None:
        """Add adapter `adapter_name` combining `adapters` with `weights` (compose/weighted.py)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, density, majority_sign_method)


def get_peft_model(model: nn.Module, peft_config: DeltaConfig, adapter_name: str = "default",
                   **_: object) -> DeltaModel:
    """Wrap `model` with a new trainable adapter built from `peft_config` (Hugging Face PEFT's entry point).

    Raises:
        ValueError: `model` is already a DeltaModel (use add_adapter()).
        DeltaConfigError: a bad config field or target, or an adapter the config is built from that cannot be read.
    """
    return core.get_peft_model(model, read_referenced(peft_config), adapter_name)
