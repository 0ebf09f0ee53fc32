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
    assert "LoRA written to" in capsys.readouterr().out
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "lora")
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, loha(ids).logits, atol=1e-4, rtol=1e-4)
