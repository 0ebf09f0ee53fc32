"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

        x ──► W (frozen) ─────────────────────────────────────────────┐
        │                                                            (+) ──► out
        └─► dropout ─► A[:r, :in] ─► * lambda_d ─► B[:out, :r] ─► * lambda_b

Update rule: delta W = diag(lambda_b) B diag(lambda_d) A. A (r, in_max) and B (out_max, r) are frozen,
random and shared by every adapted layer (each layer slices the top-left block it needs); only the
vectors lambda_d (r,) and lambda_b (out,) train.
Init rule: A, B ~ kaiming-uniform drawn from a CPU generator seeded with `projection_prng_key` (A first,
then B, as `peft` draws them, so the same key gives the same matrices); lambda_d = d_initial,
lambda_b = 0, so the adapted model starts equal to the base (init_weights=False: lambda_b = 1,
lambda_d ~ N(0, 1)).

Files: per layer `<path>.vera_lambda_b` (out,), `<path>.vera_lambda_d` (r,); the shared projections are
model-level, saved as `base_model.vera_A` / `base_model.vera_B` when `save_projection` is true and
regenerated from the key otherwise (the keys `peft` uses). The base comes as core's view (core/base.py),
which gives the layer's (out, in) in any layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, register_method, require
from ..core.layer import DeltaLayer
from ..core.model import WRAPPER_TYPES, is_linear
from ..core.protocols import Additive, ModelLevel
from ..core.targeting import adaptable_modules, select_targets


def target_bases(model: nn.Module, config: DeltaConfig) -> dict[str, BaseLayer]:
    """{name: view of the base module} of the modules `config` will adapt, found as DeltaModel finds them."""
    candidates = adaptable_modules(model, WRAPPER_TYPES)
    modules = dict(candidates)
    names = select_targets(model, config, candidates, is_linear)
    return {n: BaseLayer(modules[n].base_layer if isinstance(modules[n], DeltaLayer) else modules[n])
            for n in names}


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain sqrt(2) over fan_in = shape[1], drawn from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module, ModelLevel):
    """The frozen random pair every layer of one adapter shares; saved as `base_model.vera_A/B`."""

    disk_prefix = "base_model."

    def __init__(self, r: int, out_max: int, in_max: int, seed: int, persistent: bool) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vera_a = kaiming_uniform((r, in_max), generator)  # drawn first, as peft does
        vera_b = kaiming_uniform((out_max, r), generator)
        self.register_buffer("vera_A", vera_a, persistent=persistent)  # (r, in_max)
        self.register_buffer("vera_B", vera_b, persistent=persistent)  # (out_max, r)


class VeraAdapter(nn.Module, Additive):
    """The trainable scaling vectors of one layer; the projections are borrowed, not owned."""

    merge_rule = "additive"

    def __init__(self, base: BaseLayer, projections: VeraProjections, r: int, dropout: float,
                 d_initial: float, init_weights: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = base.out_features, base.in_features
        proj_out, proj_in = projections.vera_B.shape[0], projections.vera_A.shape[1]
        if proj_out < self.out_features or proj_in < self.in_features or projections.vera_A.shape[0] < r:
            raise ValueError(f"VeRA projections {tuple(projections.vera_A.shape)}/"
                             f"{tuple(projections.vera_B.shape)} are too small for a "
                             f"({self.out_features}, {self.in_features}) layer at r={r}")
        self.r = r
        self.fan_in_fan_out = base.fan_in_fan_out  # the base weight is stored (in, out)
        self._projections = (projections,)  # a tuple: shared, so not registered (saved once, model-level)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.device, "dtype": projections.vera_A.dtype}
        if init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **factory))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(self.out_features, **factory))
            self.vera_lambda_d = nn.Parameter(torch.randn(r, **factory))

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's blocks of the shared projections: A (r, in), B (out, r)."""
        projections = self._projections[0]
        a = projections.vera_A[: self.r, : self.in_features]
        return a, projections.vera_B[: self.out_features, : self.r]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        a, b = self.sliced()
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        delta = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)  # (..., out)
        return base_out + delta.to(base_out.dtype)

    def merge_refusal(self) -> str | None:
        return None

    def delta_weight(self, base: BaseLayer) -> torch.Tensor:
        """diag(lambda_b) B diag(lambda_d) A in the base weight's layout."""
        a, b = self.sliced()
        delta = (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}"


@register_method
@dataclass
class VeraConfig(DeltaConfig):
    """VeRA; field names as in Hugging Face PEFT's VeraConfig."""

    peft_type = "VERA"
    adapter_types = (VeraAdapter,)
    model_adapter_type = VeraProjections
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", self.r,
                "must be a positive integer")
        require(isinstance(self.projection_prng_key, int), "projection_prng_key", self.projection_prng_key,
                "must be an integer")
        require(isinstance(self.vera_dropout, (int, float)) and 0 <= self.vera_dropout < 1, "vera_dropout",
                self.vera_dropout, "must be in [0, 1)")
        require(self.bias in ("none", "all"), "bias", self.bias,
                "must be 'none' or 'all' ('vera_only' is not supported yet)")

    def supports(self, base: BaseLayer) -> bool:
        return base.kind == "linear"

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> VeraProjections:
        bases = list(target_bases(model, self).values())
        return VeraProjections(self.r, max(b.out_features for b in bases), max(b.in_features for b in bases),
                               self.projection_prng_key, self.save_projection).to(**bases[0].factory)

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> VeraAdapter:
        return VeraAdapter(base, shared, self.r, self.vera_dropout, self.d_initial, self.init_weights)
