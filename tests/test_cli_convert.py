"""`deltatune convert --to lora`: a LoHa adapter becomes a LoRA that loads with (nearly) the same output."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.cli import main
from helpers_train import make_tiny_model_dir


def test_convert_loha_to_lora(tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    torch.manual_seed(0)
    config = dt.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False,
                           base_model_name_or_path=str(model_dir))
    loha = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).eval()
    loha.save_pretrained(tmp_path / "loha")
    # a LoHa update of rank r*r fits a LoRA of rank 4 exactly
    assert main(["convert", "--to", "lora", "--rank", "4", "--adapter", str(tmp_path / "loha"),
                 "--out", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out
    assert "LoRA written to" in printed and "warning" not in printed  # an exact fit: no warning
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "lora")
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, loha(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_poor_fit_is_warned_about(tmp_path, capsys):
    """An IA3 update (a scaled copy of the whole weight) at rank 1 keeps little of it: the report says so and
    names the way out; an exact fit (the LoHa case above) prints no warning."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    torch.manual_seed(0)
    config = dt.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                          init_ia3_weights=False, base_model_name_or_path=str(model_dir))
    dt.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(tmp_path / "ia3")
    assert main(["convert", "--to", "lora", "--rank", "1", "--adapter", str(tmp_path / "ia3"),
                 "--out", str(tmp_path / "lora")]) == 0
    assert "warning: the rank-1 LoRA misses" in capsys.readouterr().out
