"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al. 2023,
arXiv:2303.10512).

Update rule: delta W = B diag(E) A * lora_alpha / (ranknum + 1e-5), an SVD-shaped update P Lambda Q with
A (r, in) the right vectors, E (r, 1) the values, B (out, r) the left vectors; ranknum = init_r is
fixed, so pruning a triplet (E_i = 0) does not rescale the others.
Init rule: E = 0, A, B ~ N(0, 0.02), so the adapted model starts equal to the base.

Rank budget (Algorithm 1, as `peft` runs it): every step before `total_step - tfinal` each parameter's
sensitivity I = |p * grad| is smoothed (EMA beta1) with its uncertainty |I - Ibar| (EMA beta2); a
triplet's score is s(E_i) + mean_j s(A_ij) + mean_j s(B_ji) with s = Ibar * Ubar. The total budget
stays at sum(init_r) for `tinit` steps, then falls cubically to target_r * n_layers; every `deltaT`
steps the lowest-scoring triplets over the whole model are masked (E_i = 0). At `total_step - tfinal`
the mask is final; afterwards it is re-applied each step. The mask is `rank_pattern` in the config
({"<module path>.lora_E": [kept, ...]}) and files hold only the kept triplets, so an adapter loads at
its final ranks without the schedule. An orthogonality regulariser
orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F) comes from `extra_loss`.

