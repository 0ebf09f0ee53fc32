"""ReLoRA: High-Rank Training Through Low-Rank Updates (Lialin et al. 2023, arXiv:2307.05695).

Update rule: train a LoRA (s * B A); every `relora_steps` optimizer steps fold it into the frozen
weight, W <- W + s * B A, re-initialise A and B, and reset the optimizer state of A and B ("zero", or
"prune": zero all but the largest (1 - prune_ratio) fraction by magnitude, the paper's 99% pruning, with one
mask for all of a parameter's state tensors).
The learning rate re-warms from near zero over `relora_warmup_steps` after each reset ("jagged"
schedule): the training loop multiplies its own rate by `relora_lr_multiplier(step, ...)`.
After k resets the total update sum_i s B_i A_i has rank up to (k + 1) r.
Init rule: LoRA's (A ~ kaiming-uniform, B = 0), at start and after every reset, so the model output
is continuous across a reset (up to float rounding of the merge).

Training loop (step is the 0-based optimizer step; a reset follows steps N-1, 2N-1, ...):
    lr_t = base_lr_t * relora_lr_multiplier(step, N, warmup); loss.backward(); optimizer.step()
    model.after_optimizer_step(step, optimizer)
The result is either the merged model (`model.merge_and_unload()`, which also folds in the live LoRA)
or one cumulative LoRA for the original base: `to_cumulative_lora(model)` takes the folded updates
back out of W and makes the adapter a plain LoRA whose factors are the concatenation
[s B_1 ... s B_k, s B] [A_1; ...; A_k; A] (rank (k + 1) r, scaling 1) that `peft` loads as it is.
A `save_pretrained` during training saves only the live LoRA (relative to the folded base).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.config import register_method, require
from ..core.layer import DeltaLayer
from .lora import LoraAdapter, LoraConfig

RESET_MODES = ("zero", "prune")


def relora_lr_multiplier(step: int, relora_steps: int, relora_warmup_steps: int) -> float:
    """The jagged re-warmup factor for optimizer step `step` (0-based): 1 in the first cycle; after
    each reset it rises linearly from 1/(warmup+1) back to 1 over `relora_warmup_steps` steps."""
    since_reset = step % relora_steps
    if step < relora_steps or since_reset >= relora_warmup_steps:
        return 1.0
    return (since_reset + 1) / (relora_warmup_steps + 1)


@register_method
@dataclass
class ReLoraConfig(LoraConfig):
    """LoRA plus the ReLoRA schedule; the adapter itself is a LoraAdapter."""

    peft_type = "RELORA"
    relora_steps: int = 1000
    relora_warmup_steps: int = 50
    optimizer_reset: str = "prune"
    prune_ratio: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.relora_steps, int) and self.relora_steps > 0, "relora_steps",
                self.relora_steps, "must be a positive integer")
        warmup = self.relora_warmup_steps
        require(isinstance(warmup, int) and 0 <= warmup < self.relora_steps, "relora_warmup_steps", warmup,
                f"must be in [0, relora_steps={self.relora_steps})")
        require(self.optimizer_reset in RESET_MODES, "optimizer_reset", self.optimizer_reset,
                f"must be one of {RESET_MODES}")
        require(0 <= self.prune_ratio <= 1, "prune_ratio", self.prune_ratio, "must be in [0, 1]")
        require(not self.use_dora, "use_dora", self.use_dora,
                "ReLoRA merges additively; DoRA is not additive")
        require(self.init_lora_weights in (True, "gaussian"), "init_lora_weights", self.init_lora_weights,
                "ReLoRA re-initialises to a zero update; use True or 'gaussian'")

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> LoraAdapter:
        """A LoraAdapter with an empty `relora_merged` history: the (A, s B) pairs its resets fold into W."""
        adapter = super().make_adapter(base, module_name, shared)
        adapter.relora_merged = []
        return adapter

    def lr_multiplier(self, step: int) -> float:
        return relora_lr_multiplier(step, self.relora_steps, self.relora_warmup_steps)

    def after_optimizer_step(self, model: nn.Module, adapter_name: str, step: int, optimizer=None) -> None:
        if self.inference_mode or (step + 1) % self.relora_steps:
            return
        if optimizer is None:
            raise ValueError("ReLoRA resets the optimizer state at each merge: call "
                             "model.after_optimizer_step(step, optimizer) with the optimizer")
        for _path, layer in model.delta_layers():
            if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters:
                if not layer.base.is_quantized:  # disable / unload give W0, exactly
                    model.keep_base_values(adapter_name, [layer.base.weight])
                merge_and_reinit(layer, adapter_name, self.init_lora_weights)
                reset_optimizer_state(optimizer, layer.adapters[adapter_name].parameters(),
                                      self.optimizer_reset, self.prune_ratio)


@torch.no_grad()
def merge_and_reinit(layer: DeltaLayer, adapter_name: str, init: bool | str) -> None:
    """W <- W + s B A; keep (A, s B) in the adapter's `relora_merged` history; A, B back to init."""
    if adapter_name in layer.merged:
        raise RuntimeError(f"{layer.module_name}: unmerge adapter {adapter_name!r} before a ReLoRA reset")
    adapter = layer.adapters[adapter_name]
    base = layer.base  # the view: reads and writes the effective weight of any storage (core/base.py)
    base.write_weight(base.read_weight() + adapter.delta_weight(base).float())
    adapter.relora_merged.append((adapter.A.detach().clone(), (adapter.B * adapter.scaling).detach().clone()))
    if adapter.kind == "embedding":
        nn.init.zeros_(adapter.lora_embedding_A)
        nn.init.normal_(adapter.lora_embedding_B)
        return
    if init == "gaussian":
        nn.init.normal_(adapter.lora_A.weight, std=1 / adapter.r)
    else:
        nn.init.kaiming_uniform_(adapter.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(adapter.lora_B.weight)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params, mode: str, prune_ratio: float) -> None:
    """Zero (or magnitude-prune) every per-element state tensor (Adam's moments, momentum) of `params`;
    scalar entries such as Adam's step count are left as they are. Pruning keeps the same entries in every
    state tensor of a parameter, chosen by the first one's magnitude (Adam's first moment): pruned
    separately, an entry could keep its first moment and lose its second, and Adam would divide by eps."""
    for param in params:
        states = [v for v in optimizer.state.get(param, {}).values()
                  if torch.is_tensor(v) and v.shape == param.shape and v.numel() > 0]
        if not states:
            continue
        n_pruned = math.ceil(prune_ratio * param.numel()) if mode == "prune" else param.numel()
        if n_pruned >= param.numel():
            for value in states:
                value.zero_()
        elif n_pruned > 0:
            magnitude = states[0].abs()
            drop = magnitude <= magnitude.flatten().kthvalue(n_pruned).values
            for value in states:
                value.masked_fill_(drop, 0)


