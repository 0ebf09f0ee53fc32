"""ULoRA: task-modulated LoRA, one shared low-rank pair with a learned gate vector per task.

        x ──► W (frozen) ──────────────────────────────────────┐
        │                                                     (+) ──► out_t = W x + s * B diag(v_t) A x
        └─► dropout ─► A (r x in) ─► * v_t (r,) ─► B (out x r) ─► * s

No single paper fixes this form: it is the task-conditioned LoRA of issue 5, close to gating the
singular values per task (cf. AdaLoRA's diag(E), arXiv:2303.10512). The tasks share the subspace (A, B)
and differ only in how much of each rank-1 direction they use.
Update rule: delta W_t = s * B diag(v_t) A, s = lora_alpha / r; t is the task of the sample, so a mixed
batch (`model(..., task_ids=ids)`, one id per sample) gathers v_t per row and needs no per-sample loop.
Init rule: A ~ kaiming-uniform(a=sqrt(5)), B = 0, v_t = 1, so every task starts at the base output.

A call without task_ids uses `default_task`; merging folds in that task's update (delta W_default).
Files (peft_type "ULORA", deltatune's own): `<path>.lora_A.weight` (r, in), `<path>.lora_B.weight`
(out, r), `<path>.ulora_task_vectors` (num_tasks, r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import DeltaConfig, register_method, require


def is_linear(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D"


@register_method
@dataclass
class ULoraConfig(DeltaConfig):
    """Task-modulated LoRA: LoRA's fields plus `num_tasks` and `default_task`."""

    peft_type = "ULORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    num_tasks: int = 2
    default_task: int | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", self.r,
                "must be a positive integer")
        require(isinstance(self.num_tasks, int) and self.num_tasks > 0, "num_tasks", self.num_tasks,
                "must be a positive integer")
        require(self.default_task is None or (isinstance(self.default_task, int)
                                              and 0 <= self.default_task < self.num_tasks),
                "default_task", self.default_task, f"must be a task id in [0, {self.num_tasks}) or null")
        require(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1, "lora_dropout",
                self.lora_dropout, "must be in [0, 1)")
        require(self.bias in ("none", "all", "lora_only"), "bias", self.bias,
                "must be none, all or lora_only")

    def supports(self, base: nn.Module) -> bool:
        return is_linear(base)

    def make_adapter(self, base: nn.Module, module_name: str,
                     shared: nn.Module | None = None) -> ULoraAdapter:
        default = self.default_task
        if default is None and self.num_tasks == 1:
            default = 0
        return ULoraAdapter(base, self.r, self.lora_alpha / self.r, self.lora_dropout, self.num_tasks,
                            default)


class ULoraAdapter(nn.Module):
    """One shared A/B pair and a (num_tasks, r) table of task vectors for one linear layer."""

    uses_routing = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, num_tasks: int,
                 default_task: int | None) -> None:
        super().__init__()
        self.transposed = type(base).__name__ == "Conv1D"  # Transformers' Conv1D stores (in, out)
        weight = base.weight
        if hasattr(base, "in_features"):  # nn.Linear, also when quantized (the stored weight is packed)
            out_f, in_f = base.out_features, base.in_features
        else:  # Transformers' Conv1D
            in_f, out_f = weight.shape
        dtype = weight.dtype if weight.is_floating_point() else getattr(base, "compute_dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        self.r, self.scaling, self.default_task = r, scaling, default_task
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_f, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.ulora_task_vectors = nn.Parameter(torch.ones(num_tasks, r, **factory))  # (tasks, r)

    def task_gates(self, routing, batch: int) -> torch.Tensor:
        """(batch, r): each sample's v_t, or the default task's for every sample."""
        task_ids = getattr(routing, "task_ids", None)
        if task_ids is None:
            if self.default_task is None:
                raise ValueError(f"ULoRA with {len(self.ulora_task_vectors)} tasks needs task_ids= (one "
                                 "task id per sample) in the forward call, or default_task in its config")
            return self.ulora_task_vectors[self.default_task].expand(batch, -1)
        if routing.index is not None:
            raise ValueError("ULoRA task_ids cannot be combined with a mixed adapter_names batch yet")
        task_ids = routing.per_sample(task_ids, batch, "task_ids")  # generate() may repeat each row
        return self.ulora_task_vectors[task_ids.long()]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module, routing=None) -> torch.Tensor:
        gates = self.task_gates(routing, x.shape[0])  # (batch, r)
        hidden = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (batch, ..., r)
        hidden = hidden * gates.view(x.shape[0], *[1] * (hidden.dim() - 2), self.r)
        return base_out + (self.lora_B(hidden) * self.scaling).to(base_out.dtype)

    def merge_refusal(self) -> str | None:
        """Asked before any layer is merged (core/merging.py): without a default task there is no one
        update to fold in."""
        if self.default_task is None:
            return (f"ULoRA with {len(self.ulora_task_vectors)} tasks has no default_task; set default_task "
                    "in its config to merge that task's update")
        return None

    def delta_weight(self, base: nn.Module) -> torch.Tensor | None:
        """s * B diag(v_default) A in the base weight's layout; None (not mergeable) without a
        default task."""
        if self.default_task is None:
            return None
        gate = self.ulora_task_vectors[self.default_task]
        delta = (self.lora_B.weight * gate) @ self.lora_A.weight * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def extra_repr(self) -> str:
        return f"r={self.r}, tasks={len(self.ulora_task_vectors)}, default_task={self.default_task}"
