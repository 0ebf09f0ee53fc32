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

Both variants run a checkpointed block's forward a second time in backward, after the call that set its
per-call state has returned: the routing (adapter per row, task ids, disabled), a model-level adapter's
hooks (LLaMA-Adapter) or gate weights (X-LoRA). Given `capture`, every checkpointing module's checkpoint
function is wrapped for the call so that the recompute replays the state captured when the block ran;
tensors in that state that need a gradient (X-LoRA's gates) go in as explicit inputs of the checkpoint,
so the reentrant variant hands their gradient back to the graph outside the block.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

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


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that will checkpoint in a training forward. Reads the flags Transformers sets
    (`gradient_checkpointing`, `_gradient_checkpointing_func`) from each module's own attributes: about
    2 ms per training forward for a model of 1,600 modules (SmolLM2's)."""
    return [module for module in model.modules()
            if module.__dict__.get("gradient_checkpointing") is True and module.training]


def reentrant_blocks(model: nn.Module, checkpointing: list[nn.Module] | None = None) -> list[nn.Module]:
    """Of `checkpointing` (default: checkpointing_modules(model)), those that checkpoint reentrantly and
    hold a trainable parameter."""
    modules = checkpointing_modules(model) if checkpointing is None else checkpointing
    return [module for module in modules if is_reentrant(module.__dict__.get("_gradient_checkpointing_func"))
            and any(p.requires_grad for p in module.parameters())]


# capture() -> (tensors, replay): the per-call state at the moment a block runs; `replay(tensors)` is a
# context manager that puts it back, with `tensors` standing for the captured ones (the checkpoint's copies).
Capture = Callable[[], tuple[tuple[torch.Tensor, ...],
                             Callable[[tuple[torch.Tensor, ...]], contextlib.AbstractContextManager]]]


def replaying_checkpoint(checkpoint_function, capture: Capture):
    """`checkpoint_function` (a module's `_gradient_checkpointing_func(function, *args, **kwargs)`) whose
    recompute in backward runs under the per-call state captured when the block ran. The forward itself
    runs as it is, inside its own call; the captured tensors ride along as extra inputs of the checkpoint."""

    def run(function, *args, **kwargs):
        tensors, replay = capture()
        count, live = len(args), [True]

        def block(*inputs, **block_kwargs):
            if live[0]:  # the forward, inside the call that set the state
                return function(*inputs[:count], **block_kwargs)
            with replay(inputs[count:]):  # the recompute, in backward
                return function(*inputs[:count], **block_kwargs)

        try:
            return checkpoint_function(block, *args, *tensors, **kwargs)
        finally:
            live[0] = False

    return run


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
def gradients_through_checkpoints(model: nn.Module, capture: Capture | None = None):
    """Around one forward of `model` (the user's model inside a DeltaModel): if a reentrant checkpoint
    would cut its adapters off, make the input embeddings' output require grad for this call; with
    `capture`, every checkpointed block's recompute replays the per-call state it ran with.

    Raises:
        DeltaConfigError: reentrant checkpointing is on around trainable parameters and the model has no
            input embeddings to hook.
    """
    active = model.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    checkpointing = checkpointing_modules(model) if active else []  # inference and eval forwards pay nothing
    if not checkpointing:
        yield
        return
    blocks = reentrant_blocks(model, checkpointing)
    embeddings = input_embeddings(model) if blocks else []
    if blocks and not embeddings:
        names = [name for name, module in model.named_modules() if any(module is b for b in blocks)]
        raise DeltaConfigError(
            f"gradient checkpointing with use_reentrant=True is on in {names[:3]} of "
            f"{type(model).__name__}, "
            "which has no input embeddings (get_input_embeddings) to make require grad, so the adapters "
            "inside those blocks would get no gradient; enable it with "
            "gradient_checkpointing_kwargs={'use_reentrant': False}")
    handles = [embedding.register_forward_hook(_output_requires_grad) for embedding in embeddings]
    wrapped = [m for m in checkpointing if "_gradient_checkpointing_func" in m.__dict__] if capture else []
    originals = [m.__dict__["_gradient_checkpointing_func"] for m in wrapped]
    for module, original in zip(wrapped, originals):
        module._gradient_checkpointing_func = replaying_checkpoint(original, capture)
    try:
        yield
    finally:
        for module, original in zip(wrapped, originals):
            module._gradient_checkpointing_func = original
        for handle in handles:
            handle.remove()
