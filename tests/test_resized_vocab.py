"""An adapter saved from a model with a resized vocabulary carries the rows reloading needs, in peft's
layout for saved embedding layers, or says at save what is missing (issue 14 item 6). The invariant:
save, then load onto a fresh base resized the same way, gives the saved model's logits exactly."""

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.io.adapter_files import AdapterFileError

IDS = torch.tensor([[1, 5, 32, 7, 32, 2]])  # 32: the added token


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)


def resized(base: LlamaForCausalLM, resize_seed: int) -> LlamaForCausalLM:
    """32 -> 33 tokens; the new rows are drawn at random, so two resizes give two different rows."""
    torch.manual_seed(resize_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.resize_token_embeddings(33)
    return base.eval()


def fresh(resize_seed: int, directory=None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(directory) if directory else LlamaForCausalLM(tiny_config())
    return resized(base, resize_seed)


def set_new_rows(base: LlamaForCausalLM) -> LlamaForCausalLM:
    with torch.no_grad():  # the user initialises the new token (e.g. from a related word)
        base.get_input_embeddings().weight[32] = 0.5
        base.get_output_embeddings().weight[32] = -0.3
    return base


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def saved_keys(directory) -> list[str]:
    return sorted(load_file(str(directory / "adapter_model.safetensors")))


def test_issue_replay_lora_on_resized_embedding_reloads_exactly(tmp_path):
    model = dt.get_peft_model(set_new_rows(fresh(resize_seed=1)),
                              dt.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    expected = logits(model)
    with pytest.warns(UserWarning, match=r"saving \['lm_head', 'model.embed_tokens'\] in full"):
        model.save_pretrained(str(tmp_path))
    # peft's layout for saved embedding layers: base_layer.weight under an adapter, .weight when plain
    assert {"base_model.model.model.embed_tokens.base_layer.weight",
            "base_model.model.lm_head.weight"} <= set(saved_keys(tmp_path))
    other_base = fresh(resize_seed=2)  # resized the same way, other random new rows
    assert (logits(dt.DeltaModel.from_pretrained(fresh(resize_seed=2), str(tmp_path), is_trainable=False))
            - expected).abs().max() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(other_base, str(tmp_path))  # peft reads the same file
    torch.testing.assert_close(logits(theirs), expected, atol=1e-6, rtol=1e-6)


@pytest.fixture
def published(tmp_path):
    """A base saved with its config.json (vocab_size 32), as a hub download would be."""
    torch.manual_seed(0)
    directory = tmp_path / "base"
    LlamaForCausalLM(tiny_config()).save_pretrained(str(directory))
    return directory


def test_resize_known_from_the_base_config_saves_untargeted_layers(tmp_path, published):
    model = dt.get_peft_model(set_new_rows(fresh(1, published)), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    expected = logits(model)
    with pytest.warns(UserWarning, match=r"the vocabulary was resized .*33 rows.*vocab_size=32"):
        model.save_pretrained(str(tmp_path / "adapter"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} \
        <= set(saved_keys(tmp_path / "adapter"))
    reloaded = dt.DeltaModel.from_pretrained(fresh(2, published), str(tmp_path / "adapter"))
    assert (logits(reloaded) - expected).abs().max() == 0
    # a base that was not resized: the error says what to do
    with pytest.raises(AdapterFileError, match=r"resize_token_embeddings\(33\)"):
        dt.DeltaModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(published)), str(tmp_path / "adapter"))


def test_unchanged_vocabulary_of_a_published_base_saves_no_full_layers(tmp_path, published):
    # the config.json rules a resize out, so the file stays small (peft would save the embedding anyway)
    base = LlamaForCausalLM.from_pretrained(str(published))
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(str(tmp_path / "adapter"))
    assert not [k for k in saved_keys(tmp_path / "adapter") if k.endswith("weight") and "lora" not in k]


def test_save_embedding_layers_false_warns_what_is_missing(tmp_path, published):
    model = dt.get_peft_model(fresh(1, published), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=r"save_embedding_layers=False: the vocabulary was resized.*leaves out "
                                         r"\['lm_head', 'model.embed_tokens'\]"):
        model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    assert all("lora_" in k for k in saved_keys(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="save_embedding_layers='yes'"):
        model.save_pretrained(str(tmp_path / "other"), save_embedding_layers="yes")
    assert not (tmp_path / "other").exists()


def test_save_embedding_layers_true_and_peft_written_resized_file(tmp_path, published):
    # peft, told the layers were resized (its "auto" reads the same config.json), writes .weight keys
    theirs = peft.get_peft_model(set_new_rows(fresh(1, published)),
                                 peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    expected = logits(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path / "peft"))
    assert "base_model.model.model.embed_tokens.weight" in saved_keys(tmp_path / "peft")
    ours = dt.DeltaModel.from_pretrained(fresh(2, published), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(ours), expected, atol=1e-6, rtol=1e-6)
    ours.save_pretrained(str(tmp_path / "ours"), save_embedding_layers=True)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(published)
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")


def test_a_trained_head_copy_of_a_published_base_saves_and_reloads(tmp_path, published):
    """modules_to_save=["lm_head"] on a base with a config.json at hand: the vocabulary check reads the head's
    rows through its modules_to_save wrapper (it raised AttributeError), and the trained copy reloads exactly."""
    model = dt.get_peft_model(LlamaForCausalLM.from_pretrained(str(published)),
                              dt.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.model.lm_head.copies["default"].weight.add_(0.5)
    model.save_pretrained(str(tmp_path / "adapter"))
    again = dt.DeltaModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(published)), str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 5, 9, 31]])  # the published vocabulary: 32 tokens
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
