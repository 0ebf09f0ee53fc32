"""`deltatune inspect FILE.safetensors`: which image tools load an image-model adapter file, each verdict by
that tool's own loader rule (the version read is printed with it).

The format is told from the safetensors header's keys (io/kohya_keys.py's table): kohya LoRA
(`lora_unet_... .lora_down.weight`), LyCORIS LoHa / LoKr (`hada_*`, `lokr_*`), or the diffusers layout
(`unet.` / `transformer.` / `text_encoder.` + `lora_A` / `lora_B`). Only the scalar `alpha` tensors are read
besides the header (one diffusers rule depends on their values).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import AdapterFileError
from .diffusers_layout import adapter_folders
from .kohya_keys import ALPHA, KEY, method_of_tensor
from .serving import Verdict

IMAGE_SOURCES = {
    "diffusers": "diffusers 0.42.1 load_lora_weights: loaders/lora_conversion_utils.py "
                 "_convert_non_diffusers_lora_to_diffusers, lora_pipeline.py lora_state_dict (dora_scale), "
                 "utils/state_dict_utils.py convert_state_dict_to_diffusers",
    "kohya readers": "ComfyUI comfy/lora.py (model_lora_keys_unet/clip; weight_adapter lora, loha, lokr) and "
                     "A1111/Forge extensions-builtin/Lora (network_lora, network_hada, network_lokr)",
    "LyCORIS": "lycoris-lora 4.1.3 kohya.py create_network_from_weights, modules/lokr.py make_module_from_state_dict",
}
DIFFUSERS_LAYOUT = re.compile(r"^(unet|transformer|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B)\.weight$")
DIFFUSERS_RENAMES = {"lora_down.weight", "lora_up.weight", ALPHA, "dora_scale"}  # what its converter pops
ATTENTION = re.compile(r"_(to_q|to_k|to_v|to_out_0)$")
# ComfyUI maps text-encoder keys only as lora_te[12]_text_model_encoder_layers_<i>_<LORA_CLIP_MAP value>
COMFY_TE = re.compile(r"^text_model_encoder_layers_\d+_(mlp_fc1|mlp_fc2|self_attn_[qkv]_proj|self_attn_out_proj)$")
UNET_BLOCKS = re.compile(r"^(down_blocks|up_blocks|mid_block|conv_in|conv_out|time_embedding)")


DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) reads in a folder


def component_folders_or_self(path: Path) -> list[Path]:
    """A text-to-image run's component adapter folders (its output or adapter/ folder), else [path]."""
    if path.is_dir() and not (path / "adapter_config.json").is_file():
        try:
            return adapter_folders(path)
        except AdapterFileError:
            pass
    return [path]


def image_file(path: str | os.PathLike) -> Path | None:
    """What `inspect` reports on with this module: a single .safetensors file, or the diffusers file in a folder
    holding no adapter_config.json (`save_diffusers_lora`'s output); None for an adapter directory."""
    path = Path(path)
    if path.is_dir() and not (path / "adapter_config.json").is_file() and (path / DIFFUSERS_FILE).is_file():
        return path / DIFFUSERS_FILE
    return path if path.is_file() and path.suffix == ".safetensors" else None