@torch.no_grad()
def to_cumulative_lora(model: nn.Module, adapter_name: str = "default") -> LoraConfig:
    """Turn a ReLoRA adapter into one plain LoRA for the original base, in place: the folded updates are
    subtracted from W again and the adapter's factors become [A_1; ...; A_k; A], [s B_1 ... s B_k, s B]
    with scaling 1. Returns the new LoraConfig (also set as the adapter's config); the model output is
    unchanged up to float rounding, and `save_pretrained` then writes a standard PEFT LoRA."""
    config = model.peft_config[adapter_name]
    if not isinstance(config, ReLoraConfig):
        raise TypeError(f"adapter {adapter_name!r} is {config.peft_type}, not RELORA")
    factors = {}
    for path, layer in model.delta_layers():
        if not isinstance(layer, DeltaLayer) or adapter_name not in layer.adapters:
            continue
        if adapter_name in layer.merged:
            raise RuntimeError(f"{path}: unmerge adapter {adapter_name!r} first")
        adapter = layer.adapters[adapter_name]
        live = (adapter.A.detach(), (adapter.B * adapter.scaling).detach())
        parts = [*adapter.relora_merged, live]
        a = torch.cat([p[0] for p in parts], dim=0)  # (r_total, in, ...)
        b = torch.cat([p[1] for p in parts], dim=1)  # (out, r_total, ...)
        factors[path] = (layer, a, b, adapter)
    ranks = {path: a.shape[0] for path, (_, a, _, _) in factors.items()}
    r = max(ranks.values())
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k in lora_fields}
    settings.update(r=r, lora_alpha=r, use_rslora=False, alpha_pattern={},
                    rank_pattern={p: n for p, n in ranks.items() if n != r})
    settings["alpha_pattern"] = dict(settings["rank_pattern"])  # scaling 1 everywhere
    new_config = LoraConfig(**settings)
    for path, (layer, a, b, old) in factors.items():
        base = layer.base
        old_delta = old.delta_weight(base).float()
        new = new_config.make_adapter(base, path).train(old.training)
        new.A.copy_(a)
        new.B.copy_(b.reshape(new.B.shape))
        # W0 = W - (total delta - live delta): take the folded part back out of the base
        base.write_weight(base.read_weight() - (new.delta_weight(base).float() - old_delta))
        layer.adapters[adapter_name] = new
    model.peft_config[adapter_name] = new_config
    model.set_adapter(model.active_adapters)
    return new_config
