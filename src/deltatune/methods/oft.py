"""OFT: Controlling Text-to-Image Diffusion by Orthogonal Finetuning (Qiu et al. 2023, arXiv:2306.07280).

Update rule: W' = W R^T, R = diag(R_1, ..., R_n) block-diagonal orthogonal (in x in), so the layer sees
x R instead of x: the angles between a neuron's weights are kept, only rotated. Each block comes from a
skew-symmetric Q_i (b x b, b(b-1)/2 free numbers, its upper triangle) by the Cayley transform
R_i = (I - Q_i)(I + Q_i)^-1, or, with `use_cayley_neumann` (PEFT's default), by the truncated Neumann
series I + 2Q + 2Q^2 + ... + 2Q^(m-2) + Q^(m-1), m = num_cayley_neumann_terms (PEFT's exact terms; the
series is orthogonal only to O(|Q|^m)). `r` blocks of size `oft_block_size` = in / r (give one of the two;
values that do not divide `in` are adjusted to the nearest divisor, with a warning, as PEFT does).
`block_share`: one Q for every block. COFT (`coft`): every Q_i is kept in the ball ||Q_i||_F <= eps / sqrt(n):
the forward projects functionally (PEFT writes the projection back inside forward; here a forward never
changes a parameter, so repeated forwards are identical), and `after_optimizer_step` writes the projected
Q back after each step (a fixed point of the projection, so PEFT reads the saved weight unchanged).
`module_dropout` (training only): a random int(p * n) of the n blocks act as the identity for that step.
Init rule: Q = 0, so R = I and the output starts equal to the base (init_weights=False: Q ~ N(0, 0.1)).

Conv2d: the rotation acts on the flattened filter, W (out, in*kh*kw) -> W R^T. PEFT 0.21.2's unmerged forward
applies it to unfolded-then-folded inputs, which for kernels wider than 1 sums overlapping patches (differing
from the base even at init, and from its own merged weights). Here the forward always equals the merged
layer, i.e. PEFT's *merged* output; 1x1 convs and Linear match either. The base comes as core's view.

Saved tensor (PEFT's name): oft_R.weight (n or 1 with block_share, b(b-1)/2), the upper triangles of Q.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method, require
from ..core.layer import DeltaLayer
from ..core.protocols import Reparameterizing

BIAS_MODES = ("none", "all")
NEUMANN_FORMAT_VERSION = "0.18.0"  # the PEFT release whose Cayley-Neumann terms this file implements


def oft_kind(base: BaseLayer) -> str | None:
    """'linear' (stored (out, in), any storage), 'conv2d', or None (OFT / BOFT cannot adapt `base`)."""
    if base.kind == "conv":
        return "conv2d" if len(base.kernel_size) == 2 else None
    return "linear" if base.kind == "linear" and not base.fan_in_fan_out else None


def validate_rotation_target(base: BaseLayer, module_name: str, method: str) -> None:
    """What OFT and BOFT refuse before the model is touched (PEFT refuses the same)."""
    if base.fan_in_fan_out:
        raise DeltaConfigError(f"target module {module_name!r} is a {type(base.module).__name__} that stores "
                               f"its weight (in, out) (fan_in_fan_out, GPT-2 style); {method} adapts "
                               "nn.Linear and nn.Conv2d only, as PEFT does")
    if oft_kind(base) == "conv2d" and (base.groups != 1 or any(d != 1 for d in base.dilation)):
        raise DeltaConfigError(f"target module {module_name!r}: {method} does not support grouped or dilated "
                               f"convolutions (groups={base.groups}, dilation={base.dilation})")


def no_fan_in_fan_out(value: bool, method: str) -> bool:
    """nn.Linear and nn.Conv2d store (out, in); PEFT warns and resets fan_in_fan_out=True, so do we."""
    if value:
        warnings.warn(f"fan_in_fan_out=True does not apply to the layers {method} adapts "
                      "(nn.Linear, nn.Conv2d); using False", stacklevel=3)
    return False


def filter_dim(base: BaseLayer) -> int:
    """Length of the vector the rotation acts on: in_features, or in_channels * kh * kw for a conv."""
    return base.in_features if oft_kind(base) == "linear" else base.in_channels * math.prod(base.kernel_size)


def nearest_divisor(dimension: int, value: int) -> int:
    """PEFT's adjustment of an r / block size that does not divide `dimension` (ties go down)."""
    if value >= dimension:
        return dimension
    higher = lower = value
    while higher <= dimension and dimension % higher:
        higher += 1
    while lower > 1 and dimension % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform of a stack of skew-symmetric matrices (n, b, b): (I - Q)(I + Q)^-1, solved
    in at least float32 (as PEFT does; linalg.solve has no half-precision kernels)."""
    work = skew.to(torch.promote_types(skew.dtype, torch.float32))
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=work.dtype).expand_as(work)
    return torch.linalg.solve(eye + work, eye - work, left=False).to(skew.dtype)


def multiplicative_dropout(blocks: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Replace a random int(p * n) of n rotation blocks (n, b, b) by the identity (training only)."""
    n = blocks.shape[0]
    if not training or p <= 0 or n == 1:
        return blocks
    mask = torch.zeros(n, 1, 1, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(n, device=blocks.device)[: int(p * n)]] = 1
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


