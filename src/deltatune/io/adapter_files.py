"""Saving and loading adapters in the Hugging Face PEFT layout (DESIGN section 4).

<dir>/adapter_config.json + <dir>/adapter_model.safetensors for the "default" adapter, <dir>/<name>/
for the others. Only safetensors is read unless the caller passes allow_pickle=True. Files are read
and checked before the model is touched; a failed load leaves the model as it was.

The two files of an adapter are replaced one after the other, so a save is journaled: first
`.adapter_save.json` records the sha256 of both files as they were and as the save writes them, then
the weights and the config are each renamed into place, then the journal goes. A folder that still has
a journal was killed part way; it loads only if its two files are the previous save or the new one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.config import DeltaConfig, DeltaConfigError, config_from_dict
from ..core.model import check_adapter_name
from ..errors import AdapterFileError  # noqa: F401  (re-exported)
from .atomic import json_text, safetensors_bytes, write_bytes, write_json, write_text
from .keymap import DISK_PREFIX, adapter_slots, base_weight_slots, embedding_layer_slots, trained_head_bias_extras
from .models import loadable_name
from .vocabulary import embedding_tensors, resize_hint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
JOURNAL_NAME = ".adapter_save.json"
CONFIG_HASH, WEIGHTS_HASH = "config_sha256", "weights_sha256"  # the journal's keys


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    root = Path(save_directory)
    return root if adapter_name == "default" else root / adapter_name


def save_adapters(model, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                  is_main_process: bool = True, save_embedding_layers: bool | str = "auto",
                  **_: object) -> None:
    """Write adapter_config.json and adapter_model.safetensors per adapter; other files are left alone.
    `save_embedding_layers` ("auto", True, False) decides whether the input embeddings and output head
    go into the file in full, as in peft (io/vocabulary.py: resized vocabularies)."""
    names = list(selected_adapters or model.peft_config)
    for name in names:
        check_adapter_name(name)
        if name not in model.peft_config:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(model.peft_config)}")
    if not is_main_process:
        return
    for name in names:
        target = adapter_dir(save_directory, name)
        if target.exists() and not target.is_dir():
            raise AdapterFileError(f"{target} exists and is not a directory")
        tensors = adapter_slots(model, name)
        if not tensors:
            raise AdapterFileError(f"adapter {name!r} has no tensors to save")
        tensors = {**embedding_tensors(model, name, save_embedding_layers), **tensors}
        config_text = json_text(config_to_json(model, model.peft_config[name]))
        weights = safetensors_bytes(tensors)
        write_json(target / JOURNAL_NAME, {"new": file_hashes(config_text.encode("utf-8"), weights),
                                           "previous": saved_hashes(target)})
        try:
            write_bytes(target / WEIGHTS_NAME, weights)
        except Exception:  # nothing was replaced: the folder holds the previous save, whole
            (target / JOURNAL_NAME).unlink(missing_ok=True)
            raise
        write_text(target / CONFIG_NAME, config_text)  # failing here leaves the journal: the pair is torn
        (target / JOURNAL_NAME).unlink()


def config_to_json(model, config: DeltaConfig) -> dict:
    data = config.to_dict()
    # a name every reader of the file loads (models.loadable_name): never our alias, a relative path or ""
    base = (data.get("base_model_name_or_path")
            or getattr(getattr(model.model, "config", None), "_name_or_path", None))
    data["base_model_name_or_path"] = loadable_name(base)
    data["inference_mode"] = True
    if isinstance(data.get("target_modules"), (set, tuple)):
        data["target_modules"] = sorted(data["target_modules"])
    return data


def file_hashes(config: bytes | None, weights: bytes | None) -> dict[str, str | None]:
    """sha256 of an adapter's two files (None for a missing one), as its save journal records them."""
    return {name: hashlib.sha256(data).hexdigest() if data is not None else None
            for name, data in ((CONFIG_HASH, config), (WEIGHTS_HASH, weights))}


def saved_hashes(folder: Path) -> dict[str, str | None]:
    """file_hashes of the adapter files now in `folder`."""
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    return file_hashes(config.read_bytes() if config.is_file() else None,
                       weights.read_bytes() if weights.is_file() else None)


