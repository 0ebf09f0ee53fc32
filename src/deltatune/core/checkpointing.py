"""Gradient checkpointing that still trains the adapters inside the checkpointed blocks.

torch's reentrant checkpoint (`use_reentrant=True`) back-propagates into a checkpointed block only
through the block's tensor *inputs*; the parameters inside it do not count. With a frozen base nothing
before the first block requires grad, so every adapter inside a block silently gets no gradient (and with
no trained module outside the blocks, backward fails with torch's bare "element 0 of tensors does not
require grad"). Transformers works around it only for models whose main input is `input_ids`
(`enable_input_require_grads`); vision models such as ViT are left out, in peft too.

`gradients_through_checkpoints(model)` wraps one training forward: when some module will checkpoint
reentrantly and holds a trainable parameter, the input embeddings' output is made to require grad for
that call (the same hook as Transformers'), which reconnects the graph whether checkpointing was turned
on before or after wrapping. The non-reentrant variant needs nothing. Without input embeddings to hook,
the call stops with an error that names the blocks and the fix.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .config import DeltaConfigError


def is_reentrant(checkpoint_function) -> bool:
    """Whether a module's `_gradient_checkpointing_func` runs torch's reentrant variant. torch defaults to
    it when `use_reentrant` is not given; a function we cannot see into counts as reentrant (the cure is
    harmless when it is not)."""
    while isinstance(checkpoint_function, functools.partial):
        if "use_reentrant" in checkpoint_function.keywords:
            return checkpoint_function.keywords["use_reentrant"] is not False
        checkpoint_function = checkpoint_function.func
    return True


def reentrant_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that will checkpoint reentrantly in a training forward and hold a trainable parameter.
    Reads the flags Transformers sets (`gradient_checkpointing`, `_gradient_checkpointing_func`) from each
    module's own attributes: about 2 ms per training forward for a model of 1,600 modules (SmolLM2's)."""
    found = []
    for module in model.modules():
        state = module.__dict__
        if state.get("gradient_checkpointing") is True and module.training \
                and is_reentrant(state.get("_gradient_checkpointing_func")) \
                and any(p.requires_grad for p in module.parameters()):
            found.append(module)
    return found


def input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input-embedding modules of `model` and of the Transformers models inside it, once each."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embedding, nn.Module):
            found.setdefault(id(embedding), embedding)
    return list(found.values())


def _output_requires_grad(module: nn.Module, inputs, output):
    # A frozen embedding's output is a leaf; marking it lets reentrant checkpoints reach the blocks' adapters.
    if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


@contextlib.contextmanager
def gradients_through_checkpoints(model: nn.Module):
    """Around one forward of `model` (the user's model inside a DeltaModel): if a reentrant checkpoint
    would cut its adapters off, make the input embeddings' output require grad for this call.

    Raises:
        DeltaConfigError: reentrant checkpointing is on around trainable parameters and the model has no
            input embeddings to hook.
    """
    active = model.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    blocks = reentrant_blocks(model) if active else []  # inference and eval forwards pay nothing
    if not blocks:
        yield
        return
    embeddings = input_embeddings(model)
    if not embeddings:
        names = [name for name, module in model.named_modules() if any(module is b for b in blocks)]
        raise DeltaConfigError(
            f"gradient checkpointing with use_reentrant=True is on in {names[:3]} of "
            f"{type(model).__name__}, "
            "which has no input embeddings (get_input_embeddings) to make require grad, so the adapters "
            "inside those blocks would get no gradient; enable it with "
            "gradient_checkpointing_kwargs={'use_reentrant': False}")
    handles = [embedding.register_forward_hook(_output_requires_grad) for embedding in embeddings]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
