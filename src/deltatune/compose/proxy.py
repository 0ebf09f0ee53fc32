"""Proxy-tuning: Tuning Language Models by Proxy (Liu et al. 2024, arXiv:2401.08565).

A large base model M is steered at decoding time by a small tuned "expert" M+ and its untuned
"anti-expert" M- (the same small model before tuning). At every step, over the shared vocabulary:

    logits = s_M(x) + alpha * (s_M+(x) - s_M-(x))        (alpha = 1 in the paper)

then the usual decoding (greedy, sampling, beams) runs on these logits. Here the arithmetic is a
Transformers `LogitsProcessor`, so the base model's own `generate` does the decoding:

    out = proxy_generate(base, expert, anti_expert, input_ids, attention_mask=mask, max_new_tokens=20)

The small models keep their own key/value caches between steps (re-run from scratch when the sequences
are not the previous ones plus new tokens, e.g. after beam reordering). The three models must share a
tokenizer: a vocabulary or logit-width mismatch is an error. Processors that Transformers adds itself
(repetition penalty, bad words) act on the base logits before this one; temperature, top-k and top-p
act after it, on the combined logits.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from ..errors import VocabularyMismatchError  # noqa: F401  (re-exported)

SHARED = "proxy-tuning needs one shared vocabulary"


def check_same_vocabulary(base_tokenizer, expert_tokenizer, anti_expert_tokenizer=None) -> None:
    """Raise VocabularyMismatchError unless the tokenizers map the same strings to the same ids."""
    reference = base_tokenizer.get_vocab()
    for role, tokenizer in (("expert", expert_tokenizer), ("anti-expert", anti_expert_tokenizer)):
        if tokenizer is None:
            continue
        vocab = tokenizer.get_vocab()
        if vocab != reference:
            differ = sorted(t for t in set(vocab) ^ set(reference))[:5] or \
                sorted(t for t in vocab if vocab[t] != reference[t])[:5]
            raise VocabularyMismatchError(
                f"the {role} tokenizer ({len(vocab)} tokens) differs from the base tokenizer "
                f"({len(reference)} tokens), e.g. at {differ}; proxy-tuning needs one shared vocabulary")


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


class ProxyTuningLogitsProcessor(LogitsProcessor):
    """Adds alpha * (expert - anti-expert) next-token logits to the base model's.

    Args:
        expert: the small tuned model (any module returning `.logits`, a DeltaModel included).
        anti_expert: the small untuned model.
        alpha: the strength of the steering (1 in the paper).
        attention_mask: the prompt's attention mask (batch, prompt_len), for left-padded batches.
    """

    def __init__(self, expert: nn.Module, anti_expert: nn.Module, alpha: float = 1.0,
                 attention_mask: torch.Tensor | None = None) -> None:
        sizes = {"expert": _vocab_size(expert), "anti-expert": _vocab_size(anti_expert)}
        if None not in sizes.values() and len(set(sizes.values())) > 1:
            raise VocabularyMismatchError(f"vocabulary sizes differ: {sizes}; {SHARED}")
        self.models = {"expert": expert, "anti-expert": anti_expert}
        self.alpha = float(alpha)
        self.prompt_mask = attention_mask
        self._state: dict[str, tuple[torch.Tensor, object] | None] = {"expert": None, "anti-expert": None}

    def reset(self) -> None:
        """Forget the cached sequences (done automatically when a new prompt starts)."""
        self._state = {role: None for role in self._state}

    def _mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if self.prompt_mask is None:
            return torch.ones_like(input_ids)
        prompt = self.prompt_mask.to(input_ids.device)
        if prompt.shape[0] != batch:  # generate() repeats prompts for beams / num_return_sequences
            prompt = prompt.repeat_interleave(batch // prompt.shape[0], dim=0)
        return torch.cat([prompt, prompt.new_ones(batch, length - prompt.shape[1])], dim=1)

    @torch.no_grad()
    def _next_logits(self, role: str, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model = self.models[role]
        device = next(model.parameters()).device
        state = self._state[role]
        start = 0
        if state is not None:
            seen, _ = state
            if seen.shape[0] == input_ids.shape[0] and seen.shape[1] < input_ids.shape[1] \
                    and torch.equal(seen, input_ids[:, : seen.shape[1]]):
                start = seen.shape[1]
        past = state[1] if start else None
        kwargs = {"attention_mask": mask.to(device), "use_cache": True}
        if past is not None:
            kwargs["past_key_values"] = past
        if "position_ids" in inspect.signature(getattr(model, "model", model).forward).parameters:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
            kwargs["position_ids"] = positions[:, start:].to(device)
        out = model(input_ids=input_ids[:, start:].to(device), **kwargs)
        self._state[role] = (input_ids.clone(), getattr(out, "past_key_values", None))
        if getattr(out, "past_key_values", None) is None:
            self._state[role] = None  # no cache: run on the whole sequence next time
        return out.logits[:, -1, :]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = self._mask(input_ids)
        expert = self._next_logits("expert", input_ids, mask)
        anti = self._next_logits("anti-expert", input_ids, mask)
        for role, logits in (("expert", expert), ("anti-expert", anti)):
            if logits.shape[-1] != scores.shape[-1]:
                raise VocabularyMismatchError(f"the base model gives {scores.shape[-1]} logits per token but "
                                              f"the {role} gives {logits.shape[-1]}; {SHARED}")
        steer = (expert.float() - anti.float()).to(scores.device)
        return (scores.float() + self.alpha * steer).to(scores.dtype)


def proxy_generate(base: nn.Module, expert: nn.Module, anti_expert: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, alpha: float = 1.0, tokenizer=None,
                   expert_tokenizer=None, anti_expert_tokenizer=None, **generate_kwargs) -> torch.Tensor:
    """Generate from `base` with proxy-tuned logits: base + alpha * (expert - anti_expert).

    Args:
        base: the large model (anything with Transformers `generate`).
        expert: the small tuned model; anti_expert: the same small model untuned.
        input_ids, attention_mask: the prompt, as for `generate`.
        alpha: steering strength.
        tokenizer, expert_tokenizer, anti_expert_tokenizer: when given, checked to share one vocabulary.
        **generate_kwargs: passed to `base.generate` (max_new_tokens, do_sample, num_beams, ...).

    Returns:
        The generated ids, as `base.generate` returns them.

    Raises:
        VocabularyMismatchError: the tokenizers, vocabulary sizes or logit widths differ.
    """
    if tokenizer is not None:
        check_same_vocabulary(tokenizer, expert_tokenizer, anti_expert_tokenizer)
    sizes = {"base": _vocab_size(base), "expert": _vocab_size(expert),
             "anti-expert": _vocab_size(anti_expert)}
    if None not in sizes.values() and len(set(sizes.values())) > 1:
        raise VocabularyMismatchError(f"vocabulary sizes differ: {sizes}; {SHARED}")
    processor = ProxyTuningLogitsProcessor(expert, anti_expert, alpha, attention_mask)
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(processor)
    if attention_mask is not None:
        generate_kwargs["attention_mask"] = attention_mask
    return base.generate(input_ids=input_ids, logits_processor=processors, **generate_kwargs)
