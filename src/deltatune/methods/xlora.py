"""X-LoRA: Mixture of Low-Rank Adapter Experts (Buehler & Buehler 2024, arXiv:2402.07148).

        pass 1 (no grad): y = model(x) with every expert scaled by `scaling_pass_value` (0: the base model)
        classifier: h = hidden_states[-1] (B, T, hidden) ─► MLP ─► softmax_T ─► lambda (B, T, L, E)
        pass 2: each adapted layer l: out = W x + g * sum_e (s_e B_e A_e) (lambda[:, :, l, e] * x)

Update rule: E frozen LoRA experts, loaded from adapter directories (`adapters` = {"0": dir, ...}, in
order); a trained classifier reads the last hidden state of a first pass and gives every token a weight
per expert and per adapted layer l (the same weights for every layer unless `layerwise_scalings`). With
`top_k_lora` only the k largest weights per token are kept (`enable_softmax_topk`: renormalised over
them); g = `global_scaling_weight`. Layers are numbered in model order over the modules any expert adapts.
Init rule: the classifier is nn.Linear's default init (`xlora_depth` layers, ReLU and dropout between).

Files, as `peft` writes them: the config (peft_type XLORA, the expert directories) and the classifier
as `base_model.internal_xlora_classifier.layers.<i>.{weight,bias}`; the experts stay in their own
directories, which must exist when the X-LoRA adapter is built. io/ reads them (the config names them in
`referenced_adapters()`; get_peft_model and from_pretrained read them before the model is touched), so this
file reads no file itself. Not mergeable (the gate depends on the input); experts are frozen
(`use_trainable_adapters` is not supported).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method, require
from ..core.protocols import LayerAdapter, TakesOverForward
from ._placement import given_cache

EXPERT_KEY = ".lora_A.weight"  # an expert's tensors for module <path> include <path>.lora_A.weight


def expert_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Module paths an expert adapts (its tensors are keyed `<module path>.<local name>`)."""
    return {key[:-len(EXPERT_KEY)] for key in tensors if key.endswith(EXPERT_KEY)}


