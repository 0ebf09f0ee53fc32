"""Configs shared by every method: the DeltaConfig base dataclass, TaskType, and the method registry.

A method registers its config class under its `peft_type` (the on-disk name, e.g. "LORA"). The config
knows how to build one adapter for one base module (`make_adapter`, given the module's view, core/base.py);
everything multi-adapter lives in core/layer.py, so a method never sees adapter names. Registering checks the
adapter classes the config names (`adapter_types`, `model_adapter_type`) against the protocols they declare
(core/protocols.py), so a method that misses a piece fails when its module is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import AdapterContractError, DeltaConfigError, require  # noqa: F401  (re-exported)
from .protocols import LayerAdapter, ModelLevel, check_adapter_class

if TYPE_CHECKING:
    from .base import BaseLayer


class TaskType(str, enum.Enum):
    """The task a wrapped model solves; the values match Hugging Face PEFT's."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Heads that a classification task trains and saves in full (PEFT's names, so files interchange).
TASK_HEADS = {TaskType.SEQ_CLS: ["classifier", "score"], TaskType.TOKEN_CLS: ["classifier", "score"],
              TaskType.QUESTION_ANS: ["qa_outputs"]}

# Keys a config file may carry that are bookkeeping, not settings.
METADATA_KEYS = {"peft_type", "peft_version", "auto_mapping", "revision"}
# Settings `peft` writes into every file with these default values; they change nothing here.
PEFT_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16, "lora_ga_config": None}


