"""Evaluation: token loss and perplexity, and exact match (accuracy for classification) by generation."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.model import DeltaModel
from .data.formats import Sample
from .data.tokenize import IGNORE, Encoded, collate, model_inputs, prompt_text
from .linear_loss import chunked_loss_head, head_passed_over, linear_cross_entropy


def token_loss_sum(model, batch: dict[str, torch.Tensor], kernels: str = "none") -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens of a batch, and their count.

    Summing (rather than averaging per batch) lets the caller divide by the token count of a whole
    optimizer step, so the result does not depend on how the step is split into micro-batches or
    processes. The model runs through its own forward (a DeltaModel's, or DDP's around it) on every path,
    so one process and N processes compute the same loss the same way. `kernels`: "liger" takes the
    chunked path's loss from Liger's fused kernel (training.kernels, run/kernels.py).
    """
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    head = chunked_loss_head(model)
    if head is not None:  # no full logits tensor (linear_loss.py); the same numbers
        with head_passed_over(model):  # the model's own forward (DeltaModel's, DDP's): logits = hidden states
            hidden = model(**model_inputs(batch)).logits  # (B, T, d)
        loss = linear_cross_entropy(hidden[:, :-1].flatten(0, 1), head.weight, head.bias, targets.flatten(), kernels)
        return loss, int((targets != IGNORE).sum())
    logits = model(**model_inputs(batch)).logits
    if logits.dim() == 2:  # (B, classes): a sequence classifier; one class id per row (encode_classes)
        classes = batch["labels"][batch["labels"] != IGNORE]  # (B,), row order
        return F.cross_entropy(logits.float(), classes, reduction="sum"), int(classes.numel())
    logits = logits[:, -batch["input_ids"].shape[1]:]  # soft prompts prepend virtual positions
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def mean_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """token_loss_sum / labelled tokens: the loss `before_training` hooks (Child-Tuning_D's Fisher
    estimate) take as `loss_fn(model, batch)`."""
    loss, count = token_loss_sum(model, batch)
    return loss / max(1, count)


@torch.no_grad()
def eval_loss(
    model,
    examples: list[Encoded],
    pad_id: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast=nullcontext,
    progress: bool = True,
) -> dict[str, float]:
    """Mean loss per labelled token over `examples`, and its perplexity (a progress bar on stderr)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="eval loss", unit="batch", disable=not progress, leave=False,
                      dynamic_ncols=True):
        batch = collate(examples[start : start + batch_size], pad_id, device)
        with autocast():
            loss, n = token_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}


GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # every knob explicit (run_generate)


@torch.no_grad()
def generate_rows(model, tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device | str = "cpu",
                  sampling: dict | None = None, **options) -> torch.Tensor:
    """One batch of rendered prompts through `model.generate`, left padded: the new tokens (batch, new).

    The one decoding path of `generate` (below) and of `deltatune serve` (serve/engine.py), so both give the
    same greedy answer for a prompt. `options` go to `model.generate` as they are (adapter_names=,
    logits_processor=, stopping_criteria=, streamer=). A finished row is filled with the pad token (the EOS
    token when the tokenizer has none).
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the new tokens of every row start in the same column
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        **(sampling or GREEDY),
        **options,
    )
    return out[:, enc["input_ids"].shape[1] :]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    sampling: dict | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy completions for `prompts` (already rendered text), batched with left padding (generate_rows).

    Prompts are sorted by length so each batch pads little; answers come back in the input order.
    `sampling` replaces the greedy settings (do_sample, temperature, top_p, top_k) when given. The
    progress bar (stderr) counts answers and shows the tokens generated so far in the current batch, so a
    long batch visibly moves.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="answer", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            new = generate_rows(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, device, sampling,
                                **({"streamer": _TokenTicker(bar)} if progress else {}))
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                answers[i] = text.strip()
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return answers


class _TokenTicker:
    """A `generate(streamer=...)` that shows on the bar how many tokens the current batch has so far
    (generate hands it the prompt first, then each new token column)."""

    def __init__(self, bar) -> None:
        self.bar, self.calls = bar, 0

    def put(self, value) -> None:
        if self.calls:
            self.bar.set_postfix_str(f"token {self.calls}", refresh=self.calls % 8 == 0)
        self.calls += 1

    def end(self) -> None:
        self.calls = 0


