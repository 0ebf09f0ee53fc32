"""kohya / A1111 LoRA files and LyCORIS LoHa / LoKr files for image models, both ways.

    dms = load_kohya("style.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    save_kohya({"unet": dms["unet"], "text_encoder": dms["text_encoder"]}, "out.safetensors")

Keys and prefixes: io/kohya_keys.py (the one table). What the tensors mean:
  LoRA (kohya sd-scripts networks/lora.py, read by diffusers' _convert_non_diffusers_lora_to_diffusers):
      delta W = (alpha / r) * lora_up @ lora_down, r = lora_down.shape[0], alpha missing or 0 -> r;
      a conv: lora_down is a conv with the base's kernel (r, in, kh, kw), lora_up a 1x1 conv (out, r, 1, 1),
      exactly our lora_A / lora_B.
      DoRA (kohya / LyCORIS dora_wd, wd_on_out): dora_scale (out, 1[, 1, 1]) is the magnitude, our
      lora_magnitude_vector ((out,), conv (1, out, 1, 1): PEFT's shapes); W' = m * (W + dW) / ||W + dW||_row.
  LoHa / LoKr: io/lycoris_format.py.
A file of several methods is read per component: each component's modules must share one method, since a
component becomes one adapter (one config). Everything is checked before any model changes; an injection that
fails part way (a shape the adapter does not have) leaves every model as it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..core.layer import DeltaLayer
from ..core.model import DeltaModel
from ..errors import AdapterFileError, DeltaConfigError
from ..methods.lora import LoraConfig
from . import lycoris_format
from .adapter_files import read_adapter, weights_fill
from .atomic import safetensors_bytes, write_bytes
from .keymap import DISK_PREFIX
from .kohya_keys import (
    ALPHA,
    DORA_SCALE,
    LORA_NAMES,
    component_of,
    disk_path,
    flat_name,
    method_of_tensor,
    module_table,
    resolve,
    split_key,
    writing_prefixes,
)
from .lycoris_format import alpha_of, fit_to_module, pattern_config
from .pipelines import is_pipeline_folder, load_pipeline

__all__ = ["export_kohya", "load_kohya", "read_kohya_groups", "save_kohya"]
FROM_DISK = {disk: ours for ours, disk in LORA_NAMES.items()}


# ---------------------------------------------------------------- reading
def read_kohya_groups(tensors: Mapping[str, torch.Tensor], models: Mapping[str, nn.Module], source: str
                      ) -> dict[str, dict[str, tuple[str, dict[str, torch.Tensor]]]]:
    """{component: {module path: (method, {file tensor name: tensor})}} of a kohya/LyCORIS state dict.

    Raises:
        DeltaConfigError: a key of no known form, for a component not given, naming no module, of an unknown
            tensor, or a component whose modules mix methods (each names the key or module at fault).
    """
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    tables: dict[str, dict] = {}
    for key, tensor in tensors.items():
        prefix, flat, name = split_key(key)
        component = component_of(prefix, list(models))
        if component is None:
            raise DeltaConfigError(f"{source}: tensor {key!r} is for the {prefix} model, but no "
                                   f"{'unet/transformer' if prefix == 'lora_unet' else 'text encoder'} was "
                                   f"given (given: {sorted(models)})")
        if name not in (ALPHA, DORA_SCALE) and method_of_tensor(name) is None:
            raise DeltaConfigError(f"{source}: tensor {key!r}: {name!r} is no LoRA, LoHa or LoKr tensor "
                                   "(Tucker LoRA's lora_mid, other LyCORIS algorithms and diff/norm tensors are "
                                   "not read)")
        model = models[component]
        table = tables.setdefault(component, module_table(model.model if isinstance(model, DeltaModel) else model))
        path = resolve(table, flat, key, component)
        groups.setdefault(component, {}).setdefault(path, {})[name] = tensor
    planned: dict[str, dict[str, tuple[str, dict[str, torch.Tensor]]]] = {}
    for component, modules in groups.items():
        methods = {}
        for path, named in modules.items():
            found = {method_of_tensor(n) for n in named} - {None}
            if len(found) != 1:
                raise DeltaConfigError(f"{source}: module {path} of {component} has "
                                       f"{'tensors of ' + ' and '.join(sorted(found)) if found else 'only alpha'}"
                                       f" ({sorted(named)})")
            methods[path] = found.pop()
        if len(set(methods.values())) > 1:
            by_method = {m: next(p for p, mm in methods.items() if mm == m) for m in set(methods.values())}
            raise DeltaConfigError(f"{source}: {component} mixes methods ("
                                   + ", ".join(f"{p} is {m}" for m, p in sorted(by_method.items()))
                                   + "); one adapter holds one method")
        planned[component] = {path: (methods[path], named) for path, named in modules.items()}
    return planned


def plan_lora(modules: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]], source: str):
    """(LoraConfig, {module path.local name: tensor}) for kohya LoRA modules (see module docstring)."""
    ranks, alphas, disk = {}, {}, {}
    dora = {path for path, (_, named) in modules.items() if DORA_SCALE in named}
    if dora and len(dora) != len(modules):
        plain = next(p for p in modules if p not in dora)
        raise DeltaConfigError(f"{source}: module {plain} has no dora_scale while {sorted(dora)[0]} has one; one "
                               "adapter is DoRA everywhere or nowhere")
    for path, (module, named) in modules.items():
        for needed in LORA_NAMES.values():
            if needed not in named:
                raise DeltaConfigError(f"{source}: module {path} has no {needed} (a LoRA needs lora_down and "
                                       "lora_up)")
        down, up = named["lora_down.weight"], named["lora_up.weight"]
        rank = down.shape[0]
        if up.dim() < 2 or up.shape[1] != rank:
            raise DeltaConfigError(f"{source}: module {path}: lora_down has rank {rank}, lora_up is "
                                   f"{tuple(up.shape)}")
        ranks[path], alphas[path] = rank, alpha_of(named, rank)
        weight_shape = tuple(module.weight.shape)
        want_down = (rank, *weight_shape[1:2], *weight_shape[2:])
        want_up = (weight_shape[0], rank, *[1] * (len(weight_shape) - 2))
        disk[f"{path}.lora_A.weight"] = fit_to_module(down, want_down, path, "lora_down.weight", source)
        disk[f"{path}.lora_B.weight"] = fit_to_module(up, want_up, path, "lora_up.weight", source)
        if dora:
            disk[f"{path}.lora_magnitude_vector"] = magnitude_from_file(named[DORA_SCALE], weight_shape, path, source)
    r, alpha, rank_pattern, alpha_pattern = pattern_config(ranks, alphas)
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(modules), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, lora_dropout=0.0, use_dora=bool(dora)), disk


def magnitude_from_file(scale: torch.Tensor, weight_shape: tuple[int, ...], path: str, source: str) -> torch.Tensor:
    """dora_scale (out, 1[, 1, 1]) -> our lora_magnitude_vector ((out,), conv (1, out, 1, 1)).

    Raises:
        DeltaConfigError: another shape, e.g. LyCORIS's wd_on_out=False (1, in, ...), a per-input-channel norm.
    """
    out = weight_shape[0]
    if scale.shape[0] != out or scale.numel() != out:
        raise DeltaConfigError(f"{source}: module {path}: dora_scale is {tuple(scale.shape)}; a per-output-row "
                               f"magnitude ({out}, 1, ...) is read (LyCORIS wd_on_out=False is not)")
    return scale.reshape((1, out, *[1] * (len(weight_shape) - 2)) if len(weight_shape) > 2 else (out,))


PLANNERS = {"LORA": plan_lora, "LOHA": lycoris_format.plan_loha, "LOKR": lycoris_format.plan_lokr}


def load_kohya(path: str | os.PathLike, models: Mapping[str, nn.Module], adapter_name: str = "default"
               ) -> dict[str, DeltaModel]:
    """Load a kohya/A1111 LoRA or LyCORIS LoHa/LoKr file onto the given pipeline components.

    Args:
        path: the .safetensors file.
        models: {"unet" | "transformer" | "text_encoder" | "text_encoder_2": model}; a plain model gets wrapped
            in a new DeltaModel, a DeltaModel gets the adapter added (`adapter_name`, not made active).
    Returns:
        {component: DeltaModel} for the components the file has tensors for.
    Raises:
        AdapterFileError: the file cannot be read.
        DeltaConfigError: a key or shape the models cannot take (nothing was changed).
    """
    source = str(path)
    try:
        tensors = load_file(source)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{source}: unreadable or not a safetensors file ({err})") from None
    groups = read_kohya_groups(tensors, models, source)
    plans = {}
    for component, modules in groups.items():
        model = models[component]
        plain = model.model if isinstance(model, DeltaModel) else model
        method = next(iter(modules.values()))[0]
        located = {p: (plain.get_submodule(p), named) for p, (_, named) in modules.items()}
        located = {p: (m.base_layer if isinstance(m, DeltaLayer) else m, named) for p, (m, named) in located.items()}
        config, disk = PLANNERS[method](located, f"{source} ({component})")
        plans[component] = (config, {DISK_PREFIX + k: v for k, v in disk.items()})
    loaded: dict[str, DeltaModel] = {}
    try:
        for component, (config, disk) in plans.items():
            model, fill = models[component], weights_fill(disk, f"{source} ({component})")
            if isinstance(model, DeltaModel):
                model.inject(adapter_name, config, fill=fill)
                loaded[component] = model
            else:
                loaded[component] = DeltaModel(model, config, adapter_name, fill=fill)
    except BaseException:
        for component, done in loaded.items():  # all or nothing across the components too
            if isinstance(models[component], DeltaModel):
                done.delete_adapter(adapter_name)
            else:
                done.unload()
        raise
    return loaded


# ---------------------------------------------------------------- writing
def kohya_tensors(models: Mapping[str, DeltaModel], adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors for adapter `adapter_name` (default: each model's active one) of each component:
    LoRA as kohya LoRA, LoHa / LoKr as LyCORIS.

    Raises:
        DeltaConfigError: a method the formats do not carry (DoRA included), a component with no prefix,
            or two modules that flatten to one name.
    """
    prefixes = writing_prefixes(list(models))
    tensors: dict[str, torch.Tensor] = {}
    for component, dm in models.items():
        if not isinstance(dm, DeltaModel):
            raise DeltaConfigError(f"component {component!r}: expected a DeltaModel, got {type(dm).__name__}")
        name = adapter_name or dm.active_adapter
        if name not in dm.peft_config:
            raise DeltaConfigError(f"component {component!r} has no adapter {name!r} (it has {list(dm.peft_config)})")
        config = dm.peft_config[name]
        writer = WRITERS.get(config.peft_type)
        if writer is None:
            raise DeltaConfigError(f"component {component!r}: adapter {name!r} is {config.peft_type}; kohya/LyCORIS "
                                   "files carry LoRA (and DoRA), LoHa and LoKr")
        written_by: dict[str, str] = {}
        for path, layer in dm.delta_layers():
            if not isinstance(layer, DeltaLayer) or name not in layer.adapters:
                continue
            module_name = f"{prefixes[component]}_{flat_name(disk_path(dm.model, path))}"
            if module_name in written_by:
                raise DeltaConfigError(f"component {component!r}: modules {written_by[module_name]} and {path} "
                                       f"both flatten to {module_name!r}")
            written_by[module_name] = path
            for local, tensor in writer(layer.adapters[name]).items():
                tensors[f"{module_name}.{local}"] = tensor.detach().cpu().contiguous()  # the adapter's dtype
    return tensors


