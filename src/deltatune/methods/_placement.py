"""Where virtual tokens go, written once for prompt tuning, P-tuning and prefix tuning: into the input
embeddings (`prompt_forward`, `prompt_generate`) or the KV cache (prefix.py), with the attention mask,
position ids, labels and token types extended to match, in `forward` and at every `generate` step.

Two rules hold the outputs to the invariants (tests/invariants.py):
- A row's result does not depend on its batch's padding. Input-level virtual tokens go right after a
  row's leading (left) padding, so a left-padded row reads [pads, P, x]: the padded form of [P, x]. Given
  position ids stay the row's own: the virtual tokens take the first token's position onwards, the row's
  tokens move on by T. Without padding (or with right padding) the tokens simply go first, as in `peft`.
- Greedy `generate` equals greedy decoding by full forward passes. A generation step is recognised by
  what it feeds the model (the whole sequence, or only new tokens after a cache), not by the keyword the
  installed Transformers uses for the cache (`past_key_values` before 5.2x, `cache` since).

Shapes: B batch, L input length, T virtual tokens, D token_dim.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfigError, TaskType

IGNORE_INDEX = -100  # label value the loss skips: the virtual tokens have no target
# The order `forward` takes positional arguments in, for the models these methods serve.
POSITIONAL = ("input_ids", "attention_mask")
# The keyword a Transformers forward takes its KV cache under, newest first (5.2x renamed past_key_values).
CACHE_KEYWORDS = ("cache", "past_key_values")


def input_embeddings(model: nn.Module) -> nn.Module:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise DeltaConfigError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()); "
                               "soft prompts need a model that takes inputs_embeds")
    return embed


def bind_arguments(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional `forward` arguments -> keywords (input_ids, attention_mask), so they can be extended."""
    if len(args) > len(POSITIONAL):
        raise TypeError(f"soft-prompt forward takes at most {len(POSITIONAL)} positional arguments "
                        f"({', '.join(POSITIONAL)}); pass the others by keyword")
    for name, value in zip(POSITIONAL, args):
        if name in kwargs:
            raise TypeError(f"forward got {name} both by position and by keyword")
        kwargs[name] = value
    return kwargs


def positions_from_mask(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Give a left-padded batch without `position_ids` the positions its attention mask implies, as
    generate() does (cumsum - 1), so methods whose keys carry no position (prefixes, adaption prompts)
    see each row at the positions it has alone. Other batches keep the model's own (the same numbers)."""
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None or mask is None or mask.dim() != 2 or bool(mask[:, 0].all()):
        return
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)


def batch_size(kwargs: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name].shape[0]
    raise ValueError("give input_ids or inputs_embeds")


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword `model` (or its backbone, for task heads that pass **kwargs on) takes a KV cache under."""
    for module in (model, getattr(model, "base_model", None)):
        params = inspect.signature(module.forward).parameters if module is not None else {}
        for name in CACHE_KEYWORDS:
            if name in params:
                return name
    return None


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed under any of its names (None if none)."""
    return next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)


def check_mask(mask: torch.Tensor | None) -> None:
    if mask is not None and mask.dim() != 2:
        raise ValueError("soft prompts need a 2-D (batch, length) attention mask, got shape "
                         f"{tuple(mask.shape)}")


