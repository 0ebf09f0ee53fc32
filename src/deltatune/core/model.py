"""DeltaModel: the user's model with named adapters injected; a plain torch.nn.Module.

Adding an adapter wraps each targeted module in a DeltaLayer (core/layer.py) once; later adapters join
the same wrapper. Attributes the wrapper lacks (config, generation_config, ...) come from the model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import MergeError
from .base import BaseLayer, dequantize_model, is_quantized
from .call import CallSlot
from .checkpointing import gradients_through_checkpoints
from .config import TASK_HEADS, DeltaConfig, DeltaConfigError, TaskType
from .forward_signature import SignedForward
from .labels_loss import chunked_labels_head, forward_with_chunked_loss
from .layer import BASE_ADAPTER, DeltaLayer, ModulesToSave
from .merging import refuse_shared_targets, shared_parameters
from .originals import BaseValues
from .protocols import TakesOverForward, declares
from .targeting import (
    adaptable_modules,
    canonical_name,
    canonical_param_name,
    check_every_key_matches,
    name_matches,
    select_targets,
)

WRAPPER_TYPES = (DeltaLayer, ModulesToSave)


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or re.search(r"[/\\]|\.\.", name) \
            or name == BASE_ADAPTER or "." in name:
        raise DeltaConfigError(f"adapter name {name!r} is not allowed: use a non-empty name without '.', "
                               f"path separators or '..', other than {BASE_ADAPTER!r}")


def check_per_row(adapter_names: list[str] | None, task_ids: torch.Tensor | None, rows: int | None) -> None:
    """`adapter_names` (a list of names) and `task_ids` (1-D) give exactly one entry per input row; `rows`
    is the input's batch size when the call shows it (the layers check the rest: CallContext.per_sample).

    Raises:
        ValueError: a wrong type or shape, or a count other than `rows` (naming both lengths).
    """
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names or []):
        raise ValueError(f"adapter_names takes a list with one adapter name per input row; "
                         f"got {adapter_names!r}")
    if task_ids is not None and task_ids.dim() != 1:
        raise ValueError(f"task_ids takes one task id per input row; got shape {tuple(task_ids.shape)}")
    for what, values in (("adapter_names", adapter_names), ("task_ids", task_ids)):
        if values is not None and rows is not None and len(values) != rows:
            raise ValueError(f"{what} has {len(values)} entries but the batch has {rows} rows; "
                             "give exactly one per input row")


def is_linear(module: nn.Module) -> bool:
    """Whether `module` (or the base a DeltaLayer wraps) is a linear layer of any storage (core/base.py)."""
    return BaseLayer(module.base_layer if isinstance(module, DeltaLayer) else module).kind == "linear"


class ModelLock:
    """Calls on one DeltaModel from different threads run one at a time, so switching, loading or
    deleting adapters never lands in the middle of another thread's forward or generate (which would
    mix two adapters). Re-entrant; a deep copy or unpickled model gets a lock of its own."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> ModelLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __deepcopy__(self, memo) -> ModelLock:
        return ModelLock()

    def __reduce__(self):
        return ModelLock, ()


