"""The one table between runtime parameter names and Hugging Face PEFT's on-disk keys.

Runtime (inside DeltaModel.model)             On disk
<path>.adapters.<adapter>.<local>       <->   base_model.model.<path>.<local>      (lora_A.weight, ...)
(<path> without the `.base_layer` hops of an enclosing wrapped block: targeting.canonical_name)
<path>.copies.<adapter>.<param>         <->   base_model.model.<path>.<param>      (modules_to_save)
<path>.base_layer.bias / <path>.bias    <->   base_model.model.<same>              (bias="all"/"lora_only")
model_adapters.<adapter>.<local>        <->   <its disk_prefix><local>             (prompt_embeddings, ...)
input embeddings / output head in full  <->   base_model.model.<path>.base_layer.weight when adapted,
                                              base_model.model.<path>.weight when not (peft's
                                              save_embedding_layers layout; resized vocabularies)

`adapter_slots` builds the table for one adapter from the live model; saving reads the tensors it
names and loading copies into them, so both directions come from the same place.
"""

from __future__ import annotations

import torch

from ..core.layer import DeltaLayer, ModulesToSave
from ..core.targeting import canonical_name

DISK_PREFIX = "base_model.model."


def adapter_slots(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """{disk key: live parameter or buffer} for every tensor adapter `adapter_name` saves."""
    slots: dict[str, torch.Tensor] = {}
    # PEFT writes the task heads of prompt-learning methods as base_model.<head>, not base_model.model.<head>
    head_prefix = getattr(model.peft_config[adapter_name], "head_key_prefix", DISK_PREFIX)
    for path, layer in model.delta_layers():
        owned = layer.adapters if isinstance(layer, DeltaLayer) else layer.copies
        if adapter_name not in owned:
            continue
        prefix = DISK_PREFIX if isinstance(layer, DeltaLayer) else head_prefix
        for local, tensor in owned[adapter_name].state_dict(keep_vars=True).items():
            slots[f"{prefix}{canonical_name(path)}.{local}"] = tensor
    for name, param in model.bias_parameters(adapter_name).items():
        slots[f"{DISK_PREFIX}{name}"] = param
    if adapter_name in model.model_adapters:
        module = model.model_adapters[adapter_name]  # a ModelLevel, which declares its disk_prefix
        for local, tensor in module.state_dict(keep_vars=True).items():
            slots[f"{module.disk_prefix}{local}"] = tensor
    return slots


def base_weight_slots(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """Full base weights of adapted embeddings, which `peft` saves beside embedding adapters; accepted on
    load (copied into the base), never required."""
    return {f"{DISK_PREFIX}{canonical_name(path)}.base_layer.weight": layer.base_layer.weight
            for path, layer in model.delta_layers()
            if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters
            and isinstance(layer.base_layer, torch.nn.Embedding)}


def embedding_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(canonical path, module as it sits now: plain or wrapped) of the model's input embeddings and output
    head (Transformers' get_input_embeddings / get_output_embeddings), each once."""
    found: dict[str, torch.nn.Module] = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model.model, getter, None)
        try:
            module = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            module = None
        if module is None:
            continue
        path = next((n for n, m in model.model.named_modules() if m is module), None)
        if path:
            found.setdefault(canonical_name(path), module)
    return list(found.items())


def embedding_layer_slots(model) -> dict[str, torch.Tensor]:
    """{disk key: live tensor} of the input embeddings and output head in full, as peft saves embedding
    layers: `<path>.base_layer.weight` (and bias) under an adapter, `<path>.weight` (and bias) when plain.
    A layer trained in full (modules_to_save) is skipped: its copy is saved already."""
    slots: dict[str, torch.Tensor] = {}
    for path, module in embedding_layers(model):
        if isinstance(module, ModulesToSave):
            continue
        wrapped = isinstance(module, DeltaLayer)
        owner, prefix = (module.base_layer, f"{path}.base_layer") if wrapped else (module, path)
        for leaf in ("weight", "bias"):
            tensor = getattr(owner, leaf, None)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                slots[f"{DISK_PREFIX}{prefix}.{leaf}"] = tensor
    return slots


def trained_head_bias_extras(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The extra keys `peft` writes, with bias="all", for each bias of a module trained in full
    (modules_to_save) at <path>: bias="all" saves every parameter named *bias with the adapter name cut,
    so besides the copy's `<path>.<bias>` it writes `<path>.modules_to_save.<bias>` (the copy's bias
    again) and `<path>.original_module.<bias>` (the frozen original's, i.e. the base value).

    Returns {key: live tensor of that shape}. Neither carries an adapter value: `peft` skips the first on
    load (its copy loads from `<path>.<bias>`); the second is the base's own bias, which an adapter file
    never changes here (disable_adapter() gives the base exactly). So the loader accepts them, checks
    their shapes and copies nothing; we do not write them, and `peft` loads our files without them."""
    if getattr(model.peft_config[adapter_name], "bias", "none") != "all":
        return {}
    extras: dict[str, torch.Tensor] = {}
    for path, layer in model.delta_layers():
        if not isinstance(layer, ModulesToSave) or adapter_name not in layer.copies:
            continue
        head = f"{DISK_PREFIX}{canonical_name(path)}"
        for local, param in layer.original_module.named_parameters():
            if local.endswith("bias"):
                extras[f"{head}.original_module.{local}"] = param
                extras[f"{head}.modules_to_save.{local}"] = param
    return extras
