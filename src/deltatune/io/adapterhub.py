"""AdapterHub files: the `adapters` package's (1.3.0) bottleneck adapters and AdapterFusion layers, both ways.

Files (adapters/loading.py): an adapter is <dir>/adapter_config.json + adapter.safetensors
(`model.save_adapter(dir, name, use_safetensors=True)`; the default writes a pickled pytorch_adapter.bin,
read here only with allow_pickle=True); a fusion is <dir>/adapter_fusion_config.json +
model_adapter_fusion.safetensors. We write the safetensors files: load them there with
`model.load_adapter(dir, use_safetensors=True)` / `model.load_adapter_fusion(dir, use_safetensors=True)`.

Where an adapter sits. `adapters` calls its bottleneck layer with (h, t, LN): h the sub-block's output before
the residual, t the residual input, LN the post-norm model's LayerNorm (BERT) or none (Llama), and computes
(adapters/methods/modeling.py, Adapter.pre_forward/forward/post_forward; u = s * W_up act(W_down .)):
    original_ln_before false:                 out = LN(h + u(h) + t)      (Llama: no LN)
    original_ln_before true, residual_before_ln true:  out = LN(h + t + u(LN(h + t)))
deltatune's sequential bottleneck adds u(y) to the output y of the module it wraps, so the first is ours on
the module that produces h, and the second, on Llama (no LN), ours on the whole decoder layer (y = h + t):

    model  location        original_ln_before  their module path                 ours (wrapped)
    llama  mh_adapter      false               layers.i.attention_adapters       layers.i.self_attn
    llama  output_adapter  false               layers.i.output_adapters          layers.i.mlp
    llama  output_adapter  true                layers.i.output_adapters          layers.i
    bert   mh_adapter      false               encoder.layer.i.attention.output  (same).dense
    bert   output_adapter  false               encoder.layer.i.output            (same).dense

(paths relative to the base model: LlamaModel, BertModel). Stacks (Stack) and fusions (Fuse, keys and
values over the adapters' u, compose/fusion.py) follow from the same placement. Everything else is refused
by name, before the model is touched: `is_parallel` (their parallel adapter reads the residual stream t,
which no module hands to the block beside it), `original_ln_before: true` on BERT or at the attention
(the adapter would read LN(h + t) and add into the LayerNorm's input), `original_ln_after: false`,
`residual_before_ln` other than true with `original_ln_before`, new LayerNorms (`ln_before`, `ln_after`),
`use_gating`, `phm_layer`, `inv_adapter`, learned `scaling`, per-layer `reduction_factor`, and fusions with
`residual_before`, `temperature` (annealed per call) or no query/key/value. `dropout` and
`stochastic_depth` act only in training and are not reproduced (a warning says so). In training mode the
two libraries also differ in where the block's own dropout falls (before their adapter, after ours).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from ..core.config import DeltaConfigError, config_class
from ..core.layer import DeltaLayer
from ..core.model import DeltaModel
from ..core.targeting import canonical_name
from ..methods.bottleneck import BottleneckConfig
from .adapter_files import AdapterFileError, read_adapter, read_weights, save_adapters, weights_fill
from .atomic import safetensors_bytes, write_bytes, write_json
from .keymap import DISK_PREFIX
from .models import load_weights

# AdapterFusion is a method compose/ registers (compose/fusion.py, above io): its config class is asked
# from the method registry by peft_type, so this reader imports nothing above io
FUSION_TYPE = "BOTTLENECK_FUSION"

CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME = "adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin"
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS_NAME = "model_adapter_fusion.safetensors"
FUSION_PICKLE_NAME = "pytorch_model_adapter_fusion.bin"
VERSION = "adapters.1.3.0"  # the release whose layout this writes (tests/adapters_constraints.txt pins it)

FAMILIES = {"llama": "decoder", "mistral": "decoder", "bert": "encoder", "roberta": "encoder"}
# (family, location, original_ln_before) -> (their module path, our wrapped module path), base-model relative
PLACES = {
    ("decoder", "mh_adapter", False): ("layers.{i}.attention_adapters", "layers.{i}.self_attn"),
    ("decoder", "output_adapter", False): ("layers.{i}.output_adapters", "layers.{i}.mlp"),
    ("decoder", "output_adapter", True): ("layers.{i}.output_adapters", "layers.{i}"),
    ("encoder", "mh_adapter", False): ("encoder.layer.{i}.attention.output",
                                       "encoder.layer.{i}.attention.output.dense"),
    ("encoder", "output_adapter", False): ("encoder.layer.{i}.output", "encoder.layer.{i}.output.dense"),
}
TENSORS = {"adapter_down.0.weight": "adapter_down.weight", "adapter_down.0.bias": "adapter_down.bias",
           "adapter_up.weight": "adapter_up.weight", "adapter_up.bias": "adapter_up.bias"}  # theirs -> ours
FUSION_TENSORS = {"query.weight": "fusion_query.weight", "query.bias": "fusion_query.bias",
                  "key.weight": "fusion_key.weight", "key.bias": "fusion_key.bias",
                  "value.weight": "fusion_value.weight"}
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "swish", "tanh": "tanh",
               "linear": "identity"}  # theirs (transformers' get_activation names) -> ours
# BnConfig fields and the values deltatune reproduces exactly (anything else is refused by name)
REQUIRED = {"is_parallel": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
            "use_gating": False, "phm_layer": False, "inv_adapter": None}
BN_DEFAULTS = {  # a full BnConfig as `adapters` writes it (SeqBnConfig's defaults), our values filled in
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False}
# their "dynamic" fusion, the one deltatune's fusion is
FUSION_CONFIG = {"dropout_prob": None, "key": True, "query": True, "query_before_ln": False,
                 "regularization": True, "residual_before": False, "temperature": False, "value": True,
                 "value_before_softmax": True, "value_initialized": True}


# ---------------------------------------------------------------------------------------------- the model
def hf_model(model):
    return model.model if isinstance(model, DeltaModel) else model


def hidden_model_width(model) -> int:
    return hf_model(model).config.hidden_size


def family_of(model, source: str) -> tuple[str, str, int]:
    """(family, prefix of the base model's path inside `model`, layer count)."""
    hf = hf_model(model)
    config = getattr(hf, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise DeltaConfigError(f"{source}: AdapterHub files map onto {sorted(FAMILIES)} models here; "
                               f"{type(hf).__name__} has model_type {model_type!r}")
    prefix = getattr(hf, "base_model_prefix", "")
    prefix = f"{prefix}." if prefix and hasattr(hf, prefix) and getattr(hf, prefix) is not hf else ""
    return FAMILIES[model_type], prefix, config.num_hidden_layers


def their_meta(model, name: str) -> dict:
    hf = hf_model(model)
    base = getattr(hf, "base_model", hf)
    return {"hidden_size": hf.config.hidden_size, "model_class": type(base).__name__, "model_name": "",
            "model_type": hf.config.model_type, "name": name, "version": VERSION}


def refuse(source: str, field: str, value, why: str):
    raise DeltaConfigError(f"{source}: `{field}: {json.dumps(value)}` cannot be loaded: {why}")


# ---------------------------------------------------------------------------------------------- reading
def read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterFileError(f"{file}: unreadable ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or "name" not in data:
        raise AdapterFileError(f"{file}: not an AdapterHub config (needs `name` and a `config` object)")
    return data


def bottleneck_places(conf: dict, family: str, layers: int, source: str) -> list[tuple[str, str]]:
    """[(their module path, our module path)] for an AdapterHub bottleneck config; refuses what we cannot do."""
    if conf.get("architecture", "bottleneck") != "bottleneck":
        refuse(source, "architecture", conf["architecture"], "only bottleneck adapters map onto deltatune's")
    for field, expected in REQUIRED.items():
        if conf.get(field, expected) != expected:
            why = f"deltatune's bottleneck adapters reproduce only {field}: {json.dumps(expected)}"
            if field == "is_parallel":
                why = "a parallel adapter reads the residual stream t, which no module hands to the block " \
                      "beside it"
            refuse(source, field, conf[field], why)
    before = bool(conf.get("original_ln_before", False))
    if before and conf.get("residual_before_ln", True) is not True:
        refuse(source, "residual_before_ln", conf["residual_before_ln"],
               "with original_ln_before only `true` (the adapter's residual is the sub-block's output) "
               "is reproduced")
    locations = [loc for loc in ("mh_adapter", "output_adapter") if conf.get(loc)]
    if not locations:
        refuse(source, "mh_adapter", conf.get("mh_adapter"),
               "the config places no adapter (output_adapter is false too)")
    for location in locations:
        if (family, location, before) not in PLACES:
            refuse(source, "original_ln_before", before,
                   f"at {location} of a {family} model the adapter would read LN(h + t) or the mid-layer "
                   "residual stream, and deltatune's adapters add to a module's output")
    leave_out = set(conf.get("leave_out") or [])
    return [tuple(p.format(i=i) for p in PLACES[(family, loc, before)])
            for i in range(layers) if i not in leave_out for loc in locations]


def bottleneck_config(conf: dict, hidden: int, source: str) -> dict:
    """BottleneckConfig keyword arguments (without targets) for an AdapterHub config."""
    factor = conf.get("reduction_factor", 16)
    if isinstance(factor, dict):
        if set(factor) != {"default"}:
            refuse(source, "reduction_factor", factor, "deltatune uses one bottleneck width for every layer")
        factor = factor["default"]
    scaling = conf.get("scaling", 1.0)
    if isinstance(scaling, str) or isinstance(scaling, bool):
        refuse(source, "scaling", scaling, "only a constant scaling is reproduced")
    act = str(conf.get("non_linearity", "relu")).lower()
    if act not in ACTIVATIONS:
        refuse(source, "non_linearity", act, f"deltatune has {sorted(ACTIVATIONS)}")
    for field in ("dropout", "stochastic_depth"):
        if conf.get(field):
            warnings.warn(f"{source}: `{field}: {conf[field]}` acts only in training and is not reproduced",
                          stacklevel=3)
    return {"bottleneck_size": max(1, int(hidden // factor)), "non_linearity": ACTIVATIONS[act],
            "scaling": float(scaling)}


def their_tensors(weights: dict[str, torch.Tensor], wanted: list[str], source: str) -> dict[str, torch.Tensor]:
    """{wanted key: tensor}: file keys may carry a head model's prefix (`bert.`, `model.`); every file key must
    be wanted, and every wanted key present."""
    found, used = {}, set()
    for key in wanted:
        hits = [k for k in weights if k == key or k.endswith("." + key)]
        if len(hits) != 1:
            raise AdapterFileError(f"{source}: {'no' if not hits else 'several'} tensor(s) for {key!r}"
                                   + (f" ({hits})" if hits else ""))
        found[key] = weights[hits[0]]
        used.add(hits[0])
    extra = [k for k in weights if k not in used]
    if extra:
        raise AdapterFileError(f"{source}: {len(extra)} tensor(s) deltatune has no place for, e.g. {extra[:3]} "
                               "(adapter LayerNorms, gates or PHM layers are refused)")
    return found


def load_adapterhub(model, path: str | os.PathLike, adapter_name: str | None = None, allow_pickle: bool = False,
                    is_trainable: bool = False):
    """Load an adapter or fusion folder written by the `adapters` package (`save_adapter` /
    `save_adapter_fusion`) as a deltatune adapter, with the same outputs.

    Args:
        model: a Transformers model (Llama/Mistral or BERT/RoBERTa family) or a DeltaModel around one; a
            fusion needs a DeltaModel that already holds the adapters it fuses.
        path: the folder.
        adapter_name: our name for it (default: the name in its config; a fusion's is "a,b").
        allow_pickle: read a pickled pytorch_adapter.bin when there is no safetensors file.
        is_trainable: leave the adapter trainable (default: the returned model is in eval mode).

    Returns: the DeltaModel (a new one when `model` was a plain model).

    Raises:
        AdapterFileError: missing, unreadable or pickled files (without allow_pickle), tensors that fit nothing.
        DeltaConfigError: a config deltatune cannot reproduce, naming the field (see the module docstring).
    """
    folder = Path(path)
    if (folder / FUSION_CONFIG_NAME).is_file():
        return load_fusion(model, folder, adapter_name, allow_pickle, is_trainable)
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{folder}: no {CONFIG_NAME} or {FUSION_CONFIG_NAME} (not an AdapterHub folder)")
    data = read_json(folder / CONFIG_NAME)
    source = str(folder / CONFIG_NAME)
    family, prefix, layers = family_of(model, source)
    places = bottleneck_places(data["config"], family, layers, source)
    kwargs = bottleneck_config(data["config"], hidden_model_width(model), source)
    config = BottleneckConfig(bottleneck_type="houlsby" if data["config"].get("mh_adapter") else "pfeiffer",
                              target_modules=[prefix + ours for _, ours in places], init_weights=False,
                              inference_mode=not is_trainable, **kwargs)
    weights = read_weights(folder, allow_pickle, (WEIGHTS_NAME, PICKLE_NAME))
    keys = {f"{theirs}.adapters.{data['name']}.{t}": f"{DISK_PREFIX}{prefix}{ours}.{o}"
            for theirs, ours in places for t, o in TENSORS.items()}
    found = their_tensors(weights, list(keys), str(folder))
    return attach(model, adapter_name or data["name"], config, {keys[k]: v for k, v in found.items()},
                  str(folder), is_trainable)


def attach(model, name: str, config, weights: dict, source: str, is_trainable: bool):
    if isinstance(model, DeltaModel):
        model.inject(name, config, fill=weights_fill(weights, source))
        return model
    wrapped = DeltaModel(model, config, name, fill=weights_fill(weights, source))
    return wrapped if is_trainable else wrapped.eval()


def load_fusion(model, folder: Path, adapter_name: str | None, allow_pickle: bool, is_trainable: bool):
    data = read_json(folder / FUSION_CONFIG_NAME)
    source, conf, names = str(folder / FUSION_CONFIG_NAME), data["config"], data.get("adapter_names")
    if not isinstance(model, DeltaModel) or not all(n in model.peft_config for n in names or []):
        raise DeltaConfigError(f"{source}: a fusion over {names} needs a DeltaModel holding those adapters; "
                               "load them first with load_adapterhub")
    for field in ("residual_before", "temperature"):
        if conf.get(field):
            refuse(source, field, conf[field], "deltatune's fusion adds the residual after the attention at a "
                                               "fixed temperature 1 (their `false`)")
    present = [p for p in ("query", "key", "value") if conf.get(p, True)]
    if not present:
        refuse(source, "query", False, "a fusion without query, key and value is a different (dense) layer")
    family, prefix, _ = family_of(model, source)
    places = our_places(model, names[0], family, prefix)  # where the first fused adapter sits
    if conf.get("query_before_ln") and any(before for _, _, before, _ in places.values()):
        refuse(source, "query_before_ln", True, "at the decoder layer the query is the layer's output h + t")
    ours_of = {PLACES[(family, loc, before)][0].format(i=i): path  # their module path -> ours
               for path, (i, loc, before, _) in places.items()}
    weights = read_weights(folder, allow_pickle, (FUSION_WEIGHTS_NAME, FUSION_PICKLE_NAME))
    marker = f".adapter_fusion_layer.{data['name']}."
    in_file = {k.split(marker)[0] for k in weights if marker in k}
    resolved = {next((t for t in ours_of if p == t or p.endswith("." + t)), None) for p in in_file}
    if None in resolved or not resolved:
        raise AdapterFileError(f"{folder}: fusion tensors at {sorted(in_file)} do not sit where adapter "
                               f"{names[0]!r} does ({sorted(ours_of)})")
    wanted = [f"{t}{marker}{k}" for t in resolved for k in FUSION_TENSORS if k.split(".")[0] in present]
    found = their_tensors(weights, wanted, str(folder))
    width = hidden_model_width(model)
    ours = {}
    for t in resolved:  # a projection their config leaves out is the identity
        for k, o in FUSION_TENSORS.items():
            identity = torch.eye(width) if k.endswith("weight") else torch.zeros(width)
            ours[f"{DISK_PREFIX}{ours_of[t]}.{o}"] = found.get(f"{t}{marker}{k}", identity)
    config = config_class(FUSION_TYPE)(adapter_names=list(names), inference_mode=not is_trainable,
                                       target_modules=sorted(ours_of[t] for t in resolved))
    return attach(model, adapter_name or data["name"], config, ours, str(folder), is_trainable)


# ---------------------------------------------------------------------------------------------- writing
def place_of(path: str, family: str) -> tuple[int, str, bool] | None:
    """(layer, location, original_ln_before) of one of our module paths (base-model relative), or None."""
    for (fam, location, before), (_, ours) in PLACES.items():
        match = re.fullmatch(re.escape(ours).replace(r"\{i\}", r"(\d+)"), path)
        if fam == family and match:
            return int(match.group(1)), location, before
    return None


def our_places(model, adapter_name: str, family: str, prefix: str) -> dict[str, tuple[int, str, bool, object]]:
    """{our module path: (layer, location, original_ln_before, the adapter module)} for adapter_name."""
    found = {}
    for path, layer in model.delta_layers():
        if not isinstance(layer, DeltaLayer) or adapter_name not in layer.adapters:
            continue
        place = place_of(canonical_name(path).removeprefix(prefix), family)
        if place is None:
            allowed = sorted({ours for (fam, *_), (_, ours) in PLACES.items() if fam == family})
            raise DeltaConfigError(f"adapter {adapter_name!r} sits on {canonical_name(path)!r}, which has no "
                                   f"AdapterHub place; target {allowed} (i = layer index, under {prefix!r})")
        found[canonical_name(path)] = (*place, layer.adapters[adapter_name])
    return found


def save_adapterhub(model, save_directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter `adapter_name` (default: the active one) of a DeltaModel as the `adapters` package
    writes it, for `model.load_adapter(dir, use_safetensors=True)` (a fusion: `load_adapter_fusion`).

    Returns: the folder.

    Raises:
        DeltaConfigError: the adapter has no AdapterHub form (a parallel bottleneck, a module outside the
            table in the module docstring, attention and feed-forward adapters in different layers, a fusion
            temperature other than 1); the message names the field or module, and nothing is written.
    """
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"unknown adapter {name!r}; adapters: {list(model.peft_config)}")
    config = model.peft_config[name]
    family, prefix, layers = family_of(model, f"adapter {name!r}")
    if config.peft_type == FUSION_TYPE:
        files = fusion_files(model, name, config, family, prefix)
    elif isinstance(config, BottleneckConfig):
        files = bottleneck_files(model, name, config, family, prefix, layers)
    else:
        raise DeltaConfigError(f"adapter {name!r} is {config.peft_type}; AdapterHub files hold bottleneck "
                               "adapters and fusions")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    (config_name, config_dict), (weights_name, tensors) = files
    write_bytes(folder / weights_name, safetensors_bytes(tensors))
    write_json(folder / config_name, config_dict)
    return folder


def bottleneck_files(model, name: str, config: BottleneckConfig, family: str, prefix: str, layers: int):
    if config.bottleneck_type == "parallel":
        raise DeltaConfigError(f"adapter {name!r}: bottleneck_type 'parallel' reads the block's input, "
                               "`adapters`' parallel adapter the residual stream; no AdapterHub config gives "
                               "the same outputs")
    places = our_places(model, name, family, prefix)
    befores = {before for _, _, before, _ in places.values()}
    if len(befores) != 1:
        raise DeltaConfigError(f"adapter {name!r} mixes decoder-layer and sub-block places: {sorted(places)}")
    per_location = {loc: sorted(i for i, where, _, _ in places.values() if where == loc)
                    for loc in ("mh_adapter", "output_adapter")}
    used = [v for v in per_location.values() if v]
    if len(used) == 2 and used[0] != used[1]:
        raise DeltaConfigError(f"adapter {name!r}: `adapters` puts attention and feed-forward adapters in "
                               f"the same layers; here {per_location}")
    hidden = hidden_model_width(model)
    sizes = {a.adapter_down.out_features for *_, a in places.values()}
    if len(sizes) != 1 or any(a.adapter_down.in_features != hidden for *_, a in places.values()):
        raise DeltaConfigError(f"adapter {name!r}: AdapterHub adapters have one bottleneck width and the model's "
                               f"hidden size {hidden} as input; here widths {sorted(sizes)}")
    size = sizes.pop()
    factor = hidden / size  # they build int(hidden_size // reduction_factor) units
    if int(hidden // factor) != size:
        raise DeltaConfigError(f"adapter {name!r}: bottleneck_size {size} is no hidden_size // reduction_factor")
    act = {ours: theirs for theirs, ours in ACTIVATIONS.items()}[config.non_linearity]
    conf = {**BN_DEFAULTS, "mh_adapter": bool(per_location["mh_adapter"]),
            "output_adapter": bool(per_location["output_adapter"]), "original_ln_before": befores.pop(),
            "leave_out": [i for i in range(layers) if i not in used[0]], "non_linearity": act,
            "reduction_factor": factor, "scaling": float(config.scaling)}
    theirs_of = {(loc, before): theirs for (fam, loc, before), (theirs, _) in PLACES.items() if fam == family}
    tensors = {}
    for i, loc, before, adapter in places.values():
        state = adapter.state_dict()
        for t, o in TENSORS.items():
            tensors[f"{theirs_of[(loc, before)].format(i=i)}.adapters.{name}.{t}"] = state[o]
    return (CONFIG_NAME, {"config": conf, **their_meta(model, name)}), (WEIGHTS_NAME, tensors)


def fusion_files(model, name: str, config, family: str, prefix: str):
    if config.temperature != 1.0:
        raise DeltaConfigError(f"fusion {name!r}: temperature {config.temperature} has no AdapterHub equivalent "
                               "(theirs is 1, or annealed from 50 with `temperature: true`)")
    their_name = ",".join(config.adapter_names)
    theirs_of = {(loc, before): theirs for (fam, loc, before), (theirs, _) in PLACES.items() if fam == family}
    tensors = {}
    for i, loc, before, fusion in our_places(model, name, family, prefix).values():
        state = fusion.state_dict()
        for t, o in FUSION_TENSORS.items():
            tensors[f"{theirs_of[(loc, before)].format(i=i)}.adapter_fusion_layer.{their_name}.{t}"] = state[o]
    meta = {**their_meta(model, their_name), "adapter_names": list(config.adapter_names)}
    return (FUSION_CONFIG_NAME, {"config": dict(FUSION_CONFIG), **meta}), (FUSION_WEIGHTS_NAME, tensors)


# ---------------------------------------------------------------------------------------------- convert
def convert_adapterhub(adapter: str | os.PathLike, out: str | os.PathLike, to: str,
                       base_model: str | os.PathLike | None = None, allow_pickle: bool = False) -> Path:
    """`deltatune convert --from adapterhub` (to="deltatune": an AdapterHub folder to our PEFT layout) and
    `--to adapterhub` (one of our bottleneck adapters to an AdapterHub folder). The base model (an alias or a
    local directory; for an AdapterHub folder required, its config names no loadable base) is loaded to
    place and check the tensors: a causal LM for Llama-family models, the bare encoder for BERT-family ones.

    Raises: DeltaConfigError / AdapterFileError as load_adapterhub and save_adapterhub; ModelNotFoundError
    for a base that is no alias or local model directory.
    """
    if to == "deltatune":
        if base_model is None:
            raise DeltaConfigError(f"{adapter}: an AdapterHub folder names no loadable base; pass --base")
        model_type = read_json(Path(adapter) / CONFIG_NAME).get("model_type") \
            if (Path(adapter) / CONFIG_NAME).is_file() else None
        task = "FEATURE_EXTRACTION" if FAMILIES.get(model_type) == "encoder" else None
        base = load_weights(base_model, torch.float32, task)
        delta = load_adapterhub(base, adapter, "default", allow_pickle)
        delta.peft_config["default"].base_model_name_or_path = str(base_model)
        save_adapters(delta, out)
        return Path(out)
    if to != "adapterhub":
        raise ValueError(f"to must be 'deltatune' or 'adapterhub', not {to!r}")
    config, weights = read_adapter(adapter, allow_pickle=allow_pickle)
    base_name = base_model or config.base_model_name_or_path
    if not base_name:
        raise DeltaConfigError(f"{adapter}: the adapter config has no base_model_name_or_path; pass --base")
    config.inference_mode = True
    delta = DeltaModel(load_weights(base_name, torch.float32, config.task_type), config, "default",
                       fill=weights_fill(weights, str(adapter)))
    return save_adapterhub(delta, out, "default")
