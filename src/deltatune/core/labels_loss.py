"""`model(input_ids=..., labels=...)` on a causal LM: Transformers' loss without the (tokens x vocabulary)
logits tensor, and the same `logits` for every caller who reads them.

Transformers computes the loss from full float32 logits (ForCausalLMLoss): for SmolLM2 at batch 4 x 256
that is a 200 MB logits tensor, a 200 MB log-softmax kept for backward and a 200 MB gradient, while most
training loops (Trainer, TRL, a hand-written `model(**batch).loss.backward()`) never read the logits. Here
DeltaModel.forward runs the model with its head passed over (core/linear_loss.py), takes the loss from
the last hidden states in row chunks, and returns the model's own output class whose `logits` are
computed from those hidden states the first time anything reads them (attribute, key, index, `to_tuple`,
`items`/`values`, pickling): the same values, dtype and autograd graph as Transformers' eager `logits`,
computed under the grad and autocast modes of the forward call.

    loss = sum_i CE(W h_i, labels_{i+1}) / (num_items_in_batch or the count of labelled i)

Transformers' ForCausalLMLoss is followed exactly (transformers/loss/loss_utils.py): labels shifted left
by one (or `shift_labels` as given), IGNORE_INDEX (-100, or the `ignore_index` passed) not counted, the
mean over labelled tokens, or the sum over `num_items_in_batch` when the caller passes it (Trainer does).

Taken only where the numbers cannot differ: `labels` given, a model `causal_lm_head` accepts, a frozen
head (a trained head's weights change at optimizer.step(), so its logits could not wait), Transformers'
own ForCausalLMLoss (no custom `loss_function`), the class's own forward (not one patched onto the
instance, as TRL's `add_fused_lm_head` does for its `fused_lm_head=True` calls), `logits_to_keep` 0 or
absent, and no `return_dict=False`. Anything else runs the model's own forward unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .linear_loss import IGNORE_INDEX, causal_lm_head, head_passed_over, linear_cross_entropy


def chunked_labels_head(model: nn.Module, kwargs: dict) -> nn.Linear | None:
    """The frozen output head through which `model(**kwargs)` (a Transformers model) can take its loss in
    chunks, or None when the call must run the model's own loss."""
    if kwargs.get("labels") is None or kwargs.get("return_dict") is False:
        return None
    keep = kwargs.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):  # 0: every position (Transformers' default)
        return None
    # an instance's own forward decides: TRL's add_fused_lm_head (its `fused_lm_head=True` calls), a user's patch
    if "forward" in vars(model):
        return None
    head = causal_lm_head(model)
    if head is None or head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None
    loss_function = getattr(model, "_loss_function", None) or getattr(type(model), "loss_function", None)
    if isinstance(loss_function, property):  # Transformers' default: ForCausalLM unless loss_type says else
        if getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
            return None
    elif getattr(loss_function, "__name__", None) != "ForCausalLMLoss":
        return None
    return head


def forward_with_chunked_loss(model: nn.Module, head: nn.Linear, args: tuple, kwargs: dict):
    """`model(*args, **kwargs)` with the loss taken from the hidden states (module docstring).

    Returns:
        The model's own output class: `loss` a float32 scalar, `logits` (B, T, vocab) on first read.
    Raises:
        RuntimeError: reading `logits` after the head's weight was changed in place (the eager logits
            would have been computed before the change).
    """
    labels = kwargs.pop("labels")
    with head_passed_over(model):
        output = model(*args, **kwargs)
    hidden = output.logits  # (B, T, d): the head's input
    ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)
    targets = kwargs.get("shift_labels")
    if targets is None:
        targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T): token t+1 at t
    targets = targets.reshape(-1).to(hidden.device)
    targets = torch.where(targets == ignore_index, IGNORE_INDEX, targets)
    total = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets)
    count = kwargs.get("num_items_in_batch")
    if count is None:
        count = (targets != IGNORE_INDEX).sum()
    loss = total / (count.to(total.device) if torch.is_tensor(count) else count)
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    lazy = lazy_logits_class(type(output))(loss=loss, logits=hidden.new_empty(0), **fields)
    lazy._pending_logits = _logits_later(head, hidden)
    return lazy


def _logits_later(head: nn.Linear, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
    """head(hidden) as the forward call would have computed it: its grad mode, its autocast mode."""
    grad_enabled, device_type = torch.is_grad_enabled(), hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    autocast_dtype = torch.get_autocast_dtype(device_type)
    version = head.weight._version

    def logits() -> torch.Tensor:
        if head.weight._version != version:
            raise RuntimeError("the output head's weight changed in place after this forward call; read "
                               "`logits` before changing it (they are computed on first read)")
        with torch.set_grad_enabled(grad_enabled), \
                torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast):
            return head(hidden)  # (B, T, vocab)

    return logits


@functools.cache
def lazy_logits_class(output_class: type) -> type:
    """`output_class` (a Transformers ModelOutput dataclass) whose `logits` are computed on first read.
    The `logits` property (a data descriptor, so it wins over the dataclass field) and the dict views all
    materialise them first; the key keeps its place, so `output[1]` is still the logits."""

    class LazyLogitsOutput(output_class):
        _pending_logits = None

        @property
        def logits(self):
            self._materialise()
            return self.__dict__.get("_logits")

        @logits.setter
        def logits(self, value):
            self.__dict__["_logits"] = value

        def _materialise(self) -> None:
            pending = self.__dict__.pop("_pending_logits", None)
            if pending is not None:
                self["logits"] = pending()  # ModelOutput.__setitem__: the key in place, then the attribute

        def items(self):
            self._materialise()
            return super().items()

        def values(self):
            self._materialise()
            return super().values()

        def get(self, key, default=None):
            self._materialise()
            return super().get(key, default)

        def __reduce__(self):  # pickles as the plain output class
            self._materialise()
            return output_class, tuple(getattr(self, f) for f in output_class.__dataclass_fields__)

    LazyLogitsOutput.__name__ = LazyLogitsOutput.__qualname__ = output_class.__name__
    return LazyLogitsOutput
