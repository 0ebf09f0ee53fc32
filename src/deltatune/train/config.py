"""Run configuration schema: one validated dataclass per section (config_file.py reads YAML into it).

    model:    name_or_path, dtype, quantize, trust_remote_code
    method:   name (a registered method, e.g. lora) + that method's config fields (r, lora_alpha, ...)
    data:     train, eval, format, max_length, packing, train_on_prompt, template, columns, split,
              val_split, chat_template
    training: max_steps | epochs, batch_size, grad_accum, lr, schedule, warmup_steps, ...
    eval:     max_samples, exact_match, max_new_tokens, batch_size
    image:    text-to-image settings (image/settings.py)
    output_dir

Every error names the key at fault; an unknown key suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..core.config import DeltaConfigError, config_class
from ..errors import require
from ..quant import parse_quantize
from .data.formats import COLUMN_KEYS, FORMATS
from .image.settings import TEXT_TO_IMAGE, UNET_TARGETS, ImageSection, check_image_run
from .run.early_stop import check_best_settings
from .run.kernels import KERNELS
from .run.optim import check_optimizer_settings, optimizer_name
from .run.trackers import tracker_names

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where it is native, else fp32
TEMPLATES = ("chat", "plain")


def check_finite(key: str, value: Any) -> None:
    """Refuse NaN and infinity anywhere in a value (lists and mappings too), naming the dotted key:
    `lr: .inf` would otherwise pass every `> 0` check and train to an all-NaN adapter."""
    if isinstance(value, float) and not math.isfinite(value):
        raise DeltaConfigError(f"{key}={value!r}: must be a finite number")
    if isinstance(value, dict):
        for sub, item in value.items():
            check_finite(f"{key}.{sub}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(f"{key}[{i}]", item)


def check_finite_fields(section: Any, name: str) -> None:
    """check_finite on every field of a section dataclass (for sections built in Python, not YAML)."""
    for f in dataclasses.fields(section):
        check_finite(f"{name}.{f.name}", getattr(section, f.name))


_NO_MATCH = object()
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               dict: "a mapping", type(None): "null"}


def _union_args(annotation: Any) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def describe(annotation: Any) -> str:
    """A field's expected form in words: `list[str] | str | None` -> "a list of strings or a string or
    null"."""
    names = []
    for kind in _union_args(annotation):
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind) or (Any,)
            names.append("a list of " + {str: "strings", int: "integers"}.get(item, "values"))
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            names.append("one of " + ", ".join(str(m.value) for m in kind))
        else:
            names.append(_KIND_NAMES.get(kind, getattr(kind, "__name__", str(kind))))
    return " or ".join(names)


