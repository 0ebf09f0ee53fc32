"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685).

        x ──► W (frozen) ──────────────┐
        │                              (+) ──► out = W x + s * B A dropout(x)
        └─► dropout ─► A (r x in) ─► B (out x r) ─► * s

Update rule: delta W = s * B @ A, s = lora_alpha / r (rsLoRA, arXiv:2312.03732: lora_alpha / sqrt(r)).
Init rule: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so the adapted model starts equal to the base
("gaussian": A ~ N(0, 1/r); embeddings: A = 0, B ~ N(0, 1)). PiSSA (arXiv:2404.02948) starts A, B at
the top-r singular triplets of W and OLoRA (arXiv:2406.01775) at its QR factors; both move s*B@A out of
W so the output is unchanged. LoftQ (arXiv:2310.08659, loftq_config={"loftq_bits", "loftq_iter"})
picks the quantized W and A, B together (quant/loftq.py); W then holds dequant(Q). DoRA (use_dora) lives
in dora.py. The base comes as core's view (core/base.py): its layout (fan_in_fan_out), storage (a quantized
base is read and written through it) and compute dtype are never looked up here.

One adapter module serves every base kind; its factors are stored "out-first" (HF PEFT's key names):
  Linear (any layout): lora_A.weight (r, in)         lora_B.weight (out, r)
  ConvNd:           lora_A.weight (r, in, *kernel)   lora_B.weight (out, r, 1, ...)
  Embedding:        lora_embedding_A (r, num_emb)    lora_embedding_B (dim, r)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method, require
from ..core.protocols import Additive, Batched, LowRank, Reparameterizing
from ..core.targeting import pattern_value
from . import dora
from .lora_ops import lora_linear, mixed_lora_linear

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa", "olora", "loftq")
KINDS = ("linear", "embedding", "conv")  # the base kinds LoRA adapts (core/base.py)


class LoraAdapter(nn.Module, Additive, Reparameterizing, Batched, LowRank):
    """One LoRA (optionally DoRA) adapter for one base module."""

    def __init__(self, base: BaseLayer, r: int, scaling: float, dropout: float, use_dora: bool,
                 init: bool | str, fan_in_fan_out: bool, module_name: str, loftq_config: dict | None = None) -> None:
        super().__init__()
        self.kind = base.kind
        self.r, self.scaling, self.use_dora = r, scaling, use_dora
        self.fan_in_fan_out = fan_in_fan_out or base.fan_in_fan_out  # the weight is stored (in, out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.loftq_config = loftq_config
        factory = base.factory  # the base's device and compute dtype
        if self.kind == "linear":
            self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
            self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        elif self.kind == "embedding":
            self.lora_embedding_A = nn.Parameter(torch.empty(r, base.num_embeddings, **factory))
            self.lora_embedding_B = nn.Parameter(torch.empty(base.embedding_dim, r, **factory))
        else:
            conv = type(base.module)  # the same nn.ConvNd
            self.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding,  # padding_mode:
                               base.dilation, bias=False, padding_mode=base.padding_mode, **factory)  # = merged
            self.lora_B = conv(r, base.out_channels, 1, 1, bias=False, **factory)
        self._init(base, init, module_name)
        if use_dora:
            norm = dora.channel_norm(self._out_first(base.read_weight()) + self._delta_out_first().float())
            # PEFT stores conv magnitudes as (1, out, 1, ...); keep its shape so files interchange.
            shape = (1, -1) + (1,) * (self.lora_A.weight.dim() - 2) if self.kind == "conv" else (-1,)
            self.lora_magnitude_vector = nn.Parameter(norm.to(factory["dtype"]).reshape(shape))

    @property
    def merge_rule(self) -> str:
        """How merges compose (core/merging.py): DoRA rescales the output so far, plain LoRA adds."""
        return "sequential" if self.use_dora else "additive"

    def merge_refusal(self) -> str | None:
        return None

    # ---------------------------------------------------------------- factors
    @property
    def A(self) -> torch.Tensor:
        return self.lora_embedding_A if self.kind == "embedding" else self.lora_A.weight

    @property
    def B(self) -> torch.Tensor:
        return self.lora_embedding_B if self.kind == "embedding" else self.lora_B.weight

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, scaling) of plain LoRA (compose/ mixes them); None with DoRA, whose update is not s B A."""
        return None if self.use_dora else (self.A, self.B, self.scaling)

    def _out_first(self, weight: torch.Tensor) -> torch.Tensor:
        """Base weight -> (out, ...) layout; an embedding's "out" is its embedding dimension."""
        return weight.T if self.fan_in_fan_out or self.kind == "embedding" else weight

    _from_out_first = _out_first  # a transpose is its own inverse

    def _delta_out_first(self) -> torch.Tensor:
        a, b = self.A, self.B
        delta = b.reshape(b.shape[0], self.r) @ a.reshape(self.r, -1)
        return (delta * self.scaling).reshape(b.shape[0], *a.shape[1:])

    def delta_weight(self, base: BaseLayer) -> torch.Tensor:
        """The true update W' - W in the base weight's layout: s * B @ A; with DoRA (m / n) (W + s B A) - W,
        n = ||W + s B A|| per output channel, W the base's current weight (dora.merged)."""
        if not self.use_dora:
            return self._from_out_first(self._delta_out_first())
        weight = self._out_first(base.read_weight())
        merged, _ = dora.merged(weight, self._delta_out_first().to(weight.dtype), self.lora_magnitude_vector)
        return self._from_out_first(merged - weight)

    # ---------------------------------------------------------------- init
    def _init(self, base: BaseLayer, init: bool | str, module_name: str) -> None:
        if self.kind == "embedding":  # B ~ N(0, 1); A = 0, or N(0, 1) too with init False
            (nn.init.normal_ if init is False else nn.init.zeros_)(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            return
        if init is False:  # random A and B, as nn.Linear / nn.Conv initialise them
            return
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        elif init == "loftq" and base.is_quantized:
            # A quantized base has no float W to start from (loading a saved LoftQ adapter lands here too,
            # and replaces A and B): start as QLoRA does, and say so.
            warnings.warn("init_lora_weights='loftq' on an already quantized base starts at B = 0 (plain "
                          "QLoRA); for LoftQ, initialize on the float model, then quantize it", stacklevel=2)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "loftq":  # the base's weight becomes dequant(Q) (core/base.py, quant/loftq.py)
            a, b = base.loftq_init(self.r, self.scaling, self.loftq_config)
            with torch.no_grad():
                self.lora_A.weight.copy_(a)
                self.lora_B.weight.copy_(b)
            return
        else:
            self._init_from_weight(base, init, module_name)
            return
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def _init_from_weight(self, base: BaseLayer, init: str, module_name: str) -> None:
        """PiSSA / OLoRA: factors from W itself; W keeps the residual W - s*B@A."""
        w = self._out_first(base.read_weight())  # (out, in)
        if init == "olora":
            q, upper = torch.linalg.qr(w)
            b, a = q[:, : self.r], upper[: self.r]
        else:
            if init == "pissa":
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                u, s, vh = u[:, : self.r], s[: self.r], vh[: self.r]
            else:
                u, s, v = torch.svd_lowrank(w, self.r, niter=int(init.removeprefix("pissa_niter_")))
                vh = v.T
            root = torch.sqrt(s / self.scaling)
            b, a = u * root, root[:, None] * vh
        self.lora_A.weight.copy_(a.contiguous())
        self.lora_B.weight.copy_(b.contiguous())
        residual = w - self.scaling * b @ a
        base.write_weight(self._from_out_first(residual))

    # ---------------------------------------------------------------- forward
    def _unscaled_lora_out(self, x: torch.Tensor, base: BaseLayer) -> torch.Tensor:  # B A x (DoRA scales it)
        if self.kind == "embedding":
            hidden = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm,
                                 base.norm_type, base.scale_grad_by_freq, base.sparse)
            return hidden @ self.lora_embedding_B.T
        return self.lora_B(self.lora_A(x))

    def path(self, base: BaseLayer) -> str:
        """The kernel that runs: "linear" (lora_ops), "dora_linear" (dora.py) or "module" (conv, embedding, DoRA on
        an (in, out) or trainable weight); tests/test_fast_paths.py holds each to lora_reference.py."""
        if self.kind == "linear" and not self.use_dora:
            return "linear"
        if self.kind == "linear" and not self.fan_in_fan_out and not base.weight.requires_grad:
            return "dora_linear"
        return "module"

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        p, path = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0, self.path(base)
        if path == "linear":
            return lora_linear(x, base_out, self.lora_A.weight, self.lora_B.weight, self.scaling, p, call,
                               owns_base_out)
        if path == "dora_linear":
            return dora.dora_linear(x, base_out, base.read_weight(copy=False), base.bias, self.lora_A.weight,
                                    self.lora_B.weight, self.lora_magnitude_vector, self.scaling, p, call)
        dropped = x if self.kind == "embedding" else self.dropout(x)  # "lora_module" / "dora_module"
        lora_out = self._unscaled_lora_out(dropped, base).to(base_out.dtype)
        if not self.use_dora:
            return base_out + lora_out * self.scaling
        return dora.module_output(self, base, base_out, lora_out, None if dropped is x else dropped)

    @staticmethod
    def mixed_forward(adapters: list, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer,
                      index: torch.Tensor, call: CallContext) -> torch.Tensor | None:
        """Every sample through its own adapter, no loop over samples (linear, non-DoRA, no training dropout;
        lora_ops.mixed_lora_linear; the call's memo caches the stacked factors per base layer)."""
        present = [a for a in adapters if a is not None]
        dropping = any(a.training and not isinstance(a.dropout, nn.Identity) for a in present)
        if x.dim() < 2 or dropping or any(a.kind != "linear" or a.use_dora for a in present):
            return None
        factors = [(a.A, a.B, a.scaling) if a is not None else None for a in adapters]
        memo = call.memo if call.repeated else None  # a single forward uses each layer's stack once
        return mixed_lora_linear(factors, x, base_out, index, memo, ("lora_stacks", base.module))

    # ---------------------------------------------------------------- merge (DoRA is not additive)
    def merged_weight(self, base: BaseLayer, weight: torch.Tensor, reference: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
        """W + s B A; DoRA: dora.merged_adapter_weight (its norm is of the plain base weight in `reference`)."""
        if self.use_dora:
            return dora.merged_adapter_weight(self, base, weight, reference)
        return weight + self.delta_weight(base).to(weight.dtype)

    def unmerged_weight(self, base: BaseLayer, weight: torch.Tensor) -> torch.Tensor:
        if self.use_dora:
            return dora.unmerged_adapter_weight(self, base, weight)
        return weight - self.delta_weight(base).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, dora={self.use_dora}"


@register_method
@dataclass
class LoraConfig(DeltaConfig):
    """LoRA and its variants (rsLoRA, DoRA, PiSSA, OLoRA); field names as in Hugging Face PEFT."""

    peft_type = "LORA"
    adapter_types = (LoraAdapter,)
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    loftq_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", self.r,
                "must be a positive integer")
        require(isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool)
                and self.lora_alpha >= 0, "lora_alpha",
                self.lora_alpha, "must be a number >= 0")
        require(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1, "lora_dropout",
                self.lora_dropout, "must be in [0, 1)")
        require(self.bias in BIAS_MODES, "bias", self.bias, f"must be one of {BIAS_MODES}")
        init = self.init_lora_weights
        ok = init in INIT_MODES or (isinstance(init, str) and init.startswith("pissa_niter_")
                                    and init.removeprefix("pissa_niter_").isdigit())
        require(ok, "init_lora_weights", init, f"must be one of {INIT_MODES} or 'pissa_niter_N'")
        for name in ("rank_pattern", "alpha_pattern"):
            require(isinstance(getattr(self, name), dict), name, getattr(self, name), "must be a dict")
        if not isinstance(self.loftq_config, dict):  # peft's LoftQConfig dataclass
            self.loftq_config = dict(vars(self.loftq_config))
        if init == "loftq":
            bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
            require(bits in (4, 8), "loftq_config['loftq_bits']", bits, "must be 4 or 8")
            require(isinstance(iters, int) and iters >= 1, "loftq_config['loftq_iter']", iters, "must be >= 1")
        for key, value in self.rank_pattern.items():
            require(isinstance(value, int) and value > 0, f"rank_pattern[{key!r}]", value, "must be > 0")

    def supports(self, base: BaseLayer) -> bool:
        return base.kind in KINDS

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        super().validate_target(base, module_name)
        kind = base.kind
        if kind == "conv" and base.groups != 1:
            raise DeltaConfigError(f"target module {module_name!r}: LoRA on grouped convolutions "
                                   f"(groups={base.groups}) is not supported")
        if self.changes_base_weights and kind != "linear":
            raise DeltaConfigError(f"target module {module_name!r} is a {type(base.module).__name__}: "
                                   f"init_lora_weights={self.init_lora_weights!r} supports linear layers only")
        if self.changes_base_weights and self.init_lora_weights != "loftq" and base.is_quantized:  # PiSSA, OLoRA
            raise DeltaConfigError(f"target module {module_name!r} is quantized: init_lora_weights="
                                   f"{self.init_lora_weights!r} needs the float weights; initialize on the "
                                   "float model, then quantize it")

    @property
    def changes_base_weights(self) -> bool:
        return (isinstance(self.init_lora_weights, str)
                and self.init_lora_weights.startswith(("pissa", "olora", "loftq")))

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> LoraAdapter:
        r = pattern_value(self.rank_pattern, module_name, self.r)
        alpha = pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        scaling = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return LoraAdapter(base, r, scaling, self.lora_dropout, self.use_dora, self.init_lora_weights,
                           self.fan_in_fan_out, module_name, self.loftq_config)