def coft_radius(eps: float, blocks: int) -> torch.Tensor:
    """COFT's ball radius eps / sqrt(n) as PEFT computes it (a float32 tensor): PEFT's very boundary."""
    return eps * 1 / torch.sqrt(torch.tensor(blocks))


def rotate_filters(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W R^T for block-diagonal R: weight (out, n * b) flattened, blocks (n, b, b) -> (out, n * b)."""
    out_f = weight.shape[0]
    grouped = weight.reshape(out_f, blocks.shape[0], blocks.shape[-1])  # (out, n, b)
    return torch.einsum("onk,nck->onc", grouped, blocks).reshape(out_f, -1)


class OFTRotation(nn.Module):
    """The trainable part, held as PEFT holds it (`oft_R.weight`): upper triangles of the Q blocks."""

    def __init__(self, blocks: int, block_size: int, factory: dict) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(blocks, block_size * (block_size - 1) // 2, **factory))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.block_size = block_size

    def skew(self, vectors: torch.Tensor) -> torch.Tensor:
        """(n, b(b-1)/2) -> skew-symmetric (n, b, b)."""
        upper = vectors.new_zeros(vectors.shape[0], self.block_size, self.block_size)
        upper[:, self.rows, self.cols] = vectors
        return upper - upper.transpose(-2, -1)


class OFTAdapter(nn.Module, Reparameterizing):
    """One OFT adapter for one nn.Linear / nn.Conv2d."""
    merge_rule = "reads_base"  # the forward adds W (R x - x), W the base weight (core/merging.py)

    def __init__(self, base: BaseLayer, r: int, block_size: int, config: OFTConfig) -> None:
        super().__init__()
        self.kind = oft_kind(base)
        self.r, self.block_size = r, block_size
        self.block_share, self.coft, self.eps = config.block_share, config.coft, config.eps
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else 0
        self.module_dropout = config.module_dropout
        self.oft_R = OFTRotation(1 if config.block_share else r, block_size, base.factory)
        if not config.init_weights:
            nn.init.normal_(self.oft_R.weight, mean=0.0, std=0.1)

    # ---------------------------------------------------------------- the rotation
    def projected_skew(self) -> torch.Tensor:
        """The Q blocks (n, b, b) used by the forward: with COFT, each pulled into the ball ||Q_i||_F <=
        eps / sqrt(n) functionally (a forward stays pure), with the expression and operation order of
        PEFT's `_project_batch`: a weight inside the ball is used as is, one outside gives PEFT's numbers."""
        skew = self.oft_R.skew(self.oft_R.weight)
        if not self.coft:
            return skew
        radius = coft_radius(self.eps, skew.shape[0])
        norm = torch.norm(skew, dim=(1, 2), keepdim=True)
        # the clamp only guards the unselected branch (norm 0 -> 0/0 gradients); selected, norm > radius
        return torch.where(norm <= radius, skew, radius * (skew / norm.clamp_min(radius)))

    @torch.no_grad()
    def project_(self) -> None:
        """COFT after an optimizer step: write the projected Q back, shrunk until it is a fixed point of
        the projection (rounding can leave ||Q_i|| an ulp above the radius), so later forwards here and
        in PEFT use the saved weight exactly as stored."""
        skew = self.projected_skew()
        radius = coft_radius(self.eps, skew.shape[0])
        shrink = 1 - torch.finfo(skew.dtype).eps
        for _ in range(64):  # a few ulps at most; bounded so a NaN cannot loop forever
            outside = torch.norm(skew, dim=(1, 2), keepdim=True) > radius
            if not outside.any():
                break
            skew = torch.where(outside, skew * shrink, skew)
        self.oft_R.weight.copy_(skew[:, self.oft_R.rows, self.oft_R.cols])

    def blocks(self, dropout: bool = True) -> torch.Tensor:
        """The r rotation blocks (r, b, b); `dropout`: apply module_dropout when training."""
        skew = self.projected_skew()
        if self.neumann_terms:
            rotation = _neumann_cayley(skew, self.neumann_terms)
        else:
            rotation = cayley(skew)
        rotation = multiplicative_dropout(rotation, self.module_dropout, self.training and dropout)
        return rotation.expand(self.r, -1, -1) if self.block_share else rotation

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        blocks = self.blocks()
        if self.kind == "linear":
            # base(x R) = base(x) + W (x R - x): the bias cancels and the base output is reused
            x = x.to(blocks.dtype)
            grouped = x.reshape(*x.shape[:-1], self.r, self.block_size)  # (..., r, b)
            rotated = torch.einsum("...rk,rkc->...rc", grouped, blocks).reshape(x.shape)
            update = nn.functional.linear(rotated - x, base.read_weight(copy=False).to(blocks.dtype))
        else:  # conv(x, W R^T) = base(x) + conv(x, W R^T - W)
            weight = base.read_weight(copy=False).to(blocks.dtype)
            delta = rotate_filters(weight.flatten(1), blocks).reshape(weight.shape) - weight
            update = base._conv_forward(x.to(blocks.dtype), delta, None)
        return base_out + update.to(base_out.dtype)

    # ---------------------------------------------------------------- merge: W' = W R^T, exactly undone
    def merge_refusal(self) -> str | None:  # W R^T can always be merged
        return None

    def merged_weight(self, base: BaseLayer, weight: torch.Tensor, reference: dict) -> torch.Tensor:
        blocks = self.blocks(dropout=False).float()
        return rotate_filters(weight.flatten(1), blocks).reshape(weight.shape)

    def unmerged_weight(self, base: BaseLayer, weight: torch.Tensor) -> torch.Tensor:
        # the Neumann series is only nearly orthogonal, so invert rather than transpose
        inverse = torch.linalg.inv(self.blocks(dropout=False).double()).float()
        return rotate_filters(weight.flatten(1), inverse).reshape(weight.shape)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, r={self.r}, block_size={self.block_size}, block_share={self.block_share}, "
                f"coft={self.coft}, neumann_terms={self.neumann_terms}")


def _neumann_cayley(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated series for (I + Q)(I - Q)^-1: I + 2Q + 2Q^2 + ... + 2Q^(m-2) + Q^(m-1), with at
    least Q^3 as the last term when m > 2 (exactly PEFT 0.18+'s terms, so outputs match)."""
    rotation = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).repeat(skew.shape[0], 1, 1)
    if terms > 1:
        rotation = rotation + 2 * skew
    if terms > 2:
        top, power = max(terms - 1, 3), skew
        for k in range(2, top + 1):
            power = power @ skew
            rotation = rotation + (1.0 if k == top else 2.0) * power
    return rotation


