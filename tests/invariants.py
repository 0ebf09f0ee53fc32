"""Invariants any adapted model must keep, computed independently of the `peft` package (DESIGN.md section 8).

- `assert_generate_matches_stepwise`: greedy `generate` gives the tokens (and the per-step logits) of
  greedy decoding by repeated *full* forward passes on the growing sequence, no cache involved. A method
  that hooks generation (soft prompts, prefixes, X-LoRA ...) must agree with its own forward.
- `assert_padding_invariant`: a row's outputs do not depend on the padding of its batch: the row alone
  equals the row padded (left by default) inside a batch with a longer row.

Positions come from the attention mask, as `generate` numbers them (cumsum of the mask - 1, pads at 0), for
every decoder-only model whose forward takes `position_ids`. Both work on any model with an HF-style
`forward`/`generate` (a DeltaModel, a `peft` model, a plain Transformers model).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

ATOL = 1e-4  # float32 logits: a cached step and a full pass differ by ~1e-6


def base_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(base_of(model).config, "is_encoder_decoder", False))


def takes_position_ids(model: nn.Module) -> bool:
    """Decoder-only models whose forward takes position_ids (as generate gives them)."""
    base = base_of(model)
    return not is_encoder_decoder(model) and "position_ids" in inspect.signature(base.forward).parameters


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) attention mask -> (B, L) position ids, as Transformers' generate makes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def logits_of(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def end_ids(model: nn.Module) -> list[int]:
    eos = base_of(model).generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def greedy_stepwise(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    max_new_tokens: int, pad_token_id: int = 0,
                    **forward_kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding by a full forward pass on the whole sequence at every step (no cache).

    Returns what greedy `generate` returns (decoder-only: prompt + new tokens; encoder-decoder: the decoder
    sequence from decoder_start_token_id) and each step's last-position logits (B, V). Rows that produced
    an end token continue with `pad_token_id`, and decoding stops when every row has ended, as in generate.
    """
    batch = input_ids.shape[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    encoder_decoder = is_encoder_decoder(model)
    if encoder_decoder:
        start = base_of(model).config.decoder_start_token_id
        sequence = torch.full((batch, 1), start, dtype=input_ids.dtype, device=input_ids.device)
    else:
        sequence = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    ends = torch.tensor(end_ids(model), dtype=input_ids.dtype, device=input_ids.device)
    step_logits = []
    for _ in range(max_new_tokens):
        if encoder_decoder:
            out = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=sequence, use_cache=False,
                        **forward_kwargs)
        else:
            extra = {"position_ids": positions_from_mask(mask)} if takes_position_ids(model) else {}
            out = model(input_ids=sequence, attention_mask=mask, use_cache=False, **extra, **forward_kwargs)
        logits = logits_of(out)[:, -1, :].float()  # (B, V)
        step_logits.append(logits)
        token = logits.argmax(-1).masked_fill(finished, pad_token_id)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        if not encoder_decoder:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        finished |= torch.isin(token, ends)
        if finished.all():
            break
    return sequence, step_logits


@torch.no_grad()
def assert_generate_matches_stepwise(model: nn.Module, input_ids: torch.Tensor,
                                     attention_mask: torch.Tensor | None, max_new_tokens: int,
                                     **forward_kwargs) -> float:
    """Greedy `model.generate` == `greedy_stepwise`: the same tokens, and every step's logits within ATOL.

    `forward_kwargs` go to both (e.g. adapter_names); `use_cache` and `pad_token_id` go to generate only.
    Returns the largest logit difference over the steps.
    """
    pad = forward_kwargs.pop("pad_token_id", 0)
    use_cache = forward_kwargs.pop("use_cache", True)  # for generate only: the reference never caches
    expected, expected_logits = greedy_stepwise(model, input_ids, attention_mask, max_new_tokens, pad,
                                                **forward_kwargs)
    mask = {} if attention_mask is None else {"attention_mask": attention_mask}
    out = model.generate(input_ids=input_ids, **mask, max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
                         use_cache=use_cache, **forward_kwargs)
    got = out.sequences
    assert got.tolist() == expected.tolist(), \
        f"greedy generate {got.tolist()} != stepwise greedy forward {expected.tolist()}"
    assert len(out.logits) == len(expected_logits)
    worst = max(((a.float() - b).abs().max().item() for a, b in zip(out.logits, expected_logits)),
                default=0.0)
    assert worst <= ATOL, f"generate's step logits differ from the full forward's by {worst:.3g}"
    return worst