def prefix_ones(mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """(B, L) mask -> (B, T + L): T always-attended positions in front (the prefix's cached keys)."""
    check_mask(mask)
    return None if mask is None else torch.cat([mask.new_ones(mask.shape[0], num_tokens), mask], dim=1)


def leading_pads(mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) the number of padding positions that open each row (0 without a mask)."""
    check_mask(mask)
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return (mask.cumsum(1) == 0).sum(1)


def insert_at(x: torch.Tensor, block: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) with block (B, T, ...) put before column at[b] of each row -> (B, T + L, ...)."""
    batch, length, tokens = x.shape[0], x.shape[1], block.shape[1]
    column = torch.arange(length + tokens, device=x.device).expand(batch, -1)  # (B, T + L)
    start = at.to(x.device)[:, None]
    source = torch.where(column < start, column, column - tokens)  # column of x
    in_block = (column >= start) & (column < start + tokens)
    source = torch.where(in_block, length + column - start, source)  # column of cat([x, block])
    index = source.view(batch, length + tokens, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.cat([x, block.to(x.dtype)], dim=1).gather(1, index)


def extend_positions(positions: torch.Tensor, at: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, L) position ids -> (B, T + L): the virtual tokens take the positions from the row's first token
    on, and the row's own tokens move on by T."""
    if positions.dim() != 2:
        raise ValueError("soft prompts need 2-D (batch, length) position_ids, got shape "
                         f"{tuple(positions.shape)}")
    length = positions.shape[1]
    column = torch.arange(length, device=positions.device)[None]  # (1, L)
    restarts = (positions[:, 1:] <= positions[:, :-1]) & (column[:, 1:] > at[:, None])  # (B, L - 1)
    if restarts.any():
        warnings.warn("position_ids restart inside a row (packed examples): the virtual tokens go before the "
                      "row's first example only, so the others do not see them", stacklevel=4)
    after = column >= at[:, None]  # (B, L)
    first = positions.gather(1, at.clamp(max=length - 1)[:, None])  # (B, 1)
    block = first + torch.arange(tokens, device=positions.device)  # (B, T)
    return insert_at(positions + tokens * after, block, at)


def place_prompts(task_type: TaskType | None, model: nn.Module, prompts: torch.Tensor,
                  kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model inputs with `prompts` (T, D) after each row's leading padding: embeddings, mask, position ids,
    token types and (causal LM) labels extended to T + L."""
    batch, tokens = batch_size(kwargs), prompts.shape[0]
    embeds = kwargs.pop("inputs_embeds", None)
    input_ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = input_embeddings(model)(input_ids)  # (B, L, D)
    mask = kwargs.get("attention_mask")
    at = leading_pads(mask, batch, embeds.device)  # (B,)
    kwargs["inputs_embeds"] = insert_at(embeds, prompts.to(embeds.dtype).expand(batch, -1, -1), at)
    if mask is not None:
        kwargs["attention_mask"] = insert_at(mask, mask.new_ones(batch, tokens), at)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = extend_positions(kwargs["position_ids"], at, tokens)
    if kwargs.get("token_type_ids") is not None:
        if task_type == TaskType.CAUSAL_LM:
            warnings.warn("token_type_ids are ignored with soft prompts on a causal LM", stacklevel=4)
            kwargs["token_type_ids"] = None
        else:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = insert_at(types, types.new_zeros(batch, tokens), at)
    if task_type == TaskType.CAUSAL_LM and kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = insert_at(labels, labels.new_full((batch, tokens), IGNORE_INDEX), at)
    return kwargs


def prompt_forward(task_type: TaskType, model: nn.Module, prompts: torch.Tensor, args: tuple,
                   kwargs: dict[str, Any]):
    """Call `model` with the virtual tokens `prompts` (T, D) in front of every row's tokens."""
    return model(**place_prompts(task_type, model, prompts, bind_arguments(args, dict(kwargs))))


@contextlib.contextmanager
def patched_prepare(model: nn.Module, wrap: Callable[[dict[str, Any], bool], dict[str, Any]]):
    """Within the block, `model.generate` passes each step's model inputs through `wrap(step, whole)`
    (the one hook Transformers gives for changing what a generation step feeds the model). `whole`: the
    step feeds the whole sequence so far (the first step, or every step without a cache); otherwise it
    feeds only new tokens and continues from the cache."""
    own = model.__dict__.get("prepare_inputs_for_generation")
    original = model.prepare_inputs_for_generation

    def prepare(*args, **kwargs):
        sequence = args[0] if args else kwargs["input_ids"]
        step = original(*args, **kwargs)
        fed = step.get("input_ids") if step.get("input_ids") is not None else step.get("inputs_embeds")
        return wrap(step, fed.shape[1] == sequence.shape[1])

    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if own is None:
            del model.prepare_inputs_for_generation
        else:
            model.prepare_inputs_for_generation = own


def prompt_generate(model: nn.Module, prompts: torch.Tensor, args: tuple, kwargs: dict[str, Any]):
    """`model.generate` with the virtual tokens in front of each row's tokens. Encoder-decoder: the
    encoder input gets them. Decoder-only: every pass over the whole sequence gets them; a step that
    continues from the cache (which holds them) gets T mask ones and positions moved on by T."""
    kwargs = bind_arguments(args, dict(kwargs))
    tokens = prompts.shape[0]
    if getattr(model.config, "is_encoder_decoder", False):
        if kwargs.get("input_ids") is None:
            raise ValueError("generate with soft prompts needs input_ids")
        return model.generate(**place_prompts(None, model, prompts, kwargs))
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("generate with soft prompts takes input_ids, not inputs_embeds")

    def wrap(step: dict[str, Any], whole: bool) -> dict[str, Any]:
        if whole:
            return place_prompts(TaskType.CAUSAL_LM, model, prompts, step)
        mask = step.get("attention_mask")
        if mask is not None:
            at = leading_pads(mask, mask.shape[0], mask.device)
            step["attention_mask"] = insert_at(mask, mask.new_ones(mask.shape[0], tokens), at)
        if step.get("position_ids") is not None:
            step["position_ids"] = step["position_ids"] + tokens
        return step

    with patched_prepare(model, wrap):
        return model.generate(**kwargs)