def is_exact(prediction: str, reference: str) -> bool:
    """The exact-match rule: equal after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions equal to their reference after stripping surrounding whitespace."""
    if not references:
        return 0.0
    return 100.0 * sum(is_exact(p, r) for p, r in zip(predictions, references)) / len(references)


def prediction_rows(samples: list[Sample], predictions: list[str], tokenizer, chat: bool,
                    classifier: bool = False) -> list[dict]:
    """One record per scored sample, for `predictions.jsonl`: where the row came from, the prompt exactly
    as the model saw it (chat template included; a classifier's input text), the reference, the answer
    and whether they match.

    `predictions` are score_answers', one per sample that has a reference, in order.
    """
    scored = [s for s in samples if s.reference is not None]
    return [
        {
            "where": s.where,
            "prompt": s.messages[0]["content"] if classifier else prompt_text(s, tokenizer, chat),
            "reference": s.reference,
            "answer": answer,
            "exact_match": is_exact(answer, s.reference),
        }
        for s, answer in zip(scored, predictions)
    ]


def score_generation(
    model, tokenizer, samples: list[Sample], chat: bool, max_new_tokens: int, batch_size: int, device="cpu",
    progress: bool = True,
) -> tuple[dict[str, float], list[str]]:
    """Generate an answer for each sample with a reference and score it.

    Returns:
        ({"exact_match": %} or {"accuracy": %} for classification, plus "eval_samples"), predictions.
    """
    scored = [s for s in samples if s.reference is not None]
    if not scored:
        return {}, []
    prompts = [prompt_text(s, tokenizer, chat) for s in scored]
    predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, device, progress=progress)
    name = "accuracy" if scored[0].kind == "classification" else "exact_match"
    score = exact_match(predictions, [s.reference for s in scored])
    return {name: score, "eval_samples": len(scored)}, predictions


def _transformers_model(model):
    return model.model if isinstance(model, DeltaModel) else model


def is_sequence_classifier(model) -> bool:
    """Whether `model` (a DeltaModel or a plain Transformers model) ends in a sequence-classification head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    base = _transformers_model(model)
    config = getattr(base, "config", None)
    return config is not None and type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and (
        type(base) is MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    )


@torch.no_grad()
def score_classes(
    model, examples: list[Encoded], pad_id: int, batch_size: int, device="cpu", progress: bool = True
) -> tuple[dict[str, float], list[str]]:
    """Accuracy of a sequence classifier's argmax class against each example's class id
    (tokenize.encode_classes), and the predicted class names (the model config's id2label)."""
    was_training = model.training
    model.eval()
    id2label = _transformers_model(model).config.id2label
    predicted, correct = [], 0
    for start in tqdm(range(0, len(examples), batch_size), desc="classify", unit="batch", disable=not progress,
                      leave=False, dynamic_ncols=True):
        batch = collate(examples[start : start + batch_size], pad_id, device)
        logits = model(**model_inputs(batch)).logits  # (B, classes)
        classes = batch["labels"][batch["labels"] != IGNORE]
        best = logits.argmax(-1)
        correct += int((best == classes).sum())
        predicted += [id2label[int(i)] for i in best]
    model.train(was_training)
    return {"accuracy": 100.0 * correct / max(len(examples), 1), "eval_samples": len(examples)}, predicted


def score_answers(
    model, tokenizer, dataset, chat: bool, max_new_tokens: int, batch_size: int, device="cpu"
) -> tuple[dict[str, float], list[str]]:
    """Score a tokenized eval set (build.Dataset): a sequence classifier by its argmax class, any other
    model by generating an answer per sample (score_generation)."""
    if is_sequence_classifier(model):
        return score_classes(model, dataset.examples, tokenizer.pad_token_id, batch_size, device)
    return score_generation(model, tokenizer, dataset.samples, chat, max_new_tokens, batch_size, device)
