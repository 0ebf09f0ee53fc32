"""A row's outputs do not depend on the padding of its batch (tests/invariants.py): the row alone equals
the row left-padded in a batch with a longer row, in forward (positions from the attention mask, as
generate numbers them) and in greedy generation, for every registered method on Llama, GPT-2 and T5 where
it runs there, with randomized adapter weights; soft prompts and prefixes on BERT (padded on the right).

Replays issue 14 item 2: 1-layer GPT-2, prompt tuning with 2 virtual tokens, first-step scores of [5, 6]
alone vs [0, 0, 5, 6] with mask [0, 0, 1, 1] differed by 0.16 (the virtual tokens went before the padding).
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from adapted_models import CASES, CONFIGS, build, randomize
from invariants import assert_padding_invariant
from tiny_models import tiny_bert_cls

ROW = torch.tensor([5, 6, 7, 9])


def extra_inputs(family: str) -> dict:
    return {"decoder_input_ids": torch.tensor([[0, 3, 8]])} if family == "t5" else {}


def test_every_registered_method_is_in_the_table():
    assert set(CONFIGS) == set(dt.registered_methods())


@pytest.mark.parametrize("method, family", CASES)
def test_row_alone_equals_row_left_padded_in_a_batch(method, family, tmp_path):
    model = build(method, family, tmp_path)
    assert_padding_invariant(model, ROW, pad_id=0, pad=2, **extra_inputs(family))
    assert_padding_invariant(model, ROW[:2], pad_id=0, pad=3, **extra_inputs(family))


@pytest.mark.parametrize("config", [dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                                    dt.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                                    dt.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)],
                         ids=["prompt", "ptuning", "prefix"])
def test_encoder_row_alone_equals_row_right_padded_in_a_batch(config):
    model = dt.get_peft_model(tiny_bert_cls(), config).eval()
    randomize(model)
    assert_padding_invariant(model, ROW, pad_id=0, pad=2, side="right")


def one_layer_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()


@pytest.mark.parametrize("config", [dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                    dt.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)],
                         ids=["prompt", "lora"])
def test_issue_replay_first_step_scores_do_not_depend_on_left_padding(config):
    model = dt.get_peft_model(one_layer_gpt2(), config).eval()
    settings = dict(max_new_tokens=1, do_sample=False, pad_token_id=0, output_logits=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        alone = model.generate(input_ids=torch.tensor([[5, 6]]), **settings).logits[0]
        padded = model.generate(input_ids=torch.tensor([[0, 0, 5, 6]]),
                                attention_mask=torch.tensor([[0, 0, 1, 1]]), **settings).logits[0]
    assert (alone - padded).abs().max() <= 1e-5


def test_prompt_positions_follow_given_position_ids():
    """Given position ids stay the row's own: [P, x] numbered 0..T+L-1 whatever the padding, so a forward
    with positions from the mask equals the unpadded row; without them the model numbers the sequence."""
    model = dt.get_peft_model(one_layer_gpt2(), dt.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                      num_virtual_tokens=2)).eval()
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([[5, 6]])).logits
        padded = model(input_ids=torch.tensor([[0, 0, 5, 6]]), attention_mask=torch.tensor([[0, 0, 1, 1]]),
                       position_ids=torch.tensor([[0, 0, 0, 1]])).logits
    assert padded.shape == (1, 6, 64)
    assert (alone - padded[:, 2:]).abs().max() <= 1e-5
