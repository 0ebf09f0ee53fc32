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
The task ids come with each call (core/call.py: `call.task_ids`; in a mixed adapter_names batch core hands
this adapter its own rows and their ids). The base's layout and dtype come from core's view (core/base.py).
Files (peft_type "ULORA", deltatune's own): `<path>.lora_A.weight` (r, in), `<path>.lora_B.weight`
(out, r), `<path>.ulora_task_vectors` (num_tasks, r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, register_method, require
from ..core.protocols import Additive
from ..errors import MergeError


class ULoraAdapter(nn.Module, Additive):
    """One shared A/B pair and a (num_tasks, r) table of task vectors for one linear layer."""

    def __init__(self, base: BaseLayer, r: int, scaling: float, dropout: float, num_tasks: int,
                 default_task: int | None) -> None:
        super().__init__()
        self.fan_in_fan_out = base.fan_in_fan_out  # the base weight is stored (in, out)
        factory = base.factory  # the base's device and compute dtype
        self.r, self.scaling, self.default_task = r, scaling, default_task
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.ulora_task_vectors = nn.Parameter(torch.ones(num_tasks, r, **factory))  # (tasks, r)

    @property
    def merge_rule(self) -> str:
        """"additive" (the default task's update), or "unmergeable" without a default task."""
        return "unmergeable" if self.default_task is None else "additive"

    def task_gates(self, call: CallContext, batch: int) -> torch.Tensor:
        """(batch, r): each row's v_t from the call's task ids, or the default task's for every row.

        Raises:
            ValueError: no task ids and no default task, or not one id per row.
        """
        if call.task_ids is None:
            if self.default_task is None:
                raise ValueError(f"ULoRA with {len(self.ulora_task_vectors)} tasks needs task_ids= (one "
                                 "task id per sample) in the forward call, or default_task in its config")
            return self.ulora_task_vectors[self.default_task].expand(batch, -1)
        task_ids = call.per_sample(call.task_ids, batch, "task_ids")  # generate() may repeat each row
        return self.ulora_task_vectors[task_ids.long()]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        gates = self.task_gates(call, x.shape[0])  # (batch, r)
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

    def delta_weight(self, base: BaseLayer) -> torch.Tensor:
        """s * B diag(v_default) A in the base weight's layout: the update of every call without task ids.

        Raises:
            MergeError: without a default task (each task has its own update; merge_refusal says so).
        """
        reason = self.merge_refusal()
        if reason is not None:
            raise MergeError(reason)
        gate = self.ulora_task_vectors[self.default_task]
        delta = (self.lora_B.weight * gate) @ self.lora_A.weight * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"r={self.r}, tasks={len(self.ulora_task_vectors)}, default_task={self.default_task}"


@register_method
@dataclass
class ULoraConfig(DeltaConfig):
    """Task-modulated LoRA: LoRA's fields plus `num_tasks` and `default_task`."""

    peft_type = "ULORA"
    adapter_types = (ULoraAdapter,)
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

    def supports(self, base: BaseLayer) -> bool:
        return base.kind == "linear"

    def make_adapter(self, base: BaseLayer, module_name: str,
                     shared: nn.Module | None = None) -> ULoraAdapter:
        default = self.default_task
        if default is None and self.num_tasks == 1:
            default = 0
        return ULoraAdapter(base, self.r, self.lora_alpha / self.r, self.lora_dropout, self.num_tasks,
                            default)
