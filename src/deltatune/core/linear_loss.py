"""Next-token cross-entropy straight from the last hidden states, without the full logits tensor.

A causal LM's loss normally materialises logits (tokens x vocabulary: 4 x 256 x 49152 floats is 200 MB
for SmolLM2), keeps a log-softmax of the same size for backward and builds a gradient of the same size
again. Here the output head runs over `CHUNK_ELEMENTS`-sized row chunks; each chunk's loss and its
gradient with respect to the hidden states (and to the head, when it trains) are computed together in
the forward pass, so only one chunk of logits is ever alive and backward is a multiplication.

    loss = sum over labelled rows i of logsumexp(z_i) - z_i[t_i],   z_i = W h_i (+ b)
    dloss/dh_i = (softmax(z_i) - onehot(t_i)) W,   dloss/dW = sum_i (softmax(z_i) - onehot(t_i))^T h_i

`causal_lm_head(model)` says whether a Transformers model can take this path: a ...ForCausalLM /
...LMHeadModel whose output head is a plain, unadapted nn.Linear, with no logit scaling or soft-capping
in its config. Anything else keeps the plain logits path, which gives the same numbers.

`head_passed_over(model)` runs the model's own forward with the head passed over (its `logits` are the
last hidden states), so callers (train/evaluate.token_loss_sum, core/labels_loss.py) take the loss here
and no (tokens x vocabulary) tensor is made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

CHUNK_ELEMENTS = 2**23  # logits per chunk: 8M floats, 32 MB in float32
IGNORE_INDEX = -100  # Transformers' ignore_index: unlabelled positions
CAUSAL_LM_CLASSES = ("ForCausalLM", "LMHeadModel")  # Transformers' names for decoder-only LMs
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping")


def causal_lm_head(model: nn.Module) -> nn.Linear | None:
    """The output head of the Transformers model `model` whose logits `linear_cross_entropy` computes in
    chunks, or None when the model keeps the plain logits path."""
    config = getattr(model, "config", None)
    if not type(model).__name__.endswith(CAUSAL_LM_CLASSES) or getattr(config, "is_encoder_decoder", False):
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    return head


class _PassHidden(nn.Module):
    """Stands in for the output head for one forward: hands back the hidden states it is given."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextmanager
def head_passed_over(model: nn.Module) -> Iterator[None]:
    """Within the block, the Transformers model's `logits` are the last hidden states (B, T, d), the
    head's input."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(_PassHidden())
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` (rows (N, d)) against `targets` (N,); rows
    labelled IGNORE_INDEX do not count. The same value as F.cross_entropy(..., reduction="sum") on float32
    logits; differentiable with respect to hidden, weight and bias."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wants_grad:
        return _chunks(hidden, weight, bias, targets, grads=False)[0]
    return LinearCrossEntropy.apply(hidden, weight, bias, targets)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        loss, grad_hidden, grad_weight, grad_bias = _chunks(
            hidden, weight, bias, targets, grads=True, head_grads=weight.requires_grad)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*scaled, None)


def _chunks(hidden, weight, bias, targets, grads: bool, head_grads: bool = False):
    """Loss (float32 scalar) and, with `grads`, its gradients, one chunk of rows at a time."""
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    loss = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if grads else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if head_grads else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if head_grads and bias is not None else None
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        logits = (h @ weight.t()).float()
        if bias is not None:
            logits += bias.float()
        valid = t != IGNORE_INDEX
        picked = t.clamp(min=0)
        lse = torch.logsumexp(logits, dim=-1)
        chosen = logits.gather(1, picked[:, None]).squeeze(1)
        loss = loss + torch.where(valid, lse - chosen, 0).sum()
        if not grads:
            continue
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        probs[torch.arange(len(t), device=t.device), picked] -= 1
        probs.mul_(valid[:, None])
        grad_hidden[start:start + rows] = probs.to(h.dtype) @ weight.to(h.dtype)
        if grad_weight is not None:
            grad_weight += probs.t() @ h.float()
        if grad_bias is not None:
            grad_bias += probs.sum(0)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
    return loss, grad_hidden, grad_weight, grad_bias
