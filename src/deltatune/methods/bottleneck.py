"""Bottleneck adapters: Parameter-Efficient Transfer Learning for NLP (Houlsby et al. 2019,
arXiv:1902.00751); AdapterFusion (Pfeiffer et al. 2020, arXiv:2005.00247) for the single-adapter
"pfeiffer" placement; Towards a Unified View of Parameter-Efficient Transfer Learning (He et al. 2021,
arXiv:2110.04366) for the "parallel" one.

              block (frozen)                          adapter(z) = W_up act(W_down z + b_down) + b_up
    x ──► [attention | feed-forward] ──► h ──┬──────────────────────────(+)──► out     sequential
                                             └─► adapter(h) ─► * s ───────┘
    x ──┬─► [block] ──► h ──────────────────(+)──► out                                   parallel
        └─► adapter(x) ──────────► * s ──────┘

Update rule: sequential ("houlsby": after the attention block and after the feed-forward block;
"pfeiffer": after the feed-forward block only): out = h + s * adapter(h). Parallel (beside the
feed-forward block): out = h + s * adapter(x). s = `scaling` (default 1).
Init rule: W_down kaiming-uniform, W_up = 0 and both biases 0, so every adapter starts as the identity
and the model starts equal to the base (`init_weights=False`: W_up random too, for tests).

Placement is by module name, no per-architecture code: a DeltaLayer wraps the whole block (a block that
returns a tuple, or is called with keyword arguments, is handled by the core). The default targets are
the block names of common Transformers models: attention = Llama/Mistral `self_attn`, GPT-2 `attn`,
BERT `attention.output`, T5 `SelfAttention`; feed-forward = `mlp`, BERT `layer.N.output`, T5
`DenseReluDense`. The block's width comes from its own linear layers (first one's input, last one's
output). Shapes: adapter_down.weight (bottleneck, in), adapter_up.weight (out, bottleneck), with in = out
= the block's output width for sequential adapters and the block's input width for parallel ones;
bottleneck = `bottleneck_size`, or out // `reduction_factor`.

Not mergeable (merge_rule "unmergeable"): the non-linearity keeps the adapter out of any weight matrix;
merging raises MergeError before any layer is written.
Several bottleneck adapters active at once apply in the order given to `set_adapter` (stacking, see
compose/fusion.py, which also holds AdapterFusion over several adapters).
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
from ..core.protocols import LayerAdapter

BOTTLENECK_TYPES = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
                   "identity": lambda z: z}
# Regexes (full match) over module names. BERT's feed-forward output block is `layer.N.output`, which the
# attention's `attention.output` must not match.
ATTENTION_BLOCKS = r".*\.(self_attn|attn|SelfAttention|attention\.output)"
FEEDFORWARD_BLOCKS = r".*\.(mlp|DenseReluDense)|.*(?<!\.attention)\.output"


def block_dims(block: BaseLayer) -> tuple[int, int] | None:
    """(input width, output width) of a block: its first linear layer's input, its last one's output (each
    submodule seen through its own view, which knows every linear layout and storage)."""
    linears = [view for view in map(BaseLayer, block.module.modules()) if view.kind == "linear"]
    if not linears:
        return None
    return linears[0].in_features, linears[-1].out_features


class BottleneckAdapter(nn.Module, LayerAdapter):
    """One bottleneck adapter beside or after one block. A plain LayerAdapter: neither Additive nor
    Reparameterizing, since no weight holds its update."""

    merge_rule = "unmergeable"

    def __init__(self, in_width: int, out_width: int, size: int, non_linearity: str, scaling: float,
                 parallel: bool, init_weights: bool, factory: dict) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(in_width, size, **factory)  # (size, in)
        self.adapter_up = nn.Linear(size, out_width, **factory)  # (out, size)
        self.non_linearity, self.scaling, self.parallel = non_linearity, scaling, parallel
        self.act = NON_LINEARITIES[non_linearity]
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.bias)
        if init_weights:
            nn.init.zeros_(self.adapter_up.weight)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """W_up act(W_down z + b_down) + b_up."""
        return self.adapter_up(self.act(self.adapter_down(z.to(self.adapter_down.weight.dtype))))

    def update(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """s * adapter(.), what this adapter adds to base_out, in the adapter's dtype (AdapterFusion attends
        over these updates, compose/fusion.py)."""
        return self.scaling * self.bottleneck(x if self.parallel else base_out)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        return base_out + self.update(x, base_out).to(base_out.dtype)

    def merge_refusal(self) -> str:
        return "the non-linearity keeps a bottleneck adapter out of any weight matrix"

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return f"{kind}, non_linearity={self.non_linearity}, scaling={self.scaling:g}"


@register_method
@dataclass
class BottleneckConfig(DeltaConfig):
    """Bottleneck adapters (Houlsby / Pfeiffer / parallel).

    Args:
        bottleneck_type: "houlsby", "pfeiffer" (default) or "parallel"; picks the default targets.
        bottleneck_size: the bottleneck width; when None, the block width // reduction_factor.
        reduction_factor: block width / bottleneck width, used when bottleneck_size is None.
        non_linearity: one of relu, gelu, silu (swish), tanh, identity.
        scaling: s in out = h + s * adapter(.).
        init_weights: True: W_up = 0 (the adapter starts as the identity); False: random W_up.
        target_modules: blocks to adapt (default: by bottleneck_type, see the module docstring).
    """

    peft_type = "BOTTLENECK"
    adapter_types = (BottleneckAdapter,)
    bottleneck_type: str = "pfeiffer"
    bottleneck_size: int | None = None
    reduction_factor: float = 16
    non_linearity: str = "relu"
    scaling: float = 1.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        require(self.bottleneck_type in BOTTLENECK_TYPES, "bottleneck_type", self.bottleneck_type,
                f"must be one of {BOTTLENECK_TYPES}")
        if self.target_modules is None:
            self.target_modules = FEEDFORWARD_BLOCKS if self.bottleneck_type != "houlsby" \
                else f"{ATTENTION_BLOCKS}|{FEEDFORWARD_BLOCKS}"
        super().__post_init__()
        size = self.bottleneck_size
        require(size is None or (isinstance(size, int) and not isinstance(size, bool) and size > 0),
                "bottleneck_size", size, "must be a positive integer or None")
        require(isinstance(self.reduction_factor, (int, float)) and self.reduction_factor > 0,
                "reduction_factor", self.reduction_factor, "must be a number > 0")
        require(self.non_linearity in NON_LINEARITIES, "non_linearity", self.non_linearity,
                f"must be one of {sorted(NON_LINEARITIES)}")
        require(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool), "scaling",
                self.scaling, "must be a number")
        require(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "must be a bool")

    def supports(self, base: BaseLayer) -> bool:
        return block_dims(base) is not None

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        if not self.supports(base):
            raise DeltaConfigError(f"target module {module_name!r} ({type(base.module).__name__}) holds no "
                                   "linear layer, so its width is unknown; bottleneck adapters wrap blocks "
                                   "such as attention or feed-forward modules")

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> BottleneckAdapter:
        in_width, out_width = block_dims(base)
        parallel = self.bottleneck_type == "parallel"
        size = self.bottleneck_size or max(1, int(out_width // self.reduction_factor))
        return BottleneckAdapter(in_width if parallel else out_width, out_width, size, self.non_linearity,
                                 self.scaling, parallel, self.init_weights, base.factory)