def check_save_finished(path: Path) -> None:
    """Refuse a folder whose save was killed between renaming the weights and renaming the config.

    Raises:
        AdapterFileError: the weights and the config in `path` come from different saves.
    """
    journal, weights, config = path / JOURNAL_NAME, path / WEIGHTS_NAME, path / CONFIG_NAME
    if not journal.is_file() or not weights.is_file() or not config.is_file():
        return
    try:
        journal_data = json.loads(journal.read_text(encoding="utf-8"))
        whole_saves = (journal_data["new"], journal_data["previous"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable journal: read_weights/read_config name any fault of the files
    if saved_hashes(path) not in whole_saves:
        raise AdapterFileError(f"{path}: a save was interrupted between {WEIGHTS_NAME} and {CONFIG_NAME}, so "
                               "they come from different saves; save the adapter again (a training run: "
                               "`deltatune train CONFIG --resume`)")


def read_config(path: Path) -> DeltaConfig:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise AdapterFileError(f"{file}: no adapter config found (expected {CONFIG_NAME} in {path})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return config_from_dict(data, source=str(file))


def read_weights(path: Path, allow_pickle: bool = False, names: tuple[str, str] = (WEIGHTS_NAME, PICKLE_NAME)
                 ) -> dict[str, torch.Tensor]:
    """The tensors of folder `path`: `names` = (safetensors file, pickled file); the pickled one only with
    `allow_pickle=True` (and then with weights_only=True). Other formats' folders pass their own names."""
    safe, pickled = path / names[0], path / names[1]
    if safe.is_file():
        try:
            return load_file(str(safe))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFileError(f"{safe}: unreadable or corrupted safetensors file ({err})") from None
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterFileError(f"{pickled}: pickled weights can run arbitrary code when loaded and are "
                                   "refused; convert to safetensors or pass allow_pickle=True if you trust it")
        try:
            return torch.load(str(pickled), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several kinds for a bad pickle
            raise AdapterFileError(f"{pickled}: could not be loaded ({err})") from None
    raise AdapterFileError(f"{path}: no {names[0]} found")


def inside_directory(file: Path, root: Path) -> bool:
    """Whether `file`, links followed, stays inside `root`, or is a blob of the Hugging Face cache
    snapshot that `root` is (<repo>/snapshots/<revision>/x -> <repo>/blobs/<sha>). A link elsewhere could
    make a reader open any file on the machine."""
    target, root = file.resolve(), root.resolve()
    if target.is_relative_to(root):
        return True
    return (target.parent.name == "blobs" and root.parent.name == "snapshots"
            and target.parent.parent == root.parent.parent)


def read_adapter(model_id: str | os.PathLike, allow_pickle: bool = False, subfolder: str | None = None,
                 **_: object) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    """Config and weights of the adapter in directory `model_id` (read and parsed, not yet applied).

    Raises:
        AdapterFileError: a file is missing, unreadable, torn by an interrupted save, or a link that
            leads outside the directory.
    """
    path = Path(model_id) / subfolder if subfolder else Path(model_id)
    config, weights = read_folder(path, allow_pickle)
    return read_referenced(config), weights


def read_folder(path: Path, allow_pickle: bool = False) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    """read_adapter's files alone: config and weights of folder `path`, without the adapters it references."""
    if not path.is_dir():
        raise AdapterFileError(f"{path}: adapter directory not found (deltatune loads local directories)")
    for file in (path / CONFIG_NAME, path / WEIGHTS_NAME, path / PICKLE_NAME):
        if file.exists() and not inside_directory(file, path):
            raise AdapterFileError(f"{file}: a link to {file.resolve()}, outside the adapter directory; refused "
                                   "(copy the file in instead)")
    check_save_finished(path)
    return read_config(path), read_weights(path, allow_pickle)


def read_referenced(config: DeltaConfig) -> DeltaConfig:
    """Read the saved adapters `config` is built from (`referenced_adapters()`: X-LoRA's experts) and hand
    them to `config.use_referenced`: by name, (config, tensors keyed `<module path>.<local name>`). Only
    safetensors files are read; their own references are not followed. Returns `config`.

    Raises:
        DeltaConfigError: naming the adapter and directory that could not be read, and why.
    """
    read = {}
    for name, directory in config.referenced_adapters().items():
        try:
            referenced, weights = read_folder(Path(directory))
        except (AdapterFileError, DeltaConfigError) as err:  # a missing or bad file: named with the reference
            raise DeltaConfigError(f"{config.peft_type} is built from adapter {name!r} in {directory}: "
                                   f"{err}") from None
        read[name] = (referenced, {key.removeprefix(DISK_PREFIX): t for key, t in weights.items()})
    if read:
        config.use_referenced(read)
    return config


def assign_weights(model, adapter_name: str, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy file tensors into adapter `adapter_name`; every key must have a slot of the same shape and
    every slot a key. Checked in full before anything is copied."""
    slots = adapter_slots(model, adapter_name)
    ignored = trained_head_bias_extras(model, adapter_name)  # peft's bias="all" copies of head biases
    extras = {**embedding_layer_slots(model), **base_weight_slots(model, adapter_name), **ignored}
    unknown = [k for k in weights if k not in slots and k not in extras]
    if unknown:
        raise AdapterFileError(f"{source}: {len(unknown)} tensor(s) match no module of the model, e.g. "
                               f"{unknown[:3]}; expected keys like {list(slots)[:2]}")
    missing = [k for k in slots if k not in weights]
    if missing:
        raise AdapterFileError(f"{source}: missing {len(missing)} tensor(s) the config implies, e.g. {missing[:3]}")
    for key, tensor in weights.items():
        slot = slots.get(key, extras.get(key))
        if tuple(slot.shape) != tuple(tensor.shape):
            module = key.removeprefix("base_model.model.")
            hint = resize_hint(tensor.shape[0]) if key not in slots else ""
            raise AdapterFileError(f"{source}: shape mismatch for {module}: file has {tuple(tensor.shape)}, "
                                   f"model expects {tuple(slot.shape)} (an adapter for a different base model?)"
                                   + hint)
    with torch.no_grad():
        for key, tensor in weights.items():
            if key in ignored:  # no adapter value in them (keymap.trained_head_bias_extras)
                continue
            slot = slots.get(key, extras.get(key))
            slot.copy_(tensor.to(device=slot.device, dtype=slot.dtype))


def weights_fill(weights: dict[str, torch.Tensor], source: str):
    """The `fill` for DeltaModel(...) / inject (core/model.py) that copies a file's tensors (disk keys, read
    from `source`) into the adapter being injected, inside inject's all-or-nothing step."""
    return functools.partial(assign_weights, weights=weights, source=source)


def load_adapter(model, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                 allow_pickle: bool = False, **kwargs) -> None:
    """Add the adapter in directory `model_id` to a DeltaModel under `adapter_name`. If the model already
    has an adapter of that name, its weights are replaced, as `peft` does (Trainer's resume from a
    checkpoint loads into the adapter being trained); the saved config must then be the same.

    Raises:
        AdapterFileError: unreadable files, or (existing adapter) a config that differs from the model's.
    """
    check_adapter_name(adapter_name)
    config, weights = read_adapter(model_id, allow_pickle=allow_pickle, **kwargs)
    existing = model.peft_config.get(adapter_name)
    if existing is None:
        config.inference_mode = not is_trainable
        model.inject(adapter_name, config, fill=weights_fill(weights, str(model_id)))
        return
    ignored = ("inference_mode", "base_model_name_or_path", "revision")
    saved, current = config_to_json(model, config), config_to_json(model, existing)
    differing = sorted(key for key in saved.keys() | current.keys()
                       if key not in ignored and saved.get(key) != current.get(key))
    if differing:
        raise AdapterFileError(f"{model_id}: adapter {adapter_name!r} already exists with another config "
                               f"({', '.join(differing)} differ); load it under a new adapter_name")
    assign_weights(model, adapter_name, weights, source=str(model_id))
