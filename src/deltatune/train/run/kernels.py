"""`training.kernels`: Liger Kernel (github.com/linkedin/Liger-Kernel, the `kernels` extra) on CUDA.

Liger's Triton kernels replace, for training on a GPU: the loss (its fused linear cross-entropy computes
what train/linear_loss.py computes, chunk by chunk, without a (tokens x vocabulary) logits tensor), and in
the Transformers model RMSNorm, the SwiGLU activation and RoPE (its own patch of the model instance; the
MLP forward still calls the wrapped gate/up/down projections, so the adapters run unchanged). deltatune's
own kernels stay in the adapter branch (methods/lora_triton.py).

    auto   (default) Liger when it is installed and the run is on CUDA, else our own path
    liger  Liger; a clear error before the model loads when it is not installed or there is no GPU
    none   our own path everywhere

Same loss and gradients either way, to float rounding (tests/test_kernels.py).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ...core.config import DeltaConfigError

KERNELS = ("auto", "liger", "none")
IGNORE = -100  # data/tokenize.IGNORE: unlabelled positions


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def resolve_kernels(option: str, device: torch.device | str) -> str:
    """"liger" or "none" for `training.kernels` = `option` on `device`.

    Raises:
        DeltaConfigError: "liger" without liger-kernel installed, or not on CUDA."""
    on_cuda = torch.device(device).type == "cuda"
    if option == "liger" and not liger_installed():
        raise DeltaConfigError("training.kernels: 'liger' needs the kernels extra: pip install 'deltatune[kernels]'")
    if option == "liger" and not on_cuda:
        raise DeltaConfigError(f"training.kernels: 'liger' runs on CUDA only, this run is on {device}; "
                               "use 'auto' or 'none'")
    return "liger" if option == "liger" or (option == "auto" and on_cuda and liger_installed()) else "none"


def apply_liger(model: nn.Module) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE in the Transformers model `model` (not a DeltaModel: its base), in
    place; the loss is linear_loss.py's business (`liger_linear_cross_entropy`). A model type Liger does not
    know is left as it is (Liger logs it)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of hidden (N, d) @ weight.T (+ bias) against targets (N,), IGNORE rows left out:
    linear_loss.linear_cross_entropy through Liger's fused kernel."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(weight, hidden, targets, bias)
    return loss.float()