def exclusive(method):
    """Run a DeltaModel method under the model's lock (not while torch.compile traces it)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return method(self, *args, **kwargs)
        with self._lock:
            return method(self, *args, **kwargs)

    return run


# Fills a freshly injected adapter (model, adapter name) inside inject's all-or-nothing step: io's
# assign_weights with a file's tensors (deltatune/api: from_pretrained, load_adapter).
Fill = Callable[["DeltaModel", str], None]
_CLASS_TO_BUILD: list[Callable[[type], type]] = []  # set once by deltatune.api (set_class_to_build)


def set_class_to_build(choose: Callable[[type], type]) -> None:
    """Make `DeltaModel(...)` build `choose(requested class)`: deltatune.api, above io and compose, installs its
    public facade (save_pretrained, load_adapter, add_weighted_adapter ...; a `peft.PeftModel` to isinstance
    checks once peft is imported) when it is imported, so a DeltaModel built anywhere (io's and compose's
    loaders, user code) is the full public object while core imports nothing above it."""
    _CLASS_TO_BUILD[:] = [choose]


class DeltaModel(nn.Module):
    """A model with PEFT adapters. Create with `get_peft_model` or `DeltaModel.from_pretrained`."""

    # `model(..., labels=...)` on a causal LM takes its loss from the hidden states in chunks and computes
    # `logits` when first read (core/labels_loss.py); False runs the wrapped model's own loss.
    chunked_labels_loss: bool = True

    def __new__(cls, *args, **kwargs):
        if _CLASS_TO_BUILD:  # the public facade (deltatune/api), see set_class_to_build
            cls = _CLASS_TO_BUILD[0](cls)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: DeltaConfig, adapter_name: str = "default", *,
                 fill: Fill | None = None) -> None:
        """Wrap `model` with adapter `adapter_name`; `fill(self, adapter_name)` loads its values (inject)."""
        nn.Module.__init__(self)  # not super(): in the peft face, PeftModel.__init__ comes next
        self._lock = ModelLock()
        self.model = model
        self.training = model.training
        self.model_adapters = nn.ModuleDict().train(model.training)  # model-level: soft prompts, shared projections
        self.peft_config: dict[str, DeltaConfig] = {}
        self.active_adapters: list[str] = []
        self._calls = CallSlot()  # the current call's context, which every wrapper reads (core/call.py)
        self._disabled = 0  # depth of nested disable_adapter() blocks
        self._remerge: dict[str, list[str]] = {}  # per layer: the merges the outermost block re-applies
        self._base_values = BaseValues()  # base values of parameters adapters train in place (`bias`)
        self.inject(adapter_name, config, fill=fill)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)  # not super(): see __init__
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ------------------------------------------------------------------ structure
    def delta_layers(self) -> Iterator[tuple[str, DeltaLayer | ModulesToSave]]:
        """(name in the user's model, wrapper) for every DeltaLayer and ModulesToSave."""
        for name, module in self.model.named_modules():
            if isinstance(module, WRAPPER_TYPES):
                yield name, module

    def candidate_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every module an adapter could target (wrappers stand for the module they wrap)."""
        return adaptable_modules(self.model, WRAPPER_TYPES)

    def _replace(self, name: str, new: nn.Module) -> None:
        """Put `new` at the real (wrapper-aware) path `name`."""
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, new)

    def _swap(self, old: nn.Module, new: nn.Module) -> None:
        """Put `new` where `old` sits, wherever wrapping has moved it."""
        self._replace(next(n for n, m in self.model.named_modules() if m is old), new)

    @property
    def active_adapter(self) -> str:
        """The first active adapter's name.

        Raises:
            ValueError: no adapter is active (every adapter was deleted, or set_adapter([]) was called).
        """
        if not self.active_adapters:
            raise ValueError("no adapter left: every adapter was deleted; add one with add_adapter() or "
                             "load_adapter()" if not self.peft_config else "no active adapter; choose one "
                             f"with set_adapter() from {list(self.peft_config)}")
        return self.active_adapters[0]

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def share_dropout_masks(self) -> bool:
        """Whether sibling layers that read one input tensor (q/k/v, gate/up) share one dropout mask per call
        (default True: one mask draw instead of several, faster on a CPU, as one dropout before a fused
        projection would be). False draws an independent mask per layer, as `peft` does (core/call.py)."""
        return self._calls.share_dropout

    @share_dropout_masks.setter
    def share_dropout_masks(self, value: bool) -> None:
        self._calls.share_dropout = bool(value)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: DeltaConfig) -> None:
        """Inject a new (inactive unless it is the first) adapter named `adapter_name`."""
        self.inject(adapter_name, config)

    @exclusive
    def inject(self, adapter_name: str, config: DeltaConfig, *, fill: Fill | None = None) -> None:
        """Add an adapter and, if given, run `fill(self, adapter_name)` to load its values (a file's tensors:
        io's assign_weights). All or nothing: on any error, in `fill` too, the model, base weights included,
        is left as it was. With a `fill` (a file being loaded), target names the model lacks are warned
        about, as peft ignores them; without one they are refused."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise DeltaConfigError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        config = copy.copy(config)
        config.referenced()  # the saved adapters it is built from (X-LoRA's experts) were read by io/
        heads = TASK_HEADS.get(config.task_type, [])
        if heads:
            config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + heads))
        candidates = self.candidate_modules()
        modules = dict(candidates)
        targets = select_targets(self.model, config, candidates, is_linear) if config.targets_layers else []
        if config.targets_layers:  # a file being loaded may carry keys peft ignored: warn there, refuse here
            check_every_key_matches(self.model, config, candidates, targets, strict=fill is None)
        bases = {name: modules[name].base_layer if isinstance(modules[name], DeltaLayer) else modules[name]
                 for name in targets}
        views = {name: BaseLayer(base) for name, base in bases.items()}
        for name, view in views.items():  # every target checked before the model is touched
            config.validate_target(view, name)
        if config.changes_base_weights:
            init = getattr(config, "init_lora_weights", None)
            refuse_shared_targets(self.model, bases, f"init_lora_weights={init!r}")
        snapshot = {name: base.weight.detach().clone() for name, base in bases.items()} \
            if config.changes_base_weights else {}
        try:
            shared = config.make_model_adapter(self.model, adapter_name)
            extra = {"shared": shared} if shared is not None else {}
            adapters = {name: config.make_adapter(view, name, **extra) for name, view in views.items()}
            if shared is not None:
                self.model_adapters[adapter_name] = shared.train(self.model.training)
            for name, adapter in adapters.items():
                layer = modules[name]
                if not isinstance(layer, DeltaLayer):
                    layer = DeltaLayer(layer, self._calls, name)
                    self._swap(layer.base_layer, layer)
                layer.add(adapter_name, adapter)
            self._add_modules_to_save(adapter_name, config.modules_to_save or [], candidates)
            self.peft_config[adapter_name] = config
            self._base_values.record(adapter_name, self.bias_parameters(adapter_name).values())
            if fill is not None:
                fill(self, adapter_name)
        except BaseException:
            self._remove(adapter_name)
            with torch.no_grad():
                for name, weight in snapshot.items():
                    bases[name].weight.copy_(weight)
            raise
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self.set_adapter(self.active_adapters)

    def _add_modules_to_save(self, adapter_name: str, patterns: list[str], candidates) -> None:
        for name, module in candidates:
            if not patterns or not name_matches(patterns, name) or isinstance(module, DeltaLayer):
                continue
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, self._calls, name)
                self._swap(module.original_module, module)
            module.add(adapter_name, copy.deepcopy(module.original_module))

    @exclusive
    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make one adapter, or several (their updates sum in the given order), active and trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; adapters: {list(self.peft_config)}")
        self.active_adapters = names
        for _, layer in self.delta_layers():
            layer.active = list(names)
        self._refresh_trainable()

    @exclusive
    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter `adapter_name` everywhere. Every precondition is checked first, so a refused
        call changes nothing.

        Raises:
            ValueError: unknown adapter.
            RuntimeError: the adapter is merged into base weights (call unmerge_adapter() first).
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        merged_into = [name for name, layer in self.delta_layers()
                       if isinstance(layer, DeltaLayer) and adapter_name in layer.merged]
        if merged_into:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into {len(merged_into)} layer(s) "
                               f"({merged_into[0]}, ...); call unmerge_adapter() before deleting it")
        self._remove(adapter_name)
        remaining = [n for n in self.active_adapters if n != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapters = []

    def _remove(self, adapter_name: str) -> None:
        """Take an adapter out of every wrapper (unwrapping emptied ones) and forget its config."""
        for name, layer in list(self.delta_layers()):
            layer.remove(adapter_name)
            if isinstance(layer, DeltaLayer) and not layer.adapters:
                self._replace(name, layer.base_layer)
            elif isinstance(layer, ModulesToSave) and not layer.copies:
                self._replace(name, layer.original_module)
        if adapter_name in self.model_adapters:
            del self.model_adapters[adapter_name]
        self.peft_config.pop(adapter_name, None)
        self._base_values.release(adapter_name)

    def _refresh_trainable(self) -> None:
        """Only the active adapters' parameters (and the biases their config asks for) train."""
        for param in self.parameters():
            param.requires_grad_(False)
        trainable = [n for n in self.active_adapters if not self.peft_config[n].inference_mode]
        for _, layer in self.delta_layers():
            owned = layer.adapters if isinstance(layer, DeltaLayer) else layer.copies
            for name in trainable:
                if name in owned:
                    owned[name].requires_grad_(True)
        for name in trainable:
            if name in self.model_adapters:
                self.model_adapters[name].requires_grad_(True)
            for param in self.bias_parameters(name).values():
                param.requires_grad_(True)

    def bias_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The base biases adapter `adapter_name` trains (its config's `bias`), by canonical name."""
        mode = getattr(self.peft_config[adapter_name], "bias", "none")
        if mode == "none":
            return {}
        if mode.endswith("_only"):  # "lora_only", "vera_only": biases of the layers this adapter wraps
            return {f"{canonical_name(n)}.base_layer.bias": layer.base_layer.bias for n, layer in self.delta_layers()
                    if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters
                    and getattr(layer.base_layer, "bias", None) is not None}
        skip = (".adapters.", ".copies.", ".original_module.")
        return {canonical_param_name(n): p for n, p in self.model.named_parameters()
                if n.endswith("bias") and not any(s in n for s in skip)}

    def keep_base_values(self, adapter_name: str, params) -> None:
        """Adapter `adapter_name` is about to change base parameters `params` in place (ReLoRA's folds):
        keep their base values for disable_adapter(), unload() and delete_adapter() (core/originals.py)."""
        self._base_values.record(adapter_name, params)

    # ------------------------------------------------------------------ disable / merge / unload
    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside, the model gives exactly the base model's output (merged adapters are unmerged), also
        for adapters added inside. Blocks nest: adapters stay off, and unmerged, until the outermost block
        exits, which re-merges what was merged when it began (unless unmerge_adapter() was called inside).
        Holds the model's lock: other threads wait until the block ends."""
        with self._lock:
            yield from self._disabled_block()

    def _disabled_block(self):
        if self._disabled:  # nested: the outermost block keeps adapters off and restores them
            self._disabled += 1
            try:
                yield
            finally:
                self._disabled -= 1
            return
        merged = {name: list(layer.merged) for name, layer in self.delta_layers()
                  if isinstance(layer, DeltaLayer) and layer.merged}
        self.unmerge_adapter()  # (forgets any earlier re-merge plan)
        self._remerge = merged
        self._calls.disabled = True
        self._disabled = 1
        try:
            with self._base_values.base_values():  # biases trained in place hold their base values
                yield
        finally:
            self._disabled = 0
            self._calls.disabled = False
            remerge, self._remerge = self._remerge, {}
            layers = [layer for name, layer in self.delta_layers() if remerge.get(name)]
            shared = shared_parameters(self.model, layers) if layers else {}
            for name, layer in self.delta_layers():
                if remerge.get(name):
                    layer.merge(remerge[name], shared=shared.get(layer))

    @exclusive
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights. With safe_merge every merged
        weight is computed and checked for NaN/inf before any is written, so a bad adapter raises
        MergeError and leaves the base bit-for-bit as it was."""
        if self._disabled:  # the block promises the base model's output until it exits
            raise RuntimeError("merge_adapter() inside disable_adapter() is refused; merge after the block")
        names = list(adapter_names or self.active_adapters)
        layers, shared = self._check_merge(names)
        if not safe_merge:
            for layer in layers:
                layer.merge(names, shared=shared.get(layer))
            return
        for layer, todo, weight in self._safe_merge_plans(names, layers, shared):
            layer.apply_merge(todo, weight)

    def _check_merge(self, names: list[str], quantized_ties: bool = True) -> tuple[list[DeltaLayer], dict]:
        """Every refusal of merging `names` (MergeError / ValueError), before anything is written; returns
        the layers and their shared parameters. `quantized_ties=False` skips the one check a dequantized
        base no longer needs (a quantized weight shared with another module cannot be untied)."""
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; adapters: {list(self.peft_config)}")
            if name in self.model_adapters and declares(self.model_adapters[name], TakesOverForward):
                raise MergeError(f"adapter {name!r} ({self.peft_config[name].peft_type}) acts on the whole model "
                                 "(it runs the model's forward itself) and cannot be merged")
        layers = [layer for _, layer in self.delta_layers() if isinstance(layer, DeltaLayer)]
        shared = shared_parameters(self.model, layers)  # tied weights: untied before a merge writes them
        for layer in layers:  # refuse (MergeError) before any weight is written
            layer.check_merge(names, shared.get(layer) if quantized_ties else None)
        return layers, shared

    def _safe_merge_plans(self, names: list[str], layers: list[DeltaLayer], shared: dict) -> list[tuple]:
        """Plan every layer's merge and check the merged weights are finite; on a refusal every plan is
        discarded (biases and norms that planning wrote get their exact values back) and MergeError raised.
        Returns [(layer, todo, merged weight)] for the layers with something to merge."""
        plans = []
        try:
            for layer in layers:
                todo, weight = layer.plan_merge(names, shared.get(layer))
                plans.append((layer, todo, weight))
                if todo and not torch.isfinite(weight).all():
                    raise MergeError(f"merging adapter(s) {todo} into {layer.module_name} gives NaN/inf weights; "
                                     "no base parameter was changed")
        except MergeError:
            for planned in layers[:len(plans) + 1]:  # the planned ones and the one that raised
                planned.discard_plan()
            raise
        return [plan for plan in plans if plan[1]]

    @exclusive
    def unmerge_adapter(self) -> None:
        self._remerge = {}  # inside disable_adapter(): the adapters stay unmerged after the block
        for _, layer in self.delta_layers():
            if isinstance(layer, DeltaLayer):
                layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
                         dequantize: bool = False) -> nn.Module:
        """Merge the adapters into the base and return the plain model (trained heads kept). With
        `dequantize`, a quantized base is turned back into float first, so the merge loses nothing to
        requantization (a float export)."""
        if dequantize:  # refusals first: a refused merge leaves the base quantized, as it was
            names = list(adapter_names or self.active_adapters)
            layers, _ = self._check_merge(names, quantized_ties=False)
            if safe_merge:  # the NaN/inf check too (planned twice: here on the quantized base, no untying)
                for layer, _, _ in self._safe_merge_plans(names, layers, {}):
                    layer.discard_plan()
            dequantize_model(self.model)
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        untied = any(isinstance(layer, DeltaLayer) and layer.untied for _, layer in self.delta_layers())
        config = getattr(self.model, "config", None)
        if untied and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False  # so saving and reloading keeps the untied, merged head
        return self._unload(keep_trained_heads=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain model (original heads and biases)."""
        self.unmerge_adapter()
        self._base_values.restore_all()
        return self._unload(keep_trained_heads=False)

    @exclusive
    def _unload(self, keep_trained_heads: bool) -> nn.Module:
        for name, layer in list(self.delta_layers()):
            if isinstance(layer, DeltaLayer):
                self._replace(name, layer.base_layer)
            else:
                self._replace(name, layer.current() if keep_trained_heads else layer.original_module)
        for param in self.model.parameters():
            if param.is_floating_point():  # quantized storage cannot require grad
                param.requires_grad_(True)
        return self.model

    # ------------------------------------------------------------------ forward / generate
    @contextlib.contextmanager
    def _route(self, adapter_names: list[str] | None, task_ids: torch.Tensor | None = None,
               rows: int | None = None, expand: int = 1, repeated: bool = False):
        """Route one call: `adapter_names` / `task_ids` give one entry per input row (`rows`, when known);
        generate() repeats each row `expand` times and layers expand the entries to match (CallContext).
        Everything is checked before the routing is set.

        Raises:
            ValueError: an unknown adapter, a prompt-style adapter in a mixed batch, or a count other than
                one per row (naming both lengths).
        """
        device = next(self.model.parameters()).device
        task_ids = None if task_ids is None else torch.as_tensor(task_ids, device=device)
        check_per_row(adapter_names, task_ids, rows)
        names, slots = [], None
        if adapter_names is not None:
            unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
            if unknown:
                raise ValueError(f"adapter_names has unknown adapters {unknown}; "
                                 f"adapters: {list(self.peft_config)}")
            names = [n for n in dict.fromkeys(adapter_names) if n != BASE_ADAPTER]
            prompts = [n for n in set(names) | set(self.active_adapters)
                       if n in self.model_adapters and declares(self.model_adapters[n], TakesOverForward)]
            if prompts:
                raise ValueError(f"adapters {sorted(prompts)} act on the whole model (prompts) and cannot be "
                                 "mixed per sample with adapter_names; run them in their own batch")
            slots = torch.tensor([names.index(n) if n != BASE_ADAPTER else -1 for n in adapter_names],
                                 device=device)
        call = self._calls.new_call(adapter_names=tuple(names), adapter_index=slots, task_ids=task_ids,
                                    expand=expand, repeated=repeated)
        with self._calls.entered(call):
            yield call

    def _input_rows(self, args: tuple, kwargs: dict) -> int | None:
        """The batch size of a forward/generate call's main input, when one is given."""
        keys = (getattr(self.model, "main_input_name", "input_ids"), "input_ids", "inputs", "inputs_embeds")
        for value in [kwargs.get(key) for key in keys] + list(args[:1]):
            if isinstance(value, torch.Tensor) and value.dim() > 1:
                return value.shape[0]
        return None

    def _generate_expansion(self, kwargs: dict) -> int:
        """How many times generate() repeats each input row: transformers expands the batch by
        max(num_beams, num_return_sequences) before decoding."""
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        keys = ("num_beams", "num_return_sequences")
        return max(int(kwargs.get(key, getattr(config, key, None)) or 1) for key in keys)

    def prompt_adapter(self):
        """The active model-level adapter that takes over forward/generate (soft prompts), if any."""
        if self._disabled:
            return None
        found = [self.model_adapters[n] for n in self.active_adapters
                 if n in self.model_adapters and declares(self.model_adapters[n], TakesOverForward)]
        if len(found) > 1:
            raise RuntimeError(f"only one prompt-style adapter can be active at a time; active: {self.active_adapters}")
        return found[0] if found else None

    @exclusive
    def forward(self, *args, adapter_names: list[str] | None = None, task_ids: torch.Tensor | None = None,
                **kwargs):
        """The wrapped model's forward; `adapter_names` gives one adapter (or "__base__") per sample and
        `task_ids` one task per sample for task-conditioned methods."""
        with self._route(adapter_names, task_ids, self._input_rows(args, kwargs)), \
                gradients_through_checkpoints(self.model, self._call_state):
            hook = self.prompt_adapter()
            if hook:
                return hook.forward_model(self.model, *args, **kwargs)
            head = chunked_labels_head(self.model, kwargs) if self.chunked_labels_loss else None
            if head is not None:  # the loss without a (tokens x vocabulary) logits tensor (core/labels_loss.py)
                return forward_with_chunked_loss(self.model, head, args, kwargs)
            return self.model(*args, **kwargs)

    forward = SignedForward(forward)  # shows the wrapped model's parameters (core/forward_signature.py)

    def _call_state(self):
        """What backward's recompute of a checkpointed block must see again (core/checkpointing.py): this
        call's context (routing, memo), and the active model-level adapter's `call_state()` (its hooks,
        X-LoRA's gates)."""
        call, hook = self._calls.current, self.prompt_adapter()
        tensors, replay_hook = hook.call_state() if hook is not None else ((), None)

        @contextlib.contextmanager
        def replay(replayed: tuple[torch.Tensor, ...]):
            with self._calls.entered(call), \
                    (replay_hook(replayed) if replay_hook else contextlib.nullcontext()):
                yield

        return tensors, replay

    @exclusive
    def generate(self, *args, adapter_names: list[str] | None = None, task_ids: torch.Tensor | None = None,
                 **kwargs):
        rows, expand = self._input_rows(args, kwargs), self._generate_expansion(kwargs)
        with self._route(adapter_names, task_ids, rows, expand, repeated=True):
            hook = self.prompt_adapter()
            if hook:
                return hook.generate_model(self.model, *args, **kwargs)
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ training-time methods
    def before_training(self, batches, loss_fn=None) -> None:
        """Called by training loops once before the first step, with an iterable of training batches and
        `loss_fn(model, batch) -> loss` (default: `model(**batch).loss`); e.g. Child-Tuning_D's Fisher mask."""
        loss_fn = loss_fn or (lambda model, batch: model(**batch).loss)
        for name in self.active_adapters:
            self.peft_config[name].before_training(self, name, batches, loss_fn)

    def before_optimizer_step(self, step: int) -> None:
        """Called by training loops after backward, before optimizer.step() (gradient masks)."""
        for name in self.active_adapters:
            self.peft_config[name].before_optimizer_step(self, name, step)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called by training loops after optimizer.step() (rank budgets, periodic merges)."""
        for name in self.active_adapters:
            self.peft_config[name].after_optimizer_step(self, name, step, optimizer)

    def extra_loss(self) -> torch.Tensor | None:
        """Regularisers the active methods add to the training loss (None when there are none)."""
        terms = [t for t in (self.peft_config[n].extra_loss(self, n) for n in self.active_adapters) if t is not None]
        return sum(terms) if terms else None

    # ------------------------------------------------------------------ reports
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters. A quantized base weight counts as the float weight it stands for,
        not its packed storage, so both numbers are the same on a float and on any quantized base."""
        counts = {}  # id(parameter) -> count, only for parameters inside quantized modules
        for module in self.modules():
            if is_quantized(module):
                counts.update(BaseLayer(module).parameter_counts())
        params = list(self.parameters())
        sizes = [counts.get(id(p), p.numel()) for p in params]
        return sum(n for n, p in zip(sizes, params) if p.requires_grad), sum(sizes)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")


def get_peft_model(model: nn.Module, peft_config: DeltaConfig, adapter_name: str = "default",
                   **_: object) -> DeltaModel:
    """Wrap `model` with a new trainable adapter built from `peft_config`."""
    if isinstance(model, DeltaModel):
        raise ValueError("model is already a DeltaModel; use add_adapter() to add another adapter")
    return DeltaModel(model, peft_config, adapter_name)


__all__ = ["DeltaModel", "get_peft_model", "TaskType"]
