"""Reusable gradient checks for tests: every trainable parameter gets a real gradient on the first backward.

`assert_every_trainable_param_gets_grad(model, batch)` runs one forward/backward and fails naming each
trainable parameter whose gradient is None (cut from the graph, e.g. by reentrant gradient
checkpointing), all zero, or not finite. Zero-initialised partners (lora_B = 0 makes lora_A's gradient
zero) are a real zero: call `randomize_trainable(model)` first when the method starts that way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def randomize_trainable(model: nn.Module, seed: int = 5, scale: float = 0.2) -> None:
    """Add seeded noise to every trainable parameter (so no zero-initialised factor hides a gradient)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(noise.to(param.device, param.dtype) * scale)


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """`model(**batch).loss` when the model returns one, else the sum of squares of its main output
    (`logits`, `last_hidden_state` or the tensor itself), so every output element reaches the loss."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    if not isinstance(out, torch.Tensor):
        out = next(getattr(out, key) for key in ("logits", "last_hidden_state", "sample")
                   if getattr(out, key, None) is not None)
    return out.float().pow(2).mean()


def assert_every_trainable_param_gets_grad(model: nn.Module, batch,
                                           loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None
                                           ) -> dict[str, torch.Tensor]:
    """One forward + backward of `batch` (a dict of keyword inputs or one tensor); every parameter with
    requires_grad must get a gradient that is not None, not all zero and finite.

    Args:
        model: a DeltaModel or any nn.Module; put it in train() mode first if checkpointing should act.
        batch: keyword inputs (dict) or a single positional tensor.
        loss_fn: `loss_fn(model, batch) -> scalar`; default `default_loss`.
    Returns:
        {parameter name: gradient} for the trainable parameters (for further checks).
    Raises:
        AssertionError naming the parameters at fault, or when nothing is trainable.
    """
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert trainable, f"{type(model).__name__} has no trainable parameters"
    for param in trainable.values():
        param.grad = None
    loss = (loss_fn or default_loss)(model, batch)
    assert loss.requires_grad, (
        f"the loss does not require grad: no trainable parameter reaches it ({len(trainable)} trainable)")
    loss.backward()
    missing = [n for n, p in trainable.items() if p.grad is None]
    zero = [n for n, p in trainable.items() if p.grad is not None and not p.grad.abs().sum() > 0]
    bad = [n for n, p in trainable.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not (missing or zero or bad), (
        f"of {len(trainable)} trainable parameters: no gradient: {missing}; all-zero gradient: {zero}; "
        f"non-finite gradient: {bad}")
    return {name: param.grad for name, param in trainable.items()}