Training loop: loss = out.loss + model.extra_loss(); backward; model.before_optimizer_step(step)
(reads the gradients); optimizer.step(); model.after_optimizer_step(step, optimizer) (budget update).
Files: `<path>.lora_A` (r, in), `<path>.lora_E` (r, 1), `<path>.lora_B` (out, r) (no ".weight", as peft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method, require
from ..core.layer import DeltaLayer
from ..core.protocols import Additive


def named_adapters(model: nn.Module, adapter_name: str) -> dict[str, AdaLoraAdapter]:
    """{module path: adapter} of adapter `adapter_name` in a DeltaModel."""
    return {path: layer.adapters[adapter_name] for path, layer in model.delta_layers()
            if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters}


class AdaLoraAdapter(nn.Module, Additive):
    """One SVD-form adapter; `rank_mask` (r,) marks the triplets the budget kept (None: all)."""

    merge_rule = "additive"

    def __init__(self, base: BaseLayer, r: int, init_r: int, scaling: float, dropout: float,
                 init: bool) -> None:
        super().__init__()
        self.kind = base.kind  # "linear" (any layout or storage) or "conv" (a Conv2d)
        self.fan_in_fan_out = base.fan_in_fan_out  # the base weight is stored (in, out)
        if self.kind == "linear":  # any layout, also when quantized (the stored weight is packed)
            out_f, in_f = base.out_features, base.in_features
        else:  # Conv2d (out, in, kh, kw): A sees in * kh * kw
            out_f, in_f = base.out_channels, base.in_channels * math.prod(base.kernel_size)
        self.weight_shape = (out_f, in_f) if self.kind == "linear" else tuple(base.weight.shape)
        factory = base.factory  # the base's device and compute dtype
        self.r, self.scaling = r, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(r, in_f, **factory))  # right singular vectors
        self.lora_E = nn.Parameter(torch.randn(r, 1, **factory))  # singular values
        self.lora_B = nn.Parameter(torch.randn(out_f, r, **factory))  # left singular vectors
        # fixed at init_r (not saved): a pruned or reloaded adapter keeps the scale it trained with
        self.register_buffer("ranknum", torch.full((1,), float(init_r), **factory), persistent=False)
        if init:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.rank_mask: torch.Tensor | None = None
        self.importance: dict[str, torch.Tensor] | None = None  # EMAs of sensitivity and uncertainty
        self._grads: dict[str, torch.Tensor] | None = None
        self._register_state_dict_hook(AdaLoraAdapter._kept_triplets_only)

    @staticmethod
    def _kept_triplets_only(module: AdaLoraAdapter, state_dict: dict, prefix: str, _meta) -> None:
        """Saved tensors hold only the kept triplets, as `peft` writes them once rank_pattern is set."""
        if module.rank_mask is not None:
            keep = module.rank_mask
            state_dict[prefix + "lora_A"] = state_dict[prefix + "lora_A"][keep]
            state_dict[prefix + "lora_E"] = state_dict[prefix + "lora_E"][keep]
            state_dict[prefix + "lora_B"] = state_dict[prefix + "lora_B"][:, keep]

    # ---------------------------------------------------------------- update
    def _delta_out_first(self) -> torch.Tensor:
        scale = self.scaling / (self.ranknum + 1e-5)
        return (self.lora_B @ (self.lora_A * self.lora_E)) * scale  # (out, in*k)

    def delta_weight(self, base: BaseLayer) -> torch.Tensor:
        """B diag(E) A * alpha / ranknum in the base weight's layout (the whole update; pruned E_i are 0)."""
        delta = self._delta_out_first()
        if self.kind == "conv":
            return delta.reshape(self.weight_shape)
        return delta.T if self.fan_in_fan_out else delta

    def merge_refusal(self) -> str | None:
        return None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        dropped = self.dropout(x.to(self.lora_A.dtype))
        if self.kind == "conv":
            delta = F.conv2d(dropped, self.delta_weight(base), None, base.stride, base.padding, base.dilation)
        else:
            scale = self.scaling / (self.ranknum + 1e-5)
            delta = (dropped @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * scale
        return base_out + delta.to(base_out.dtype)

    # ---------------------------------------------------------------- importance
    def keep_gradients(self) -> None:
        """Copy the gradients now, before optimizer.step() and zero_grad() (the update reads them after)."""
        self._grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        grads = self._grads or {n: p.grad for n, p in self.named_parameters() if p.grad is not None}
        if not grads:
            raise RuntimeError("AdaLoRA's budget needs gradients: call model.before_optimizer_step(step) "
                               "after backward and before optimizer.step()")
        if self.importance is None:
            self.importance = {f"{kind}_{n}": torch.zeros_like(p) for n, p in self.named_parameters()
                               for kind in ("ipt", "unc")}
        for name, param in self.named_parameters():
            sensitivity = (param * grads[name]).abs()
            ipt, unc = self.importance[f"ipt_{name}"], self.importance[f"unc_{name}"]
            ipt.mul_(beta1).add_((1 - beta1) * sensitivity)
            unc.mul_(beta2).add_((1 - beta2) * (sensitivity - ipt).abs())
        self._grads = None

    def triplet_scores(self) -> torch.Tensor:
        """s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), (r,)."""
        if self.importance is None:
            raise RuntimeError("AdaLoRA: no importance scores yet; the budget was asked to mask before "
                               "any update")
        score = {n: self.importance[f"ipt_{n}"] * self.importance[f"unc_{n}"]
                 for n in ("lora_A", "lora_E", "lora_B")}
        return score["lora_E"].view(-1) + (score["lora_A"].mean(1) + score["lora_B"].mean(0))

    def extra_repr(self) -> str:
        kept = self.r if self.rank_mask is None else int(self.rank_mask.sum())
        return f"kind={self.kind}, r={self.r}, kept={kept}, scaling={self.scaling:g}"


@torch.no_grad()
def mask_to_budget(adapters: dict[str, AdaLoraAdapter], n_pruned: int) -> dict[str, list[bool]]:
    """Zero the `n_pruned` lowest-scoring triplets over all layers; returns the rank pattern."""
    scores = {path: adapter.triplet_scores() for path, adapter in adapters.items()}  # each (r,)
    everything = torch.cat(list(scores.values()))
    threshold = torch.kthvalue(everything, n_pruned).values if n_pruned > 0 else everything.min() - 1
    pattern = {}
    for path, adapter in adapters.items():
        adapter.rank_mask = scores[path] > threshold
        adapter.lora_E.masked_fill_(~adapter.rank_mask[:, None], 0.0)
        pattern[f"{path}.lora_E"] = adapter.rank_mask.tolist()
    return pattern


@register_method
@dataclass
class AdaLoraConfig(DeltaConfig):
    """AdaLoRA; field names as in Hugging Face PEFT's AdaLoraConfig (`r` is unused, as there)."""

    peft_type = "ADALORA"
    adapter_types = (AdaLoraAdapter,)
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_lora_weights: bool = True
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, value,
                    "must be an integer >= 0")
        require(self.init_r > 0, "init_r", self.init_r, "must be > 0")
        require(self.deltaT > 0, "deltaT", self.deltaT, "must be > 0")
        require(isinstance(self.total_step, int) and self.total_step > 0, "total_step", self.total_step,
                "AdaLoRA's schedule needs the total number of training steps (> 0)")
        require(self.tinit < self.total_step - self.tfinal, "tinit", self.tinit,
                f"leaves no budgeting phase: need tinit < total_step - tfinal "
                f"= {self.total_step - self.tfinal}")
        for name in ("beta1", "beta2"):
            require(0 < getattr(self, name) < 1, name, getattr(self, name), "must be in (0, 1)")
        require(self.orth_reg_weight >= 0, "orth_reg_weight", self.orth_reg_weight, "must be >= 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        require(self.bias in ("none", "all", "lora_only"), "bias", self.bias,
                "must be none, all or lora_only")
        require(self.rank_pattern is None or isinstance(self.rank_pattern, dict), "rank_pattern",
                self.rank_pattern, "must be a dict {'<module>.lora_E': [bool, ...]} or null")

    def supports(self, base: BaseLayer) -> bool:
        return base.kind == "linear" or (base.kind == "conv" and len(base.kernel_size) == 2)  # Conv2d

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        super().validate_target(base, module_name)
        if base.kind == "conv" and base.groups != 1:
            raise DeltaConfigError(f"target module {module_name!r}: AdaLoRA on grouped convolutions "
                                   f"(groups={base.groups}) is not supported")
        kept = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        if kept is not None and len(kept) != self.init_r:
            raise DeltaConfigError(f"rank_pattern[{module_name + '.lora_E'!r}] has {len(kept)} entries, "
                                   f"init_r={self.init_r}")

    def module_keys(self) -> dict:
        # Not peft's LoRA rank_pattern: AdaLoRA's keys are "<module>.lora_E", the kept-triplet masks.
        return {"rank_pattern": (list(self.rank_pattern or {}), lambda key, name: key == f"{name}.lora_E")}

    def make_adapter(self, base: BaseLayer, module_name: str,
                     shared: nn.Module | None = None) -> AdaLoraAdapter:
        kept = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        r = self.init_r if kept is None else int(sum(bool(k) for k in kept))
        scaling = self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)
        return AdaLoraAdapter(base, r, self.init_r, scaling, self.lora_dropout, self.init_lora_weights)

    # -- the rank budget (training-time hooks) ---------------------------------------------------
    def budget(self, step: int, initial: int, target: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask at this step): flat, cubic decrease, flat."""
        if step <= self.tinit:
            return initial, False
        if step > self.total_step - self.tfinal:
            return target, True
        progress = (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((initial - target) * (1 - progress) ** 3 + target), step % self.deltaT == 0

    def before_optimizer_step(self, model: nn.Module, adapter_name: str, step: int) -> None:
        if step < self.total_step - self.tfinal and not self.inference_mode:
            for adapter in named_adapters(model, adapter_name).values():
                adapter.keep_gradients()

    def after_optimizer_step(self, model: nn.Module, adapter_name: str, step: int, optimizer=None) -> None:
        if self.inference_mode:
            return
        adapters = named_adapters(model, adapter_name)
        final = self.total_step - self.tfinal
        if step < final:
            for adapter in adapters.values():
                adapter.update_importance(self.beta1, self.beta2)
            initial = sum(a.r for a in adapters.values())
            total, mask = self.budget(step, initial, self.target_r * len(adapters))
            if mask:
                self.rank_pattern = mask_to_budget(adapters, initial - total)
        elif step == final:
            self.rank_pattern = mask_to_budget(adapters, sum(a.r for a in adapters.values())
                                               - self.target_r * len(adapters))
            for adapter in adapters.values():
                adapter.importance = None
        elif self.rank_pattern:
            with torch.no_grad():
                for adapter in adapters.values():
                    if adapter.rank_mask is not None:
                        adapter.lora_E.masked_fill_(~adapter.rank_mask[:, None], 0.0)

    def extra_loss(self, model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        """orth_reg_weight * mean over A and B of every layer of ||A A^T - I||_F, ||B^T B - I||_F."""
        if self.inference_mode or self.orth_reg_weight == 0:
            return None
        terms = []
        for adapter in named_adapters(model, adapter_name).values():
            for gram in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):  # (r, r)
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device)))
        return self.orth_reg_weight * torch.stack(terms).mean() if terms else None
