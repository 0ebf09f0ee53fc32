"""The diffusers LoRA layout (`pytorch_lora_weights.safetensors`: what `pipeline.load_lora_weights()` reads and
`save_lora_weights()` writes), both ways, with its one key map.

On disk (read from diffusers 0.42.1: loaders/lora_base.py `_fetch_state_dict`, `write_lora_layers`,
`_load_lora_into_text_encoder`; loaders/peft.py `load_lora_adapter`; utils/peft_utils.py `get_peft_kwargs`,
`_create_lora_config`):

  <component>.<module path>.lora_A.weight           (r, in)   conv: (r, in, kh, kw)
  <component>.<module path>.lora_B.weight           (out, r)  conv: (out, r, 1, 1)
  <component>.<module path>.lora_magnitude_vector   DoRA: (out,)  conv: (1, out, 1, 1)

`component` is the pipeline attribute the module sits in (COMPONENTS: unet, transformer, text_encoder ...); a
module path is the component model's own (a DeltaModel's peft key without `base_model.model.`).

Rank and alpha: the safetensors header's "lora_adapter_metadata" is JSON {"<component>.<field>": value} with
fields of peft's LoraConfig, from which diffusers builds `peft.LoraConfig(**fields)`. We write r, lora_alpha,
use_rslora, use_dora, the adapted modules as one exact-name regex (target_modules), and rank_pattern /
alpha_pattern keyed by escaped whole module names, so every module gets its rank and alpha under any reader's
pattern rule. Without metadata diffusers takes each module's rank from lora_B and alpha = rank (scale 1:
W + B A); reading, so do we. (kohya's per-module `.alpha` keys, diffusers' `network_alphas`, are the kohya
format's.) Older key forms diffusers still reads are mapped (LEGACY_SUFFIXES), and a CLIP text encoder saved
with a `text_model.` level loads into one without it, as diffusers does.

Only LoRA and DoRA adapters are written: the Stable Diffusion pipeline's load_lora_weights refuses any key
without "lora" (LoHa's hada_*, LoKr's lokr_*; diffusers 0.42 reads LoKr through some model-level loaders only),
so other methods get one error naming the way out;
DoRA only on denoisers (a text encoder's magnitudes are dropped by diffusers 0.42.1 under Transformers 5).
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..core.config import DeltaConfigError
from ..core.model import DeltaModel
from ..core.targeting import pattern_value
from ..errors import AdapterFileError
from ..methods.lora import LoraConfig
from .adapter_files import CONFIG_NAME, read_adapter, read_config, weights_fill
from .atomic import atomic_folder, safetensors_bytes, write_bytes
from .keymap import DISK_PREFIX, adapter_slots

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
LOCAL_NAMES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")  # what a layer writes
LEGACY_SUFFIXES = {".lora.down.weight": ".lora_A.weight", ".lora.up.weight": ".lora_B.weight",
                   ".lora_linear_layer.down.weight": ".lora_A.weight", ".lora_linear_layer.up.weight": ".lora_B.weight"}
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's lora_alpha default
RUN_ADAPTER_FOLDER = "adapter"  # where a text-to-image run keeps its component folders
TEXT_MODEL = "text_model."  # CLIPTextModel's inner level before Transformers 5 flattened it
# The top-level modules of each component's model class (diffusers' UNet2DConditionModel, its SD3/Flux/DiT
# transformers; CLIP/T5 text encoders): a module path outside them means the adapter was made on another model
COMPONENT_ROOTS = {
    "unet": ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "down_blocks",
             "mid_block", "up_blocks", "conv_norm_out", "conv_out", "encoder_hid_proj"),
    "transformer": ("pos_embed", "x_embedder", "context_embedder", "time_text_embed", "transformer_blocks",
                    "single_transformer_blocks", "norm_out", "proj_out"),
    "text_encoder": ("text_model", "embeddings", "encoder", "final_layer_norm", "text_projection", "shared"),
}


# ---------------------------------------------------------------------------------------------- writing
def check_writable(config, adapter_name: str, component: str) -> LoraConfig:
    """`config` if diffusers can read its adapter as `component`, else DeltaConfigError naming what it cannot."""
    if component not in COMPONENTS:
        raise DeltaConfigError(f"component {component!r}: diffusers' pipelines load LoRA weights into "
                               f"{', '.join(COMPONENTS)}; name the pipeline attribute the model is")
    if not isinstance(config, LoraConfig) or config.peft_type != "LORA":
        raise DeltaConfigError(f"{component}: adapter {adapter_name!r} is {config.peft_type}; diffusers' "
                               "load_lora_weights reads LoRA and DoRA only (its key check needs 'lora' in every "
                               "key). Write LoHa/LoKr in the LyCORIS format, or make a LoRA first: "
                               "`deltatune convert --to lora`")
    if config.use_dora and component.startswith("text_encoder"):
        raise DeltaConfigError(f"{component}: DoRA on a text encoder does not load in diffusers (0.42.1 with "
                               "Transformers 5 drops the lora_magnitude_vector tensors: its own save_lora_weights -> "
                               "load_lora_weights round trip changes the output); use plain LoRA there")
    extras = [name for name, value in (("bias", config.bias != "none"), ("modules_to_save", config.modules_to_save))
              if value]
    if extras:
        raise DeltaConfigError(f"{component}: adapter {adapter_name!r} also trains {' and '.join(extras)}, which "
                               "the diffusers layout cannot carry (only lora_A, lora_B, lora_magnitude_vector)")
    return config


def exact_names(names: list[str]) -> str:
    """A regex matching exactly these module names (peft and we fullmatch a string target_modules)."""
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def explicit_patterns(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """r / lora_alpha as the most common values, rank_pattern / alpha_pattern for every other module, keyed by
    its escaped whole name (peft's `(.*\\.)?(key)` then matches that module only)."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha,
            "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha}}


def diffusers_state_dict(config: LoraConfig, peft_tensors: dict[str, torch.Tensor], component: str,
                         adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors under diffusers keys, the component's metadata fields unprefixed) for one adapter given as its
    config and its tensors under peft keys (`base_model.model.<path>.lora_A.weight` ...)."""
    check_writable(config, adapter_name, component)
    roots = COMPONENT_ROOTS.get(component.removesuffix("_2").removesuffix("_3"))
    tensors = {}
    for key, tensor in peft_tensors.items():
        local = key.removeprefix(DISK_PREFIX)
        if roots and local.split(".", 1)[0] not in roots:
            raise DeltaConfigError(f"{component}: module {local.rsplit('.lora_', 1)[0]} is not in a {component} "
                                   f"model (its top-level modules: {', '.join(roots)}); was the adapter made on "
                                   "another model, or is --component wrong?")
        if not local.endswith(LOCAL_NAMES):
            raise DeltaConfigError(f"{component}: {local} has no place in the diffusers layout (a LoRA on an "
                                   "embedding? diffusers' loaders read lora_A/lora_B/lora_magnitude_vector)")
        tensors[f"{component}.{local}"] = tensor.detach()
    names = sorted({k.removeprefix(DISK_PREFIX).rsplit(".lora_", 1)[0] for k in peft_tensors})
    ranks = {n: pattern_value(config.rank_pattern, n, config.r) for n in names}
    alphas = {n: pattern_value(config.alpha_pattern, n, config.lora_alpha, "alpha_pattern") for n in names}
    fields = {**explicit_patterns(ranks, alphas), "target_modules": exact_names(names),
              "use_rslora": config.use_rslora, "use_dora": config.use_dora}
    return tensors, fields


def write_file(parts: dict[str, tuple[dict[str, torch.Tensor], dict]], folder: str | os.PathLike) -> Path:
    """{component: (tensors, fields)} -> folder/pytorch_lora_weights.safetensors, the folder written whole."""
    tensors, metadata = {}, {}
    for component, (part, fields) in parts.items():
        tensors.update(part)
        metadata.update({f"{component}.{k}": v for k, v in fields.items()})
    data = safetensors_bytes(tensors, {METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    with atomic_folder(folder) as tmp:
        write_bytes(tmp / WEIGHTS_NAME, data)
    return Path(folder) / WEIGHTS_NAME


def save_diffusers_lora(components: dict[str, DeltaModel], folder: str | os.PathLike,
                        adapter_name: str = "default") -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` that `pipeline.load_lora_weights(folder)` loads.

    Args:
        components: {pipeline attribute: DeltaModel wrapping it}, e.g. {"unet": unet_model,
            "text_encoder": te_model}; keys from COMPONENTS.
        folder: the output folder; written whole under a temporary name, then renamed into place.
        adapter_name: the adapter of each DeltaModel to write.

    Returns:
        The weights file's path.

    Raises:
        DeltaConfigError: an unknown component, or an adapter diffusers cannot read (not LoRA/DoRA, or one
            that trains biases / whole modules). Nothing is written then.
    """
    if not components:
        raise DeltaConfigError("components is empty: give {pipeline attribute: DeltaModel}, e.g. {'unet': model}")
    parts = {}
    for component, model in components.items():
        if adapter_name not in model.peft_config:
            raise ValueError(f"{component}: unknown adapter {adapter_name!r}; adapters: {list(model.peft_config)}")
        parts[component] = diffusers_state_dict(model.peft_config[adapter_name], adapter_slots(model, adapter_name),
                                                component, adapter_name)
    return write_file(parts, folder)


def component_of(config, folder: Path, given: str | None) -> str:
    """The pipeline attribute the adapter in `folder` belongs to: `given`; else the adapter folder's own name
    when it is one (a training run's adapter/unet/); else its base model folder's name (a pipeline keeps each
    component in a folder named after it: .../unet); else that folder's diffusers class (`_class_name` in its
    config.json: a UNet -> unet, a transformer -> transformer)."""
    if given:
        return given
    base = Path(str(config.base_model_name_or_path or ""))
    for name in (folder.resolve().name, base.name):
        if name in COMPONENTS:
            return name
    try:
        class_name = json.loads((base / "config.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        class_name = ""
    for ending, component in (("UNet2DConditionModel", "unet"), ("Transformer2DModel", "transformer")):
        if class_name.endswith(ending):
            return component
    raise DeltaConfigError(f"{folder}: cannot tell which pipeline component the adapter is for (neither its "
                           f"folder nor its base_model_name_or_path {config.base_model_name_or_path!r} names "
                           "one); pass "
                           f"--component, one of {', '.join(COMPONENTS)}")


def adapter_folders(adapter: Path) -> list[Path]:
    """The adapter folder itself, or its component subfolders (unet/, text_encoder/ ...) that hold adapters;
    a text-to-image run's output folder stands for its adapter/ folder."""
    if not (adapter / CONFIG_NAME).is_file() and (adapter / RUN_ADAPTER_FOLDER).is_dir():
        adapter = adapter / RUN_ADAPTER_FOLDER
    if (adapter / CONFIG_NAME).is_file():
        return [adapter]
    found = [adapter / name for name in COMPONENTS if (adapter / name / CONFIG_NAME).is_file()]
    if not found:
        raise AdapterFileError(f"{adapter}: no {CONFIG_NAME} there, nor in a component subfolder "
                               f"({', '.join(COMPONENTS)})")
    return found


def component_folders(items: list[str], component: str | None = None) -> dict[str, Path]:
    """{pipeline component: adapter folder} from `deltatune export --adapter` values, each COMPONENT=DIR or a
    bare DIR: one component's adapter folder (its component from `component_of`, or `component`) or a
    text-to-image run's adapter/ folder holding unet/, text_encoder/ ... (each under its folder's name).

    Raises:
        AdapterFileError: a DIR holding no adapter. DeltaConfigError: `component` given for a folder of several
            adapters, two adapters for one component, or one whose component cannot be told.
    """
    found: dict[str, Path] = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item and not Path(item).exists() else ("", "", item)
        folders = [Path(path)] if name else adapter_folders(Path(path))
        if component and len(folders) > 1:
            raise DeltaConfigError(f"--adapter {item}: --component names one component, but the folder holds "
                                   f"{[f.name for f in folders]} (each is exported under its folder's name)")
        for folder in folders:
            key = name or component_of(read_config(folder), folder, component)
            if key in found:
                raise DeltaConfigError(f"--adapter {item}: a second adapter for component {key!r}")
            found[key] = folder
    return found


def export_diffusers(adapters: Mapping[str, str | os.PathLike], out: str | os.PathLike,
                     allow_pickle: bool = False) -> Path:
    """`deltatune export --to diffusers`: saved LoRA/DoRA adapters (peft layout, ours or peft's), one per
    pipeline component ({"unet": DIR, "text_encoder": DIR}; `component_folders` builds it from the command
    line) -> OUT/pytorch_lora_weights.safetensors, all in the one file. No model is loaded.

    Raises:
        AdapterFileError / DeltaConfigError: an unreadable adapter, or one diffusers cannot read. Nothing is
            written then.
    """
    parts = {}
    for name, folder in adapters.items():
        config, weights = read_adapter(folder, allow_pickle=allow_pickle)
        parts[name] = diffusers_state_dict(config, weights, name)
    return write_file(parts, out)


# ---------------------------------------------------------------------------------------------- reading
def weights_file(path: Path) -> Path:
    """diffusers' choice in a folder: pytorch_lora_weights.safetensors, else its only .safetensors file."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise AdapterFileError(f"{path}: no such file or folder")
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise AdapterFileError(f"{path}: expected {WEIGHTS_NAME} (or one .safetensors file), found "
                               f"{[f.name for f in found]}")
    return found[0]


def read_file(file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the parsed lora_adapter_metadata ({} without one)."""
    try:
        with safe_open(str(file), "pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            header = handle.metadata() or {}
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{file}: unreadable safetensors file or metadata ({err})") from None
    return tensors, metadata


def local_key(key: str) -> str:
    """A file key without its component, in the peft form (LEGACY_SUFFIXES mapped)."""
    for old, new in LEGACY_SUFFIXES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def split_components(tensors: dict[str, torch.Tensor], models: dict[str, nn.Module], source: str
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module path.local: tensor}}; every key must belong to a component in `models`."""
    if any(key.startswith(("lora_unet_", "lora_te", "lycoris_")) for key in tensors):
        raise AdapterFileError(f"{source}: a kohya/LyCORIS file (lora_unet_... keys), not the diffusers layout")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in models:
            raise AdapterFileError(f"{source}: key {key!r} is for component {component!r}, which was not given "
                                   f"(components given: {sorted(models)}; the file has "
                                   f"{sorted({k.partition('.')[0] for k in tensors})})")
        rest = local_key(rest)
        if not rest.endswith(LOCAL_NAMES):
            raise AdapterFileError(f"{source}: key {key!r} is no LoRA/DoRA tensor this loader reads "
                                   f"(expected names ending in {', '.join(LOCAL_NAMES)})")
        if rest.startswith(TEXT_MODEL) and not hasattr(models[component], "text_model"):
            rest = rest.removeprefix(TEXT_MODEL)
        parts.setdefault(component, {})[rest] = tensor
    return parts


def config_for(part: dict[str, torch.Tensor], fields: dict) -> LoraConfig:
    """The LoraConfig a component's tensors and metadata fields describe: each module's rank from its lora_B,
    its alpha from the metadata (peft's pattern rule) or, without metadata, = rank (diffusers' rule)."""
    ranks = {k.removesuffix(".lora_B.weight"): t.shape[1] for k, t in part.items() if k.endswith(".lora_B.weight")}
    if fields:
        default = fields.get("lora_alpha", PEFT_DEFAULT_ALPHA)  # what peft.LoraConfig(**fields) falls back to
        alphas = {n: pattern_value(fields.get("alpha_pattern") or {}, n, default, "alpha_pattern") for n in ranks}
    else:
        alphas = dict(ranks)
    return LoraConfig(**explicit_patterns(ranks, alphas), target_modules=exact_names(list(ranks)),
                      use_rslora=bool(fields.get("use_rslora", False)),
                      use_dora=any(k.endswith("lora_magnitude_vector") for k in part))


def load_diffusers_lora(path: str | os.PathLike, components: dict[str, nn.Module],
                        adapter_name: str = "default") -> dict[str, DeltaModel]:
    """Load a diffusers-layout LoRA (ours, or one diffusers' `save_lora_weights` wrote) onto plain models.

    Args:
        path: a folder holding pytorch_lora_weights.safetensors (or one .safetensors file), or the file.
        components: {pipeline attribute: model}, e.g. {"unet": pipe.unet, "text_encoder": pipe.text_encoder};
            every component the file has must be given.
        adapter_name: the adapter's name in each DeltaModel.

    Returns:
        {component: DeltaModel} for the components the file has (the models are adapted in place, so a
        pipeline holding them runs with the LoRA).

    Raises:
        AdapterFileError: an unreadable file, keys of a component not given, a key no LoRA tensor, a tensor that
            matches no module or has the wrong shape. Checked for every component before any model changes.
    """
    file = weights_file(Path(path))
    tensors, metadata = read_file(file)
    if not tensors:
        raise AdapterFileError(f"{file}: no tensors")
    parts = split_components(tensors, components, str(file))
    plans = {}
    for component, part in parts.items():
        fields = {k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")}
        plans[component] = (config_for(part, fields), {DISK_PREFIX + k: t for k, t in part.items()})
    for component, (_, disk) in plans.items():  # every key against every model first: all or nothing
        names = {n for n, _ in components[component].named_modules()}
        unknown = sorted({k.rsplit(".lora_", 1)[0].removeprefix(DISK_PREFIX) for k in disk} - names)
        if unknown:
            raise AdapterFileError(f"{file}: {component} has no module {unknown[0]!r} ({len(unknown)} such; "
                                   f"is this LoRA for another model?)")
    built: dict[str, DeltaModel] = {}
    try:
        for component, (config, disk) in plans.items():
            built[component] = DeltaModel(components[component], config, adapter_name,
                                          fill=weights_fill(disk, f"{file} ({component})"))
    except BaseException:
        for model in built.values():  # a later component's tensors were refused: the earlier ones go too
            model.unload()
        raise
    return built