def read_modules(path: Path) -> tuple[str, dict[tuple[str, str], dict[str, tuple]], dict[tuple[str, str], float]]:
    """(format, {(prefix, flattened module): {tensor name: shape}}, {(prefix, module): alpha}) of a file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
            alphas = {k: float(handle.get_tensor(k).float().item()) for k in keys if k.endswith("." + ALPHA)}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path}: unreadable or not a safetensors file ({err})") from None
    if keys and all(DIFFUSERS_LAYOUT.match(k) for k in keys):
        modules: dict = {}
        for key in keys:
            found = DIFFUSERS_LAYOUT.match(key)
            modules.setdefault((found.group(1), found.group(2)), {})[found.group(3)] = shapes[key]
        return "diffusers", modules, {}
    modules, alpha_of = {}, {}
    for key in keys:
        found = KEY.match(key)
        if not found:
            raise AdapterFileError(f"{path}: tensor {key!r} is neither kohya/LyCORIS (lora_unet_..., lora_te_...) "
                                   "nor diffusers-layout (unet./text_encoder. ... lora_A/lora_B): not an image-model "
                                   "adapter file deltatune knows")
        prefix, flat, name = found.groups()
        modules.setdefault((prefix, flat), {})[name] = shapes[key]
        if name == ALPHA:
            alpha_of[(prefix, flat)] = alphas[key]
    methods = {method_of_tensor(n) for named in modules.values() for n in named} - {None}
    kind = {"LORA": "kohya LoRA", "LOHA": "LyCORIS LoHa", "LOKR": "LyCORIS LoKr"}
    label = " + ".join(kind[m] for m in sorted(methods)) or "kohya (alpha only)"
    return label, modules, alpha_of


def diffusers_verdict(fmt: str, modules: dict, alphas: dict) -> Verdict:
    verdict = Verdict("diffusers")
    if fmt == "diffusers":
        verdict.detail = "its own layout"
        return verdict
    names = {n for named in modules.values() for n in named}
    other = sorted(names - DIFFUSERS_RENAMES)
    if "dora_scale" in names and not other:  # lora_pipeline.py lora_state_dict filters dora_scale out
        verdict.reasons.append("DoRA (dora_scale): diffusers drops dora_scale from kohya files and would run it "
                               "as plain LoRA")
    if other:
        verdict.reasons.append(f"tensors {other} are not LoRA (lora_down/lora_up/alpha): the converter leaves them "
                               "unrenamed and refuses the file")
    te = [flat for (prefix, flat) in modules if prefix.startswith("lora_te")]
    if te and not any(f.endswith(("out_proj", "mlp_fc1", "mlp_fc2")) for f in te):
        verdict.reasons.append("the text-encoder modules are q/k/v projections only: convert_state_dict_to_diffusers "
                               "cannot infer their state dict type (needs an out_proj or mlp module)")
    unet_alphas = {m: a for m, a in alphas.items() if m[0] == "lora_unet"}
    if unet_alphas:
        common = Counter(unet_alphas.values()).most_common(1)[0][0]
        odd = sorted(flat for (_, flat), a in unet_alphas.items() if a != common and ATTENTION.search(flat))
        if odd:
            verdict.reasons.append(f"attention projections with their own alpha (e.g. {odd[0]}): diffusers keeps "
                                   "them under names peft ignores, so their scale would be wrong")
    return verdict


def kohya_readers_verdict(fmt: str, modules: dict) -> Verdict:
    verdict = Verdict("kohya readers")
    if fmt == "diffusers":
        verdict.reasons.append("the diffusers layout: ComfyUI maps unet. keys only in diffusers' old "
                               "attention-processor names; write it with `deltatune export --to kohya`")
        return verdict
    names = {n for named in modules.values() for n in named}
    other = sorted(n for n in names - DIFFUSERS_RENAMES - {"lora_mid.weight"} if not method_of_tensor(n))
    if other:
        verdict.reasons.append(f"tensors {other} no reader's module type takes")
    te = [flat for (prefix, flat) in modules if prefix.startswith("lora_te")]
    unmapped = [f for f in te if not COMFY_TE.match(f)]
    if unmapped:
        verdict.reasons.append(f"text-encoder modules such as {unmapped[0]!r}: readers map only "
                               "text_model_encoder_layers_<i>_<self_attn_q/k/v/out_proj | mlp_fc1/fc2>")
    unet = [flat for (prefix, flat) in modules if prefix == "lora_unet"]
    if unet and not all(UNET_BLOCKS.match(f) for f in unet):
        verdict.reasons.append("lora_unet_ modules outside a UNet's blocks (a DiT?): readers take DiT LoRAs under "
                               "their own key names, not lora_unet_<diffusers path>")
    return verdict


def lycoris_verdict(fmt: str, modules: dict) -> Verdict:
    verdict = Verdict("LyCORIS")
    if fmt == "diffusers":
        verdict.reasons.append("the diffusers layout (LyCORIS reads lora_unet_/lora_te_ keys)")
        return verdict
    for (prefix, flat), named in sorted(modules.items()):
        if "lokr_t2" in named and "lokr_w1" in named:
            verdict.reasons.append(f"{prefix}_{flat}: a Tucker LoKr with a full lokr_w1; its loader takes the rank "
                                   "from lokr_w2_a's second axis and cannot build the module")
            break
        if "lokr_w1_a" in named and "lokr_w2" in named:
            verdict.reasons.append(f"{prefix}_{flat}: lokr_w1_a with a full lokr_w2; its loader builds a full "
                                   "lokr_w1 for it and fails")
            break
    if any(prefix.startswith("lora_te") and flat.startswith("text_model_") for prefix, flat in modules):
        verdict.detail = ("under Transformers >= 5 it matches text-encoder keys against the live CLIPTextModel, "
                          "which has no text_model level: those modules are skipped there")
    return verdict


def image_file_report(path: str | os.PathLike) -> str:
    """The report `deltatune inspect FILE.safetensors` prints: format, modules per component, ranks, and one
    verdict per image tool.

    Raises:
        AdapterFileError: the file is unreadable or of no image-adapter format.
    """
    path = Path(path)
    fmt, modules, alphas = read_modules(path)
    per_prefix = Counter(prefix for prefix, _ in modules)
    ranks = set()
    for named in modules.values():
        for name, shape in named.items():
            if name in ("lora_down.weight", "lora_A", "hada_w1_b"):
                ranks.add(shape[0])
    parameters = sum(math.prod(s) for named in modules.values() for s in named.values())
    lines = [f"file:         {path}",
             f"format:       {fmt}",
             "modules:      " + ", ".join(f"{p} {n}" for p, n in sorted(per_prefix.items())),
             f"rank:         {', '.join(map(str, sorted(ranks))) or '-'}",
             f"parameters:   {parameters:,d}",
             f"file size:    {path.stat().st_size / 2**20:.2f} MiB",
             "image tools (each verdict follows the tool's own loader, read from the version named):"]
    for verdict in (diffusers_verdict(fmt, modules, alphas), kohya_readers_verdict(fmt, modules),
                    lycoris_verdict(fmt, modules)):
        answer = ("no - " + "; ".join(verdict.reasons)) if verdict.reasons else "yes"
        answer += f" ({verdict.detail})" if verdict.detail else ""
        lines += [f"  {verdict.server + ':':15s} {answer}", f"  {'':15s} rule: {IMAGE_SOURCES[verdict.server]}"]
    return "\n".join(lines)