@register_method
@dataclass
class OFTConfig(DeltaConfig):
    """OFT settings; field names as in Hugging Face PEFT's OFTConfig."""

    peft_type = "OFT"
    adapter_types = (OFTAdapter,)
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, value,
                    "must be an integer >= 0")
        require((self.r == 0) != (self.oft_block_size == 0), "r", self.r,
                f"give exactly one of r and oft_block_size (oft_block_size={self.oft_block_size}); "
                "r * oft_block_size == in_features")
        require(isinstance(self.module_dropout, (int, float)) and 0 <= self.module_dropout < 1, "module_dropout",
                self.module_dropout, "must be in [0, 1)")
        require(self.bias in BIAS_MODES, "bias", self.bias, f"must be one of {BIAS_MODES} ('oft_only': not yet)")
        require(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "must be true or false")
        require(isinstance(self.eps, (int, float)) and self.eps > 0, "eps", self.eps, "must be > 0")
        self.fan_in_fan_out = no_fan_in_fan_out(self.fan_in_fan_out, "OFT")

    def to_dict(self) -> dict:
        # PEFT reads peft_version to tell the pre-0.18 Neumann series from the current one (ours) and
        # warns "retrain your adapter" when it is missing; this says which series the file uses.
        return {**super().to_dict(), "peft_version": NEUMANN_FORMAT_VERSION}

    def supports(self, base: BaseLayer) -> bool:
        return oft_kind(base) is not None

    def after_optimizer_step(self, model: nn.Module, adapter_name: str, step: int, optimizer=None) -> None:
        """COFT: pull the trained Q back into its eps-ball after each step (the parameter stays inside)."""
        if self.coft and not self.inference_mode:
            for _, layer in model.delta_layers():
                if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters:
                    layer.adapters[adapter_name].project_()

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        validate_rotation_target(base, module_name, "OFT")
        super().validate_target(base, module_name)

    def make_adapter(self, base: BaseLayer, module_name: str, shared: nn.Module | None = None) -> OFTAdapter:
        dim = filter_dim(base)
        given = self.r or self.oft_block_size
        adjusted = nearest_divisor(dim, given)
        if adjusted != given:
            name = "r" if self.r else "oft_block_size"
            warnings.warn(f"{module_name}: {name}={given} does not divide {dim}; using {name}={adjusted}",
                          stacklevel=2)
        r = adjusted if self.r else dim // adjusted
        return OFTAdapter(base, r, dim // r, self)