@dataclass
class DeltaConfig:
    """Fields every method shares. Subclasses add their own and set `peft_type`."""

    peft_type: ClassVar[str] = ""
    targets_layers: ClassVar[bool] = True  # False for methods that only act at model level (soft prompts)
    supports_quantized: ClassVar[bool] = True  # False: refuse a quantized base (reads W in full)
    saves_layer_selection: ClassVar[bool] = True  # False: unset layers_to_transform/pattern stay out of files
    # A method's default target list, when it names modules of several architectures (entries a given model
    # lacks are expected there, so they are not reported as matching nothing).
    default_target_modules: ClassVar[tuple[str, ...]] = ()
    # The classes make_adapter / make_model_adapter build (checked against their protocols at registration).
    adapter_types: ClassVar[tuple[type, ...]] = ()
    model_adapter_type: ClassVar[type | None] = None
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(getattr(self.task_type, "value", self.task_type)))
            except ValueError:
                raise DeltaConfigError(f"task_type={self.task_type!r} is not one of "
                                       f"{[t.value for t in TaskType]}") from None
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
                    raise DeltaConfigError(f"{name}={value!r}: must be a list of strings or a string or null")
                setattr(self, name, list(value))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise DeltaConfigError("layers_pattern is set but layers_to_transform is not; set both or neither")

    # -- what a method provides ------------------------------------------------------------------
    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> LayerAdapter:
        """Build one adapter (one of `adapter_types`) for `base`, the view of the module at `module_name`;
        `shared` is this adapter's model-level module when `make_model_adapter` made one."""
        raise NotImplementedError

    def supports(self, base: BaseLayer) -> bool:
        """Whether this method can adapt a module of this kind (`base.kind`, ...)."""
        return False

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        """Raise DeltaConfigError naming the module if this method cannot adapt it. Runs on every
        target before the model is touched."""
        if type(base.module).__module__.startswith("peft."):  # a layer of the peft package, not a base layer
            raise DeltaConfigError(f"target module {module_name!r} already carries a peft adapter "
                                   f"({type(base.module).__module__}.{type(base.module).__name__}, e.g. from "
                                   "diffusers' load_lora_weights or peft's get_peft_model); adapt a model without "
                                   "it (load it afresh, or unload the peft adapter first)")
        if not self.supports(base):
            raise DeltaConfigError(f"target module {module_name!r} is a {type(base.module).__name__}, which "
                                   f"{self.peft_type} does not support")
        if not self.supports_quantized and base.is_quantized:
            raise DeltaConfigError(f"target module {module_name!r} is quantized, and {self.peft_type} "
                                   "does not support quantized bases; adapt the float model instead")

    def module_keys(self) -> dict[str, tuple[list[str], Callable[[str, str], bool]]]:
        """Per-module fields whose every key must select a module this adapter targets, as
        {field: (keys, matches(key, module_name))}: LoRA's rank_pattern and alpha_pattern, IA3's
        feedforward_modules ... core/targeting.py checks them before the model is touched."""
        return {}

    @property
    def changes_base_weights(self) -> bool:
        """Whether building an adapter rewrites the base weight (PiSSA): then a failed load restores it."""
        return False

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> ModelLevel | None:
        """A model-level module for this adapter (soft prompt, shared projections; a `model_adapter_type`), or
        None. It is saved under its `disk_prefix` + its state-dict names; a `TakesOverForward` one runs the
        wrapped model's forward and generate (core/protocols.py)."""
        return None

    # -- saved adapters this one is built from (X-LoRA's experts): io/ reads them --------------------
    def referenced_adapters(self) -> dict[str, str]:
        """{name: adapter directory} of the saved adapters this adapter is built from (X-LoRA's experts); {}
        for most methods. io/ reads them (io/adapter_files.read_referenced, which from_pretrained,
        load_adapter and get_peft_model call) and hands them to `use_referenced` before the model is
        touched."""
        return {}

    def use_referenced(self, adapters: dict[str, tuple[DeltaConfig, dict[str, torch.Tensor]]]) -> None:
        """Take the adapters `referenced_adapters()` names, as io/ read them: by name, (config, tensors keyed
        `<module path>.<local name>`). Kept on this object only: an attribute, not a field, so never saved."""
        self._referenced = adapters

    def referenced(self) -> dict[str, tuple[DeltaConfig, dict[str, torch.Tensor]]]:
        """What `use_referenced` was given (checked before the model is touched: DeltaModel.inject).

        Raises:
            DeltaConfigError: some of `referenced_adapters()` were not read (a config built by hand and passed
                to DeltaModel(...) directly; get_peft_model and from_pretrained read them).
        """
        read = getattr(self, "_referenced", {})
        missing = {name: path for name, path in self.referenced_adapters().items() if name not in read}
        if missing:
            raise DeltaConfigError(f"{self.peft_type} is built from the saved adapters {missing}, which were "
                                   "not read; build the model with get_peft_model() or from_pretrained(), "
                                   "which read them (io/adapter_files.read_referenced)")
        return read

    # -- training-time hooks, called by DeltaModel for the active adapters ---------------------------
    def before_training(self, model: nn.Module, adapter_name: str, batches, loss_fn) -> None:
        """Once before the first step: `batches` iterates over training batches (model keyword dicts with
        labels), `loss_fn(model, batch)` gives a batch's loss; e.g. fix a gradient mask from them."""

    def before_optimizer_step(self, model: nn.Module, adapter_name: str, step: int) -> None:
        """After backward, before optimizer.step(): e.g. mask gradients."""

    def after_optimizer_step(self, model: nn.Module, adapter_name: str, step: int, optimizer) -> None:
        """After optimizer.step(): e.g. update a rank budget, merge and reset."""

    def extra_loss(self, model: nn.Module, adapter_name: str):
        """A regulariser to add to the training loss, or None."""
        return None

    # -- (de)serialisation with PEFT's field names --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not self.saves_layer_selection:  # PEFT's config for the method has no such fields
            for key in ("layers_to_transform", "layers_pattern"):
                if out.get(key) is None:
                    out.pop(key, None)
        if isinstance(out["task_type"], TaskType):
            out["task_type"] = out["task_type"].value
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DeltaConfig:
        """Build a config from a dict (a parsed adapter_config.json); unknown keys warn and are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in METADATA_KEYS and value not in (None, False, {}, [], "") \
                    and (key not in PEFT_DEFAULTS or PEFT_DEFAULTS[key] != value):
                ignored[key] = value
        if ignored:
            warnings.warn(f"{source}: ignoring keys deltatune does not use for {cls.peft_type}: "
                          + ", ".join(f"{k}={v!r}" for k, v in sorted(ignored.items())), stacklevel=2)
        try:
            return cls(**kwargs)
        except (TypeError, DeltaConfigError) as err:
            raise DeltaConfigError(f"{source}: {err}") from None


_REGISTRY: dict[str, type[DeltaConfig]] = {}


def register_method(config_cls: type[DeltaConfig]) -> type[DeltaConfig]:
    """Class decorator: make a method's config known by its `peft_type`, after checking the adapter classes it
    builds provide every protocol they declare (core/protocols.py).

    Raises:
        AdapterContractError: a config that targets layers names no `adapter_types`, or a class misses a piece.
    """
    if config_cls.targets_layers and not config_cls.adapter_types:
        raise AdapterContractError(f"{config_cls.__name__} targets layers but names no adapter_types")
    for adapter_type in config_cls.adapter_types:
        check_adapter_class(adapter_type, LayerAdapter)
    if config_cls.model_adapter_type is not None:
        check_adapter_class(config_cls.model_adapter_type, ModelLevel)
    _REGISTRY[config_cls.peft_type] = config_cls
    return config_cls


def registered_methods() -> dict[str, type[DeltaConfig]]:
    return dict(_REGISTRY)


def config_class(peft_type: str, source: str = "config") -> type[DeltaConfig]:
    """The config class registered for `peft_type`, or an error that names the nearest known type."""
    key = str(peft_type).upper()
    if key not in _REGISTRY:
        near = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise DeltaConfigError(f"{source}: unknown peft_type {peft_type!r}{hint}; "
                               f"known: {sorted(_REGISTRY)}")
    return _REGISTRY[key]


def config_from_dict(data: dict[str, Any], source: str = "config") -> DeltaConfig:
    """Build the right config class from a dict that carries `peft_type`."""
    if "peft_type" not in data:
        raise DeltaConfigError(f"{source}: missing required key 'peft_type'")
    return config_class(data["peft_type"], source).from_dict(data, source)


def default_list(*values: str):
    return field(default_factory=lambda: list(values))