def padded_batch(ids: torch.Tensor, pad_id: int, pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row `ids` (L,) padded by `pad` tokens on `side`, in a batch of 2 whose other row is `pad` longer
    (no padding). Returns ids (2, L + pad) and mask (2, L + pad); row 0 is the padded one."""
    length = ids.shape[0]
    generator = torch.Generator().manual_seed(123)
    vocab_top = int(ids.max()) + 1
    other = torch.randint(1, max(vocab_top, 2), (length + pad,), generator=generator).to(ids)
    other = other.masked_fill(other == pad_id, pad_id + 1)
    fill = ids.new_full((pad,), pad_id)
    row = torch.cat([fill, ids]) if side == "left" else torch.cat([ids, fill])
    mask = torch.ones(2, length + pad, dtype=torch.long, device=ids.device)
    if side == "left":
        mask[0, :pad] = 0
    else:
        mask[0, length:] = 0
    return torch.stack([row, other]), mask


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, forward_kwargs: dict) -> torch.Tensor:
    kwargs = {k: (v.expand(ids.shape[0], *v.shape[1:]) if torch.is_tensor(v) else v)
              for k, v in forward_kwargs.items()}
    if takes_position_ids(model):
        kwargs["position_ids"] = positions_from_mask(mask)
    return logits_of(model(input_ids=ids, attention_mask=mask, **kwargs)).float()


@torch.no_grad()
def assert_padding_invariant(model: nn.Module, ids, pad_id: int, pad: int = 2, side: str = "left",
                             max_new_tokens: int = 3, atol: float = ATOL, **forward_kwargs) -> float:
    """Row `ids` alone == the same row padded in a batch: forward outputs at the row's own positions and,
    for a model that generates, greedy generation (tokens and every step's logits).

    Args:
        ids: the row's token ids, (L,) or (1, L), no padding.
        pad_id: the padding token id.
        pad: how many padding tokens; side: "left" (decoders, generation) or "right" (encoders).
        forward_kwargs: extra inputs with batch dimension 1 (e.g. decoder_input_ids), broadcast to the batch.
    Returns the largest difference found.
    """
    ids = torch.as_tensor(ids).reshape(-1)
    alone_mask = torch.ones(1, ids.shape[0], dtype=torch.long, device=ids.device)
    alone = _forward(model, ids[None], alone_mask, forward_kwargs)
    batch_ids, batch_mask = padded_batch(ids, pad_id, pad, side)
    padded = _forward(model, batch_ids, batch_mask, forward_kwargs)[:1]
    if alone.dim() == 3 and not is_encoder_decoder(model):  # per-token outputs: the row's own positions
        span = alone.shape[1]
        padded = padded[:, -span:] if side == "left" else padded[:, :span]
    worst = (alone - padded).abs().max().item()
    assert worst <= atol, f"padding changes the row's forward outputs by {worst:.3g}"
    if max_new_tokens and getattr(base_of(model), "can_generate", lambda: False)():
        settings = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                        output_logits=True, return_dict_in_generate=True, **forward_kwargs)
        settings.pop("decoder_input_ids", None)
        one = model.generate(input_ids=ids[None], attention_mask=alone_mask, **settings)
        two = model.generate(input_ids=batch_ids, attention_mask=batch_mask, **settings)
        new_one = one.sequences[0, -len(one.logits):]
        new_two = two.sequences[0, -len(two.logits):][: len(new_one)]
        assert new_one.tolist() == new_two.tolist()[: len(new_one)], \
            f"padding changes the generated tokens: {new_one.tolist()} vs {new_two.tolist()}"
        for a, b in zip(one.logits, two.logits):
            worst = max(worst, (a[0].float() - b[0].float()).abs().max().item())
        assert worst <= atol, f"padding changes the row's generation scores by {worst:.3g}"
    return worst