def _as_kind(value: Any, kind: Any, keep_ints: bool, numbers_as_str: bool = False) -> Any:
    """`value` as `kind` (one member of a field's union), or _NO_MATCH. Numbers pass as strings only
    where a string is all the field takes (`output_dir: 2024`), never where a list is meant."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is Any:
        return value
    if kind is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if kind is int:
        return value if number and isinstance(value, int) else _NO_MATCH
    if kind is float:
        if number:
            return value if keep_ints and isinstance(value, int) else float(value)
        try:  # YAML 1.1 reads `1e-3` (no dot) as a string
            return float(value) if isinstance(value, str) else _NO_MATCH
        except ValueError:
            return _NO_MATCH
    if kind is str:
        return str(value) if isinstance(value, str) or (number and numbers_as_str) else _NO_MATCH
    if typing.get_origin(kind) is list:
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        (item,) = typing.get_args(kind) or (Any,)
        items = [_as_kind(v, item, keep_ints) for v in value]
        return _NO_MATCH if any(v is _NO_MATCH for v in items) else items
    if isinstance(kind, type):
        return value if isinstance(value, kind) else _NO_MATCH
    return value  # an annotation this reader does not know: the config class checks it


def coerce(key: str, value: Any, annotation: Any, keep_ints: bool = False) -> Any:
    """`value` (from YAML or a `key=value` override) converted to the field's annotation.

    Raises:
        DeltaConfigError: "KEY=VALUE: must be <expected form>" when it fits no member of the annotation,
            or it holds NaN or infinity.
    """
    args = _union_args(annotation)
    if value is None:
        require(type(None) in args or Any in args, key, value, f"must be {describe(annotation)}, not null")
        return None
    only_str = {kind for kind in args if kind is not type(None)} == {str}
    for kind in args:
        converted = _as_kind(value, kind, keep_ints, numbers_as_str=only_str)
        if converted is not _NO_MATCH:
            check_finite(key, converted)
            return converted
    raise DeltaConfigError(f"{key}={value!r}: must be {describe(annotation)}")


# model.task -> the adapter's task_type (SEQ_CLS also trains and saves the new classifier head); an image
# model's adapters have none (peft leaves it unset for diffusers models)
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", TEXT_TO_IMAGE: None}


@dataclass
class ModelSection:
    name_or_path: str = "smollm2-135m"
    dtype: str = "float32"
    quantize: str | dict | None = None  # "nf4" | "fp4" | "int8" or {type, double_quant, blocksize, skip}
    trust_remote_code: bool = False  # run Python code shipped with the model (auto_map); opt-in only
    task: str = "causal_lm"  # or sequence_classification ({text, label} rows), or text-to-image (a pipeline)

    def __post_init__(self) -> None:
        check_finite_fields(self, "model")
        require(self.task in TASK_TYPES, "model.task", self.task, f"must be one of {list(TASK_TYPES)}")
        require(self.dtype in DTYPES, "model.dtype", self.dtype, f"must be one of {sorted(DTYPES)}")
        self.dtype = DTYPES[self.dtype]
        try:
            parse_quantize(self.quantize)
        except DeltaConfigError as err:
            raise DeltaConfigError(f"model.quantize: {err}") from None


@dataclass
class DataSection:
    train: str | list[str] | None = None  # file, folder, glob, save_to_disk folder, or a list of them
    eval: str | list[str] | None = None
    format: str = "auto"
    max_length: int = 512
    packing: bool = False  # padding-free: examples share rows, each with its own positions and attention
    train_on_prompt: bool = False
    template: str = "chat"  # chat: the tokenizer's chat template; plain: prompt + completion as text
    columns: dict | None = None  # {our name: your column}, e.g. {prompt: question, completion: answer}
    split: str | None = None  # the DatasetDict split data.train reads (default: train, or the only one)
    val_split: int | float | None = None  # hold out a fraction (0-1) or a count of train rows as eval
    chat_template: str | None = None  # chatml, Jinja text, a .jinja file, or a model folder's template

    def __post_init__(self) -> None:
        check_finite_fields(self, "data")
        for key in ("train", "eval"):
            value = getattr(self, key)
            require(not isinstance(value, list) or (value and all(isinstance(v, str) and v for v in value)),
                  f"data.{key}", value, "must be a path or a non-empty list of paths")
        require(self.columns is None or isinstance(self.columns, dict), "data.columns", self.columns,
              "must be a mapping {our name: your column}, e.g. {prompt: question, completion: answer}")
        for ours, theirs in (self.columns or {}).items():
            require(ours in COLUMN_KEYS, f"data.columns.{ours}", theirs, f"{ours!r} is not a name the data "
                  f"formats read; expected one of {list(COLUMN_KEYS)}")
            require(isinstance(theirs, str) and bool(theirs), f"data.columns.{ours}", theirs,
                  "must be the name of a column in your data")
        if self.val_split is not None:
            fraction = isinstance(self.val_split, float) and 0 < self.val_split < 1
            count = float(self.val_split).is_integer() and self.val_split >= 1
            require(fraction or count, "data.val_split", self.val_split,
                  "must be a fraction between 0 and 1 or a whole number of rows >= 1")
            self.val_split = self.val_split if fraction else int(self.val_split)
            require(self.eval is None, "data.val_split", self.val_split,
                  "holds rows of data.train out for evaluation, but data.eval is set too; use one of them")
        require(self.chat_template is None or self.template == "chat", "data.chat_template",
              self.chat_template, "needs data.template=chat (plain joins text without a template)")
        require(
            self.format in FORMATS + ("auto",),
            "data.format",
            self.format,
            f"must be one of {list(FORMATS) + ['auto']}",
        )
        require(self.max_length >= 8, "data.max_length", self.max_length, "must be at least 8")
        require(self.template in TEMPLATES, "data.template", self.template, f"must be one of {TEMPLATES}")


@dataclass
class TrainingSection:
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False
    offload_checkpoints: bool = False  # keep the checkpointed layers' saved inputs in host memory
    kernels: str = "auto"  # auto | liger | none: Liger Kernel on CUDA (run/kernels.py)
    compile: bool = False  # torch.compile the decoder body for training (run/runtime.py compile_for_training)
    share_dropout_masks: bool = True  # one LoRA dropout mask for layers reading one input; false: peft's
    precision: str = "fp32"
    eval_every: int = 0  # 0: evaluate once, at the end
    save_every: int = 0  # 0: no intermediate checkpoints
    log_every: int = 1
    keep_checkpoints: int = 2
    optimizer: str = "adamw"  # adamw | adamw_8bit | sgd | adafactor (optim.py)
    adam_beta1: float | None = None  # adamw, adamw_8bit; null: 0.9
    adam_beta2: float | None = None  # adamw, adamw_8bit; null: 0.999
    adam_epsilon: float | None = None  # adamw, adamw_8bit; null: 1e-8
    momentum: float | None = None  # sgd; null: 0
    neftune_noise_alpha: float | None = None  # NEFTune noise on the input embeddings (neftune.py)
    report_to: str | list[str] = "none"  # tensorboard | mlflow | wandb | trackio, or a list (trackers.py)
    metric_for_best: str | None = None  # eval_loss | eval_ppl | exact_match | accuracy (early_stop.py)
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    early_stopping_threshold: float = 0.0
    load_best_at_end: bool = False  # the saved adapter is the best evaluation's

    def __post_init__(self) -> None:
        check_finite_fields(self, "training")
        require(
            self.max_steps is None or self.max_steps > 0, "training.max_steps", self.max_steps, "must be > 0"
        )
        require(self.epochs is None or self.epochs > 0, "training.epochs", self.epochs, "must be > 0")
        require(
            not (self.max_steps and self.epochs),
            "training.epochs",
            self.epochs,
            "set either training.max_steps or training.epochs, not both",
        )
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            require(getattr(self, name) >= 1, f"training.{name}", getattr(self, name), "must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay"):
            require(getattr(self, name) >= 0, f"training.{name}", getattr(self, name), "must be >= 0")
        require(self.lr > 0, "training.lr", self.lr, "must be > 0")
        require(self.schedule in SCHEDULES, "training.schedule", self.schedule, f"must be one of {SCHEDULES}")
        require(
            self.precision in PRECISIONS, "training.precision", self.precision, f"must be one of {PRECISIONS}"
        )
        require(
            self.gradient_checkpointing or not self.offload_checkpoints,
            "training.offload_checkpoints",
            self.offload_checkpoints,
            "offloads what gradient checkpointing saves: set training.gradient_checkpointing=true too",
        )
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "training.max_grad_norm",
            self.max_grad_norm,
            "must be > 0 (or null to disable clipping)",
        )
        self.optimizer = optimizer_name(self.optimizer)
        check_optimizer_settings(self)
        require(
            self.neftune_noise_alpha is None or self.neftune_noise_alpha > 0,
            "training.neftune_noise_alpha",
            self.neftune_noise_alpha,
            "must be > 0 (or null for no noise); the paper uses 5-15",
        )
        require(self.kernels in KERNELS, "training.kernels", self.kernels, f"must be one of {KERNELS}")
        tracker_names(self.report_to)
        check_best_settings(self)


@dataclass
class EvalSection:
    max_samples: int | None = None  # use the first N eval rows (loss and exact match); null: all
    exact_match: bool = True  # generate an answer per eval row at the end and score it
    max_new_tokens: int = 64
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_finite_fields(self, "eval")
        require(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(
            self.max_samples is None or self.max_samples >= 1,
            "eval.max_samples",
            self.max_samples,
            "must be >= 1 (or null for all rows)",
        )
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


SECTIONS = {"model": ModelSection, "data": DataSection, "training": TrainingSection, "eval": EvalSection,
            "image": ImageSection}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: dict = field(default_factory=lambda: {"name": "lora"})
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    image: ImageSection = field(default_factory=ImageSection)
    output_dir: str = "runs/deltatune"

    def __post_init__(self) -> None:
        check_image_run(self)
        if self.model.task == TEXT_TO_IMAGE:
            return  # check_image_run refused what does not apply (packing, task_type)
        require(
            self.model.task == "causal_lm" or not self.data.packing,
            "data.packing", self.data.packing, "packs token sequences for a causal LM; model.task="
            f"{self.model.task} classifies each row on its own: set data.packing=false",
        )
        given = str(self.method.get("task_type", TASK_TYPES[self.model.task])).upper()
        require(
            given == TASK_TYPES[self.model.task], "method.task_type", self.method.get("task_type"),
            f"disagrees with model.task={self.model.task} (which sets it); set model.task to "
            f"{[t for t, v in TASK_TYPES.items() if v == given] or list(TASK_TYPES)} instead",
        )

    def method_config(self):
        """The method's config dataclass (e.g. LoraConfig) built from the `method` section, for the task
        `model.task` names."""
        built = build_method_config(self.method, TASK_TYPES[self.model.task])
        if self.model.task == TEXT_TO_IMAGE and getattr(built, "target_modules", ()) is None:
            built.target_modules = list(UNET_TARGETS)  # the denoiser's attention projections
        return built

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {prefix + near[0]!r}?)" if near else ""


def method_values(method: dict) -> tuple[type, dict]:
    """The method's config class and the `method` section's values coerced to its field types.

    Raises:
        DeltaConfigError: not a mapping, an unknown method or key, or a value of the wrong form.
    """
    require(isinstance(method, dict), "method", method, "must be a mapping with at least `name`")
    values = dict(method)
    name = values.pop("name", "lora")
    require(isinstance(name, str), "method.name", name, "must be a method name, e.g. lora")
    cls = config_class(name, source="method.name")
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise DeltaConfigError(
                f"unknown key method.{key} for {cls.peft_type}{_suggest(key, fields, 'method.')}"
            )
        # ints stay ints (lora_alpha: 16 is written back as 16, the way peft writes it)
        values[key] = coerce(f"method.{key}", values[key], hints.get(key, Any), keep_ints=True)
    return cls, values


def build_method_config(method: dict, task_type: str = "CAUSAL_LM"):
    """Build the registered method's config from a `method` section ({name: lora, r: 8, ...})."""
    cls, values = method_values(method)
    values.setdefault("task_type", task_type)
    try:
        return cls(**values)
    except DeltaConfigError as err:
        raise DeltaConfigError(f"method.{err}") from None
    except TypeError as err:
        raise DeltaConfigError(f"method: {err}") from None