class XLoraClassifier(nn.Module, TakesOverForward):
    """The trained gate (model-level): runs the scaling pass and gives (B, T, n_layers, n_experts). It runs
    the model's forward and generate (TakesOverForward: two passes), so merge_adapter refuses it."""

    disk_prefix = "base_model.internal_xlora_classifier."

    def __init__(self, config: XLoraConfig, hidden_size: int, layer_numbers: dict[str, int]) -> None:
        super().__init__()
        self.config, self.layer_numbers = config, layer_numbers
        self.n_layers, self.n_experts = len(layer_numbers), len(config.adapters)
        out = self.n_experts * (self.n_layers if config.layerwise_scalings else 1)
        size = config.xlora_size
        layers: list[nn.Module] = []
        for depth in range(config.xlora_depth - 1):  # peft's layout, so the state-dict indices match
            layers += [nn.Linear(hidden_size if depth == 0 else size, size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
        layers.append(nn.Linear(hidden_size if config.xlora_depth == 1 else size, out))
        self.layers = nn.Sequential(*layers)
        self.scalings: torch.Tensor | None = None  # set for the duration of one two-pass forward
        self._in_scaling_pass = False

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, hidden) -> expert weights (B, T, n_layers, n_experts)."""
        batch, tokens = hidden.shape[:2]
        logits = self.layers(hidden)  # (B, T, E) or (B, T, L * E)
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, tokens, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings

    def _scaling_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the wrapped model: pass 1, then the classifier, before the real pass."""
        if self._in_scaling_pass:
            return
        if given_cache(kwargs) is not None:  # under either name (Transformers 5.2x calls it `cache`)
            raise ValueError("X-LoRA runs two passes per forward and cannot reuse a cache (past_key_values); "
                             "call it with use_cache=False")
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        self.scalings = torch.full((ids.shape[0], ids.shape[1], self.n_layers, self.n_experts),
                                   float(self.config.scaling_pass_value), device=ids.device,
                                   dtype=self.layers[-1].weight.dtype)
        first = {k: v for k, v in kwargs.items() if k != "labels"}
        first.update(output_hidden_states=True, return_dict=True, use_cache=False)
        self._in_scaling_pass = True
        try:
            with torch.no_grad():
                hidden = module(*args, **first).hidden_states[-1]
        finally:
            self._in_scaling_pass = False
        self.scalings = self.classify(hidden)

    def _two_passes(self, model: nn.Module, run):
        handle = model.register_forward_pre_hook(self._scaling_pass, with_kwargs=True)
        try:
            return run()
        finally:
            handle.remove()
            self.scalings = None

    def call_state(self):
        """A checkpointed block's recompute in backward runs after this forward dropped its gates: give it
        the same ones, as an input of the checkpoint so their gradient reaches the classifier."""
        return (() if self.scalings is None else (self.scalings,)), self._gated

    @contextlib.contextmanager
    def _gated(self, tensors: tuple[torch.Tensor, ...]):
        previous, self.scalings = self.scalings, (tensors[0] if tensors else None)
        try:
            yield
        finally:
            self.scalings = previous

    def forward_model(self, model: nn.Module, *args, **kwargs):
        return self._two_passes(model, lambda: model(*args, **kwargs))

    def generate_model(self, model: nn.Module, *args, **kwargs):
        kwargs["use_cache"] = False  # every step re-runs both passes over the whole sequence
        return self._two_passes(model, lambda: model.generate(*args, **kwargs))


class XLoraAdapter(nn.Module, LayerAdapter):
    """The frozen experts of one layer, gated by the classifier's weights for this layer. A plain
    LayerAdapter: the expert mix depends on the input, so no weight holds it (merge_rule "unmergeable")."""

    merge_rule = "unmergeable"

    def __init__(self, experts: dict[str, nn.Module], classifier: XLoraClassifier, layer_number: int) -> None:
        super().__init__()
        self.experts = nn.ModuleDict(experts)  # key: the expert's index among all experts
        self.experts.requires_grad_(False)
        self._classifier = (classifier,)  # shared, owned by the model (not registered here)
        self.layer_number = layer_number
        self._register_state_dict_hook(XLoraAdapter._without_experts)

    @staticmethod
    def _without_experts(module: nn.Module, state_dict: dict, prefix: str, _meta) -> None:
        """The experts live in their own directories; an X-LoRA file holds only the classifier."""
        for key in [k for k in state_dict if k.startswith(prefix + "experts.")]:
            del state_dict[key]

    def requires_grad_(self, requires_grad: bool = True) -> XLoraAdapter:
        super().requires_grad_(requires_grad)
        self.experts.requires_grad_(False)  # the experts stay frozen whatever the wrapper asks
        return self

    def gates(self, scalings: torch.Tensor) -> torch.Tensor:
        """This layer's (B, T, E) expert weights, with peft's top-k masking and renormalisation."""
        config = self._classifier[0].config
        gates = scalings[:, :, self.layer_number, :]
        if config.top_k_lora is not None:
            top = torch.topk(gates, k=config.top_k_lora, dim=-1).indices
            mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, top, True)
            gates = gates * mask.to(gates.dtype)
        if config.enable_softmax_topk:
            kept = gates != 0
            gates = torch.softmax(gates.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
        return gates

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        classifier = self._classifier[0]
        scalings = classifier.scalings
        if scalings is None:  # called outside a two-pass forward: every expert at full weight, as peft does
            gates, weight = None, 1.0
        else:
            gates, weight = self.gates(scalings), classifier.config.global_scaling_weight
        zeros = torch.zeros_like(base_out)
        out = base_out
        for index, expert in self.experts.items():
            x_mod = x if gates is None else x * gates[:, :, int(index), None].to(x.dtype)  # (B, T, in)
            out = out + expert(x_mod, zeros, base, call) * weight
        return out

    def merge_refusal(self) -> str:
        return "the expert mix depends on the input"

    def extra_repr(self) -> str:
        return f"layer_number={self.layer_number}, experts={list(self.experts)}"


@register_method
@dataclass
class XLoraConfig(DeltaConfig):
    """X-LoRA; field names as in Hugging Face PEFT's XLoraConfig. `target_modules` is derived from the
    experts' files (every module any expert adapts)."""

    peft_type = "XLORA"
    adapter_types = (XLoraAdapter,)
    model_adapter_type = XLoraClassifier
    hidden_size: int | None = None
    adapters: dict = field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.adapters, dict) and len(self.adapters) > 0, "adapters", self.adapters,
                "must map expert names to LoRA adapter directories, e.g. {'0': 'dir0', '1': 'dir1'}")
        require(isinstance(self.xlora_depth, int) and self.xlora_depth > 0, "xlora_depth", self.xlora_depth,
                "must be a positive integer")
        require(self.top_k_lora is None or 1 <= self.top_k_lora <= len(self.adapters), "top_k_lora",
                self.top_k_lora, f"must be in [1, {len(self.adapters)}] (the number of experts) or null")
        require(not self.enable_softmax_topk or self.top_k_lora is not None, "enable_softmax_topk",
                self.enable_softmax_topk, "needs top_k_lora")
        require(self.softmax_temperature > 0, "softmax_temperature", self.softmax_temperature, "must be > 0")
        require(0 <= self.xlora_dropout_p < 1, "xlora_dropout_p", self.xlora_dropout_p, "must be in [0, 1)")
        require(not self.use_trainable_adapters, "use_trainable_adapters", self.use_trainable_adapters,
                "trainable experts are not supported: X-LoRA trains its classifier over frozen experts")
        for name, directory in self.adapters.items():  # what a path alone shows; io/ reads the files
            path = Path(directory)
            require(path.is_dir() and any(path.iterdir()), "adapters", self.adapters,
                    f"expert {name!r}: {str(directory)!r} is not an adapter directory (missing or empty)")

    def referenced_adapters(self) -> dict[str, str]:
        return {str(name): str(directory) for name, directory in self.adapters.items()}

    def use_referenced(self, adapters: dict[str, tuple[DeltaConfig, dict[str, torch.Tensor]]]) -> None:
        """The experts as io/ read them: each a plain LoRA adapter; `target_modules` becomes every module
        any expert adapts."""
        directories = self.referenced_adapters()
        for name, (config, _) in adapters.items():
            dora = config.peft_type == "LORA" and config.use_dora
            if config.peft_type != "LORA" or dora:
                raise DeltaConfigError(f"adapters: {directories[name]!r} holds a {config.peft_type} adapter"
                                       f"{' with DoRA' if dora else ''}; X-LoRA experts are plain LoRA "
                                       "adapters")
        super().use_referenced(adapters)
        self.target_modules = sorted(set().union(*(expert_modules(t) for _, t in adapters.values())))

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["adapters"] = {name: str(directory) for name, directory in self.adapters.items()}
        return data

    def supports(self, base: BaseLayer) -> bool:
        return base.kind == "linear"

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> XLoraClassifier:
        self.referenced()  # the experts (and the targets they give) were read
        targets = set(self.target_modules)
        ordered = [name for name, _ in model.named_modules() if name in targets]
        hidden = self.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise DeltaConfigError("hidden_size is not set and the model config has none")
        weight = next(model.parameters())
        numbers = {name: i for i, name in enumerate(ordered)}
        return XLoraClassifier(self, hidden, numbers).to(weight.device, weight.dtype)

    def make_adapter(self, base: BaseLayer, module_name: str,
                     shared: nn.Module | None = None) -> XLoraAdapter:
        experts = {}
        for index, (config, tensors) in enumerate(self.referenced().values()):
            prefix = f"{module_name}."
            local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if local:
                expert = config.make_adapter(base, module_name)
                expert.load_state_dict(local)
                experts[str(index)] = expert
        return XLoraAdapter(experts, shared, shared.layer_numbers[module_name])
