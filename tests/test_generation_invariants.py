"""Greedy `generate` == greedy decoding by repeated full forward passes on the growing sequence
(tests/invariants.py), for every method that takes over forward/generate (prompt tuning, P-tuning, prefix
tuning, LLaMA-Adapter, X-LoRA, AdapterFusion) on Llama, GPT-2 and T5 where it runs there, with randomized
adapter weights, on plain and left-padded batches, with and without the cache; LoRA as a control.

Replays issue 14 item 1: on Transformers 5.2x generate passes each step's cache as `cache`, not
`past_key_values`; a prefix was then dropped (generate printed the base model's tokens) and prompt tuning
re-inserted its virtual tokens at every step.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from adapted_models import MODEL_LEVEL, SUPPORTED, build, randomize
from invariants import assert_generate_matches_stepwise, greedy_stepwise, logits_of
from tiny_models import VOCAB, token_batch

GENERATION_CASES = [(m, f) for m in (*MODEL_LEVEL, "LORA") for f in SUPPORTED[m]]


def left_padded(batch: int = 3, length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_batch(batch=batch, length=length)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("method, family", GENERATION_CASES)
def test_generate_equals_stepwise_greedy_forward(method, family, tmp_path):
    model = build(method, family, tmp_path)
    ids = token_batch(batch=2, length=3)
    assert_generate_matches_stepwise(model, ids, torch.ones_like(ids), 6)
    assert_generate_matches_stepwise(model, *left_padded(), 6)


@pytest.mark.parametrize("method", ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT"])
def test_generate_without_cache_equals_stepwise_greedy_forward(method, tmp_path):
    """use_cache=False: every step is a full pass; virtual tokens and prefixes go in every time."""
    model = build(method, "llama", tmp_path)
    assert_generate_matches_stepwise(model, *left_padded(), 5, use_cache=False)


def one_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("config", [dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                    dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                    dt.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)],
                         ids=["prefix", "prompt", "ptuning"])
def test_issue_replay_soft_prompt_generation_follows_forward(config):
    """1-layer Llama, 2 random virtual tokens, 6 greedy tokens from a 3-token prompt: generate follows
    the adapted forward (which differs from the base), not the base model."""
    model = dt.get_peft_model(one_layer_llama(), config).eval()
    randomize(model, scale=1.0)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        adapted, base = logits_of(model(input_ids=ids)), logits_of(one_layer_llama()(input_ids=ids))
    assert (adapted[:, -1] - base[:, -1]).abs().max() > 0.05, "the prefix must move the logits"
    assert_generate_matches_stepwise(model, ids, torch.ones_like(ids), 6)


@pytest.mark.parametrize("method, message", [("PREFIX_TUNING", "without a cache of your own"),
                                             ("XLORA", "cannot reuse a cache")])
def test_a_cache_of_the_callers_own_is_refused_under_either_name(method, message, tmp_path):
    from transformers import DynamicCache

    model = build(method, "llama", tmp_path)
    ids = token_batch(batch=1, length=3)
    for keyword in ("cache", "past_key_values"):
        with pytest.raises(ValueError, match=message):
            model(input_ids=ids, **{keyword: DynamicCache()})


@pytest.mark.parametrize("method", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_eval_answers_do_not_depend_on_the_batch(method, tmp_path):
    """`deltatune eval`'s batched greedy answers (left-padded batches of different lengths) equal each
    prompt generated alone, and the stepwise greedy forward's."""
    from deltatune.train.evaluate import generate
    from test_methods_prompts import word_tokenizer

    tokenizer = word_tokenizer()
    tokenizer.pad_token = "w0"
    model = build(method, "llama", tmp_path)
    prompts = ["w5 w9 w3 w7 w8", "w4 w2", "w11 w12 w13"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    assert batched == [generate(model, tokenizer, [p], max_new_tokens=4, batch_size=1)[0] for p in prompts]
    for prompt, answer in zip(prompts, batched):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        expected = greedy_stepwise(model, ids, torch.ones_like(ids), 4)[0][0, ids.shape[1]:]
        assert answer == tokenizer.decode(expected, skip_special_tokens=True).strip()


@pytest.mark.parametrize("config", [dt.LoHaConfig(r=2, target_modules=["q_proj", "down_proj"], init_weights=False),
                                    dt.LoKrConfig(r=2, target_modules=["q_proj", "down_proj"], init_weights=False)],
                         ids=["loha", "lokr"])
def test_lycoris_update_is_built_once_per_generate_call(config, monkeypatch):
    """LoHa/LoKr build each layer's update once for a whole generate() call (it was rebuilt for every token,
    7.8x slower than needed on SmolLM2 all-linear r=16), and greedy generate still equals stepwise decoding."""
    from deltatune.core.layer import DeltaLayer
    from tiny_models import tiny_llama

    model = dt.get_peft_model(tiny_llama(), config).eval()
    adapter_class = type(next(m for m in model.modules() if isinstance(m, DeltaLayer)).adapters["default"])
    builds, make_delta = [], adapter_class.make_delta
    monkeypatch.setattr(adapter_class, "make_delta", lambda self: builds.append(1) or make_delta(self))
    ids = token_batch(batch=2, length=4)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert len(builds) == 2 * 2  # 2 layers x 2 targets, once each, not once per step
    builds.clear()
    assert_generate_matches_stepwise(model, ids, torch.ones_like(ids), max_new_tokens=6)