def lora_file_tensors(adapter) -> dict[str, torch.Tensor]:
    """kohya tensors of one LoRA adapter: alpha = scaling * r, so alpha / r is our scaling (rsLoRA too);
    DoRA's magnitude as dora_scale (out, 1[, 1, 1])."""
    tensors = {"lora_down.weight": adapter.lora_A.weight, "lora_up.weight": adapter.lora_B.weight,
               ALPHA: torch.tensor(adapter.scaling * adapter.r)}
    if adapter.use_dora:
        down = adapter.lora_A.weight  # (r, in[, kh, kw])
        tensors[DORA_SCALE] = adapter.lora_magnitude_vector.reshape(-1, *[1] * (down.dim() - 1))
    return tensors


WRITERS = {"LORA": lora_file_tensors, "LOHA": lycoris_format.loha_file_tensors,
           "LOKR": lycoris_format.lokr_file_tensors}


def save_kohya(models: Mapping[str, DeltaModel], path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the adapters of `models` ({"unet": dm, "text_encoder": dm, ...}) as one kohya/LyCORIS
    .safetensors file (atomically); returns its path. Errors: see kohya_tensors."""
    tensors = kohya_tensors(models, adapter_name)
    if not tensors:
        raise DeltaConfigError("nothing to write: no adapted module in the given models")
    write_bytes(path, safetensors_bytes(tensors))
    return Path(path)


def export_kohya(adapters: Mapping[str, str | os.PathLike], out: str | os.PathLike,
                 pipeline: str | os.PathLike | None = None, allow_pickle: bool = False) -> Path:
    """`deltatune export --to kohya`: load the pipeline folder's components, each adapter folder (our PEFT
    layout; {"unet": DIR, "text_encoder": DIR}) onto its component, and write one kohya/LyCORIS file to `out`.
    `pipeline` defaults to the adapters' base_model_name_or_path (a text-to-image run records its pipeline
    folder there).

    Raises:
        DeltaConfigError: a component the format has no prefix for, or the pipeline lacks; no pipeline given
            and the adapters name none (or different ones). Checked before the pipeline loads.
    """
    writing_prefixes(list(adapters))  # a component the format has no prefix for: refused before any loading
    read = {component: read_adapter(folder, allow_pickle=allow_pickle) for component, folder in adapters.items()}
    if pipeline is None:
        named = {str(config.base_model_name_or_path) for config, _ in read.values()}
        if len(named) != 1 or not is_pipeline_folder(next(iter(named))):
            raise DeltaConfigError(f"--pipeline: the adapters name no one pipeline folder as their base "
                                   f"({sorted(named)}); pass --pipeline DIR")
        pipeline = named.pop()
    pipe = load_pipeline(pipeline)
    models = {}
    for component, folder in adapters.items():
        base = pipe.components.get(component)
        if not isinstance(base, nn.Module):
            raise DeltaConfigError(f"--adapter {component}={folder}: the pipeline in {pipeline} has no model "
                                   f"{component!r}")
        config, weights = read[component]
        models[component] = DeltaModel(base, config, fill=weights_fill(weights, str(folder)))
    return save_kohya(models, out)
